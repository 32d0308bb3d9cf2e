"""mHC's stream mixing on GPU (Pallas Triton): one kernel per pass that reads and writes the
streams once.

Dims: B batch, T positions, M = B*T tokens of a device, N mHC streams, D model dim, K = N*D
features of a token, C = (2+N)N coefficient slots (N at the HyperHead), P = C padded to a power
of two >= 16 (the narrowest tl.dot), bm tokens per program, bd features per chunk.

Each kernel runs one program per block of bm tokens and loops over D (or K) in chunks of bd, so
a program holds a few [bm, bd] tiles and its per-token sums, and no [B,T,N,N,D] product or fp32
copy of the streams is ever written. Under XLA the same passes were several memory-bound kernels
each (fp32 converts, reductions, the adds of the stream cotangents); here:

  read_in     fwd  u = sum_m pre_m X_m                        reads X, writes u
              bwd  dX_m = pre_m du, dpre_m = <X_m, du>        reads X, du; writes dX
  write_back  fwd  X'_k = post_k y + sum_j comb[j,k] X_j      reads X, y; writes X'
              bwd  dX_j = sum_k comb[j,k] g_k, dy = sum_k post_k g_k, dpost_k = <g_k, y>,
                   dcomb[j,k] = <X_j, g_k>                    reads X, y, g; writes dX, dy
  normed_mix  fwd  a = x fn, r = rsqrt(mean(x^2) + eps), mu = a r   reads x, writes a, r
              bwd  dx = da fn^T - (sum_c dmu a) r^3 x / K      reads x, writes dx
with fp32 arithmetic and accumulation throughout and results rounded once to the streams' dtype.

The normed mix's products are exact for bf16 x as layers.dot_f32's 'split' mode is: fn is split
in the kernel into three bf16 parts (hi + mid + lo = fn exactly) on tensor cores with fp32
accumulation, hi and (mid + lo) summed apart. Its dx takes da fn^T as three bf16 products of
two-part splits (hi.hi + hi.lo + lo.hi: ~2^-16 relative, far below dx's bf16 rounding), not an
fp32 FMA GEMM, which at C = 24 columns would run several times the pass's memory time. Its
dfn = x^T da stays an XLA GEMM (dot_f32 'split'): it contracts over all tokens, i.e. across
programs, so a kernel would need atomics or [M/bm, K, C] partial sums; the GEMM reads x once near
bandwidth. Only bf16 x takes the kernels here (the seam keeps fp32 streams on the reference);
read-in and write-back take either dtype.

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

from v4jax.kernels.pallas_common import gpu_interpret, next_pow2, pad_axis, per_device
from v4jax.model.layers import dot_f32

_F32, _BF16 = jnp.float32, jnp.bfloat16
_NT = (((1,), (1,)), ((), ()))   # a [M,C] . b [N,C] -> [M,N]
_MIN_DOT = 16                    # tl.dot's smallest dimension


@dataclasses.dataclass(frozen=True)
class Blocks:
  """One op's tiling (its forward and backward kernels): block_m tokens per program, block_d
  features per chunk (of D; of K = N*D for the normed mix), powers of two (>= 16 for the normed
  mix, whose tiles feed tl.dot), Triton warps and pipeline stages. None takes the op's default."""
  block_m: int | None = None
  block_d: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None


# (block_m, block_d, warps, stages) per op: the H200 sweeps of `tools/bench_mhc.py --hc_block_m
# .. --hc_num_stages ..` at bench_h200's streams [8,4096,4,1536] (seventeenth session), the least
# forward + forward-and-backward time (what a remat step runs): read_in 0.62 ms against 0.82 with
# the first guess (16, 256, 4, 2), normed_mix 1.21 against 1.37 with (64, 128, 4, 2).
_DEFAULTS = {'read_in': (4, 128, 4, 2), 'write_back': (8, 128, 4, 1), 'normed_mix': (64, 128, 4, 1)}


