"""mHC's per-site cost: Sinkhorn and one hyper-connection site, forward + backward, on one device.

Times in one process, at the peer model's mHC shapes (B x T tokens, N streams, width D):
  sinkhorn        v4jax.model.mhc.sinkhorn on [B,T,N,N] logits (custom VJP, recomputing)
  loop, unrolled_reduce, unrolled_adds
                  the same iterations written three ways (CANDIDATES), plain autodiff: which
                  formulation the GPU runs fastest (launches vs fusion)
  pallas          the seam's Triton kernels (v4jax/kernels/sinkhorn/gpu.py; interpret mode off
                  GPU), one row per (--block_m, --num_warps, --segment) combination
  mixing_reference, mixing, mixing_pallas
                  the streams' read-in and write-back around an identity sub-layer, forward +
                  backward wrt the streams and the coefficients: autodiff of the plain jnp forms
                  vs the hc_mix seam's jnp custom VJPs (kernels.hc_mix=reference) vs its Triton
                  kernels (pallas)
  hc_read_in, hc_write_back, hc_normed_mix, hc_mix_read_in
                  each hc_mix op alone (mix_read_in as a site calls it: the streams handed on,
                  cotangents on mu, u and the handed-on streams; its --hc_* tiling is its
                  forward's read-in kernel's), pass 'fwd' and 'fwd+bwd' (a VJP with a random
                  cotangent), impl reference (jnp custom VJPs) and pallas (v4jax/kernels/hc_mix/
                  gpu.py), the pallas rows one per (--hc_block_m, --hc_block_d, --hc_num_warps,
                  --hc_num_stages) combination; with GB/s = the pass's own bytes (the streams
                  and coefficients each kernel reads and writes once; the normed mix's backward
                  also its XLA dfn GEMM's read of x) / time, and the largest difference from the
                  reference relative to its largest magnitude
  hc_mix_read_in_dx, hc_mix_read_in_dots (--hc_bwd)
                  mix_read_in's two backward kernels alone, one row per --hc_* tiling: the dX
                  kernel (reads X, du and the handed-on streams' cotangent, writes dX; chained
                  in a fori_loop of --hc_bwd_chain calls, each one's dX the next one's dXw, so
                  its aliased input is not copied, as in the step) and the stream dots (X, du)
  site, site_pallas, site_hc_pallas, site_pallas_hc_pallas
                  one HCSite (coefficients, read-in, write-back) around an identity sub-layer,
                  forward + backward wrt the streams and the site's parameters, with
                  kernels.sinkhorn (--sites) x kernels.hc_mix (--site_hc_mix) = reference / pallas
Each row: median ms over --iters calls after a compile call, the compile time, and the largest
difference of the candidate's output and of its logits gradient from the model's (the kernel's
parity check on the GPU). Memory-bound; no FLOP figures. At the end: the fastest tiling of each
hc_mix op's pallas rows (fwd+bwd), to paste into gpu._DEFAULTS.

  python tools/bench_mhc.py --out bench_mhc.json            # GPU
  python tools/bench_mhc.py --candidates loop,pallas --block_m 32,64,128,256 --num_warps 1,2,4 \
      --segment 2,4,19 --sites pallas --out bench_mhc_sweep.json   # GPU: the kernel's sweep
  python tools/bench_mhc.py --candidates sinkhorn --sites reference --shape 4,4096,4,1536 \
      --out bench_mhc_h200.json                             # GPU: at bench_h200's shapes
  python tools/bench_mhc.py --candidates sinkhorn --mixing reference,custom,pallas \
      --shape 8,4096,4,1536 --out bench_hc_mix.json         # GPU: the hc_mix kernels vs XLA
  python tools/bench_mhc.py --candidates sinkhorn --mixing '' --sites pallas --site_hc_mix pallas \
      --hc_mix pallas --hc_block_m 4,8,16,32,64 --hc_block_d 128,256,512,1024 --hc_num_warps 4,8 \
      --hc_num_stages 1,2 --shape 8,4096,4,1536 --out bench_hc_mix_sweep.json   # GPU: the sweep
  python tools/bench_mhc.py --smoke                         # any backend, tiny shapes
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from v4jax.cli import BenchReport, median_seconds  # noqa: E402
from v4jax.config import default_config  # noqa: E402
from v4jax.kernels import hc_mix  # noqa: E402
from v4jax.kernels.hc_mix import gpu as hc_mix_gpu  # noqa: E402
from v4jax.kernels.sinkhorn import gpu as sinkhorn_gpu  # noqa: E402
from v4jax.kernels.sinkhorn import reference as sinkhorn_reference  # noqa: E402
from v4jax.model.mhc import (HCSite, read_in, read_in_reference, sinkhorn,  # noqa: E402
                             write_back, write_back_reference)

_OPTS = ('impl', 'block_m', 'block_d', 'num_warps', 'num_stages', 'segment')
_HC_OPS = ('read_in', 'write_back', 'normed_mix', 'mix_read_in')


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
  ap.add_argument('--site_hc_mix', default='reference,pallas',
                  help='comma list of kernels.hc_mix impls to time each --sites row with')
  ap.add_argument('--mixing', default='reference,custom,pallas',
                  help="comma list of 'reference' (autodiff), 'custom' (the jnp custom VJPs) and "
                       "'pallas' (the hc_mix Triton kernels)")
  ap.add_argument('--hc_mix', default='reference,pallas',
                  help="comma list of hc_mix impls to time each op with ('' = none)")
  ap.add_argument('--hc_ops', default=','.join(_HC_OPS), help=f'comma list of {_HC_OPS}')
  ap.add_argument('--hc_block_m', type=ints, default=[0],
                  help='hc_mix pallas: tokens per program (0 = the op\'s default)')
  ap.add_argument('--hc_block_d', type=ints, default=[0],
                  help='hc_mix pallas: features per chunk (0 = the op\'s default)')
  ap.add_argument('--hc_num_warps', type=ints, default=[0], help='hc_mix pallas (0 = default)')
  ap.add_argument('--hc_num_stages', type=ints, default=[0], help='hc_mix pallas (0 = default)')
  ap.add_argument('--hc_bwd', action='store_true',
                  help="time mix_read_in's backward kernels alone over the --hc_* tilings")
  ap.add_argument('--hc_bwd_chain', type=int, default=8,
                  help='--hc_bwd: dX kernel calls chained per timed call')
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
  for name in [o for o in args.hc_ops.split(',') if o]:
    if name not in _HC_OPS:
      ap.error(f'--hc_ops: {name!r} is not one of {_HC_OPS}')
  B, T, N, D = (2, 16, 4, 32) if args.smoke else args.shape
  iters = 2 if args.smoke else args.iters
  eps = 1e-6
  dev = jax.devices()[0]
  report = BenchReport(args.out, iters=iters, shape=dict(B=B, T=T, N=N, D=D),
                       sinkhorn_iters=args.sinkhorn_iters)
  rows = report.rows
  print(f'jax {jax.__version__}, {dev.platform} {dev.device_kind}, B={B} T={T} N={N} D={D}')
  lam = jax.random.normal(jax.random.key(0), (B, T, N, N), jnp.float32)
  g = jax.random.normal(jax.random.key(1), (B, T, N, N), jnp.float32)

  def record(row):
    """Print and save each row as soon as it is measured (a run cut short keeps its rows)."""
    report.add(row)
    opts = ' '.join(f'{k}={row[k]}' for k in _OPTS if k in row)
    gbps = f"{row['gbps']:7.0f} GB/s" if 'gbps' in row else ''
    print(f"{row['name']:<16} {row['pass_']:<8} compile {row['compile_s']:6.1f} s "
          f"{row['ms']:9.3f} ms {gbps} {opts}", flush=True)

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
              'custom': (functools.partial(read_in, impl='reference'),
                         functools.partial(write_back, impl='reference')),
              'pallas': (functools.partial(read_in, impl='pallas'),
                         functools.partial(write_back, impl='pallas'))}[impl]

    def mix(X, pre, post, comb, rd=rd, wb=wb):
      return wb(X, rd(X, pre), post, comb)
    if args.remat:     # as under the model's block remat: the forward recomputed in the backward
      mix = jax.checkpoint(mix)

    def mix_loss(X, pre, post, comb, mix=mix):
      return jnp.sum(mix(X, pre, post, comb).astype(jnp.float32) ** 2)
    step = jax.jit(jax.grad(mix_loss, argnums=(0, 1, 2, 3)))
    t0 = time.perf_counter()
    mix_grads[impl] = jax.block_until_ready(step(X, pre, post, comb))
    row = dict(name={'custom': 'mixing', 'reference': 'mixing_reference',
                     'pallas': 'mixing_pallas'}[impl], pass_='fwd+bwd',
               remat=args.remat,
               compile_s=time.perf_counter() - t0,
               ms=1e3 * median_seconds(step, X, pre, post, comb, iters=iters))
    if impl != 'reference' and 'reference' in mix_grads:   # bf16 dX: rounding-level
      row['max_rel_grad_diff'] = [
          float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
          for a, b in zip(mix_grads[impl], mix_grads['reference'])]
    record(row)
  _hc_rows(args, X, pre, post, comb, iters, record)
  if args.hc_bwd:
    _hc_bwd_rows(args, X, pre, iters, record)
  for impl, hc in itertools.product([m for m in args.sites.split(',') if m],
                                    [m for m in args.site_hc_mix.split(',') if m]):
    cfg = default_config()
    cfg.model.d_model = D
    cfg.mhc.update(streams=N, sinkhorn_iters=args.sinkhorn_iters)
    cfg.kernels.sinkhorn, cfg.kernels.hc_mix = impl, hc
    gdef, params = nnx.split(HCSite(cfg, 0, rngs=nnx.Rngs(0)))

    def loss(params, X, gdef=gdef):
      out, _ = nnx.merge(gdef, params)(X, lambda u: (u, {}))
      return jnp.sum(out.astype(jnp.float32) ** 2)
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, X))
    name = 'site' + ('' if impl == 'reference' else f'_{impl}') + (
        '' if hc == 'reference' else f'_hc_{hc}')
    record(dict(name=name, pass_='fwd+bwd', compile_s=time.perf_counter() - t0,
                ms=1e3 * median_seconds(step, params, X, iters=iters)))
  base = next((r['ms'] for r in rows if r['name'] == 'loop'), None)
  if base:
    for r in rows:
      if r['name'] in CANDIDATES or r['name'] in ('sinkhorn', 'pallas'):
        opts = ' '.join(f'{k}={r[k]}' for k in _OPTS if k in r)
        print(f"{r['name']:<16} {base / r['ms']:.2f}x the loop's speed {opts}")
  for op in _HC_OPS:
    tiled = [r for r in rows if r['name'] == f'hc_{op}' and r['impl'] == 'pallas'
             and r['pass_'] == 'fwd+bwd']
    if tiled:
      best = min(tiled, key=lambda r: r['ms'])
      print(f"fastest hc_{op} fwd+bwd: {best['ms']:.3f} ms, {best.get('gbps', 0):.0f} GB/s: " +
            ' '.join(f'{k}={best[k]}' for k in _OPTS[1:5]))


def _hc_bytes(op: str, pass_: str, X, C: int) -> int:
  """Bytes an hc_mix pass reads and writes once: streams X [B,T,N,D] (and u / y / their
  cotangents [B,T,D]) in X's dtype, fp32 coefficients; the normed mix's backward also reads x for
  its dfn GEMM. fp32 [K,C] weights and their gradient are left out (< 0.1% at the bench shapes)."""
  B, T, N, D = X.shape
  s, M = X.dtype.itemsize, B * T
  streams = {('read_in', 'fwd'): N + 1, ('read_in', 'fwd+bwd'): 3 * N + 2,
             ('write_back', 'fwd'): 2 * N + 1, ('write_back', 'fwd+bwd'): 5 * N + 3,
             ('normed_mix', 'fwd'): N, ('normed_mix', 'fwd+bwd'): 4 * N,
             # the mix's GEMM X, the read-in X + u; the backward's dots X + du, dX pass X + du +
             # dXw + dX, dfn GEMM X
             ('mix_read_in', 'fwd'): 2 * N + 1, ('mix_read_in', 'fwd+bwd'): 7 * N + 3}[op, pass_]
  coeffs = {'read_in': 2 * N, 'write_back': 2 * (N + N * N), 'normed_mix': 3 * (C + 1),
            'mix_read_in': 3 * (C + 1) + N}[op]
  return M * (D * s * streams + 4 * coeffs * (1 if pass_ == 'fwd' else 2))


def _hc_rows(args, X, pre, post, comb, iters, record):
  """Rows hc_<op> for each hc_mix op alone, fwd and fwd+bwd (VJP with a random cotangent), the
  reference and the pallas kernels at each tiling; GB/s and the difference from the reference."""
  B, T, N, D = X.shape
  C = (2 + N) * N
  ks = jax.random.split(jax.random.key(4), 4)
  y = jax.random.normal(ks[0], (B, T, D), X.dtype)
  fn = 0.02 * jax.random.normal(ks[1], (N * D, C), jnp.float32)
  gate = (jnp.float32(1.0), 0.5 * jax.random.normal(ks[3], (N,), jnp.float32))
  inputs = {'read_in': (X, pre), 'write_back': (X, y, post, comb), 'normed_mix': (X, fn),
            'mix_read_in': (X, fn, *gate)}
  ref_fns = {'read_in': functools.partial(hc_mix.read_in, impl='reference'),
             'write_back': functools.partial(hc_mix.write_back, impl='reference'),
             'normed_mix': lambda X, fn: hc_mix.normed_mix(X, fn, 1e-6, 'split',
                                                           impl='reference'),
             'mix_read_in': lambda *a: hc_mix.mix_read_in(*a, 1e-6, 1e-6, 'split',
                                                          pass_streams=True, impl='reference')}
  tilings = list(itertools.product(args.hc_block_m, args.hc_block_d, args.hc_num_warps,
                                   args.hc_num_stages))
  rel1 = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                            jnp.max(jnp.abs(b.astype(jnp.float32))))
  rel = lambda a, b: max(map(rel1, jax.tree.leaves(a), jax.tree.leaves(b)))   # tuples: worst
  for op in [o for o in args.hc_ops.split(',') if o]:
    a = inputs[op]
    out_ref = jax.jit(ref_fns[op])(*a)
    g = jax.tree.map(lambda o: jax.random.normal(ks[2], o.shape, o.dtype), out_ref)
    runs = []
    for impl in [m for m in args.hc_mix.split(',') if m]:
      if impl == 'reference':
        runs.append((impl, {}, ref_fns[op]))
        continue
      for bm, bd, nw, ns in tilings:
        opts = {k: v for k, v in (('block_m', bm), ('block_d', bd), ('num_warps', nw),
                                  ('num_stages', ns)) if v}
        kernel = getattr(hc_mix_gpu, op)
        if op == 'normed_mix':
          fn_ = functools.partial(kernel, eps=1e-6, blocks=opts)
        elif op == 'mix_read_in':
          fn_ = functools.partial(kernel, eps=1e-6, pre_eps=1e-6, pass_streams=True,
                                  blocks=opts)
        else:
          fn_ = functools.partial(kernel, blocks=opts)
        try:
          # mix_read_in's blocks tile the read-in kernel of its forward
          tiled_op = 'read_in' if op == 'mix_read_in' else op
          tiles = dataclasses.asdict(hc_mix_gpu.resolved_blocks(tiled_op, opts, X.shape))
        except ValueError as e:     # e.g. block_m 8 for the normed mix (tl.dot needs >= 16)
          print(f'hc_{op} {opts}: skipped: {e}')
          continue
        if all(tiles != t for _, t, _ in runs):     # capped tilings can coincide
          runs.append((impl, tiles, fn_))
    want_grads = jax.jit(lambda g, *a: jax.vjp(ref_fns[op], *a)[1](g))(g, *a)
    for impl, opts, f in runs:
      fwd = jax.jit(f)
      fb = jax.jit(lambda g, *a, f=f: jax.vjp(f, *a)[1](g))
      for pass_, step, call in (('fwd', fwd, a), ('fwd+bwd', fb, (g, *a))):
        t0 = time.perf_counter()
        try:
          got = jax.block_until_ready(step(*call))
        except Exception as e:       # a tiling the GPU cannot compile: say so, go on sweeping
          print(f'hc_{op} {pass_} {opts}: failed: {type(e).__name__}: {str(e)[:300]}')
          break
        compile_s = time.perf_counter() - t0
        ms = 1e3 * median_seconds(step, *call, iters=iters)
        diff = (rel(got, out_ref) if pass_ == 'fwd' else
                max(rel(x, w) for x, w in zip(got, want_grads)))
        record(dict(name=f'hc_{op}', pass_=pass_, impl=impl, compile_s=compile_s, ms=ms,
                    gbps=_hc_bytes(op, pass_, X, C) / ms / 1e6, max_rel_diff=diff, **opts))


def _hc_bwd_rows(args, X, pre, iters, record):
  """Rows hc_mix_read_in_dx / hc_mix_read_in_dots: mix_read_in's backward kernels alone at each
  --hc_* tiling (hc_mix.gpu's drivers, as its custom VJP calls them); GB/s = each kernel's own
  stream bytes (dX: X, du, dXw read, dX written; dots: X, du read)."""
  B, T, N, D = X.shape
  C = (2 + N) * N
  ks = jax.random.split(jax.random.key(5), 5)
  du = jax.random.normal(ks[0], (B, T, D), X.dtype)
  dxw = jax.random.normal(ks[1], X.shape, X.dtype)
  fn_KP = hc_mix_gpu._pad_cols(0.02 * jax.random.normal(ks[2], (N * D, C), jnp.float32))
  da = jax.random.normal(ks[3], (B, T, fn_KP.shape[1]), jnp.float32)
  coef = 1e-3 * jax.random.normal(ks[4], (B, T), jnp.float32)
  chain, s = args.hc_bwd_chain, X.dtype.itemsize
  tilings = itertools.product(args.hc_block_m, args.hc_block_d, args.hc_num_warps,
                              args.hc_num_stages)
  for bm, bd, nw, ns in tilings:
    opts = {k: v for k, v in (('block_m', bm), ('block_d', bd), ('num_warps', nw),
                              ('num_stages', ns)) if v}
    cfg = hc_mix_gpu._cfg(opts, None)

    def dx_chain(X, da, coef, pre, du, dxw, cfg=cfg):
      step = lambda _, g: hc_mix_gpu._mix_dx_dev(X, fn_KP, da, coef, pre, du, g, cfg=cfg,
                                                 read_in=True, add=True)
      return jax.lax.fori_loop(0, chain, step, dxw)

    dots = jax.jit(functools.partial(hc_mix_gpu._stream_dots_dev, cfg=cfg))
    kernels = (('hc_mix_read_in_dx', 'mix_read_in_dx', jax.jit(dx_chain),
                (X, da, coef, pre, du, dxw), chain, 3 * N + 1),
               ('hc_mix_read_in_dots', 'read_in', dots, (X, du), 1, N + 1))
    for name, op, f, call, calls, streams in kernels:
      try:
        tiles = dataclasses.asdict(hc_mix_gpu.resolved_blocks(op, opts, X.shape))
        t0 = time.perf_counter()
        jax.block_until_ready(f(*call))
      except Exception as e:       # a tiling that is illegal or will not compile: go on
        print(f'{name} {opts}: skipped: {type(e).__name__}: {str(e)[:200]}')
        continue
      compile_s = time.perf_counter() - t0
      ms = 1e3 * median_seconds(f, *call, iters=iters) / calls
      record(dict(name=name, pass_='bwd', impl='pallas', compile_s=compile_s, ms=ms,
                  gbps=B * T * D * s * streams / ms / 1e6, **tiles))


if __name__ == '__main__':
  main()
