"""Grouped matmul (the MoE expert FFN's GEMM) against a dense bf16 matmul of the same FLOPs.

For each expert shape (bench-1B: E=64 experts, D=1536, d_e=1024, 16K tokens x top-6 slots;
DeepSeek-V3 local slice: 32 of 256 experts on one GPU, D=7168, d_e=2048, 32K slots) and each
routing (balanced: equal group sizes; skewed: Zipf(1) group sizes), this times in one process:
  dense    x[M,K] @ w[K,N]                              (the ceiling)
  mgpu     v4jax grouped_matmul impl=mgpu (Mosaic-GPU ragged_dot + custom VJP)
  ragged   jax.lax.ragged_dot (XLA's reference lowering)
forward (y) and forward+backward (y, dx, dw via jax.vjp with a bf16 cotangent: 3 GEMMs), for the
up-projection (K=D, N=d_e) and the down-projection (K=d_e, N=D). TFLOP/s count 2*M*K*N per GEMM.

  python tools/bench_moe.py --out bench.json            # GPU
  python tools/bench_moe.py --smoke --out smoke.json    # any backend, tiny shapes, seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from v4jax.cli import median_seconds  # noqa: E402
from v4jax.kernels.grouped_matmul import grouped_matmul, resolve_impl  # noqa: E402

SHAPES = {   # name: (groups, slots M, model dim D, expert dim F)
    'v3_local32': (32, 32768, 7168, 2048),
    'bench1b': (64, 16384 * 6, 1536, 1024),
}
SMOKE = {'smoke': (8, 512, 128, 64)}


def group_sizes(G: int, M: int, kind: str) -> np.ndarray:
  """balanced: M/G each; skewed: Zipf(1) over experts (largest ~ M / ln G), summing to M."""
  if kind == 'balanced':
    w = np.ones(G)
  else:
    w = 1.0 / np.arange(1, G + 1)
  s = np.floor(w / w.sum() * M).astype(np.int32)
  s[0] += M - s.sum()
  return s


def fns(impl: str, sizes):
  """(forward, forward+backward) jitted functions of (x, w[, dy]) for one impl."""
  # bf16 results (fp32 accumulation inside the GEMM): with preferred_element_type=f32 and a
  # cast, the cotangent would be f32 and the backward GEMMs mixed f32 x bf16 (slow on GPU)
  if impl == 'dense':
    f = lambda x, w: jnp.dot(x, w[0])
  elif impl == 'ragged':
    f = lambda x, w: jax.lax.ragged_dot(x, w, sizes)
  else:
    f = lambda x, w: grouped_matmul(x, w, sizes, impl=impl, preferred_element_type=x.dtype)

  def fb(x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y,) + vjp(dy)
  return jax.jit(f), jax.jit(fb)


def bench_case(name, G, M, K, N, routing, impls, iters, dtype, no_bwd=()):
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(M, K).astype(np.float32), dtype)
  w = jnp.asarray((rs.randn(G, K, N) / np.sqrt(K)).astype(np.float32), dtype)
  dy = jnp.asarray(rs.randn(M, N).astype(np.float32), dtype)
  sizes = jnp.asarray(group_sizes(G, M, routing))
  flops = 2.0 * M * K * N
  rows = []
  for impl in impls:
    fwd, fb = fns(impl, sizes)
    row = {'shape': name, 'G': G, 'M': M, 'K': K, 'N': N, 'routing': routing, 'impl': impl}
    try:
      t_f = median_seconds(fwd, x, w, iters=iters)
      row.update(fwd_ms=t_f * 1e3, fwd_tflops=flops / t_f / 1e12)
      if impl not in no_bwd:
        t_fb = median_seconds(fb, x, w, dy, iters=iters)
        row.update(fwdbwd_ms=t_fb * 1e3, fwdbwd_tflops=3 * flops / t_fb / 1e12)
    except Exception as e:  # noqa: BLE001 - one failing impl must not hide the others
      row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
    rows.append(row)
  dense = next((r for r in rows if r['impl'] == 'dense' and 'fwd_ms' in r), None)
  for r in rows:
    if dense and 'fwd_ms' in r:
      r['fwd_vs_dense'] = dense['fwd_ms'] / r['fwd_ms']
    if dense and 'fwdbwd_ms' in r:
      r['fwdbwd_vs_dense'] = dense['fwdbwd_ms'] / r['fwdbwd_ms']
  return rows


def table(rows) -> str:
  head = (f"{'shape':<11} {'gemm':<5} {'routing':<9} {'impl':<7} {'fwd ms':>8} {'TFLOP/s':>8} "
          f"{'vs dense':>8} {'f+b ms':>8} {'TFLOP/s':>8} {'vs dense':>8}")
  out = [head, '-' * len(head)]
  for r in rows:
    pre = f"{r['shape']:<11} {r['gemm']:<5} {r['routing']:<9} {r['impl']:<7}"
    if 'error' in r:
      out.append(f"{pre} {r['error']}")
      continue
    bwd = (f"{r['fwdbwd_ms']:8.3f} {r['fwdbwd_tflops']:8.1f} {r.get('fwdbwd_vs_dense', 0):8.1%}"
           if 'fwdbwd_ms' in r else f"{'-':>8} {'-':>8} {'-':>8}")
    out.append(f"{pre} {r['fwd_ms']:8.3f} {r['fwd_tflops']:8.1f} {r.get('fwd_vs_dense', 0):8.1%} "
               + bwd)
  return '\n'.join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--smoke', action='store_true', help='tiny shapes, any backend')
  ap.add_argument('--shapes', default=','.join(SHAPES), help=f'subset of {list(SHAPES)}')
  ap.add_argument('--impls', default='dense,mgpu,ragged')
  ap.add_argument('--iters', type=int, default=10)
  ap.add_argument('--ragged_full', action='store_true',
                  help='also time lax.ragged_dot forward+backward and on skewed routing (slow on '
                  'GPU: forward on balanced routing only by default)')
  ap.add_argument('--out', default=None, help='write the rows as JSON here')
  args = ap.parse_args()
  shapes = SMOKE if args.smoke else {k: SHAPES[k] for k in args.shapes.split(',')}
  impls = args.impls.split(',')
  dtype = jnp.bfloat16
  if 'mgpu' in impls and resolve_impl('auto', dtype) != 'mgpu':
    print(f'mgpu skipped: needs a Hopper GPU (backend {jax.default_backend()})')
    impls.remove('mgpu')
  iters = 2 if args.smoke else args.iters
  dev = jax.devices()[0]
  print(f'jax {jax.__version__}, {dev.platform} {dev.device_kind}', flush=True)
  meta = {'jax': jax.__version__, 'device': dev.device_kind, 'platform': dev.platform,
          'date': datetime.date.today().isoformat(), 'iters': iters, 'dtype': 'bfloat16'}
  rows = []
  for name, (G, M, D, F) in shapes.items():
    for gemm, (K, N) in (('up', (D, F)), ('down', (F, D))):
      for routing in ('balanced', 'skewed'):
        full = args.ragged_full or args.smoke
        use = [i for i in impls if full or not (i == 'ragged' and routing == 'skewed')]
        for r in bench_case(name, G, M, K, N, routing, use, iters, dtype,
                            no_bwd=() if full else ('ragged',)):
          r['gemm'] = gemm
          rows.append(r)
          print(table([r]).splitlines()[-1], flush=True)
        if args.out:   # after every case, so a run cut short still leaves its rows
          with open(args.out, 'w') as f:
            json.dump({'meta': meta, 'rows': rows}, f, indent=1)
  print()
  print(table(rows))


if __name__ == '__main__':
  main()
