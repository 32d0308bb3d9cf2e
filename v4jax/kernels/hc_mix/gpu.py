"""mHC's stream mixing on GPU (Pallas Triton): one kernel per pass that reads and writes the
streams once.

Dims: B batch, T positions, M = B*T tokens of a device, N mHC streams, D model dim, K = N*D
features of a token, C = (2+N)N coefficient slots (N at the HyperHead), P = C padded to a power
of two >= 16 (the narrowest tl.dot), bm tokens per program, bd features per chunk.

Each kernel runs one program per block of bm tokens and loops over D in chunks of bd (every
stream's chunk in one iteration), so a program holds a few [bm, bd] tiles and its per-token sums,
and no [B,T,N,N,D] product or fp32 copy of the streams is ever written. Under XLA the same passes
were several memory-bound kernels each (fp32 converts, reductions, the adds of the stream
cotangents); here:

  read_in     fwd  u = sum_m pre_m X_m                        reads X, writes u
              bwd  dX_m = pre_m du, dpre_m = <X_m, du>        reads X, du; writes dX
  write_back  fwd  X'_k = post_k y + sum_j comb[j,k] X_j      reads X, y; writes X'
              bwd  dX_j = sum_k comb[j,k] g_k, dy = sum_k post_k g_k, dpost_k = <g_k, y>,
                   dcomb[j,k] = <X_j, g_k>                    reads X, y, g; writes dX, dy
  normed_mix  fwd  a = x fn, r = rsqrt(mean(x^2) + eps), mu = a r   reads x, writes mu, r
              bwd  dx = da fn^T - (sum_c dmu mu) r^2 x / K     reads x, writes dx
  mix_read_in fwd  the normed mix by XLA's GEMMs, s = sigmoid(scale mu[:N] + base),
                   u = sum_m (s_m + eps) X_m (the read-in's kernel)
              bwd  dots_m = <X_m, du>                          reads X, du
                   dX = da fn^T - coef X + pre du [+ dXw]     reads X, du [, dXw]; writes dX
with fp32 arithmetic and accumulation throughout and results rounded once to the streams' dtype.

The normed mix's products are exact for bf16 x as layers.dot_f32's 'split' mode is: fn is split
in the kernel into three bf16 parts (hi + mid + lo = fn exactly) on tensor cores with fp32
accumulation, hi and (mid + lo) summed apart. Its dx takes da fn^T as three bf16 products of
two-part splits (hi.hi + hi.lo + lo.hi: ~2^-16 relative, far below dx's bf16 rounding), not an
fp32 FMA GEMM, which at C = 24 columns would run several times the pass's memory time. Its
dfn = x^T da stays an XLA GEMM (dot_f32 'split'): it contracts over all tokens, i.e. across
programs, so a kernel would need atomics or [M/bm, K, C] partial sums; the GEMM reads x once near
bandwidth.

mix_read_in is the model's op (an mHC site reads its streams for the coefficients and for its
sub-layer's input): one custom VJP whose backward makes one pass fewer over the streams and no
separate add of their cotangents. With `pass_streams` it returns X itself as a third output,
which the site's write-back takes: the write-back's stream cotangent then arrives here as that
output's cotangent dXw and is added inside the dX kernel, so the streams' cotangent is written
once instead of as three bf16 tensors summed by XLA. Its forward runs the mix as XLA's split-bf16
GEMMs (the reference's): at ~26 MFLOP per token the kernel's three split dots per chunk, not the
streams' bytes, set its time, and on the H200 a kernel computing mu, the gate and u in one
launch (the token block read twice, the second time from L2) ran 0.87 ms at its best tiling
against 0.35 + 0.28 for XLA's GEMM and the read-in kernel (twenty-first session; that kernel is
in de269f6, docs/performance.md row 76). Only bf16 x takes the kernels here (the seam keeps fp32
streams on the reference); read-in and write-back take either dtype.

Tokens and features need not fill whole blocks: loads past M or D are masked to zero and such
stores dropped, so nothing is padded or copied. The coefficient columns are strided loads and
stores of [bm] vectors: they are ~N/D of the streams' bytes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from v4jax.kernels.hc_mix import reference
from v4jax.kernels.pallas_common import gpu_interpret, next_pow2, pad_axis, per_device
from v4jax.model.layers import barrier_active, dot_f32

_F32, _BF16 = jnp.float32, jnp.bfloat16
_NT = (((1,), (1,)), ((), ()))   # a [M,C] . b [N,C] -> [M,N]
_MIN_DOT = 16                    # tl.dot's smallest dimension


@dataclasses.dataclass(frozen=True)
class Blocks:
  """One op's tiling (its forward and backward kernels; for mix_read_in the read-in kernel of its
  forward): block_m tokens per program, block_d features of D per chunk, powers of two (>= 16 for
  the normed mix, whose tiles feed tl.dot), Triton warps and pipeline stages. None takes the
  op's default."""
  block_m: int | None = None
  block_d: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None


