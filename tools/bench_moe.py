"""Grouped matmul (the MoE expert FFN's GEMM) against a dense bf16 matmul of the same FLOPs.

For each expert shape (bench-1B: E=64 experts, D=1536, d_e=1024, 16K tokens x top-6 slots;
DeepSeek-V3 local slice: 32 of 256 experts on one GPU, D=7168, d_e=2048, 32K slots) and each
routing (balanced: equal group sizes; skewed: Zipf(1) group sizes), this times in one process:
  dense    x[M,K] @ w[K,N]                              (the ceiling)
  mgpu_grouped  v4jax grouped_matmul impl=mgpu (Mosaic-GPU ragged_dot + custom VJP) with
           all_rows_grouped=True: the call the model makes (model/moe.py, parallel/expert.py; the
           group sizes sum to M, so no pass zeroes rows past them); the issue's headline row
  mgpu     the same without all_rows_grouped (a generic caller's: one more pass over y zeroes
           rows past the groups, ~15-20% of a bench-1B forward)
  ragged   jax.lax.ragged_dot (XLA's reference lowering)
forward (y) and forward+backward (y, dx, dw via jax.vjp with a bf16 cotangent: 3 GEMMs), for the
expert FFN's GEMMs (--gemms): up (K=D, N=d_e; the gate projection is the same GEMM) and down
(K=d_e, N=D); gate_up (K=D, N=2 d_e) times the gate and up projections as one GEMM, a fusion the
model tried and dropped (docs/performance.md row 42). TFLOP/s count 2*M*K*N per GEMM.
Each time is the median over --iters timed blocks of --reps calls dispatched back to back (one
wait per block, so sub-ms GEMMs are not timed with a host round trip each). Every impl is timed
in --iters rounds interleaved with the dense matmul of its case, and its ratio to dense is the
median of the per-round ratios: the dense GEMM's own time drifted by 10-15% between timing loops
of one process on the H200, which moved ratios taken from separate loops by as much.

  python tools/bench_moe.py --out bench.json            # GPU
  python tools/bench_moe.py --smoke --out smoke.json    # any backend, tiny shapes, seconds
  python tools/bench_moe.py --sweep --out sweep.json    # Hopper: tile sweep of the mgpu kernels

`--sweep` times each Mosaic-GPU kernel of the mgpu VJP (fwd: y = x w[g]; fwd_t: dx = dy w[g]^T;
dw: x_g^T dy_g; `--sweep-kernels` picks some) alone, as the dropless MoE calls them (no row mask),
at each shape's GEMMs of --gemms (balanced routing) over candidate tilings
(v4jax.kernels.grouped_matmul.mgpu.Tiles), against the dense matmul of the same FLOPs, and prints
the best tiling per kernel and shape: the entries of mgpu.TUNED. `--sweep-consumers 3` times only
each GEMM's tiling in use (TUNED's, else DEFAULT_TILES) and, for the warp-specialized kernel, the
same tiling with one WGMMA group in flight (`in_flight=1`), with 2-CTA clusters sharing the x
tile (`cluster=2`) and with both: four candidates per kernel, no band round.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from v4jax.cli import BenchReport, median_seconds, paired_seconds  # noqa: E402
from v4jax.kernels.grouped_matmul import grouped_matmul, resolve_impl  # noqa: E402

SHAPES = {   # name: (groups, slots M, model dim D, expert dim F)
    'v3_local32': (32, 32768, 7168, 2048),
    'bench1b': (64, 16384 * 6, 1536, 1024),
}
SMOKE = {'smoke': (8, 512, 128, 64)}
GEMMS = {   # name: (K, N) of the expert FFN's GEMMs from (D, F)
    'up': lambda D, F: (D, F),            # the gate and the up projection: one GEMM each
    'down': lambda D, F: (F, D),
    'gate_up': lambda D, F: (D, 2 * F),   # both as one GEMM (interleaved weights): not what the
                                          # model runs; the eleventh measurement's fusion trial
}


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
  else:   # group_sizes() sums to M, as all_rows_grouped promises
    kw = dict(impl='mgpu', all_rows_grouped=True) if impl == 'mgpu_grouped' else dict(impl=impl)
    f = lambda x, w: grouped_matmul(x, w, sizes, preferred_element_type=x.dtype, **kw)

  def fb(x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y,) + vjp(dy)
  return jax.jit(f), jax.jit(fb)


def paired_ms(fn, args, dense, dense_args, iters, reps=1) -> dict:
  """{ms, dense_ms, vs_dense}: fn timed in rounds interleaved with the dense matmul
  (`cli.paired_seconds`), medians of each and of the per-round ratio dense / fn."""
  t, t_dense = (np.asarray(a) for a in paired_seconds(fn, args, dense, dense_args, iters, reps))
  return {'ms': float(np.median(t)) * 1e3, 'dense_ms': float(np.median(t_dense)) * 1e3,
          'vs_dense': float(np.median(t_dense / t))}


def bench_case(name, G, M, K, N, routing, impls, iters, dtype, no_bwd=(), reps=1):
  """Rows {impl, fwd_ms, fwdbwd_ms, *_tflops, *_vs_dense} of one GEMM and routing. With 'dense'
  in impls every other impl is timed in rounds interleaved with the dense matmul
  (`cli.paired_seconds`): *_vs_dense is the median of the per-round ratios and *_dense_ms the
  dense time of those rounds."""
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(M, K).astype(np.float32), dtype)
  w = jnp.asarray((rs.randn(G, K, N) / np.sqrt(K)).astype(np.float32), dtype)
  dy = jnp.asarray(rs.randn(M, N).astype(np.float32), dtype)
  sizes = jnp.asarray(group_sizes(G, M, routing))
  flops = 2.0 * M * K * N
  args = {'fwd': (x, w), 'fwdbwd': (x, w, dy)}
  dense = dict(zip(args, fns('dense', sizes))) if 'dense' in impls else None
  rows = []
  for impl in impls:
    row = {'shape': name, 'G': G, 'M': M, 'K': K, 'N': N, 'routing': routing, 'impl': impl}
    try:
      own = dense.values() if impl == 'dense' else fns(impl, sizes)
      for k, fn in zip(args, own):
        if k == 'fwdbwd' and impl in no_bwd:
          continue
        if dense is None or impl == 'dense':
          row[f'{k}_ms'] = median_seconds(fn, *args[k], iters=iters, reps=reps) * 1e3
          if impl == 'dense':
            row[f'{k}_vs_dense'] = 1.0
          continue
        row.update({f'{k}_{f}': v for f, v in
                    paired_ms(fn, args[k], dense[k], args[k], iters, reps).items()})
    except Exception as e:  # noqa: BLE001 - one failing impl must not hide the others
      row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
    for k, gemms in (('fwd', 1), ('fwdbwd', 3)):   # fwd: 1 GEMM, fwd+bwd: 3
      if f'{k}_ms' in row:
        row[f'{k}_tflops'] = gemms * flops / row[f'{k}_ms'] / 1e9
    rows.append(row)
  return rows


def sweep_candidates(kernel: str = 'fwd', consumers: int = 0, in_use=None):
  """Tilings of `kernel` that fit Hopper's 227 KB of shared memory and one warpgroup's registers
  (the fp32 accumulator block_m x block_n over 128 threads: at most 128 x 128); consumers 1 or 2:
  only that kernel's tilings (2: with the default tiling as the baseline), 0: both; 3: the tiling
  in use (`in_use`) and, if it is the warp-specialized kernel's, its in_flight / cluster forms."""
  from v4jax.kernels.grouped_matmul.mgpu import DEFAULT_TILES, Tiles
  if consumers == 3:
    if in_use.consumers != 2:
      return [in_use]
    return [in_use._replace(in_flight=f, cluster=c) for f, c in ((0, 1), (1, 1), (0, 2), (1, 2))
            if f < in_use.stages]
  shapes = ((128, 128, 64, (3, 4, 5)), (128, 128, 128, (2,)), (64, 256, 64, (3, 4)),
            (64, 256, 128, (2,)), (128, 64, 64, (4,)), (128, 64, 128, (3,)), (64, 128, 64, (4,)))
  one = [Tiles(bm, bn, bk, st, 4) for bm, bn, bk, stages in shapes for st in stages
         if st * (bm * bk + bk * bn) * 2 + bm * bn * 2 <= 220 * 1024]
  # the warp-specialized kernel: CTA tile block_m x 2*block_n, 2 x block_m x 64 staging (fwd and
  # fwd_t only; jax's transposed kernel computes dw)
  two = [Tiles(bm, bn, bk, st, 4, 2) for bm, bn, bk, stages in
         ((128, 128, 64, (3, 4)), (128, 64, 64, (4, 5, 6)), (64, 128, 64, (4, 5, 6)))
         for st in stages if st * (bm * bk + bk * 2 * bn) * 2 + 2 * bm * 64 * 2 <= 224 * 1024]
  if kernel not in ('fwd', 'fwd_t'):
    return one
  return {1: one, 2: [DEFAULT_TILES] + two}.get(consumers, one + two)


