"""mHC's per-site cost: Sinkhorn and one hyper-connection site, forward + backward, on one device.

Times in one process, at the peer model's mHC shapes (B x T tokens, N streams, width D):
  sinkhorn        v4jax.model.mhc.sinkhorn on [B,T,N,N] logits (custom VJP, recomputing)
  loop, unrolled_reduce, unrolled_adds
                  the same iterations written three ways (CANDIDATES), plain autodiff: which
                  formulation the GPU runs fastest (launches vs fusion)
  pallas          the seam's Triton kernels (v4jax/kernels/sinkhorn/gpu.py; interpret mode off
                  GPU), one row per (--block_m, --num_warps, --segment) combination
  mixing_reference, mixing
                  the streams' read-in and write-back around an identity sub-layer, forward +
                  backward wrt the streams and the coefficients: autodiff of the plain jnp forms
                  vs the model's custom VJPs (v4jax.model.mhc.read_in / write_back)
  site, site_pallas
                  one HCSite (coefficients, read-in, write-back) around an identity sub-layer,
                  forward + backward wrt the streams and the site's parameters, with
                  kernels.sinkhorn = reference / pallas
Each row: median ms over --iters calls after a compile call, the compile time, and the largest
difference of the candidate's output and of its logits gradient from the model's (the kernel's
parity check on the GPU). Memory-bound; no FLOP figures.

  python tools/bench_mhc.py --out bench_mhc.json            # GPU
  python tools/bench_mhc.py --candidates loop,pallas --block_m 32,64,128,256 --num_warps 1,2,4 \
      --segment 2,4,19 --sites pallas --out bench_mhc_sweep.json   # GPU: the kernel's sweep
  python tools/bench_mhc.py --candidates sinkhorn --sites reference --shape 4,4096,4,1536 \
      --out bench_mhc_h200.json                             # GPU: at bench_h200's shapes
  python tools/bench_mhc.py --smoke                         # any backend, tiny shapes
"""
from __future__ import annotations

import argparse
import datetime
import functools
import itertools
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
from v4jax.kernels.sinkhorn import gpu as sinkhorn_gpu  # noqa: E402
from v4jax.kernels.sinkhorn import reference as sinkhorn_reference  # noqa: E402
from v4jax.model.mhc import (HCSite, read_in, read_in_reference, sinkhorn,  # noqa: E402
                             write_back, write_back_reference)


