"""What the backward keeps: the residuals of a config's train loss at its real shapes, on a CPU.

jax's own report (`jax.ad_checkpoint.print_saved_residuals`) of one micro-batch's loss, traced
with abstract parameters (nothing is allocated or compiled, so a 5.6B-parameter preset traces in
under a minute on a laptop), summed by where each residual comes from, largest first. It is the
memory side of `model.remat`, `model.remat_save` and `model.remat_recompute`: run it before and
after a change to see what the change frees or costs per micro-batch, then time it on the device.

  python tools/remat_report.py --config configs/bench_h200.py
  python tools/remat_report.py --config configs/bench_h200.py \\
      "--config.model.remat_recompute=('mla_up','indexer_q','ffn_in')" --out r.json

Kernels: `--kernels=gpu` (default) traces the GPU kernels' custom VJPs (Pallas seams set to
`pallas`, traced in interpret mode; their residuals are the compiled kernels'), with the grouped
matmul as `lax.ragged_dot` (the Mosaic-GPU seam keeps the same inputs); `--kernels=config`
takes the config's seams as resolved on this machine. Engram tables are traced in HBM
(`engram.table_memory=device`): host tables change the step's inputs, not the residuals. With
`model.scan_layers` the residuals of a run of blocks show as one stacked array.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Preset file, e.g. configs/tiny.py.',
                                          lock_config=True)
_KERNELS = flags.DEFINE_enum('kernels', 'gpu', ['gpu', 'config'],
                             "gpu: the GPU kernels' residuals; config: the config's seams here.")
_BATCH = flags.DEFINE_integer('batch', 0, 'Sequences per micro-batch (0: data.global_batch / '
                              'train.grad_accum, the whole micro-batch on one device).')
_TOP = flags.DEFINE_integer('top', 25, 'Sources to list.')
_OUT = flags.DEFINE_string('out', None, 'Write the report as JSON here.')
flags.mark_flags_as_required(['config'])

_BYTES = {'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 'i64': 8, 'i32': 4, 'u32': 4, 'i16': 2,
          'u16': 2, 'i8': 1, 'u8': 1, 'bool': 1}
_LINE = re.compile(r'(\w+)\[([\d,]*)\] (.*)')


def residual_lines(cfg, batch: int) -> list[str]:
  """jax's report lines for one micro-batch of `batch` sequences of the (validated) config."""
  import jax
  import jax.ad_checkpoint
  from flax import nnx

  from v4jax.data.pipeline import batch_fields
  from v4jax.model.transformer import Transformer
  from v4jax.trainer import engram_setup

  _, rows = engram_setup(cfg, None)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0),
                                             engram_rows_per_layer=rows))
  gdef, params, rest = nnx.split(model, nnx.Param, ...)
  inputs = {k: jax.ShapeDtypeStruct(shape, dt)
            for k, (shape, dt) in batch_fields(cfg, batch).items()}
  loss = lambda p, b: nnx.merge(gdef, p, rest)(b, 0.5)[0]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(loss, params, inputs)
  return out.getvalue().splitlines()


def summarize(lines: list[str]) -> dict:
  """Residual bytes by source (what jax names after the shape), arguments apart."""
  by_source, args, n = collections.Counter(), 0, collections.Counter()
  for ln in lines:
    m = _LINE.match(ln)
    if not m:
      continue
    dt, dims, what = m.groups()
    size = _BYTES.get(dt, 4)
    for d in filter(None, dims.split(',')):
      size *= int(d)
    if what.startswith('from the argument'):
      args += size
      continue
    key = re.sub(r' from .*/(v4jax/[^:]+):\d+:\d+ ', r' from \1 ', f'{dt}[{dims}] {what}')
    by_source[key] += size
    n[key] += 1
  return {'residual_bytes': sum(by_source.values()), 'argument_bytes': args,
          'sources': [{'residual': k, 'count': n[k], 'bytes': b}
                      for k, b in by_source.most_common()]}


def main(argv):
  del argv
  from v4jax.config import validate
  cfg = _CONFIG.value
  cfg.engram.table_memory = 'device'
  if _KERNELS.value == 'gpu':
    for field in ('impl', 'attention', 'sinkhorn', 'hc_mix', 'xent'):
      cfg.kernels[field] = 'pallas'
    cfg.kernels.grouped_matmul = 'ragged_dot'
  cfg = validate(cfg)
  batch = _BATCH.value or cfg.data.global_batch // cfg.train.grad_accum
  rep = summarize(residual_lines(cfg, batch))
  rep.update(config=config_flags.get_config_filename(flags.FLAGS['config']), batch=batch,
             seq_len=cfg.data.seq_len, kernels=_KERNELS.value, remat=cfg.model.remat,
             remat_save=list(cfg.model.remat_save),
             remat_recompute=list(cfg.model.remat_recompute))
  print(f'micro-batch {batch} x {cfg.data.seq_len}, remat={cfg.model.remat}, '
        f'remat_save={cfg.model.remat_save}, remat_recompute={cfg.model.remat_recompute}, '
        f'kernels={_KERNELS.value}')
  print(f'residuals kept for the backward: {rep["residual_bytes"] / 1e9:.2f} GB '
        f'(arguments, not counted: {rep["argument_bytes"] / 1e9:.2f} GB)')
  print(f'{"MB":>9} {"n":>3}  residual')
  for s in rep['sources'][:_TOP.value]:
    print(f'{s["bytes"] / 1e6:9.1f} {s["count"]:3d}  {s["residual"][:150]}')
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(rep, f, indent=1)


if __name__ == '__main__':
  app.run(main)
