"""The MoE's slot sums: the gather_sum seam's row gather-sum, on one device.

Times in one process, at bench_h200's MoE (micro-batch 8 x 4096 tokens, top-6 of 64 experts:
N = 32,768 output rows summing K = 6 of M = 196,608 expert-sorted rows of D = 1536) unless
--shape says otherwise, for the two uses in the layer: the forward combine (bf16 rows summed
into fp32, `slot_sum`) and the dispatch gather's backward (bf16 into bf16, `permuted_rows`):
  reference   the jnp form (kernels.gather_sum=reference): XLA gathers [N,K,D], widens, reduces
  pallas      the Triton kernel (v4jax/kernels/gather_sum/gpu.py; interpret mode off GPU), one
              row per (--block_n, --block_d, --num_warps) combination
  copy        the same sum over rows in place order, x.reshape(N, K, D).sum(1): the same bytes
              without the gather, the floor's yardstick
Each row: median ms over --iters calls after a compile call, GB/s = (the K gathered rows read +
the output written) / time, and the largest difference from the reference's output.

  python tools/bench_gather_sum.py --out bench_gather_sum.json              # GPU
  python tools/bench_gather_sum.py --block_n 8,16,32 --block_d 256,512,1024 --num_warps 2,4,8 \\
      --out bench_gather_sum_sweep.json                                    # GPU: the sweep
  python tools/bench_gather_sum.py --smoke                                 # any backend
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
from v4jax.kernels import gather_sum  # noqa: E402
from v4jax.kernels.gather_sum import gpu  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ints = lambda s: [int(x) for x in s.split(',')]
  ap.add_argument('--shape', type=ints, default=[32768, 6, 1536], help='N,K,D (M = N*K)')
  ap.add_argument('--block_n', type=ints, default=[gpu.DEFAULT.block_n])
  ap.add_argument('--block_d', type=ints, default=[gpu.DEFAULT.block_d])
  ap.add_argument('--num_warps', type=ints, default=[gpu.DEFAULT.num_warps])
  ap.add_argument('--iters', type=int, default=20)
  ap.add_argument('--smoke', action='store_true', help='tiny shapes, any backend')
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  if len(args.shape) != 3:
    ap.error(f'--shape: expected N,K,D, got {args.shape}')
  N, K, D = (24, 3, 64) if args.smoke else args.shape
  M, iters = N * K, (2 if args.smoke else args.iters)
  dev = jax.devices()[0]
  report = BenchReport(args.out, iters=iters, shape=dict(N=N, K=K, D=D, M=M))
  rows = report.rows
  print(f'jax {jax.__version__}, {dev.platform} {dev.device_kind}, N={N} K={K} D={D} M={M}')
  k = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(k[0], (M, D), jnp.float32).astype(jnp.bfloat16)
  idx = jax.random.permutation(k[1], M).astype(jnp.int32).reshape(N, K)   # a slot order

  def record(row, s, out_bytes):
    nbytes = M * D * 2 + N * D * out_bytes
    row.update(ms=s * 1e3, gbps=nbytes / s / 1e9)
    report.add(row)
    opts = ' '.join(f'{k}={row[k]}' for k in ('block_n', 'block_d', 'num_warps') if k in row)
    diff = f"diff {row['diff']:.1e}" if 'diff' in row else ''
    print(f"{row['use']:<9} {row['name']:<10} {row['ms']:8.3f} ms {row['gbps']:7.0f} GB/s "
          f"{diff} {opts}", flush=True)

  interpret = dev.platform != 'gpu'
  for use, out_dtype in (('combine', jnp.float32), ('dispatch', jnp.bfloat16)):
    ob = jnp.dtype(out_dtype).itemsize
    copy = jax.jit(lambda x: jnp.sum(x.reshape(N, K, D).astype(jnp.float32), 1).astype(out_dtype))
    record({'use': use, 'name': 'copy'}, median_seconds(copy, x, iters=iters), ob)
    ref = jax.jit(lambda x, i: gather_sum.gather_sum(x, i, out_dtype, impl='reference'))
    want = ref(x, idx).astype(jnp.float32)
    record({'use': use, 'name': 'reference'}, median_seconds(ref, x, idx, iters=iters), ob)
    for bn, bd, nw in itertools.product(args.block_n, args.block_d, args.num_warps):
      blocks = gpu.Blocks(bn, bd, nw)
      f = jax.jit(lambda x, i, blocks=blocks: gpu.gather_sum(x, i, out_dtype, blocks,
                                                             interpret=interpret))
      try:
        got = f(x, idx)
      except Exception as e:      # a tiling the GPU rejects
        print(f'pallas {blocks}: {type(e).__name__}: {str(e).splitlines()[0][:200]}', flush=True)
        continue
      row = {'use': use, 'name': 'pallas', 'block_n': bn, 'block_d': bd, 'num_warps': nw,
             'diff': float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))}
      record(row, median_seconds(f, x, idx, iters=iters), ob)
  for use in ('combine', 'dispatch'):
    mine = [r for r in rows if r['use'] == use]
    best = min((r for r in mine if r['name'] == 'pallas'), key=lambda r: r['ms'], default=None)
    if best:
      ref_ms = next(r['ms'] for r in mine if r['name'] == 'reference')
      print(f"{use}: best pallas {best['ms']:.3f} ms vs reference {ref_ms:.3f} ms "
            f"({ref_ms / best['ms']:.2f}x); copy {mine[0]['ms']:.3f} ms")


if __name__ == '__main__':
  main()