def _blocks(op: str, b: Blocks | None, m: int, d: int) -> Blocks:
  """Blocks (or None) -> all fields set, checked, and capped at the tokens and features there
  are."""
  b = b or Blocks()
  bm, bd, warps, stages = _DEFAULTS[op]
  lo = _MIN_DOT if op == 'normed_mix' else 1
  for name, v in (('block_m', b.block_m), ('block_d', b.block_d)):
    if v is not None and (v < lo or v != next_pow2(v)):
      raise ValueError(f'hc_mix gpu {op}: {name}={v} must be a power of two >= {lo}')
  return Blocks(min(b.block_m or bm, max(lo, next_pow2(m))),
                min(b.block_d or bd, max(lo, next_pow2(d))),
                b.num_warps or warps, b.num_stages or stages)


def resolved_blocks(op: str, blocks: Blocks | dict | None, shape_BTND) -> Blocks:
  """The tiling `op` ('read_in', 'write_back' or 'normed_mix') runs with on streams of this
  [B,T,N,D] shape (one device's) when given `blocks` (tools/bench_mhc.py records it)."""
  B, T, N, D = shape_BTND
  b = Blocks(**blocks) if isinstance(blocks, dict) else blocks
  return _blocks(op, b, B * T, N * D if op == 'normed_mix' else D)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  blocks: Blocks | None
  interpret: bool


def _cfg(blocks, interpret) -> _Cfg:
  return _Cfg(Blocks(**blocks) if isinstance(blocks, dict) else blocks, gpu_interpret(interpret))


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
  bm, n, d = x_ref.shape
  rows = _rows_ok(bm, m)
  pre = _columns(pre_ref, n, rows)

  def chunk(d0, acc):
    cols = pl.ds(d0, bd)
    ok = _both(rows, _cols_ok(d0, bd, d))
    du = _ld(du_ref.at[:, cols], ok)
    out = []
    for i in range(n):
      _st(dx_ref.at[:, _at(i), cols], pre[i] * du, ok)
      out.append(acc[i] + jnp.sum(_ld(x_ref.at[:, _at(i), cols], ok) * du, axis=1))
    return tuple(out)

  dpre = _chunks(chunk, d, bd, tuple(jnp.zeros((bm,), _F32) for _ in range(n)))
  for i in range(n):
    _st(dpre_ref.at[:, _at(i)], dpre[i], rows)


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


def _mix_fwd_kernel(x_ref, fn_ref, a_ref, r_ref, *, m, bd, eps):
  bm, k = x_ref.shape
  p = fn_ref.shape[1]
  rows = _rows_ok(bm, m)

  def chunk(k0, acc):
    hi, lo, ss = acc
    cols = pl.ds(k0, bd)
    kok = _cols_ok(k0, bd, k)
    ok = _both(rows, kok)
    x = pltriton.load(x_ref.at[:, cols]) if ok is None else pltriton.load(
        x_ref.at[:, cols], mask=ok, other=0)
    f = _ld(fn_ref.at[cols, :], None if kok is None else kok[:, None])
    f_hi, f_mid, f_lo = _split(f, 3)
    xf = x.astype(_F32)
    return (hi + _dot(x, f_hi), lo + (_dot(x, f_mid) + _dot(x, f_lo)),
            ss + jnp.sum(xf * xf, axis=1))

  init = (jnp.zeros((bm, p), _F32), jnp.zeros((bm, p), _F32), jnp.zeros((bm,), _F32))
  hi, lo, ss = _chunks(chunk, k, bd, init)
  _st(a_ref, hi + lo, None if rows is None else rows[:, None])
  _st(r_ref, jax.lax.rsqrt(ss / k + eps), rows)