# (block_m, block_d, warps, stages) per op: the H200 sweeps of `tools/bench_mhc.py --hc_block_m
# .. --hc_num_stages ..` at bench_h200's streams [8,4096,4,1536] (seventeenth session), the least
# forward + forward-and-backward time (what a remat step runs): read_in 0.62 ms against 0.82 with
# the first guess (16, 256, 4, 2), normed_mix 1.21 against 1.37 with (64, 128, 4, 2) (then a
# chunk of 128 of the flattened N*D features; now of each stream's D). mix_read_in's dX kernel
# (the normed mix's dx with the read-in's and the write-back's cotangents): 0.90 ms at
# (128, 64, 4, 2) against 1.13 at the normed mix's tiling, the best of 36 (a one-off sweep,
# twenty-first session).
_DEFAULTS = {'read_in': (4, 128, 4, 2), 'write_back': (8, 128, 4, 1), 'normed_mix': (64, 128, 4, 1),
             'mix_read_in_dx': (128, 64, 4, 2)}


def _blocks(op: str, b: Blocks | None, m: int, d: int) -> Blocks:
  """Blocks (or None) -> all fields set, checked, and capped at the tokens and features there
  are."""
  b = b or Blocks()
  bm, bd, warps, stages = _DEFAULTS[op]
  lo = _MIN_DOT if op in ('normed_mix', 'mix_read_in_dx') else 1
  for name, v in (('block_m', b.block_m), ('block_d', b.block_d)):
    if v is not None and (v < lo or v != next_pow2(v)):
      raise ValueError(f'hc_mix gpu {op}: {name}={v} must be a power of two >= {lo}')
  return Blocks(min(b.block_m or bm, max(lo, next_pow2(m))),
                min(b.block_d or bd, max(lo, next_pow2(d))),
                b.num_warps or warps, b.num_stages or stages)


def resolved_blocks(op: str, blocks: Blocks | dict | None, shape_BTND) -> Blocks:
  """The tiling `op` ('read_in', 'write_back', 'normed_mix' or mix_read_in's 'mix_read_in_dx')
  runs with on streams of this [B,T,N,D] shape (one device's) when given `blocks`
  (tools/bench_mhc.py records it)."""
  B, T, N, D = shape_BTND
  b = Blocks(**blocks) if isinstance(blocks, dict) else blocks
  return _blocks(op, b, B * T, D)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  blocks: Blocks | None
  interpret: bool
  keep: bool = False    # mix_read_in: its GEMM's output behind the remat barrier (read at call)


def _cfg(blocks, interpret, keep: bool = False) -> _Cfg:
  return _Cfg(Blocks(**blocks) if isinstance(blocks, dict) else blocks, gpu_interpret(interpret),
              keep)


# ---- in-kernel helpers ------------------------------------------------------------------------

def _iota(n):
  return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _rows_ok(bm: int, m: int):
  """Bool [bm]: the program's tokens below m; None when the blocks tile m exactly."""
  return None if m % bm == 0 else pl.program_id(0) * bm + _iota(bm) < m


def _cols_ok(d0, bd: int, d: int):
  """Bool [bd]: the chunk's features below d; None when the chunks tile d exactly."""
  return None if d % bd == 0 else d0 + _iota(bd) < d


def _both(rows, cols):
  """[bm, bd] mask from the row and column masks (None = all)."""
  if rows is None:
    return None if cols is None else cols[None, :]
  return rows[:, None] if cols is None else rows[:, None] & cols[None, :]


def _ld(ref, ok):
  """Load as fp32; zeros where `ok` is False (None: no mask)."""
  if ok is None:
    return pltriton.load(ref).astype(_F32)
  return pltriton.load(ref, mask=ok, other=0).astype(_F32)


def _st(ref, val, ok):
  pltriton.store(ref, val.astype(ref.dtype), mask=ok)


def _chunks(body, d: int, bd: int, init):
  """fori_loop of body(d0, carry) over the chunks d0 = 0, bd, 2 bd, .. < d."""
  return jax.lax.fori_loop(0, pl.cdiv(d, bd),
                           lambda c, carry: body(pl.multiple_of(c * bd, bd), carry), init)


