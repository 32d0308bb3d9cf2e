"""Lightning indexer on GPU: fused score kernel and a radix-select top-k kernel (Pallas Triton).

Dims: B batch, T query positions, S key positions, H indexer heads, D indexer head dim, K top-k.

Scores I[t,s] = Σ_h w[t,h]·ReLU(q[t,h]·k[s]) (scales folded into w by the caller) come from one
kernel over (query block, key block) tiles: a loop over heads of [bt,D]x[D,bs] dots, ReLU, head
weight and sum, fp32 accumulation, the causal / segment mask applied in the epilogue and tiles
entirely above the diagonal skipped. Top-k never sees a T x T matrix: queries are processed in
chunks whose [B, Tc, S_c] fp32 score slab fits `slab_bytes` (S_c stops at the chunk's last row).

Top-k, one program per query row: scores map to order-preserving int32 keys (-0.0 counts as
+0.0); a radix search over the key bits (RADIX_BITS bits per sweep, starting below the
common prefix of the row's min and max) finds the exact k-th largest key; a last sweep keeps
every key above it plus the first ties in position order (ties go to the smaller s, as SPEC §3
asks) and writes them compacted with a prefix sum. Each row reads only its allowed prefix
(s <= t). The output holds the same set as `lax.top_k` would, ordered by position (the order
carries no meaning downstream), with -1 in slots past min(K, #allowed).

The gradient of `indexer_scores` (dense warm-up KL) reuses the jnp reference's VJP.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from v4jax.kernels.indexer import reference
from v4jax.kernels.pallas_common import NEG_INF, with_reference_vjp, gpu_interpret, next_pow2, pad_axis, round_up

_NT = (((1,), (1,)), ((), ()))
_INT_MIN = -2**31
_INT_MAX = 2**31 - 1
# Bits resolved per top-k radix sweep: 1 = one compare per key per sweep (up to 32 sweeps); b > 1
# counts 2^b candidate digits per sweep (up to 32/b sweeps, 2^b compares per key).
RADIX_BITS = 1


def _params(num_warps=None, num_stages=None):
  # Always Triton params: without them a GPU pallas_call may pick the Mosaic GPU backend.
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- scores


def _score_kernel(q_ref, k_ref, w_ref, sq_ref, sk_ref, o_ref, *, bt, bs, t0, n_keys, masked):
  qi, si = pl.program_id(1), pl.program_id(2)
  t_idx = t0 + qi * bt + jnp.arange(bt, dtype=jnp.int32)
  s_idx = si * bs + jnp.arange(bs, dtype=jnp.int32)

  def compute():
    k = k_ref[...]

    def head(h, acc):
      d = jax.lax.dot_general(q_ref[h], k, _NT, preferred_element_type=jnp.float32)
      return acc + w_ref[h][:, None] * jnp.maximum(d, 0.0)
    acc = jax.lax.fori_loop(0, q_ref.shape[0], head, jnp.zeros((bt, bs), jnp.float32))
    if masked:
      ok = (s_idx[None, :] <= t_idx[:, None]) & (s_idx[None, :] < n_keys)
      ok = ok & (sq_ref[...][:, None] == sk_ref[...][None, :])
      acc = jnp.where(ok, acc, NEG_INF)
    o_ref[...] = acc

  if not masked:
    compute()
    return
  live = si * bs <= t0 + qi * bt + bt - 1

  @pl.when(live)
  def _():
    compute()

  @pl.when(jnp.logical_not(live))
  def _():
    o_ref[...] = jnp.full((bt, bs), NEG_INF, jnp.float32)


def _score_slab(qT, k, wT, seg_q, seg_k, *, t0, rows, n_cols, n_keys, masked, bt, bs, interpret,
                num_warps=None, num_stages=None):
  """fp32 scores [B, rows, n_cols] of query rows [t0, t0+rows) against keys [0, n_cols).

  qT [B,H,Tp,D], wT [B,H,Tp], seg_q [B,Tp], k [B,Sp,D], seg_k [B,Sp], padded to the blocks.
  """
  B, H, _, D = qT.shape
  kernel = functools.partial(_score_kernel, bt=bt, bs=bs, t0=t0, n_keys=n_keys, masked=masked)
  r0 = t0 // bt
  return pl.pallas_call(
      kernel,
      grid=(B, rows // bt, n_cols // bs),
      in_specs=[pl.BlockSpec((None, H, bt, D), lambda b, i, j: (b, 0, r0 + i, 0)),
                pl.BlockSpec((None, bs, D), lambda b, i, j: (b, j, 0)),
                pl.BlockSpec((None, H, bt), lambda b, i, j: (b, 0, r0 + i)),
                pl.BlockSpec((None, bt), lambda b, i, j: (b, r0 + i)),
                pl.BlockSpec((None, bs), lambda b, i, j: (b, j))],
      out_specs=pl.BlockSpec((None, bt, bs), lambda b, i, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct((B, rows, n_cols), jnp.float32),
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name='indexer_scores',
  )(qT, k, wT, seg_q, seg_k)


def _layout(q, k, w, seg, bt, bs, s_mult):
  """Transposes q/w head-major and pads T to bt and S to s_mult (a multiple of bs)."""
  B, T, H, D = q.shape
  S = k.shape[1]
  Tp, Sp = round_up(T, bt), round_up(S, s_mult)
  qT = pad_axis(jnp.transpose(q, (0, 2, 1, 3)), 2, Tp)
  wT = pad_axis(jnp.transpose(w.astype(jnp.float32), (0, 2, 1)), 2, Tp)
  kp = pad_axis(k.astype(q.dtype), 1, Sp)
  if seg is None:
    seg_q, seg_k = jnp.zeros((B, Tp), jnp.int32), jnp.zeros((B, Sp), jnp.int32)
  else:
    seg_q = pad_axis(seg.astype(jnp.int32), 1, Tp, value=-1)
    seg_k = pad_axis(seg.astype(jnp.int32), 1, Sp, value=-2)
  return qT, kp, wT, seg_q, seg_k


def _check_blocks(**blocks):
  for name, b in blocks.items():
    if b < 16 or b != next_pow2(b):
      raise ValueError(f'indexer gpu: {name}={b} must be a power of two >= 16')


def _scores_kernel(q, k, w, opts):
  bt, bs, interpret = opts
  B, T = q.shape[:2]
  S = k.shape[1]
  qT, kp, wT, sq, sk = _layout(q, k, w, None, bt, bs, bs)
  out = _score_slab(qT, kp, wT, sq, sk, t0=0, rows=qT.shape[2], n_cols=kp.shape[1], n_keys=S,
                    masked=False, bt=bt, bs=bs, interpret=interpret)
  return out[:, :T, :S]


_scores = with_reference_vjp(_scores_kernel, reference.indexer_scores)


def indexer_scores(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, *,
                   block_t: int = 64, block_s: int = 64, interpret: bool | None = None) -> jax.Array:
  """Unmasked fp32 I [B,T,S] by the score kernel; the VJP is the jnp reference's."""
  _check_blocks(block_t=block_t, block_s=block_s)
  return _scores(q_BTHD, k_BSD, w_BTH, (block_t, block_s, gpu_interpret(interpret)))


