"""mHC's per-site cost: Sinkhorn and one hyper-connection site, forward + backward, on one device.

Times in one process, at the peer model's mHC shapes (B x T tokens, N streams, width D):
  sinkhorn        v4jax.model.mhc.sinkhorn on [B,T,N,N] logits (custom VJP, recomputing)
  loop, unrolled_reduce, unrolled_adds
                  the same iterations written three ways (CANDIDATES), plain autodiff: which
                  formulation the GPU runs fastest (launches vs fusion)
  site            one HCSite (coefficients, read-in, write-back) around an identity sub-layer,
                  forward + backward wrt the streams and the site's parameters
Each row: median ms over --iters calls after a compile call, the compile time, and the largest
difference of the candidate's output from the model's. Memory-bound; no FLOP figures.

  python tools/bench_mhc.py --out bench_mhc.json            # GPU
  python tools/bench_mhc.py --smoke                         # any backend, tiny shapes
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from v4jax.cli import median_seconds  # noqa: E402
from v4jax.config import default_config  # noqa: E402
from v4jax.model.mhc import HCSite, sinkhorn  # noqa: E402


def _iterate(logits_NN, iters: int, eps: float, colsum, rowsum, loop: bool):
  m = jax.nn.softmax(logits_NN.astype(jnp.float32), axis=-1) + eps
  m = m / (colsum(m) + eps)

  def body(_, m):
    m = m / (rowsum(m) + eps)
    return m / (colsum(m) + eps)
  if loop:
    return jax.lax.fori_loop(0, iters - 1, body, m)
  for i in range(iters - 1):
    m = body(i, m)
  return m


def _adds(axis):
  """Sum over a short axis as explicit adds of slices (elementwise, fusible)."""
  def f(m):
    parts = [jax.lax.slice_in_dim(m, i, i + 1, axis=axis) for i in range(m.shape[axis])]
    return functools.reduce(jnp.add, parts)
  return f


_red = lambda axis: (lambda m: jnp.sum(m, axis=axis, keepdims=True))
# Sinkhorn formulations compared with the model's own (`sinkhorn`): the same math, written as
# a loop, unrolled with reductions, unrolled with explicit adds.
CANDIDATES = {
    'loop': functools.partial(_iterate, colsum=_red(-2), rowsum=_red(-1), loop=True),
    'unrolled_reduce': functools.partial(_iterate, colsum=_red(-2), rowsum=_red(-1), loop=False),
    'unrolled_adds': functools.partial(_iterate, colsum=_adds(-2), rowsum=_adds(-1), loop=False),
}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--smoke', action='store_true', help='tiny shapes, any backend')
  ap.add_argument('--iters', type=int, default=20)
  ap.add_argument('--sinkhorn_iters', type=int, default=20)
  ap.add_argument('--candidates', default='loop,sinkhorn,unrolled_reduce,unrolled_adds',
                  help=f"comma list of 'sinkhorn' and {sorted(CANDIDATES)}, in order")
  ap.add_argument('--out', default=None, help='write the rows as JSON here')
  args = ap.parse_args()
  for name in args.candidates.split(','):
    if name != 'sinkhorn' and name not in CANDIDATES:
      ap.error(f"--candidates: {name!r} is not 'sinkhorn' or one of {sorted(CANDIDATES)}")
  B, T, N, D = (2, 16, 4, 32) if args.smoke else (8, 2048, 4, 1024)
  iters = 2 if args.smoke else args.iters
  eps = 1e-6
  dev = jax.devices()[0]
  meta = {'jax': jax.__version__, 'device': dev.device_kind, 'platform': dev.platform,
          'date': datetime.date.today().isoformat(), 'iters': iters,
          'shape': dict(B=B, T=T, N=N, D=D), 'sinkhorn_iters': args.sinkhorn_iters}
  print(f'jax {jax.__version__}, {dev.platform} {dev.device_kind}, B={B} T={T} N={N} D={D}')
  lam = jax.random.normal(jax.random.key(0), (B, T, N, N), jnp.float32)
  g = jax.random.normal(jax.random.key(1), (B, T, N, N), jnp.float32)
  rows = []

  def record(row):
    """Print and save each row as soon as it is measured (a run cut short keeps its rows)."""
    rows.append(row)
    print(f"{row['name']:<16} {row['pass_']:<8} compile {row['compile_s']:6.1f} s "
          f"{row['ms']:9.3f} ms", flush=True)
    if args.out:
      with open(args.out, 'w') as f:
        json.dump({'meta': meta, 'rows': rows}, f, indent=1)

  want = jax.jit(sinkhorn, static_argnums=(1, 2))(lam, args.sinkhorn_iters, eps)
  for name in args.candidates.split(','):
    fn = sinkhorn if name == 'sinkhorn' else CANDIDATES[name]
    fb = jax.jit(lambda l, g, fn=fn: jax.vjp(lambda x: fn(x, args.sinkhorn_iters, eps), l)[1](g))
    t0 = time.perf_counter()
    jax.block_until_ready(fb(lam, g))
    compile_s = time.perf_counter() - t0
    diff = jnp.max(jnp.abs(fn(lam, args.sinkhorn_iters, eps) - want))   # same math, same values
    record(dict(name=name, pass_='fwd+bwd', compile_s=compile_s, max_abs_diff=float(diff),
                ms=1e3 * median_seconds(fb, lam, g, iters=iters)))

  cfg = default_config()
  cfg.model.d_model = D
  cfg.mhc.update(streams=N, sinkhorn_iters=args.sinkhorn_iters)
  site = HCSite(cfg, 0, rngs=nnx.Rngs(0))
  gdef, params = nnx.split(site)
  X = jax.random.normal(jax.random.key(2), (B, T, N, D), jnp.bfloat16)

  def loss(params, X):
    out, _ = nnx.merge(gdef, params)(X, lambda u: (u, {}))
    return jnp.sum(out.astype(jnp.float32) ** 2)
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  t0 = time.perf_counter()
  jax.block_until_ready(step(params, X))
  record(dict(name='site', pass_='fwd+bwd', compile_s=time.perf_counter() - t0,
              ms=1e3 * median_seconds(step, params, X, iters=iters)))
  base = next((r['ms'] for r in rows if r['name'] == 'loop'), None)
  if base:
    for r in rows:
      if r['name'] != 'site':
        print(f"{r['name']:<16} {base / r['ms']:.2f}x the loop's speed")


if __name__ == '__main__':
  main()