def compile_all(fns, args, workers: int = 0) -> list:
  """jax.jit(fn) compiled ahead of time at `args` for each fn (or the exception it raised), in a
  thread pool: XLA compiles outside the GIL, so a sweep's ~12 candidates per kernel compile side
  by side instead of one after another. The arrays are arguments, not closed-over constants
  (a closure would embed them in the program)."""
  from concurrent.futures import ThreadPoolExecutor

  def one(fn):
    try:
      return jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - returned: the caller records it per candidate
      return e
  with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
    return list(pool.map(one, fns))


def sweep_case(name, G, M, K, N, iters, dtype, budget_s, t_start, which=('fwd', 'fwd_t', 'dw'),
               threads: int = 0, consumers: int = 0, reps: int = 1):
  """Rows {kernel, K, N, tiles, ms, dense_ms, tflops, vs_dense} for the three kernels of one GEMM,
  each candidate timed interleaved with the dense matmul of the same FLOPs (`paired_ms`)."""
  from v4jax.kernels.grouped_matmul import mgpu
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(M, K).astype(np.float32), dtype)
  w = jnp.asarray((rs.randn(G, K, N) / np.sqrt(K)).astype(np.float32), dtype)
  dy = jnp.asarray(rs.randn(M, N).astype(np.float32), dtype)
  sizes = jnp.asarray(group_sizes(G, M, 'balanced'))
  flops = 2.0 * M * K * N
  dense = (jax.jit(lambda a, b: jnp.dot(a, b[0])), (x, w))
  kernels = {   # kernel: (K, N of its product, the call for a Tiles, its arguments)
      'fwd': (K, N, lambda t: functools.partial(mgpu._ragged, tiles=t, mask_rows=False),
              (x, w, sizes)),
      'fwd_t': (N, K, lambda t: functools.partial(mgpu._ragged, transpose_rhs=True, tiles=t,
                                                  mask_rows=False), (dy, w, sizes)),
      'dw': (K, N, lambda t: functools.partial(mgpu._transposed, tiles=t), (x, dy, sizes)),
  }
  rows = []
  for kernel, (kk, nn, make, args) in kernels.items():
    if kernel not in which:
      continue
    _sweep_kernel(rows, name, kernel, kk, nn, make, args, flops, dense, iters, budget_s,
                  t_start, threads, consumers, reps)
  return rows