# ----------------------------------------------------------------------------- top-k


def _to_key(x):
  """Order-preserving int32 key of fp32 x (-0.0 first becomes +0.0)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0.0, 0.0, x), jnp.int32)
  return jnp.where(bits >= 0, bits, bits ^ _INT_MAX)


def _topk_kernel(x_ref, idx_ref, val_ref, *, topk, kp, ch, n_ch, t0, radix_bits):
  t = t0 + pl.program_id(1)
  n_live = jnp.minimum(n_ch, t // ch + 1)          # chunks holding keys s <= t
  trash = kp                                       # spare slot for unselected lanes

  def sweep(fn, init):
    def body(j, carry):
      x = x_ref[pl.ds(j * ch, ch)]
      return fn(j, x, _to_key(x), x > NEG_INF, carry)
    return jax.lax.fori_loop(0, n_live, body, init)

  def stats(j, x, key, ok, c):
    n, lo, hi = c
    return (n + jnp.sum(ok.astype(jnp.int32)),
            jnp.minimum(lo, jnp.min(jnp.where(ok, key, _INT_MAX))),
            jnp.maximum(hi, jnp.max(jnp.where(ok, key, _INT_MIN))))
  n_ok, lo, hi = sweep(stats, (jnp.int32(0), jnp.int32(_INT_MAX), jnp.int32(_INT_MIN)))
  kk = jnp.minimum(n_ok, topk)

  # Radix search in the unsigned view u = key ^ INT_MIN: the largest thr_u with
  # #(u >= thr_u) >= kk. Bits above the highest bit where lo and hi differ are shared by every
  # allowed key, so the search starts below them.
  lo_u, hi_u = lo ^ _INT_MIN, hi ^ _INT_MIN
  diff = lo_u ^ hi_u
  n_bits = jnp.where(diff == 0, 0, 32 - jax.lax.clz(diff))     # bits left to resolve
  low_mask = jnp.where(n_bits >= 32, -1, jnp.left_shift(jnp.int32(1), n_bits) - 1)
  thr0 = hi_u & ~low_mask
  digits = jnp.arange(1 << radix_bits, dtype=jnp.int32)

  # One sweep per radix digit of `radix_bits` bits (the last one may be narrower): count the
  # keys >= each candidate digit at once; counts fall with the digit, so the digit kept is the
  # number of candidates whose count reaches kk, minus one (digit 0 always does).
  def digit_step(i, thr_u):
    lo_bit = jnp.maximum(n_bits - (i + 1) * radix_bits, 0)
    if radix_bits == 1:                            # scalar compares (no [ch, 2] tile)
      cand_key = (thr_u | jnp.left_shift(jnp.int32(1), lo_bit)) ^ _INT_MIN
      cnt = sweep(lambda j, x, key, ok, c: c + jnp.sum((ok & (key >= cand_key)).astype(jnp.int32)),
                  jnp.int32(0))
      return thr_u | jnp.left_shift((cnt >= kk).astype(jnp.int32), lo_bit)
    width = n_bits - i * radix_bits - lo_bit
    cand_key = (thr_u | jnp.left_shift(digits, lo_bit)) ^ _INT_MIN
    cnt = sweep(lambda j, x, key, ok, c: c + jnp.sum(
        (ok[:, None] & (key[:, None] >= cand_key[None, :])).astype(jnp.int32), axis=0),
                jnp.zeros(digits.shape, jnp.int32))
    keep = (cnt >= kk) & (digits < jnp.left_shift(jnp.int32(1), width))
    return thr_u | jnp.left_shift(jnp.sum(keep.astype(jnp.int32)) - 1, lo_bit)
  n_steps = (n_bits + radix_bits - 1) // radix_bits
  thr = jax.lax.fori_loop(0, n_steps, digit_step, thr0) ^ _INT_MIN
  thr = jnp.where(kk == 0, _INT_MAX, thr)

  n_gt = sweep(lambda j, x, key, ok, c: c + jnp.sum((ok & (key > thr)).astype(jnp.int32)),
               jnp.int32(0))
  need_eq = kk - n_gt

  def emit(j, x, key, ok, c):
    n_sel, n_eq = c
    gt = (ok & (key > thr)).astype(jnp.int32)
    eq = (ok & (key == thr)).astype(jnp.int32)
    eq_rank = n_eq + jnp.cumsum(eq) - eq
    sel = gt | (eq & (eq_rank < need_eq).astype(jnp.int32))
    pos = jnp.where(sel > 0, n_sel + jnp.cumsum(sel) - sel, trash)
    idx_ref[pos] = j * ch + jnp.arange(ch, dtype=jnp.int32)
    val_ref[pos] = x
    return n_sel + jnp.sum(sel), n_eq + jnp.sum(eq)
  sweep(emit, (jnp.int32(0), jnp.int32(0)))

  slot = jnp.arange(kp, dtype=jnp.int32)
  rest = jnp.where(slot >= kk, slot, trash)
  idx_ref[rest] = jnp.full((kp,), -1, jnp.int32)
  val_ref[rest] = jnp.full((kp,), NEG_INF, jnp.float32)


def _topk_slab(slab, topk, *, t0, ch, interpret, num_warps=None, radix_bits=None):
  """idx, scores [B, rows, K] of the top-k per row of a masked slab [B, rows, n_ch*ch]."""
  B, rows, n_cols = slab.shape
  kp = next_pow2(topk)
  radix_bits = radix_bits or RADIX_BITS
  if radix_bits not in (1, 2, 3, 4):
    raise ValueError(f'indexer gpu: radix_bits={radix_bits} must be 1, 2, 3 or 4')
  kernel = functools.partial(_topk_kernel, topk=topk, kp=kp, ch=ch, n_ch=n_cols // ch, t0=t0,
                             radix_bits=radix_bits)
  idx, val = pl.pallas_call(
      kernel,
      grid=(B, rows),
      in_specs=[pl.BlockSpec((None, None, n_cols), lambda b, r: (b, r, 0))],
      out_specs=[pl.BlockSpec((None, None, kp + 1), lambda b, r: (b, r, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct((B, rows, kp + 1), jnp.int32),
                 jax.ShapeDtypeStruct((B, rows, kp + 1), jnp.float32)],
      compiler_params=_params(num_warps), interpret=interpret, name='indexer_topk',
  )(slab)
  return idx[..., :topk], val[..., :topk]


def indexer_topk(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, topk: int,
                 segment_ids_BT: jax.Array | None = None, *, return_scores: bool = False,
                 block_t: int | None = None, block_s: int | None = None,
                 chunk: int | None = None, slab_bytes: int = 1 << 30,
                 radix_bits: int | None = None, interpret: bool | None = None):
  """int32 idx [B,T,K] of the top-K allowed keys per token (ties to the smaller s, -1 empty).

  The index set equals the reference's; slots are ordered by position. With return_scores, also
  the fp32 scores [B,T,K] of the selected keys (-inf at -1 slots), e.g. for the sparse KL.
  block_t x block_s score tiles (default 64 x 64), `chunk` keys per top-k sweep step (default
  1024), all powers of two >= 16 (smaller defaults for short sequences); radix_bits: bits per
  radix sweep (default RADIX_BITS).
  """
  B, T, H, D = q_BTHD.shape
  S = k_BSD.shape[1]
  block_t = block_t or min(64, max(16, next_pow2(T)))
  block_s = block_s or min(64, max(16, next_pow2(S)))
  chunk = chunk or min(1024, max(block_s, next_pow2(S)))
  _check_blocks(block_t=block_t, block_s=block_s, chunk=chunk)
  interpret = gpu_interpret(interpret)
  if segment_ids_BT is not None and S != T:
    raise ValueError(f'indexer_topk: segment_ids_BT needs S == T, got k_BSD {k_BSD.shape}')
  s_mult = max(block_s, chunk)
  # Selection carries no gradient (SPEC §3): keep autodiff away from the kernels.
  q_BTHD, k_BSD, w_BTH = (jax.lax.stop_gradient(x) for x in (q_BTHD, k_BSD, w_BTH))
  qT, kp, wT, sq, sk = _layout(q_BTHD, k_BSD, w_BTH, segment_ids_BT, block_t, block_s, s_mult)
  Tp, Sp = qT.shape[2], kp.shape[1]
  rows = max(block_t, min(Tp, (slab_bytes // (4 * B * Sp)) // block_t * block_t))
  idx_parts, val_parts = [], []
  for t0 in range(0, Tp, rows):
    n = min(rows, Tp - t0)
    n_cols = min(Sp, round_up(t0 + n, s_mult))
    slab = _score_slab(qT, kp, wT, sq, sk, t0=t0, rows=n, n_cols=n_cols, n_keys=S, masked=True,
                       bt=block_t, bs=block_s, interpret=interpret)
    idx, val = _topk_slab(slab, topk, t0=t0, ch=chunk, interpret=interpret,
                          radix_bits=radix_bits)
    idx_parts.append(idx)
    val_parts.append(val)
  idx = jnp.concatenate(idx_parts, axis=1)[:, :T]
  if not return_scores:
    return idx
  return idx, jnp.concatenate(val_parts, axis=1)[:, :T]


# ----------------------------------------------------------------------------- scores at idx


def _at_fwd_kernel(q_ref, w_ref, idx_ref, k_ref, o_ref, *, bk, nk):
  q, w = q_ref[...], w_ref[...]

  def chunk(j, carry):
    ids = idx_ref[pl.ds(j * bk, bk)]
    k = k_ref[jnp.maximum(ids, 0), :]
    d = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)   # [H, bk]
    s = jnp.sum(w[:, None] * jnp.maximum(d, 0.0), axis=0)
    o_ref[pl.ds(j * bk, bk)] = jnp.where(ids >= 0, s, NEG_INF)
    return carry
  jax.lax.fori_loop(0, nk, chunk, 0)


def _at_bwd_kernel(q_ref, w_ref, idx_ref, g_ref, k_ref, _, dq_ref, dw_ref, dk_ref, *, bk, nk,
                   trash_row, masked_atomics):
  q, w = q_ref[...], w_ref[...]
  cols = jnp.arange(q.shape[1], dtype=jnp.int32)

  def chunk(j, carry):
    dq, dw = carry
    ids = idx_ref[pl.ds(j * bk, bk)]
    valid = ids >= 0
    k = k_ref[jnp.maximum(ids, 0), :]
    g = jnp.where(valid, g_ref[pl.ds(j * bk, bk)], 0.0)                      # dL/dI, [bk]
    d = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)   # [H, bk]
    dd = jnp.where(d > 0, w[:, None] * g[None, :], 0.0)                      # dL/d(q.k)
    dd_c = dd.astype(q.dtype)
    dq = dq + jnp.dot(dd_c, k, preferred_element_type=jnp.float32)
    dw = dw + jnp.sum(jnp.maximum(d, 0.0) * g[None, :], axis=1)
    dk = jax.lax.dot_general(dd_c, q, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)             # [bk, D]
    dst = jnp.where(valid, ids, trash_row)[:, None]
    mask = jnp.broadcast_to(valid[:, None], dk.shape) if masked_atomics else None
    pltriton.atomic_add(dk_ref, (dst, cols[None, :]), dk, mask=mask)
    return dq, dw
  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((q.shape[0],), jnp.float32))
  dq, dw = jax.lax.fori_loop(0, nk, chunk, init)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dw_ref[...] = dw


def _at_prep(q, k, w, idx, bk):
  H, D, K = q.shape[2], q.shape[3], idx.shape[2]
  hp, dp, kp = max(16, next_pow2(H)), max(16, next_pow2(D)), round_up(K, bk)
  qp = pad_axis(pad_axis(q, 3, dp), 2, hp)
  wp = pad_axis(w.astype(jnp.float32), 2, hp)
  kpad = pad_axis(k.astype(q.dtype), 2, dp)
  idxp = pad_axis(idx.astype(jnp.int32), 2, kp, value=-1)
  return qp, wp, kpad, idxp


def _tok_specs(T, *shapes):
  return [pl.BlockSpec((None, None) + s, lambda i, n=len(s): (i // T, i % T) + (0,) * n)
          for s in shapes]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _scores_at(q, k, w, idx, opts):
  bk, interpret = opts
  B, T, H, _ = q.shape
  S, K = k.shape[1], idx.shape[2]
  qp, wp, kpad, idxp = _at_prep(q, k, w, idx, bk)
  hp, dp, kp = qp.shape[2], qp.shape[3], idxp.shape[2]
  out = pl.pallas_call(
      functools.partial(_at_fwd_kernel, bk=bk, nk=kp // bk),
      grid=(B * T,),
      in_specs=_tok_specs(T, (hp, dp), (hp,), (kp,))
      + [pl.BlockSpec((None, S, dp), lambda i: (i // T, 0, 0))],
      out_specs=_tok_specs(T, (kp,))[0],
      out_shape=jax.ShapeDtypeStruct((B, T, kp), jnp.float32),
      compiler_params=_params(), interpret=interpret, name='indexer_scores_at',
  )(qp, wp, idxp, kpad)
  return out[:, :, :K]


def _scores_at_fwd(q, k, w, idx, opts):
  return _scores_at(q, k, w, idx, opts), (q, k, w, idx)


def _scores_at_bwd(opts, res, g):
  bk, interpret = opts
  q, k, w, idx = res
  B, T, H, D = q.shape
  S = k.shape[1]
  qp, wp, kpad, idxp = _at_prep(q, k, w, idx, bk)
  hp, dp, kp = qp.shape[2], qp.shape[3], idxp.shape[2]
  gp = pad_axis(jnp.where(idx >= 0, g, 0.0).astype(jnp.float32), 2, kp)
  dq, dw, dk = pl.pallas_call(
      functools.partial(_at_bwd_kernel, bk=bk, nk=kp // bk, trash_row=S,
                        masked_atomics=not interpret),
      grid=(B * T,),
      in_specs=_tok_specs(T, (hp, dp), (hp,), (kp,), (kp,))
      + [pl.BlockSpec((None, S, dp), lambda i: (i // T, 0, 0)),
         pl.BlockSpec((None, S + 1, dp), lambda i: (i // T, 0, 0))],
      out_specs=_tok_specs(T, (hp, dp), (hp,))
      + [pl.BlockSpec((None, S + 1, dp), lambda i: (i // T, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, T, hp, dp), q.dtype),
                 jax.ShapeDtypeStruct((B, T, hp), jnp.float32),
                 jax.ShapeDtypeStruct((B, S + 1, dp), jnp.float32)],
      input_output_aliases={5: 2},
      compiler_params=_params(), interpret=interpret, name='indexer_scores_at_bwd',
  )(qp, wp, idxp, gp, kpad, jnp.zeros((B, S + 1, dp), jnp.float32))
  return (dq[:, :, :H, :D], dk[:, :S, :D].astype(k.dtype), dw[:, :, :H].astype(w.dtype),
          np.zeros(idx.shape, jax.dtypes.float0))


_scores_at.defvjp(_scores_at_fwd, _scores_at_bwd)


def indexer_scores_at(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, idx_BTK: jax.Array,
                      *, block_k: int | None = None,
                      interpret: bool | None = None) -> jax.Array:
  """fp32 I [B,T,K] = Σ_h w·ReLU(q_h·k[idx]) at the selected keys (-inf at -1 slots).

  The sparse-stage KL student (SPEC §3) without gathering [B,T,K,D] keys in HBM; differentiable
  in q, k and w (the backward scatter-adds dk rows with fp32 atomics; indices of one token must
  be distinct under interpret mode, as top-k output is).
  """
  K = idx_BTK.shape[2]
  bk = block_k or min(64, max(16, next_pow2(K)))
  _check_blocks(block_k=bk)
  return _scores_at(q_BTHD, k_BSD, w_BTH, idx_BTK, (bk, gpu_interpret(interpret)))