def _at(i: int):
  """A static index as an int32 scalar array (interpret mode's load rule takes no Python int)."""
  return jnp.asarray(i, jnp.int32)


def _columns(ref, n, rows):
  """[ref[:, i][:, None] for i < n]: a coefficient array's columns as [bm, 1] fp32."""
  return [_ld(ref.at[:, _at(i)], rows)[:, None] for i in range(n)]


def _dot(a, b, dims=None):
  if dims is None:
    return jnp.dot(a, b, preferred_element_type=_F32)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _split(f, parts: int):
  """fp32 -> `parts` bf16 tensors summing to f (3: exactly; 2: to ~2^-16 relative)."""
  out = []
  for i in range(parts):
    p = f.astype(_BF16)
    out.append(p)
    if i < parts - 1:
      f = f - p.astype(_F32)
  return out


# ---- kernels ----------------------------------------------------------------------------------

def _stream_dots(x_ref, du_ref, rows, bd, pre=None, dx_ref=None):
  """[<X_m, du> for m < N], each [bm] fp32; with `pre`, also stores dX_m = pre_m du to dx_ref."""
  bm, n, d = x_ref.shape

  def chunk(d0, acc):
    cols = pl.ds(d0, bd)
    ok = _both(rows, _cols_ok(d0, bd, d))
    du = _ld(du_ref.at[:, cols], ok)
    out = []
    for i in range(n):
      if pre is not None:
        _st(dx_ref.at[:, _at(i), cols], pre[i] * du, ok)
      out.append(acc[i] + jnp.sum(_ld(x_ref.at[:, _at(i), cols], ok) * du, axis=1))
    return tuple(out)

  return _chunks(chunk, d, bd, tuple(jnp.zeros((bm,), _F32) for _ in range(n)))


def _store_columns(ref, cols, rows):
  for i, c in enumerate(cols):
    _st(ref.at[:, _at(i)], c, rows)


def _read_in_fwd_kernel(x_ref, pre_ref, u_ref, *, m, bd):
  bm, n, d = x_ref.shape
  rows = _rows_ok(bm, m)
  pre = _columns(pre_ref, n, rows)

  def chunk(d0, carry):
    cols = pl.ds(d0, bd)
    ok = _both(rows, _cols_ok(d0, bd, d))
    u = None
    for i in range(n):
      t = pre[i] * _ld(x_ref.at[:, _at(i), cols], ok)
      u = t if u is None else u + t
    _st(u_ref.at[:, cols], u, ok)
    return carry

  _chunks(chunk, d, bd, 0)


def _read_in_bwd_kernel(x_ref, pre_ref, du_ref, dx_ref, dpre_ref, *, m, bd):
  bm, n, _ = x_ref.shape
  rows = _rows_ok(bm, m)
  _store_columns(dpre_ref, _stream_dots(x_ref, du_ref, rows, bd, _columns(pre_ref, n, rows),
                                        dx_ref), rows)


def _stream_dots_kernel(x_ref, du_ref, dots_ref, *, m, bd):
  """dots_m = <X_m, du> per token (the fused op's gate cotangent; no dX)."""
  rows = _rows_ok(x_ref.shape[0], m)
  _store_columns(dots_ref, _stream_dots(x_ref, du_ref, rows, bd), rows)


def _write_back_fwd_kernel(x_ref, y_ref, post_ref, comb_ref, o_ref, *, m, bd):
  bm, n, d = x_ref.shape
  rows = _rows_ok(bm, m)
  post = _columns(post_ref, n, rows)
  comb = _columns(comb_ref, n * n, rows)          # comb[j * n + k]

  def chunk(d0, carry):
    cols = pl.ds(d0, bd)
    ok = _both(rows, _cols_ok(d0, bd, d))
    y = _ld(y_ref.at[:, cols], ok)
    xs = [_ld(x_ref.at[:, _at(j), cols], ok) for j in range(n)]
    for k in range(n):
      out = post[k] * y
      for j in range(n):
        out = out + comb[j * n + k] * xs[j]
      _st(o_ref.at[:, _at(k), cols], out, ok)
    return carry

  _chunks(chunk, d, bd, 0)


