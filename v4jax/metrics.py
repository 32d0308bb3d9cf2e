"""Metric writers: console line with ETA, `metrics.jsonl`, TensorBoard events.

Every log step writes one JSON object per line to `<workdir>/metrics.jsonl` with at least `step`,
`loss`, `tokens_per_sec`, `tflops_per_device`, `mfu` (None where the device peak is unknown, e.g.
CPU); eval rows carry `eval_loss`. Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time


def _fmt(v):
  if v is None:
    return 'n/a'
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


class MetricWriter:
  def __init__(self, workdir: str, tensorboard: bool = True, progress: bool = True,
               enabled: bool = True, total_steps: int = 0):
    self.enabled = enabled
    self.progress = progress
    self.total_steps = total_steps
    self.t0 = time.time()
    self.start_step = None
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:
        print('tensorboardX is not installed: TensorBoard events are off', file=sys.stderr)

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time()}
    for k, v in scalars.items():
      if v is None:
        row[k] = None
      else:
        v = float(v) if not isinstance(v, (int, str)) else v
        row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k not in ('step', 'time') and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self.progress:
      print(self.line(step, row), flush=True)

  def line(self, step, row) -> str:
    if self.start_step is None:
      self.start_step, self.t0 = step, time.time()
    keys = [k for k in ('loss', 'eval_loss', 'grad_norm', 'lr', 'tokens_per_sec',
                        'tflops_per_device', 'mfu', 'skipped') if k in row]
    body = ' '.join(f'{k}={_fmt(row[k])}' for k in keys)
    eta = ''
    if self.total_steps and step > self.start_step:
      rate = (time.time() - self.t0) / (step - self.start_step)
      eta = f' eta={max(self.total_steps - step, 0) * rate:.0f}s'
    return f'[step {step}/{self.total_steps}] {body}{eta}'

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