def _unrolled(logits_NN, iters: int, eps: float, colsum, rowsum):
  """The reference's iterations unrolled in Python, with the given row / column sums."""
  m = jax.nn.softmax(logits_NN.astype(jnp.float32), axis=-1) + eps
  m = m / (colsum(m) + eps)
  for _ in range(iters - 1):
    m = m / (rowsum(m) + eps)
    m = m / (colsum(m) + eps)
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
    'loop': sinkhorn_reference.iterations,
    'unrolled_reduce': functools.partial(_unrolled, colsum=_red(-2), rowsum=_red(-1)),
    'unrolled_adds': functools.partial(_unrolled, colsum=_adds(-2), rowsum=_adds(-1)),
}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--smoke', action='store_true', help='tiny shapes, any backend')
  ap.add_argument('--iters', type=int, default=20)
  ap.add_argument('--sinkhorn_iters', type=int, default=20)
  # The unrolled forms last: on the H200 their compile alone ran past a 120 s slot.
  ap.add_argument('--candidates', default='loop,sinkhorn,pallas,unrolled_reduce,unrolled_adds',
                  help=f"comma list of 'sinkhorn', 'pallas' and {sorted(CANDIDATES)}, in order")
  ints = lambda s: [int(x) for x in s.split(',')]
  ap.add_argument('--block_m', type=ints, default=[32], help='pallas: tokens per program')
  ap.add_argument('--num_warps', type=ints, default=[1], help='pallas: warps per program')
  ap.add_argument('--segment', type=ints, default=[4],
                  help='pallas: iterations per backward segment')
  ap.add_argument('--sites', default='reference,pallas',
                  help='comma list of kernels.sinkhorn impls to time one HCSite with')
  ap.add_argument('--mixing', default='reference,custom',
                  help="comma list of 'reference' (autodiff) and 'custom' (the model's VJPs)")
  ap.add_argument('--remat', action='store_true',
                  help='mixing rows under jax.checkpoint (the model runs its blocks so)')
  ap.add_argument('--shape', type=ints, default=[8, 2048, 4, 1024],
                  help='B,T,N,D (default: the peer model; bench_h200 is 4,4096,4,1536)')
  ap.add_argument('--out', default=None, help='write the rows as JSON here')
  args = ap.parse_args()
  for name in args.candidates.split(','):
    if name not in ('sinkhorn', 'pallas') and name not in CANDIDATES:
      ap.error(f"--candidates: {name!r} is not 'sinkhorn', 'pallas' or one of "
               f"{sorted(CANDIDATES)}")
  if len(args.shape) != 4:
    ap.error(f'--shape: expected B,T,N,D, got {args.shape}')
  B, T, N, D = (2, 16, 4, 32) if args.smoke else args.shape
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
    opts = ' '.join(f'{k}={row[k]}' for k in ('block_m', 'num_warps', 'segment') if k in row)
    print(f"{row['name']:<16} {row['pass_']:<8} compile {row['compile_s']:6.1f} s "
          f"{row['ms']:9.3f} ms {opts}", flush=True)
    if args.out:
      with open(args.out, 'w') as f:
        json.dump({'meta': meta, 'rows': rows}, f, indent=1)

  want = jax.jit(sinkhorn, static_argnums=(1, 2))(lam, args.sinkhorn_iters, eps)
  vjp_of = lambda fn: jax.jit(
      lambda l, g: jax.vjp(lambda x: fn(x, args.sinkhorn_iters, eps), l)[1](g)[0])
  want_grad = vjp_of(sinkhorn)(lam, g)
  runs = []
  for name in args.candidates.split(','):
    if name != 'pallas':
      runs.append((name, sinkhorn if name == 'sinkhorn' else CANDIDATES[name], {}))
      continue
    for bm, nw, seg in itertools.product(args.block_m, args.num_warps, args.segment):
      opts = dict(block_m=bm, num_warps=nw, segment=seg)
      runs.append((name, functools.partial(sinkhorn_gpu.sinkhorn, **opts), opts))
  for name, fn, opts in runs:
    fb = vjp_of(fn)
    t0 = time.perf_counter()
    got_grad = jax.block_until_ready(fb(lam, g))
    compile_s = time.perf_counter() - t0
    # Same math in another order: the values and gradients agree to fp32 rounding.
    diff = jnp.max(jnp.abs(jax.jit(fn, static_argnums=(1, 2))(lam, args.sinkhorn_iters, eps)
                           - want))
    record(dict(name=name, pass_='fwd+bwd', compile_s=compile_s, max_abs_diff=float(diff),
                max_abs_grad_diff=float(jnp.max(jnp.abs(got_grad - want_grad))),
                ms=1e3 * median_seconds(fb, lam, g, iters=iters), **opts))

  X = jax.random.normal(jax.random.key(2), (B, T, N, D), jnp.bfloat16)
  ks = jax.random.split(jax.random.key(3), 3)
  pre = jax.random.uniform(ks[0], (B, T, N))
  post = 2 * jax.random.uniform(ks[1], (B, T, N))
  comb = jax.nn.softmax(jax.random.normal(ks[2], (B, T, N, N)), axis=-2)
  mix_grads = {}
  for impl in [m for m in args.mixing.split(',') if m]:
    rd, wb = {'reference': (read_in_reference, write_back_reference),
              'custom': (read_in, write_back)}[impl]

    def mix(X, pre, post, comb, rd=rd, wb=wb):
      return wb(X, rd(X, pre), post, comb)
    if args.remat:     # as under the model's block remat: the forward recomputed in the backward
      mix = jax.checkpoint(mix)

    def mix_loss(X, pre, post, comb, mix=mix):
      return jnp.sum(mix(X, pre, post, comb).astype(jnp.float32) ** 2)
    step = jax.jit(jax.grad(mix_loss, argnums=(0, 1, 2, 3)))
    t0 = time.perf_counter()
    mix_grads[impl] = jax.block_until_ready(step(X, pre, post, comb))
    row = dict(name='mixing' if impl == 'custom' else 'mixing_reference', pass_='fwd+bwd',
               remat=args.remat,
               compile_s=time.perf_counter() - t0,
               ms=1e3 * median_seconds(step, X, pre, post, comb, iters=iters))
    if impl != 'reference' and 'reference' in mix_grads:   # bf16 dX: rounding-level
      row['max_rel_grad_diff'] = [
          float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
          for a, b in zip(mix_grads[impl], mix_grads['reference'])]
    record(row)
  for impl in args.sites.split(','):
    cfg = default_config()
    cfg.model.d_model = D
    cfg.mhc.update(streams=N, sinkhorn_iters=args.sinkhorn_iters)
    cfg.kernels.sinkhorn = impl
    gdef, params = nnx.split(HCSite(cfg, 0, rngs=nnx.Rngs(0)))

    def loss(params, X, gdef=gdef):
      out, _ = nnx.merge(gdef, params)(X, lambda u: (u, {}))
      return jnp.sum(out.astype(jnp.float32) ** 2)
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, X))
    record(dict(name='site' if impl == 'reference' else f'site_{impl}', pass_='fwd+bwd',
                compile_s=time.perf_counter() - t0,
                ms=1e3 * median_seconds(step, params, X, iters=iters)))
  base = next((r['ms'] for r in rows if r['name'] == 'loop'), None)
  if base:
    for r in rows:
      if not r['name'].startswith('site'):
        opts = ' '.join(f'{k}={r[k]}' for k in ('block_m', 'num_warps', 'segment') if k in r)
        print(f"{r['name']:<16} {base / r['ms']:.2f}x the loop's speed {opts}")


if __name__ == '__main__':
  main()