def _write_back_bwd_kernel(x_ref, y_ref, post_ref, comb_ref, g_ref, dx_ref, dy_ref, dpost_ref,
                           dcomb_ref, *, m, bd):
  bm, n, d = x_ref.shape
  rows = _rows_ok(bm, m)
  post = _columns(post_ref, n, rows)
  comb = _columns(comb_ref, n * n, rows)

  def chunk(d0, acc):
    dpost, dcomb = acc
    cols = pl.ds(d0, bd)
    ok = _both(rows, _cols_ok(d0, bd, d))
    g = [_ld(g_ref.at[:, _at(k), cols], ok) for k in range(n)]
    y = _ld(y_ref.at[:, cols], ok)
    dy = post[0] * g[0]
    for k in range(1, n):
      dy = dy + post[k] * g[k]
    _st(dy_ref.at[:, cols], dy, ok)
    dpost = tuple(dpost[k] + jnp.sum(g[k] * y, axis=1) for k in range(n))
    dcomb = list(dcomb)
    for j in range(n):
      dx = comb[j * n] * g[0]
      for k in range(1, n):
        dx = dx + comb[j * n + k] * g[k]
      _st(dx_ref.at[:, _at(j), cols], dx, ok)
      x = _ld(x_ref.at[:, _at(j), cols], ok)
      for k in range(n):
        dcomb[j * n + k] = dcomb[j * n + k] + jnp.sum(x * g[k], axis=1)
    return dpost, tuple(dcomb)

  zeros = lambda c: tuple(jnp.zeros((bm,), _F32) for _ in range(c))
  dpost, dcomb = _chunks(chunk, d, bd, (zeros(n), zeros(n * n)))
  for k in range(n):
    _st(dpost_ref.at[:, _at(k)], dpost[k], rows)
  for jk in range(n * n):
    _st(dcomb_ref.at[:, _at(jk)], dcomb[jk], rows)


def _mix_fwd_kernel(x_ref, fn_ref, mu_ref, r_ref, *, m, bd, eps):
  """mu = (x fn) r, exact for bf16 x (fn in three bf16 parts), r = rsqrt(mean(x^2) + eps) over a
  token's N*D features, x_ref [bm, N, D] read in chunks of bd of every stream."""
  bm, n, d = x_ref.shape
  p = fn_ref.shape[1]
  rows = _rows_ok(bm, m)

  def chunk(d0, acc):
    hi, lo, ss = acc
    cols = pl.ds(d0, bd)
    dok = _cols_ok(d0, bd, d)
    ok = _both(rows, dok)
    for i in range(n):
      x = (pltriton.load(x_ref.at[:, _at(i), cols]) if ok is None else
           pltriton.load(x_ref.at[:, _at(i), cols], mask=ok, other=0))
      f = _ld(fn_ref.at[pl.ds(i * d + d0, bd), :], None if dok is None else dok[:, None])
      f_hi, f_mid, f_lo = _split(f, 3)
      xf = x.astype(_F32)
      hi, lo = hi + _dot(x, f_hi), lo + (_dot(x, f_mid) + _dot(x, f_lo))
      ss = ss + jnp.sum(xf * xf, axis=1)
    return hi, lo, ss

  init = (jnp.zeros((bm, p), _F32), jnp.zeros((bm, p), _F32), jnp.zeros((bm,), _F32))
  hi, lo, ss = _chunks(chunk, d, bd, init)
  r = jax.lax.rsqrt(ss / (n * d) + eps)
  _st(mu_ref, (hi + lo) * r[:, None], None if rows is None else rows[:, None])
  _st(r_ref, r, rows)


def _mix_dx_kernel(x_ref, fn_ref, da_ref, coef_ref, *refs, m, bd, read_in, add):
  """dX_m = (da fn^T)_m - coef X_m [+ pre_m du] [+ dXw_m]: the normed mix's dx, with the fused
  op's read-in cotangent and the passed-through streams' cotangent added before the one rounding.
  refs: (pre_ref, du_ref if read_in) + (dxw_ref if add) + (dx_ref,)."""
  bm, n, d = x_ref.shape
  refs = list(refs)
  pre_ref, du_ref = (refs.pop(0), refs.pop(0)) if read_in else (None, None)
  dxw_ref = refs.pop(0) if add else None
  (dx_ref,) = refs
  rows = _rows_ok(bm, m)
  da_hi, da_lo = _split(_ld(da_ref, None if rows is None else rows[:, None]), 2)
  coef = _ld(coef_ref, rows)[:, None]
  pre = _columns(pre_ref, n, rows) if read_in else None

  def chunk(d0, carry):
    cols = pl.ds(d0, bd)
    dok = _cols_ok(d0, bd, d)
    ok = _both(rows, dok)
    du = _ld(du_ref.at[:, cols], ok) if read_in else None
    for i in range(n):
      f_hi, f_lo = _split(_ld(fn_ref.at[pl.ds(i * d + d0, bd), :],
                              None if dok is None else dok[:, None]), 2)
      g = _dot(da_hi, f_hi, _NT) + (_dot(da_hi, f_lo, _NT) + _dot(da_lo, f_hi, _NT))
      g = g - coef * _ld(x_ref.at[:, _at(i), cols], ok)
      if read_in:
        g = g + pre[i] * du
      if add:
        g = g + _ld(dxw_ref.at[:, _at(i), cols], ok)
      _st(dx_ref.at[:, _at(i), cols], g, ok)
    return carry

  _chunks(chunk, d, bd, 0)