def _sweep_kernel(rows, name, kernel, kk, nn, make, args, flops, dense, iters, budget_s,
                  t_start, threads, consumers, reps):
  """Appends one kernel's candidate rows: every tile shape, then the snake band widths of the
  best one; stops where the budget ends."""
  import time
  from v4jax.kernels.grouped_matmul.mgpu import tiles_for
  best = None
  cands = sweep_candidates(kernel, consumers, tiles_for(kernel, kk, nn))
  for _ in range(1 if consumers == 3 else 2):
    if time.time() - t_start > budget_s:
      break
    compiled = compile_all([make(t) for t in cands], args, threads)
    for t, exe in zip(cands, compiled):
      if time.time() - t_start > budget_s:
        break
      row = {'shape': name, 'kernel': kernel, 'K': kk, 'N': nn, 'tiles': list(t)}
      try:
        if isinstance(exe, Exception):
          raise exe
        row.update(paired_ms(exe, args, *dense, iters, reps))
        row['tflops'] = flops / row['ms'] / 1e9
        if best is None or row['ms'] < best['ms']:
          best = row
      except Exception as e:  # noqa: BLE001 - a tiling the kernel rejects is skipped
        row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
      rows.append(row)
      print(f"{name:<11} {kernel:<6} K={kk:<5} N={nn:<5} {str(tuple(t)):<24} "
            + (f"{row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s {row['vs_dense']:7.1%}"
               if 'ms' in row else row['error']), flush=True)
    if best is None:
      break
    b = best['tiles']   # second round: the snake band width for the best tile shape
    cands = [type(cands[0])(*b[:4], g, *b[5:]) for g in (1, 2, 8) if g != b[4]]
  if best:
    best['best'] = True


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
  ap.add_argument('--impls', default='dense,mgpu_grouped,mgpu,ragged')
  ap.add_argument('--gemms', default='up,down', help=f'subset of {list(GEMMS)}')
  ap.add_argument('--iters', type=int, default=10, help='timed rounds')
  ap.add_argument('--reps', type=int, default=10,
                  help='calls per timed block (dispatched back to back, one wait at the end)')
  ap.add_argument('--ragged_full', action='store_true',
                  help='also time lax.ragged_dot forward+backward and on skewed routing (slow on '
                  'GPU: forward on balanced routing only by default)')
  ap.add_argument('--sweep', action='store_true',
                  help='tile sweep of the mgpu kernels (Hopper): the best tiling per kernel')
  ap.add_argument('--sweep-kernels', default='fwd,fwd_t,dw', help='--sweep: which kernels')
  ap.add_argument('--sweep-consumers', type=int, default=0, choices=(0, 1, 2, 3),
                  help='--sweep: 1 = jax ragged_dot_mgpu tilings, 2 = the warp-specialized kernel '
                  '(and the default tiling), 0 = both; 3 = the tiling in use and its in_flight / '
                  'cluster forms')
  ap.add_argument('--sweep-threads', type=int, default=0,
                  help='--sweep: candidates compiled at once (0: min(16, cores); 1: one by one)')
  ap.add_argument('--budget-s', type=float, default=1e9, help='stop the sweep after this long')
  ap.add_argument('--out', default=None, help='write the rows as JSON here')
  args = ap.parse_args()
  shapes = SMOKE if args.smoke else {k: SHAPES[k] for k in args.shapes.split(',')}
  impls = args.impls.split(',')
  gemms = args.gemms.split(',')
  dtype = jnp.bfloat16
  if resolve_impl('auto', dtype) != 'mgpu':
    for i in ('mgpu', 'mgpu_grouped'):
      if i in impls:
        print(f'{i} skipped: needs a Hopper GPU (backend {jax.default_backend()})')
        impls.remove(i)
  iters = 2 if args.smoke else args.iters
  reps = 1 if args.smoke else args.reps
  dev = jax.devices()[0]
  print(f'jax {jax.__version__}, {dev.platform} {dev.device_kind}', flush=True)
  report = BenchReport(args.out, iters=iters, reps=reps, dtype='bfloat16')
  rows = report.rows
  if args.sweep:
    import time
    if resolve_impl('auto', dtype) != 'mgpu':
      raise SystemExit(f'--sweep times the Mosaic-GPU kernels: it needs a Hopper GPU '
                       f'(backend {jax.default_backend()})')
    t0 = time.time()
    for name, (G, M, D, F) in shapes.items():
      for K, N in (GEMMS[g](D, F) for g in gemms):
        report.add(*sweep_case(name, G, M, K, N, iters, dtype, args.budget_s, t0,
                               which=tuple(args.sweep_kernels.split(',')),
                               threads=args.sweep_threads, consumers=args.sweep_consumers,
                               reps=reps))
    print('\nbest tilings (mgpu.TUNED entries):')
    for r in rows:
      if r.get('best'):
        print(f"  ({r['kernel']!r}, {r['K']}, {r['N']}): Tiles{tuple(r['tiles'])},  "
              f"# {r['tflops']:.0f} TFLOP/s, {r['vs_dense']:.0%} of dense ({r['shape']})")
    return
  for name, (G, M, D, F) in shapes.items():
    for gemm in gemms:
      K, N = GEMMS[gemm](D, F)
      for routing in ('balanced', 'skewed'):
        full = args.ragged_full or args.smoke
        use = [i for i in impls if full or not (i == 'ragged' and routing == 'skewed')]
        for r in bench_case(name, G, M, K, N, routing, use, iters, dtype,
                            no_bwd=() if full else ('ragged',), reps=reps):
          r['gemm'] = gemm
          report.add(r)      # saved after every row, so a run cut short still leaves them
          print(table([r]).splitlines()[-1], flush=True)
  print()
  print(table(rows))


if __name__ == '__main__':
  main()