def _mix_dx_kernel(x_ref, fn_ref, da_ref, coef_ref, dx_ref, *, m, bd):
  bm, k = x_ref.shape
  rows = _rows_ok(bm, m)
  da_hi, da_lo = _split(_ld(da_ref, None if rows is None else rows[:, None]), 2)
  coef = _ld(coef_ref, rows)[:, None]

  def chunk(k0, carry):
    cols = pl.ds(k0, bd)
    kok = _cols_ok(k0, bd, k)
    ok = _both(rows, kok)
    f_hi, f_lo = _split(_ld(fn_ref.at[cols, :], None if kok is None else kok[:, None]), 2)
    g = _dot(da_hi, f_hi, _NT) + (_dot(da_hi, f_lo, _NT) + _dot(da_lo, f_hi, _NT))
    _st(dx_ref.at[:, cols], g - coef * _ld(x_ref.at[:, cols], ok), ok)
    return carry

  _chunks(chunk, k, bd, 0)


# ---- drivers (one device's arrays, tokens flattened) ------------------------------------------

def _call(kernel, name, m, b: Blocks, interpret, ins, outs, **kw):
  """pallas_call over cdiv(m, block_m) programs. ins / outs: (array or ShapeDtypeStruct,
  token-blocked?) pairs; a token-blocked array gets [block_m, rest..] blocks, others whole."""
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
      interpret=interpret, name=name,
  )(*(a for a, _ in ins))


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def _flat(a, tail: int):
  """[B, T, rest..] -> [B*T, rest..] (`tail` trailing dims kept)."""
  return a.reshape(-1, *a.shape[a.ndim - tail:])


def _read_in_fwd_dev(X_BTND, pre_BTN, cfg):
  B, T, N, D = X_BTND.shape
  M = B * T
  b = _blocks('read_in', cfg.blocks, M, D)
  (u,) = _call(_read_in_fwd_kernel, 'hc_read_in_fwd', M, b, cfg.interpret,
               [(_flat(X_BTND, 2), True), (_flat(pre_BTN, 1), True)],
               [(_sds((M, D), X_BTND.dtype), True)])
  return u.reshape(B, T, D)


def _read_in_bwd_dev(X_BTND, pre_BTN, du_BTD, cfg):
  B, T, N, D = X_BTND.shape
  M = B * T
  b = _blocks('read_in', cfg.blocks, M, D)
  dx, dpre = _call(_read_in_bwd_kernel, 'hc_read_in_bwd', M, b, cfg.interpret,
                   [(_flat(X_BTND, 2), True), (_flat(pre_BTN, 1), True), (_flat(du_BTD, 1), True)],
                   [(_sds((M, N, D), X_BTND.dtype), True), (_sds((M, N), _F32), True)])
  return dx.reshape(X_BTND.shape), dpre.reshape(B, T, N).astype(pre_BTN.dtype)


def _write_back_fwd_dev(X_BTND, y_BTD, post_BTN, comb_BTNN, cfg):
  B, T, N, D = X_BTND.shape
  M = B * T
  b = _blocks('write_back', cfg.blocks, M, D)
  (out,) = _call(_write_back_fwd_kernel, 'hc_write_back_fwd', M, b, cfg.interpret,
                 [(_flat(X_BTND, 2), True), (_flat(y_BTD, 1), True), (_flat(post_BTN, 1), True),
                  (comb_BTNN.reshape(M, N * N), True)],
                 [(_sds((M, N, D), X_BTND.dtype), True)])
  return out.reshape(X_BTND.shape)