# ---- drivers (one device's arrays, tokens flattened) ------------------------------------------

def _call(kernel, name, op, cfg, X_BTND, ins, outs, aliases=None, **kw):
  """pallas_call over cdiv(B*T, block_m) programs for streams X [B,T,N,D], tiled by `op`'s Blocks.
  ins / outs: (array or ShapeDtypeStruct, token-blocked?) pairs; a token-blocked array gets
  [block_m, rest..] blocks, others whole; aliases: {input index: output index} buffers shared."""
  B, T, _, D = X_BTND.shape
  m = B * T
  b = _blocks(op, cfg.blocks, m, D)
  def spec(shape, blocked):
    nd = len(shape)
    if blocked:
      return pl.BlockSpec((b.block_m, *shape[1:]), lambda i: (i,) + (0,) * (nd - 1))
    return pl.BlockSpec(tuple(shape), lambda i: (0,) * nd)
  return pl.pallas_call(
      functools.partial(kernel, m=m, bd=b.block_d, **kw),
      grid=(pl.cdiv(m, b.block_m),),
      in_specs=[spec(a.shape, blk) for a, blk in ins],
      out_specs=[spec(o.shape, blk) for o, blk in outs],
      out_shape=[o for o, _ in outs],
      # Always Triton params: without them a GPU pallas_call may pick the Mosaic GPU backend.
      compiler_params=pltriton.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
      input_output_aliases=aliases or {}, interpret=cfg.interpret, name=name,
  )(*(a for a, _ in ins))


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def _flat(a, tail: int):
  """[B, T, rest..] -> [B*T, rest..] (`tail` trailing dims kept)."""
  return a.reshape(-1, *a.shape[a.ndim - tail:])


def _read_in_fwd_dev(X_BTND, pre_BTN, cfg):
  B, T, N, D = X_BTND.shape
  M = B * T
  (u,) = _call(_read_in_fwd_kernel, 'hc_read_in_fwd', 'read_in', cfg, X_BTND,
               [(_flat(X_BTND, 2), True), (_flat(pre_BTN, 1), True)],
               [(_sds((M, D), X_BTND.dtype), True)])
  return u.reshape(B, T, D)


def _read_in_bwd_dev(X_BTND, pre_BTN, du_BTD, cfg):
  B, T, N, D = X_BTND.shape
  M = B * T
  dx, dpre = _call(_read_in_bwd_kernel, 'hc_read_in_bwd', 'read_in', cfg, X_BTND,
                   [(_flat(X_BTND, 2), True), (_flat(pre_BTN, 1), True), (_flat(du_BTD, 1), True)],
                   [(_sds((M, N, D), X_BTND.dtype), True), (_sds((M, N), _F32), True)])
  return dx.reshape(X_BTND.shape), dpre.reshape(B, T, N).astype(pre_BTN.dtype)


def _write_back_fwd_dev(X_BTND, y_BTD, post_BTN, comb_BTNN, cfg):
  B, T, N, D = X_BTND.shape
  M = B * T
  (out,) = _call(_write_back_fwd_kernel, 'hc_write_back_fwd', 'write_back', cfg, X_BTND,
                 [(_flat(X_BTND, 2), True), (_flat(y_BTD, 1), True), (_flat(post_BTN, 1), True),
                  (comb_BTNN.reshape(M, N * N), True)],
                 [(_sds((M, N, D), X_BTND.dtype), True)])
  return out.reshape(X_BTND.shape)


def _write_back_bwd_dev(X_BTND, y_BTD, post_BTN, comb_BTNN, g_BTND, cfg):
  B, T, N, D = X_BTND.shape
  M = B * T
  dx, dy, dpost, dcomb = _call(
      _write_back_bwd_kernel, 'hc_write_back_bwd', 'write_back', cfg, X_BTND,
      [(_flat(X_BTND, 2), True), (_flat(y_BTD, 1), True), (_flat(post_BTN, 1), True),
       (comb_BTNN.reshape(M, N * N), True), (_flat(g_BTND, 2), True)],
      [(_sds((M, N, D), X_BTND.dtype), True), (_sds((M, D), y_BTD.dtype), True),
       (_sds((M, N), _F32), True), (_sds((M, N * N), _F32), True)])
  return (dx.reshape(X_BTND.shape), dy.reshape(y_BTD.shape),
          dpost.reshape(post_BTN.shape).astype(post_BTN.dtype),
          dcomb.reshape(comb_BTNN.shape).astype(comb_BTNN.dtype))


