"""The LM head's cross entropy per chunk: the xent seam's loss + logits gradient, on one device.

Times in one process, at bench_h200's chunk (micro-batch 8 x logits_chunk 1024 rows, vocabulary
129,280, bf16 logits) unless --shape says otherwise:
  reference   the jnp form (kernels.xent=reference): XLA's max, sum of exponentials and
              gradient passes over the logits
  pallas      the Triton kernel (v4jax/kernels/xent/gpu.py; interpret mode off GPU), one row per
              (--block_m, --block_v, --num_warps, --num_stages, --programs) combination
  copy        the logits read once and written once (x + 1 in bf16): the floor's yardstick
Each row: median ms over --iters calls after a compile call, GB/s = (one read of the logits +
one write of the gradient) / time, the same floor at the copy's measured rate as a fraction of
the row's time, and the largest difference of the loss and of the gradient from the reference's.

  python tools/bench_xent.py --out bench_xent.json                       # GPU
  python tools/bench_xent.py --block_m 1,2,4 --block_v 2048,4096,8192 --num_warps 4,8,16 \
      --out bench_xent_sweep.json                                          # GPU: the sweep
  python tools/bench_xent.py --block_v 4096,8192 --num_warps 8,16 --num_stages 1,2 \
      --programs 0,132,264,528 --out bench_xent_programs.json              # GPU: rows in flight
  python tools/bench_xent.py --smoke                                       # any backend
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from v4jax.cli import BenchReport, median_seconds  # noqa: E402
from v4jax.kernels import xent  # noqa: E402
from v4jax.kernels.xent import gpu  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ints = lambda s: [int(x) for x in s.split(',')]
  ap.add_argument('--shape', type=ints, default=[8, 1024, 129280], help='B,C,V')
  ap.add_argument('--block_m', type=ints, default=[gpu.DEFAULT.block_m])
  ap.add_argument('--block_v', type=ints, default=[gpu.DEFAULT.block_v])
  ap.add_argument('--num_warps', type=ints, default=[gpu.DEFAULT.num_warps])
  ap.add_argument('--num_stages', type=ints, default=[gpu.DEFAULT.num_stages])
  ap.add_argument('--programs', type=ints, default=[gpu.DEFAULT.programs],
                  help='programs walking the row blocks (0 = one per block)')
  ap.add_argument('--iters', type=int, default=20)
  ap.add_argument('--smoke', action='store_true', help='tiny shapes, any backend')
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  if len(args.shape) != 3:
    ap.error(f'--shape: expected B,C,V, got {args.shape}')
  B, C, V = (2, 8, 1000) if args.smoke else args.shape
  iters = 2 if args.smoke else args.iters
  dev = jax.devices()[0]
  report = BenchReport(args.out, iters=iters, shape=dict(B=B, C=C, V=V))
  rows = report.rows
  print(f'jax {jax.__version__}, {dev.platform} {dev.device_kind}, B={B} C={C} V={V}')
  k = jax.random.split(jax.random.key(0), 3)
  logits = (4 * jax.random.normal(k[0], (B, C, V), jnp.float32)).astype(jnp.bfloat16)
  tgt = jax.random.randint(k[1], (B, C), 0, V)
  w = (jax.random.uniform(k[2], (B, C)) > 0.1).astype(jnp.float32)
  nbytes = 2 * logits.size * logits.dtype.itemsize      # one read + one write

  def record(row, ms):
    row.update(ms=ms * 1e3, gbps=nbytes / ms / 1e9)
    report.add(row)
    opts = ' '.join(f'{k}={row[k]}' for k in ('block_m', 'block_v', 'num_warps', 'num_stages',
                                               'programs') if k in row)
    diff = f"loss {row['loss_diff']:.1e} grad {row['grad_diff']:.1e}" if 'grad_diff' in row \
        else ''
    print(f"{row['name']:<10} {row['ms']:8.3f} ms {row['gbps']:7.0f} GB/s {diff} {opts}",
          flush=True)

  copy = jax.jit(lambda x: x + jnp.ones((), x.dtype))
  record({'name': 'copy'}, median_seconds(copy, logits, iters=iters))
  ref = jax.jit(lambda l, t, w: xent.nll_and_grad(l, t, w, impl='reference'))
  want = ref(logits, tgt, w)
  record({'name': 'reference'}, median_seconds(ref, logits, tgt, w, iters=iters))
  interpret = dev.platform != 'gpu'
  for bm, bv, nw, ns, pr in itertools.product(args.block_m, args.block_v, args.num_warps,
                                              args.num_stages, args.programs):
    blocks = gpu.Blocks(bm, bv, nw, ns, pr)
    def f(l, t, w, blocks=blocks):
      lse, tg, d = gpu.lse_target_grad(l, t, w, blocks, interpret=interpret)
      return jnp.sum((lse - tg) * w), d
    f = jax.jit(f)
    try:
      got = f(logits, tgt, w)
    except Exception as e:      # a tiling the GPU rejects (registers, shared memory)
      print(f'pallas {blocks}: {type(e).__name__}: {str(e).splitlines()[0][:200]}', flush=True)
      continue
    row = {'name': 'pallas', 'block_m': bm, 'block_v': bv, 'num_warps': nw, 'num_stages': ns,
           'programs': pr,
           'loss_diff': float(abs(got[0] - want[0]) / abs(want[0])),
           'grad_diff': float(jnp.max(jnp.abs(got[1].astype(jnp.float32) -
                                              want[1].astype(jnp.float32))))}
    record(row, median_seconds(f, logits, tgt, w, iters=iters))
  floor = rows[0]['ms']
  for r in rows[1:]:
    r['floor_frac'] = floor / r['ms']
  best = min((r for r in rows if r['name'] == 'pallas'), key=lambda r: r['ms'], default=None)
  if best:
    print(f"best pallas {best['ms']:.3f} ms vs reference {rows[1]['ms']:.3f} ms "
          f"({rows[1]['ms'] / best['ms']:.2f}x); copy floor {floor:.3f} ms "
          f"({floor / best['ms']:.0%} of the best)")
  report.save()


if __name__ == '__main__':
  main()