def _write_back_bwd_dev(X_BTND, y_BTD, post_BTN, comb_BTNN, g_BTND, cfg):
  B, T, N, D = X_BTND.shape
  M = B * T
  b = _blocks('write_back', cfg.blocks, M, D)
  dx, dy, dpost, dcomb = _call(
      _write_back_bwd_kernel, 'hc_write_back_bwd', M, b, cfg.interpret,
      [(_flat(X_BTND, 2), True), (_flat(y_BTD, 1), True), (_flat(post_BTN, 1), True),
       (comb_BTNN.reshape(M, N * N), True), (_flat(g_BTND, 2), True)],
      [(_sds((M, N, D), X_BTND.dtype), True), (_sds((M, D), y_BTD.dtype), True),
       (_sds((M, N), _F32), True), (_sds((M, N * N), _F32), True)])
  return (dx.reshape(X_BTND.shape), dy.reshape(y_BTD.shape),
          dpost.reshape(post_BTN.shape).astype(post_BTN.dtype),
          dcomb.reshape(comb_BTNN.shape).astype(comb_BTNN.dtype))


def _mix_fwd_dev(X_BTND, fn_KP, cfg, eps):
  B, T, N, D = X_BTND.shape
  M, K = B * T, N * D
  b = _blocks('normed_mix', cfg.blocks, M, K)
  P = fn_KP.shape[1]
  a, r = _call(_mix_fwd_kernel, 'hc_normed_mix_fwd', M, b, cfg.interpret,
               [(X_BTND.reshape(M, K), True), (fn_KP, False)],
               [(_sds((M, P), _F32), True), (_sds((M,), _F32), True)], eps=eps)
  return a.reshape(B, T, P), r.reshape(B, T)


def _mix_dx_dev(X_BTND, fn_KP, da_BTP, coef_BT, cfg):
  B, T, N, D = X_BTND.shape
  M, K = B * T, N * D
  b = _blocks('normed_mix', cfg.blocks, M, K)
  (dx,) = _call(_mix_dx_kernel, 'hc_normed_mix_dx', M, b, cfg.interpret,
                [(X_BTND.reshape(M, K), True), (fn_KP, False), (_flat(da_BTP, 1), True),
                 (coef_BT.reshape(M), True)],
                [(_sds((M, K), X_BTND.dtype), True)])
  return dx.reshape(X_BTND.shape)


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
  a, r = per_device(fwd, (_BT__, _WHOLE), (_BT_, _BT))(X_BTND, _pad_cols(fn_KC))
  return a[..., :fn_KC.shape[1]], r


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _normed_mix(X_BTND, fn_KC, eps, cfg):
  a_BTC, r_BT = _mix_residuals(X_BTND, fn_KC, eps, cfg)
  return a_BTC * r_BT[..., None]


def _normed_mix_vjp_fwd(X_BTND, fn_KC, eps, cfg):
  a_BTC, r_BT = _mix_residuals(X_BTND, fn_KC, eps, cfg)
  return a_BTC * r_BT[..., None], (X_BTND, fn_KC, a_BTC, r_BT)


def _normed_mix_vjp_bwd(eps, cfg, res, dmu_BTC):
  """As reference._mix_rows_bwd: da = dmu r; dfn = x^T da (an XLA GEMM: the module docstring
  says why); dx = da fn^T - (sum_c dmu a) r^3 x / K (the kernel)."""
  X_BTND, fn_KC, a_BTC, r_BT = res
  B, T, N, D = X_BTND.shape
  da_BTC = dmu_BTC * r_BT[..., None]
  dfn_KC = dot_f32(X_BTND.reshape(B * T, N * D), da_BTC.reshape(B * T, -1), ((0,), (0,)),
                   'split')
  coef_BT = jnp.sum(dmu_BTC * a_BTC, axis=-1) * r_BT ** 3 / (N * D)
  fn_KP = _pad_cols(fn_KC)
  dx = per_device(functools.partial(_mix_dx_dev, cfg=cfg), (_BT__, _WHOLE, _BT_, _BT),
                  (_BT__,))(X_BTND, fn_KP, pad_axis(da_BTC, 2, fn_KP.shape[1]), coef_BT)
  return dx, dfn_KC.astype(fn_KC.dtype)


_normed_mix.defvjp(_normed_mix_vjp_fwd, _normed_mix_vjp_bwd)


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