def _mix_fwd_dev(X_BTND, fn_KP, cfg, eps):
  B, T, N, D = X_BTND.shape
  M, P = B * T, fn_KP.shape[1]
  mu, r = _call(_mix_fwd_kernel, 'hc_normed_mix_fwd', 'normed_mix', cfg, X_BTND,
                [(_flat(X_BTND, 2), True), (fn_KP, False)],
                [(_sds((M, P), _F32), True), (_sds((M,), _F32), True)], eps=eps)
  return mu.reshape(B, T, P), r.reshape(B, T)


def _mix_dx_dev(X_BTND, fn_KP, da_BTP, coef_BT, *extra, cfg, read_in=False, add=False):
  """dX of the normed mix; `extra`: (pre [B,T,N], du [B,T,D]) if read_in, then dXw [B,T,N,D]
  if add (its buffer becomes dX's)."""
  B, T, N, D = X_BTND.shape
  M = B * T
  extra = [(_flat(e, e.ndim - 2), True) for e in extra]
  ins = [(_flat(X_BTND, 2), True), (fn_KP, False), (_flat(da_BTP, 1), True),
         (coef_BT.reshape(M), True), *extra]
  (dx,) = _call(_mix_dx_kernel, 'hc_mix_read_in_dx' if read_in else 'hc_normed_mix_dx',
                'mix_read_in_dx' if read_in else 'normed_mix', cfg, X_BTND, ins,
                [(_sds((M, N, D), X_BTND.dtype), True)],
                aliases={len(ins) - 1: 0} if add else None, read_in=read_in, add=add)
  return dx.reshape(X_BTND.shape)


def _stream_dots_dev(X_BTND, du_BTD, cfg):
  B, T, N, D = X_BTND.shape
  M = B * T
  (dots,) = _call(_stream_dots_kernel, 'hc_mix_read_in_dots', 'read_in', cfg, X_BTND,
                  [(_flat(X_BTND, 2), True), (_flat(du_BTD, 1), True)],
                  [(_sds((M, N), _F32), True)])
  return dots.reshape(B, T, N)


# Logical axes for per_device: tokens shard as the activations do, the rest is whole per device.
_BT, _BT_, _BT__ = ('batch', 'seq'), ('batch', 'seq', None), ('batch', 'seq', None, None)
_WHOLE = (None, None)


# ---- custom VJPs ------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _read_in(X_BTND, pre_BTN, cfg):
  fwd = functools.partial(_read_in_fwd_dev, cfg=cfg)
  return per_device(fwd, (_BT__, _BT_), (_BT_,))(X_BTND, pre_BTN)


def _read_in_vjp_fwd(X_BTND, pre_BTN, cfg):
  return _read_in(X_BTND, pre_BTN, cfg), (X_BTND, pre_BTN)


def _read_in_vjp_bwd(cfg, res, du_BTD):
  bwd = functools.partial(_read_in_bwd_dev, cfg=cfg)
  return per_device(bwd, (_BT__, _BT_, _BT_), (_BT__, _BT_))(*res, du_BTD)


