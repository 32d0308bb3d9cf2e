#!/usr/bin/env python3
"""Train and validation loss curves of several runs in one PNG, and a Markdown summary table.

  python tools/plot_runs.py --runs runs/ablate/baseline runs/ablate/dsa --out docs/ablations.png \\
      [--table docs/ablations_table.md] [--smooth 0.6] [--labels baseline dsa]

Each run is a training workdir (`python -m v4jax.train --workdir DIR`) holding `metrics.jsonl`:
train rows carry `loss` and `tokens_per_sec`, eval rows `eval_loss`. A step logged twice (a run
resumed from an older checkpoint) keeps its last row. Train loss is drawn raw (faint) and as an
exponential moving average (`--smooth`, debiased like TensorBoard's); validation loss as points.

Table columns: final train loss (the last logged step), its EMA, final eval loss, median tokens/s
(the first logged window, which includes compilation, is left out when there are others), and
total / active parameters from `v4jax.flops.param_counts` of the run's config, read from its
newest checkpoint (`n/a` when the run has no checkpoint). The table is printed, and written to
`--table` when given.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RunError(RuntimeError):
  """A run directory cannot be read; the message names the file and the problem."""


def read_metrics(run_dir: str) -> tuple[dict[int, dict], dict[int, float]]:
  """({step: train row}, {step: eval_loss}) of one run; the last row wins for a repeated step."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.isdir(run_dir):
    raise RunError(f'{run_dir}: no such run directory')
  if not os.path.isfile(path):
    raise RunError(f'{path}: missing (is {run_dir} a training --workdir that has logged a step?)')
  train, evals = {}, {}
  with open(path, encoding='utf-8') as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step = int(row['step'])
      except (ValueError, KeyError, TypeError) as e:
        raise RunError(f'{path}:{i}: not a metrics row ({type(e).__name__}: {e})') from None
      if row.get('loss') is not None:
        train[step] = row
      if row.get('eval_loss') is not None:
        evals[step] = float(row['eval_loss'])
  if not train:
    raise RunError(f'{path}: no train rows (rows with a finite "loss")')
  return dict(sorted(train.items())), dict(sorted(evals.items()))


def ema(values: list[float], alpha: float) -> list[float]:
  """Debiased exponential moving average with weight `alpha` on the past (0 = no smoothing)."""
  if not 0 <= alpha < 1:
    raise ValueError(f'--smooth={alpha} must be in [0, 1)')
  out, acc, norm = [], 0.0, 0.0
  for v in values:
    acc, norm = alpha * acc + (1 - alpha) * v, alpha * norm + (1 - alpha)
    out.append(acc / norm)
  return out


def run_config(run_dir: str):
  """The run's config (ConfigDict) from its newest checkpoint's meta, or None."""
  steps = []
  for p in glob.glob(os.path.join(run_dir, 'checkpoints', '*', 'meta', 'metadata')):
    step = os.path.basename(os.path.dirname(os.path.dirname(p)))
    if step.isdigit():
      steps.append((int(step), p))
  if not steps:
    return None
  path = max(steps)[1]
  try:
    with open(path, encoding='utf-8') as f:
      cfg = json.loads(json.load(f)['config'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise RunError(f'{path}: cannot read the config ({type(e).__name__}: {e})') from None
  import ml_collections
  return ml_collections.ConfigDict(cfg)


def summarize(run_dir: str, label: str, smooth: float) -> dict:
  train, evals = read_metrics(run_dir)
  steps = list(train)
  losses = [float(train[s]['loss']) for s in steps]
  tps = [float(r['tokens_per_sec']) for r in train.values() if r.get('tokens_per_sec')]
  if len(tps) > 1:
    tps = tps[1:]
  cfg = run_config(run_dir)
  counts = None
  if cfg is not None:
    from v4jax.flops import param_counts
    counts = param_counts(cfg)
  return {'label': label, 'dir': run_dir, 'steps': steps, 'loss': losses,
          'loss_ema': ema(losses, smooth), 'evals': evals,
          'tokens_per_sec': statistics.median(tps) if tps else math.nan, 'params': counts}


def _fmt(x, spec):
  return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(runs: list[dict], smooth: float) -> str:
  head = ['run', 'steps', 'final train loss', f'train loss EMA({smooth:g})', 'final eval loss',
          'tokens/s (median)', 'params total', 'params active']
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '|'.join(['---'] + ['---:'] * (len(head) - 1)) + '|']
  for r in runs:
    last_eval = r['evals'][max(r['evals'])] if r['evals'] else None
    p = r['params']
    lines.append('| ' + ' | '.join([
        r['label'], str(r['steps'][-1]), _fmt(r['loss'][-1], '.4f'), _fmt(r['loss_ema'][-1], '.4f'),
        _fmt(last_eval, '.4f'), _fmt(r['tokens_per_sec'], ',.0f'),
        _fmt(p.total if p else None, ','), _fmt(p.active if p else None, ',')]) + ' |')
  return '\n'.join(lines)


def plot(runs: list[dict], out: str, smooth: float, title: str = ''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, r in enumerate(runs):
    c = colors[i % len(colors)]
    ax_t.plot(r['steps'], r['loss'], color=c, alpha=0.25, lw=1)
    ax_t.plot(r['steps'], r['loss_ema'], color=c, lw=1.8, label=r['label'])
    if r['evals']:
      ax_e.plot(list(r['evals']), list(r['evals'].values()), color=c, marker='o', lw=1.5,
                label=r['label'])
  ax_t.set(title=f'train loss (faint: logged steps; line: EMA {smooth:g})', xlabel='step',
           ylabel='LM loss (nats/token)')
  ax_e.set(title='validation loss', xlabel='step', ylabel='LM loss (nats/token)')
  for ax in (ax_t, ax_e):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(runs: list[str], out: str, table_path: str | None = None, smooth: float = 0.6,
         labels: list[str] | None = None, title: str = '') -> str:
  """Reads every run, draws the PNG, returns (and optionally writes) the Markdown table."""
  if not runs:
    raise RunError('no runs given')
  if labels is not None and len(labels) != len(runs):
    raise RunError(f'--labels has {len(labels)} names for {len(runs)} runs')
  labels = labels or [os.path.basename(os.path.normpath(r)) for r in runs]
  ema([], smooth)   # validates --smooth before any reading
  data = [summarize(r, l, smooth) for r, l in zip(runs, labels)]
  plot(data, out, smooth, title)
  md = table(data, smooth)
  if table_path:
    os.makedirs(os.path.dirname(os.path.abspath(table_path)), exist_ok=True)
    with open(table_path, 'w', encoding='utf-8') as f:
      f.write(md + '\n')
  return md


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--runs', nargs='+', required=True, metavar='DIR',
                 help='training workdirs, each with metrics.jsonl')
  p.add_argument('--out', required=True, metavar='PNG', help='output image')
  p.add_argument('--table', metavar='MD', help='also write the Markdown table here')
  p.add_argument('--smooth', type=float, default=0.6, help='EMA weight on the past, in [0, 1)')
  p.add_argument('--labels', nargs='+', help='legend names (default: directory names)')
  p.add_argument('--title', default='', help='figure title')
  return p.parse_args(argv)


if __name__ == '__main__':
  a = parse_args()
  try:
    print(main(a.runs, a.out, a.table, a.smooth, a.labels, a.title))
  except (RunError, ValueError) as err:
    sys.exit(f'plot_runs: {err}')