_read_in.defvjp(_read_in_vjp_fwd, _read_in_vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _write_back(X_BTND, y_BTD, post_BTN, comb_BTNN, cfg):
  fwd = functools.partial(_write_back_fwd_dev, cfg=cfg)
  return per_device(fwd, (_BT__, _BT_, _BT_, _BT__), (_BT__,))(X_BTND, y_BTD, post_BTN,
                                                                  comb_BTNN)


def _write_back_vjp_fwd(X_BTND, y_BTD, post_BTN, comb_BTNN, cfg):
  res = (X_BTND, y_BTD, post_BTN, comb_BTNN)
  return _write_back(*res, cfg), res


def _write_back_vjp_bwd(cfg, res, g_BTND):
  bwd = functools.partial(_write_back_bwd_dev, cfg=cfg)
  return per_device(bwd, (_BT__, _BT_, _BT_, _BT__, _BT__),
                    (_BT__, _BT_, _BT_, _BT__))(*res, g_BTND)


_write_back.defvjp(_write_back_vjp_fwd, _write_back_vjp_bwd)


def _pad_cols(fn_KC):
  """fp32 fn [K, C] -> [K, P] with zero columns (P = max(16, next_pow2(C)))."""
  return pad_axis(fn_KC.astype(_F32), 1, max(_MIN_DOT, next_pow2(fn_KC.shape[1])))


def _mix_residuals(X_BTND, fn_KC, eps, cfg):
  fwd = functools.partial(_mix_fwd_dev, cfg=cfg, eps=eps)
  mu, r = per_device(fwd, (_BT__, _WHOLE), (_BT_, _BT))(X_BTND, _pad_cols(fn_KC))
  return mu[..., :fn_KC.shape[1]], r


def _mix_cotangents(X_BTND, fn_KC, mu_BTC, r_BT, dmu_BTC):
  """As reference._mix_rows_bwd, from mu = a r: da = dmu r (padded to P columns), the dx
  kernel's coef = (sum_c dmu a) r^3 / K = (sum_c dmu mu) r^2 / K, and dfn = x^T da (an XLA GEMM:
  the module docstring says why)."""
  B, T, N, D = X_BTND.shape
  da_BTC = dmu_BTC * r_BT[..., None]
  dfn_KC = dot_f32(X_BTND.reshape(B * T, N * D), da_BTC.reshape(B * T, -1), ((0,), (0,)),
                   'split')
  coef_BT = jnp.sum(dmu_BTC * mu_BTC, axis=-1) * r_BT ** 2 / (N * D)
  fn_KP = _pad_cols(fn_KC)
  return fn_KP, pad_axis(da_BTC, 2, fn_KP.shape[1]), coef_BT, dfn_KC.astype(fn_KC.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _normed_mix(X_BTND, fn_KC, eps, cfg):
  return _mix_residuals(X_BTND, fn_KC, eps, cfg)[0]


def _normed_mix_vjp_fwd(X_BTND, fn_KC, eps, cfg):
  mu_BTC, r_BT = _mix_residuals(X_BTND, fn_KC, eps, cfg)
  return mu_BTC, (X_BTND, fn_KC, mu_BTC, r_BT)


def _normed_mix_vjp_bwd(eps, cfg, res, dmu_BTC):
  """dx = da fn^T - coef x (the kernel); dfn from _mix_cotangents."""
  X_BTND, fn_KC, mu_BTC, r_BT = res
  fn_KP, da_BTP, coef_BT, dfn_KC = _mix_cotangents(X_BTND, fn_KC, mu_BTC, r_BT, dmu_BTC)
  dx = per_device(functools.partial(_mix_dx_dev, cfg=cfg), (_BT__, _WHOLE, _BT_, _BT),
                  (_BT__,))(X_BTND, fn_KP, da_BTP, coef_BT)
  return dx, dfn_KC


_normed_mix.defvjp(_normed_mix_vjp_fwd, _normed_mix_vjp_bwd)


def _mix_read_in_residuals(X_BTND, fn_KC, scale, base_N, eps, pre_eps, cfg):
  """(mu [B,T,C], r [B,T], s [B,T,N] = the gate's sigmoid, u [B,T,D]): the normed mix's
  split-bf16 GEMMs in XLA (the module docstring says why), then the read-in kernel."""
  mu, r = reference.normed_mix_and_rsqrt(X_BTND, fn_KC, eps, 'split', cfg.keep)
  s = reference.gate(mu, scale, base_N)
  u = per_device(functools.partial(_read_in_fwd_dev, cfg=cfg), (_BT__, _BT_), (_BT_,))(
      X_BTND, s + pre_eps)
  return mu, r, s, u


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _mix_read_in(X_BTND, fn_KC, scale, base_N, eps, pre_eps, pass_streams, cfg):
  mu, _, _, u = _mix_read_in_residuals(X_BTND, fn_KC, scale, base_N, eps, pre_eps, cfg)
  return (mu, u, X_BTND) if pass_streams else (mu, u)


def _mix_read_in_vjp_fwd(X_BTND, fn_KC, scale, base_N, eps, pre_eps, pass_streams, cfg):
  mu, r, s, u = _mix_read_in_residuals(X_BTND, fn_KC, scale, base_N, eps, pre_eps, cfg)
  out = (mu, u, X_BTND) if pass_streams else (mu, u)
  return out, (X_BTND, fn_KC, scale, base_N, mu, r, s)


def _mix_read_in_vjp_bwd(eps, pre_eps, pass_streams, cfg, res, cts):
  """dpre_m = <X_m, du> (kernel 1); through the gate into dmu's first N columns, dscale, dbase;
  then the normed mix's cotangents, and dX = da fn^T - coef X + pre du [+ dXw] (kernel 2)."""
  X_BTND, fn_KC, scale, base_N, mu, r, s = res
  dmu, du = cts[:2]
  cfg = dataclasses.replace(cfg, blocks=None)      # `blocks` tiles the forward's read-in only
  N = X_BTND.shape[2]
  dots = per_device(functools.partial(_stream_dots_dev, cfg=cfg), (_BT__, _BT_), (_BT_,))
  dz = dots(X_BTND, du) * s * (1.0 - s)                    # d loss / d (scale mu + base), [B,T,N]
  dscale = jnp.sum(dz * mu[..., :N])
  dbase = jnp.sum(dz, axis=(0, 1))
  dmu = dmu.at[..., :N].add(scale.astype(_F32) * dz)
  fn_KP, da_BTP, coef_BT, dfn_KC = _mix_cotangents(X_BTND, fn_KC, mu, r, dmu)
  extra = (s + pre_eps, du) + ((cts[2],) if pass_streams else ())
  dx = per_device(functools.partial(_mix_dx_dev, cfg=cfg, read_in=True, add=pass_streams),
                  (_BT__, _WHOLE, _BT_, _BT, _BT_, _BT_) + ((_BT__,) if pass_streams else ()),
                  (_BT__,))(X_BTND, fn_KP, da_BTP, coef_BT, *extra)
  return dx, dfn_KC, dscale.astype(scale.dtype), dbase.astype(base_N.dtype)


_mix_read_in.defvjp(_mix_read_in_vjp_fwd, _mix_read_in_vjp_bwd)


# ---- public ops -------------------------------------------------------------------------------

def read_in(X_BTND: jax.Array, pre_BTN: jax.Array, *, blocks: Blocks | dict | None = None,
            interpret: bool | None = None) -> jax.Array:
  """u [B,T,D] = sum_m pre_m X_m in X's dtype (pre fp32), by the Triton kernels both ways."""
  return _read_in(X_BTND, pre_BTN, _cfg(blocks, interpret))


def write_back(X_BTND: jax.Array, y_BTD: jax.Array, post_BTN: jax.Array, comb_BTNN: jax.Array, *,
               blocks: Blocks | dict | None = None, interpret: bool | None = None) -> jax.Array:
  """X' [B,T,N,D] = post_k y + sum_j comb[j,k] X_j in X's dtype (post, comb fp32), by the
  Triton kernels both ways."""
  return _write_back(X_BTND, y_BTD, post_BTN, comb_BTNN, _cfg(blocks, interpret))


def normed_mix(X_BTND: jax.Array, fn_KC: jax.Array, eps: float, *,
               blocks: Blocks | dict | None = None, interpret: bool | None = None) -> jax.Array:
  """mu [B,T,C] = (x . fn) rsqrt(mean(x^2) + eps) over each token's ND features, fp32, for bf16
  streams X (exact products, as dot_f32's 'split'); fn [N*D, C] fp32."""
  if X_BTND.dtype != _BF16:
    raise ValueError(f'hc_mix gpu normed_mix: X_BTND is {X_BTND.dtype}; the kernels take bf16 '
                     'streams (the seam keeps other dtypes on the reference)')
  return _normed_mix(X_BTND, fn_KC, float(eps), _cfg(blocks, interpret))


def mix_read_in(X_BTND: jax.Array, fn_KC: jax.Array, scale: jax.Array, base_N: jax.Array,
                eps: float, pre_eps: float, *, pass_streams: bool = False,
                blocks: Blocks | dict | None = None, interpret: bool | None = None):
  """The normed mix and the read-in as one op, for bf16 streams: mu [B,T,C] as normed_mix,
  pre = sigmoid(scale mu[..., :N] + base) + pre_eps and u = sum_m pre_m X_m; returns (mu, u), or
  (mu, u, X) with `pass_streams`: X handed on for the site's write-back, so that the write-back's
  stream cotangent is added inside this op's dX kernel instead of by a separate pass. `blocks`
  tiles the forward's read-in kernel (default 'read_in'); the backward's two kernels take their
  defaults ('read_in' for the stream dots, 'mix_read_in_dx')."""
  if X_BTND.dtype != _BF16:
    raise ValueError(f'hc_mix gpu mix_read_in: X_BTND is {X_BTND.dtype}; the kernels take bf16 '
                     'streams (the seam keeps other dtypes on the reference)')
  return _mix_read_in(X_BTND, fn_KC, scale, base_N, float(eps), float(pre_eps), pass_streams,
                      _cfg(blocks, interpret, barrier_active()))
