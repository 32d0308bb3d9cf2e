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

Scores at the selected keys I[t,j] = Σ_h w[t,h]·ReLU(q[t,h]·k[idx[t,j]]) (sparse KL student):
one program per token gathering its key rows in-kernel, or no kernel when the caller passes the
top-k kernel's own scores at the keys it selected (the same I). Its backward is dense and
atomic-free, since H·D is small: the slot cotangent is scattered into an fp32 G [B,T,S] (XLA
scatter-add), then a dk kernel per (key block, head group) and a dq/dw kernel per (head, query
block) loop over the [bt,bs] tiles where G has a nonzero (lists built in XLA: most of the upper
triangle drops out under causal top-k, yet no layout of idx is assumed) and recompute q_h·k.
Per head and tile: d = q_h·k^T, dd = [d > 0]·w·G, dk += dd^T·q_h, dq_h += dd·k,
dw_h += Σ_s ReLU(d)·G.

The gradient of `indexer_scores` (dense warm-up KL) reuses the jnp reference's VJP.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from v4jax.kernels.blockwise import MASK_BITS
from v4jax.kernels.indexer import reference
from v4jax.kernels.pallas_common import NEG_INF, given_value_vjp, with_reference_vjp, gpu_interpret, live_tile, next_pow2, pad_axis, round_up

_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
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

  live_tile(compute, o_ref, si * bs <= t0 + qi * bt + bt - 1 if masked else None)


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


def _topk_kernel(x_ref, idx_ref, val_ref, *words_ref, topk, kp, ch, n_ch, t0, radix_bits):
  t = t0 + pl.program_id(1)
  n_live = jnp.minimum(n_ch, t // ch + 1)          # chunks holding keys s <= t
  trash = kp                                       # spare slot for unselected lanes

  def sweep(fn, init, n=None):
    def body(j, carry):
      x = x_ref[pl.ds(j * ch, ch)]
      return fn(j, x, _to_key(x), x > NEG_INF, carry)
    return jax.lax.fori_loop(0, n_live if n is None else n, body, init)

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
  # number of candidates whose count reaches kk, minus one (digit 0 always does). `at` counts
  # the keys >= thr_u. The search stops as soon as that is exactly kk: those keys are then the
  # top kk (the lower bits cannot change the set), which with distinct scores happens once
  # the bucket at the threshold holds no other key, well before the last bit; with ties at
  # the k-th value it never happens and every bit is resolved as before.
  def digit_step(c):
    i, thr_u, at = c
    lo_bit = jnp.maximum(n_bits - (i + 1) * radix_bits, 0)
    if radix_bits == 1:                            # scalar compares (no [ch, 2] tile)
      cand_key = (thr_u | jnp.left_shift(jnp.int32(1), lo_bit)) ^ _INT_MIN
      cnt = sweep(lambda j, x, key, ok, c: c + jnp.sum((ok & (key >= cand_key)).astype(jnp.int32)),
                  jnp.int32(0))
      up = cnt >= kk
      return (i + 1, thr_u | jnp.left_shift(up.astype(jnp.int32), lo_bit),
              jnp.where(up, cnt, at))
    width = n_bits - i * radix_bits - lo_bit
    cand_key = (thr_u | jnp.left_shift(digits, lo_bit)) ^ _INT_MIN
    cnt = sweep(lambda j, x, key, ok, c: c + jnp.sum(
        (ok[:, None] & (key[:, None] >= cand_key[None, :])).astype(jnp.int32), axis=0),
                jnp.zeros(digits.shape, jnp.int32))
    keep = (cnt >= kk) & (digits < jnp.left_shift(jnp.int32(1), width))
    d = jnp.sum(keep.astype(jnp.int32)) - 1
    return (i + 1, thr_u | jnp.left_shift(d, lo_bit),
            jnp.sum(jnp.where(digits == d, cnt, 0)))
  n_steps = (n_bits + radix_bits - 1) // radix_bits
  _, thr_u, at = jax.lax.while_loop(lambda c: (c[0] < n_steps) & (c[2] != kk), digit_step,
                                    (jnp.int32(0), thr0, n_ok))   # every allowed key >= thr0
  exact = at == kk           # the keys >= thr are the selection: no tie break needed
  thr = jnp.where(kk == 0, _INT_MAX, thr_u ^ _INT_MIN)

  n_gt = sweep(lambda j, x, key, ok, c: c + jnp.sum((ok & (key > thr)).astype(jnp.int32)),
               jnp.int32(0), n=jnp.where(exact, 0, n_live))        # no sweep when exact
  need_eq = jnp.where(exact, kk, kk - n_gt)

  def emit(j, x, key, ok, c):
    n_sel, n_eq = c
    gt = (ok & (key > thr)).astype(jnp.int32)
    eq = (ok & (key == thr)).astype(jnp.int32)
    eq_rank = n_eq + jnp.cumsum(eq) - eq
    sel = gt | (eq & (eq_rank < need_eq).astype(jnp.int32))
    pos = jnp.where(sel > 0, n_sel + jnp.cumsum(sel) - sel, trash)
    idx_ref[pos] = j * ch + jnp.arange(ch, dtype=jnp.int32)
    val_ref[pos] = x
    if words_ref:         # the set as bits: bit s % 32 of word s // 32 (distinct bits: sum = or)
      bits = jnp.left_shift(sel.reshape(nw, MASK_BITS),
                            jax.lax.broadcasted_iota(jnp.int32, (nw, MASK_BITS), 1))
      words_ref[0][pl.ds(j * nw, nw)] = jnp.sum(bits, axis=1)
    return n_sel + jnp.sum(sel), n_eq + jnp.sum(eq)
  nw = ch // MASK_BITS
  sweep(emit, (jnp.int32(0), jnp.int32(0)))
  if words_ref:           # chunks past the row's last allowed key hold no selected key
    def clear(j, c):
      words_ref[0][pl.ds(j * nw, nw)] = jnp.zeros((nw,), jnp.int32)
      return c
    jax.lax.fori_loop(n_live, n_ch, clear, 0)

  slot = jnp.arange(kp, dtype=jnp.int32)
  rest = jnp.where(slot >= kk, slot, trash)
  idx_ref[rest] = jnp.full((kp,), -1, jnp.int32)
  val_ref[rest] = jnp.full((kp,), NEG_INF, jnp.float32)


def _topk_slab(slab, topk, *, t0, ch, interpret, num_warps=None, radix_bits=None, words=False):
  """idx, scores [B, rows, K] of the top-k per row of a masked slab [B, rows, n_cols = n_ch*ch],
  and with `words` the set as int32 bit words [B, rows, n_cols/32] (ch a multiple of 32)."""
  B, rows, n_cols = slab.shape
  kp = next_pow2(topk)
  radix_bits = radix_bits or RADIX_BITS
  if radix_bits not in (1, 2, 3, 4):
    raise ValueError(f'indexer gpu: radix_bits={radix_bits} must be 1, 2, 3 or 4')
  kernel = functools.partial(_topk_kernel, topk=topk, kp=kp, ch=ch, n_ch=n_cols // ch, t0=t0,
                             radix_bits=radix_bits)
  row = lambda b, r: (b, r, 0)
  out_specs = [pl.BlockSpec((None, None, kp + 1), row)] * 2
  out_shape = [jax.ShapeDtypeStruct((B, rows, kp + 1), jnp.int32),
               jax.ShapeDtypeStruct((B, rows, kp + 1), jnp.float32)]
  if words:
    out_specs.append(pl.BlockSpec((None, None, n_cols // MASK_BITS), row))
    out_shape.append(jax.ShapeDtypeStruct((B, rows, n_cols // MASK_BITS), jnp.int32))
  out = pl.pallas_call(
      kernel,
      grid=(B, rows),
      in_specs=[pl.BlockSpec((None, None, n_cols), row)],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(num_warps), interpret=interpret, name='indexer_topk',
  )(slab)
  return (out[0][..., :topk], out[1][..., :topk]) + tuple(out[2:])


def indexer_topk(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, topk: int,
                 segment_ids_BT: jax.Array | None = None, *, return_scores: bool = False,
                 return_words: bool = False, block_t: int | None = None,
                 block_s: int | None = None, chunk: int | None = None,
                 slab_bytes: int = 1 << 30, radix_bits: int | None = None,
                 interpret: bool | None = None):
  """int32 idx [B,T,K] of the top-K allowed keys per token (ties to the smaller s, -1 empty).

  The index set equals the reference's; slots are ordered by position. With return_scores, also
  the fp32 scores [B,T,K] of the selected keys (-inf at -1 slots), e.g. for the sparse KL; with
  return_words, also the same set as uint32 bit words [B,T,ceil(S/32)] (blockwise.pack_mask's
  layout, the masked attention kernel's input), written by the selection kernel as it emits the
  indices, so no [B,T,S] mask is ever scattered. Returns idx alone, or a tuple of idx and the
  outputs asked for, in this order.
  block_t x block_s score tiles (default 64 x 64), `chunk` keys per top-k sweep step (default
  1024), all powers of two >= 16, >= 32 with return_words (smaller defaults for short
  sequences); radix_bits: bits per radix sweep (default RADIX_BITS).
  """
  B, T, H, D = q_BTHD.shape
  S = k_BSD.shape[1]
  block_t = block_t or min(64, max(16, next_pow2(T)))
  block_s = block_s or min(64, max(16, next_pow2(S)))
  chunk = chunk or min(1024, max(block_s, MASK_BITS if return_words else 16, next_pow2(S)))
  _check_blocks(block_t=block_t, block_s=block_s, chunk=chunk)
  if return_words and chunk < MASK_BITS:
    raise ValueError(f'indexer gpu: chunk={chunk} must be >= {MASK_BITS} with return_words')
  interpret = gpu_interpret(interpret)
  if segment_ids_BT is not None and S != T:
    raise ValueError(f'indexer_topk: segment_ids_BT needs S == T, got k_BSD {k_BSD.shape}')
  s_mult = max(block_s, chunk)
  # Selection carries no gradient (SPEC §3): keep autodiff away from the kernels.
  q_BTHD, k_BSD, w_BTH = (jax.lax.stop_gradient(x) for x in (q_BTHD, k_BSD, w_BTH))
  qT, kp, wT, sq, sk = _layout(q_BTHD, k_BSD, w_BTH, segment_ids_BT, block_t, block_s, s_mult)
  Tp, Sp = qT.shape[2], kp.shape[1]
  rows = max(block_t, min(Tp, (slab_bytes // (4 * B * Sp)) // block_t * block_t))
  parts = []
  for t0 in range(0, Tp, rows):
    n = min(rows, Tp - t0)
    n_cols = min(Sp, round_up(t0 + n, s_mult))
    slab = _score_slab(qT, kp, wT, sq, sk, t0=t0, rows=n, n_cols=n_cols, n_keys=S, masked=True,
                       bt=block_t, bs=block_s, interpret=interpret)
    out = _topk_slab(slab, topk, t0=t0, ch=chunk, interpret=interpret, radix_bits=radix_bits,
                     words=return_words)
    if return_words:      # a short slab's words end at its last column: no key selected past it
      out = out[:2] + (pad_axis(out[2], 2, Sp // MASK_BITS),)
    parts.append(out)
  idx, val, *words = (jnp.concatenate(p, axis=1)[:, :T] for p in zip(*parts))
  res = (idx,) + ((val,) if return_scores else ())
  if return_words:
    res += (jax.lax.bitcast_convert_type(words[0][..., :-(-S // MASK_BITS)], jnp.uint32),)
  return res if len(res) > 1 else idx


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
  bk, interpret = opts.block_k, opts.interpret
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


def _at_dk_kernel(n_ref, blk_ref, q_ref, w_ref, g_ref, k_ref, dk_ref, *, bt, bh):
  """One (head group, key block, batch): dk = Σ_t Σ_h dd_h^T·q_h over the live query blocks
  (blk_ref lists them, n_ref counts them), one (query block, head) pair a step."""
  k = k_ref[...]                                                           # [bs, dp]

  def step(m, acc):
    rows = pl.ds(pl.multiple_of(blk_ref[jax.lax.div(m, bh)] * bt, bt), bt)
    h = jax.lax.rem(m, bh)               # m >= 0; jnp's // and % fail in the Triton lowering
    q = q_ref[h, rows, :]                                                  # [bt, dp]
    d = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)  # [bt, bs]
    dd = jnp.where(d > 0, w_ref[h, rows][:, None] * g_ref[rows, :], 0.0).astype(q.dtype)
    return acc + jax.lax.dot_general(dd, q, _TN, preferred_element_type=jnp.float32)
  acc = jax.lax.fori_loop(0, n_ref[0] * bh, step, jnp.zeros(dk_ref.shape, jnp.float32))
  dk_ref[...] = acc.astype(dk_ref.dtype)


def _at_dq_kernel(n_ref, blk_ref, q_ref, w_ref, g_ref, k_ref, dq_ref, dw_ref, *, bs):
  """One (head, query block, batch): dq_h = Σ_s dd·k and dw_h = Σ_s ReLU(d)·G over the live key
  blocks (blk_ref lists them, n_ref counts them)."""
  q, w = q_ref[...], w_ref[...]                                            # [bt, dp], [bt]

  def step(m, carry):
    dq, dw = carry
    cols = pl.ds(pl.multiple_of(blk_ref[m] * bs, bs), bs)
    k, g = k_ref[cols, :], g_ref[:, cols]                                  # [bs, dp], [bt, bs]
    d = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
    dd = jnp.where(d > 0, w[:, None] * g, 0.0).astype(q.dtype)
    return (dq + jnp.dot(dd, k, preferred_element_type=jnp.float32),
            dw + jnp.sum(jnp.maximum(d, 0.0) * g, axis=1))
  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
  dq, dw = jax.lax.fori_loop(0, n_ref[0], step, init)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dw_ref[...] = dw


def _at_dq_gather_kernel(q_ref, w_ref, idx_ref, g_ref, k_ref, dq_ref, dw_ref, *, bk, nk):
  """One token: dq_h = Σ_j dd_hj·k[idx_j] and dw_h = Σ_j ReLU(d_hj)·g_j over its own slots, the
  key rows gathered block_k slots a step as in the forward (-1 slots carry g = 0)."""
  q, w = q_ref[...], w_ref[...]                                            # [hp, dp], [hp]

  def chunk(j, carry):
    dq, dw = carry
    ids = idx_ref[pl.ds(j * bk, bk)]
    g = jnp.where(ids >= 0, g_ref[pl.ds(j * bk, bk)], 0.0)                # [bk]
    k = k_ref[jnp.maximum(ids, 0), :]                                      # [bk, dp]
    d = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)  # [hp, bk]
    dd = jnp.where(d > 0, w[:, None] * g[None, :], 0.0).astype(q.dtype)
    return (dq + jnp.dot(dd, k, preferred_element_type=jnp.float32),
            dw + jnp.sum(jnp.maximum(d, 0.0) * g[None, :], axis=1))
  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
  dq, dw = jax.lax.fori_loop(0, nk, chunk, init)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dw_ref[...] = dw


def _dq_dw_gathered(q, k, w, idx, g, opts):
  """(dq [B,T,H,D], dw [B,T,H] fp32) from each token's own selected keys (dq_form='gather')."""
  B, T, H, D = q.shape
  S = k.shape[1]
  qp, wp, kpad, idxp = _at_prep(q, k, w, idx, opts.block_k)
  hp, dp, kp = qp.shape[2], qp.shape[3], idxp.shape[2]
  gp = pad_axis(g.astype(jnp.float32), 2, kp)
  dq, dw = pl.pallas_call(
      functools.partial(_at_dq_gather_kernel, bk=opts.block_k, nk=kp // opts.block_k),
      grid=(B * T,),
      in_specs=_tok_specs(T, (hp, dp), (hp,), (kp,), (kp,))
      + [pl.BlockSpec((None, S, dp), lambda i: (i // T, 0, 0))],
      out_specs=_tok_specs(T, (hp, dp), (hp,)),
      out_shape=[jax.ShapeDtypeStruct((B, T, hp, dp), q.dtype),
                 jax.ShapeDtypeStruct((B, T, hp), jnp.float32)],
      compiler_params=_params(opts.num_warps, opts.num_stages), interpret=opts.interpret,
      name='indexer_scores_at_dq_gather',
  )(qp, wp, idxp, gp, kpad)
  return dq[:, :, :H, :D], dw[:, :, :H].astype(w.dtype)


def _live_blocks(G, bt, bs):
  """Tiles of G holding any nonzero (NaN counts): per query block the live key blocks, first
  in ascending order ([B,nt,ns], count [B,nt,1]), and per key block the live query blocks
  ([B,ns,nt], count [B,ns,1]). The kernels loop over these lists: no per-tile branch, so Triton
  can pipeline the loads, and no assumption on where the live tiles lie.

  Nonzero means |G| >= the least normal fp32: a tile holding only subnormal values counts as
  empty, and what it would add to dq, dk and dw (under 1.2e-38 times q, k or w) is dropped. Not
  `G != 0`: XLA merges that zero with _dense_cotangent's zero slab, which then stays live beside
  G and costs a copy of the slab plus a second read of it."""
  B, Tp, Sp = G.shape
  g = G.reshape(B, Tp // bt, bt, Sp // bs, bs)
  nonzero = (jnp.abs(g) >= np.finfo(np.float32).tiny) | jnp.isnan(g)
  live = jnp.any(nonzero, axis=(2, 4))                                             # [B,nt,ns]
  lists = lambda x: (jnp.argsort(~x, axis=2, stable=True).astype(jnp.int32),
                     jnp.sum(x, axis=2, keepdims=True, dtype=jnp.int32))
  return lists(live), lists(jnp.swapaxes(live, 1, 2))


def _dense_cotangent(g, idx, Tp, Sp):
  """fp32 G [B,Tp,Sp]: g[b,t,j] added at (t, idx[b,t,j]), zero elsewhere; -1 slots dropped.

  An XLA scatter-add of the B·T·K slots into a zeroed slab: one memset plus one write per slot
  (0.11 ms at B=2, T=S=4096, K=1024 on an H200, as fast as a set with unique indices, and
  repeated indices still add up). A Pallas kernel writing whole rows would have to compare every
  slot against every column (K·S work per row) or order its zero fill before its scattered
  stores, which Triton does not guarantee across threads.
  """
  B, T, _ = idx.shape
  b_idx = jnp.arange(B, dtype=jnp.int32)[:, None, None]
  t_idx = jnp.arange(T, dtype=jnp.int32)[None, :, None]
  cols = jnp.where(idx >= 0, idx, Sp)                                      # -1 -> dropped
  return jnp.zeros((B, Tp, Sp), jnp.float32).at[b_idx, t_idx, cols].add(
      g.astype(jnp.float32), mode='drop')


def _scores_at_bwd(opts, res, g):
  """Dense and atomic-free: dL/dI scattered into G [B,T,S], then dk from one kernel per (key
  block, head group) and dq, dw from one per (head, query block), over the live G tiles only."""
  q, k, w, idx = res
  B, T, H, D = q.shape
  S = k.shape[1]
  bt, bs, interpret = opts.block_t, opts.block_s, opts.interpret
  bh = min(opts.block_h, H)
  params = _params(opts.num_warps, opts.num_stages)
  qT, kp, wT, _, _ = _layout(q, k, w, None, bt, bs, bs)                    # [B,H,Tp,D], ...
  dp, hp = max(16, next_pow2(D)), round_up(H, bh)
  qT, kp, wT = pad_axis(pad_axis(qT, 3, dp), 1, hp), pad_axis(kp, 2, dp), pad_axis(wT, 1, hp)
  Tp, Sp = qT.shape[2], kp.shape[1]
  nt, ns, ng = Tp // bt, Sp // bs, hp // bh
  G = _dense_cotangent(jnp.where(idx >= 0, g, 0.0), idx, Tp, Sp)
  (kb_list, kb_n), (qb_list, qb_n) = _live_blocks(G, bt, bs)

  # Launch order: key blocks from the first (the longest columns under causal top-k), head
  # groups fastest so that programs reading one G column slab run together.
  dk = pl.pallas_call(
      functools.partial(_at_dk_kernel, bt=bt, bh=bh),
      grid=(ng, ns, B),
      in_specs=[pl.BlockSpec((None, None, 1), lambda h, j, b: (b, j, 0)),
                pl.BlockSpec((None, None, nt), lambda h, j, b: (b, j, 0)),
                pl.BlockSpec((None, bh, Tp, dp), lambda h, j, b: (b, h, 0, 0)),
                pl.BlockSpec((None, bh, Tp), lambda h, j, b: (b, h, 0)),
                pl.BlockSpec((None, Tp, bs), lambda h, j, b: (b, 0, j)),
                pl.BlockSpec((None, bs, dp), lambda h, j, b: (b, j, 0))],
      out_specs=pl.BlockSpec((None, None, bs, dp), lambda h, j, b: (b, h, j, 0)),
      out_shape=jax.ShapeDtypeStruct((B, ng, Sp, dp), k.dtype if ng == 1 else jnp.float32),
      compiler_params=params, interpret=interpret, name='indexer_scores_at_dk',
  )(qb_n, qb_list, qT, wT, G, kp)
  dk = jnp.sum(dk, axis=1, dtype=jnp.float32)[:, :S, :D].astype(k.dtype)

  if opts.dq_form == 'gather':
    dq, dw = _dq_dw_gathered(q, k, w, idx, g, opts)
    return dq, dk, dw, np.zeros(idx.shape, jax.dtypes.float0)
  # Query blocks from the last (the longest rows under causal top-k), heads fastest.
  rev = lambda i: nt - 1 - i
  dq, dw = pl.pallas_call(
      functools.partial(_at_dq_kernel, bs=bs),
      grid=(H, nt, B),
      in_specs=[pl.BlockSpec((None, None, 1), lambda h, i, b: (b, rev(i), 0)),
                pl.BlockSpec((None, None, ns), lambda h, i, b: (b, rev(i), 0)),
                pl.BlockSpec((None, None, bt, dp), lambda h, i, b: (b, h, rev(i), 0)),
                pl.BlockSpec((None, None, bt), lambda h, i, b: (b, h, rev(i))),
                pl.BlockSpec((None, bt, Sp), lambda h, i, b: (b, rev(i), 0)),
                pl.BlockSpec((None, Sp, dp), lambda h, i, b: (b, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, bt, dp), lambda h, i, b: (b, h, rev(i), 0)),
                 pl.BlockSpec((None, None, bt), lambda h, i, b: (b, h, rev(i)))],
      out_shape=[jax.ShapeDtypeStruct((B, H, Tp, dp), q.dtype),
                 jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
      compiler_params=params, interpret=interpret, name='indexer_scores_at_dq',
  )(kb_n, kb_list, qT, wT, G, kp)
  dq = jnp.transpose(dq[:, :, :T, :D], (0, 2, 1, 3))
  dw = jnp.transpose(dw[:, :, :T], (0, 2, 1)).astype(w.dtype)
  return dq, dk, dw, np.zeros(idx.shape, jax.dtypes.float0)


_scores_at.defvjp(_scores_at_fwd, _scores_at_bwd)


_scores_at_given = given_value_vjp(_scores_at_bwd)   # the student given top-k's scores


# dq_form='auto' takes 'gather' from this ratio of the dense tiles' live (t, s) pairs to the T*K
# selected ones. The student's forward+backward on the H200 (docs/benchmarks.md, twelfth
# measurement), dense vs gather: ratio 2 (T = 4K, K = 1K, 16 heads) 3.53 vs 4.37 ms; ratio 4
# (16K, 2K, 64 heads) 30.4 vs 22.2 ms; ratio 8 (32K, 2K) 110.5 vs 70.9 ms. Even near 2.6.
GATHER_FROM_LIVE_RATIO = 3.0


def resolve_dq_form(T: int, S: int, K: int) -> str:
  """'dense' or 'gather' for dq_form='auto': causal queries t < T see keys s <= t + S - T, so
  the dense tiles cover (S - T) + (T + 1) / 2 keys per query where the gather form reads K."""
  live_over_k = ((S - T) + (T + 1) / 2) / K
  return 'gather' if live_over_k >= GATHER_FROM_LIVE_RATIO else 'dense'


class _AtOpts(NamedTuple):
  block_k: int
  block_t: int
  block_s: int
  block_h: int
  num_warps: int | None
  num_stages: int | None
  interpret: bool
  dq_form: str


def indexer_scores_at(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, idx_BTK: jax.Array,
                      *, block_k: int | None = None, block_t: int | None = None,
                      block_s: int | None = None, block_h: int | None = None,
                      num_warps: int | None = 4, num_stages: int | None = None,
                      scores_BTK: jax.Array | None = None, dq_form: str = 'auto',
                      interpret: bool | None = None) -> jax.Array:
  """fp32 I [B,T,K] = Σ_h w·ReLU(q_h·k[idx]) at the selected keys (-inf at -1 slots).

  The sparse-stage KL student (SPEC §3) without gathering [B,T,K,D] keys in HBM; differentiable
  in q, k and w. With scores_BTK (indexer_topk's return_scores for this idx: the same I, from
  the dense score slab the selection read) the forward returns them and runs no kernel;
  otherwise it gathers each token's key rows in-kernel (block_k slots a step). The
  backward is dense over [T,S] and atomic-free: dL/dI goes into an fp32 G [B,T,S], and block_t
  x block_s tiles (default 64 x 64; all-zero G tiles skipped) give dk per key block and group of
  block_h heads (default max(1, H // 8): under causal top-k the first key blocks carry the most
  tiles, so dk needs more programs than key blocks; the groups' fp32 partial sums are added in
  XLA) and dq, dw per head and query block; num_warps / num_stages are the backward kernels'
  Triton settings. Any idx works (-1 slots contribute nothing, repeated indices add up).
  dq_form='gather' computes dq and dw per token from its own K gathered keys instead (K work per
  token where the dense tiles do every live tile's: at T = 32K, K = 2048 nearly every causal
  tile is live, ~8x the sparse work); dk stays dense. dq_form='auto' (the default) picks by
  resolve_dq_form: 'dense' at the bench config's 4K tokens, 'gather' from ~8K.
  """
  if dq_form not in ('auto', 'dense', 'gather'):
    raise ValueError(f"indexer_scores_at: dq_form={dq_form!r}; expected 'auto', 'dense' or "
                     "'gather'")
  T, H = q_BTHD.shape[1:3]
  S, K = k_BSD.shape[1], idx_BTK.shape[2]
  if dq_form == 'auto':
    dq_form = resolve_dq_form(T, S, K)
  opts = _AtOpts(block_k=block_k or min(64, max(16, next_pow2(K))),
                 block_t=block_t or min(64, max(16, next_pow2(T))),
                 block_s=block_s or min(64, max(16, next_pow2(S))),
                 block_h=block_h or max(1, H // 8), num_warps=num_warps, num_stages=num_stages,
                 interpret=gpu_interpret(interpret), dq_form=dq_form)
  _check_blocks(block_k=opts.block_k, block_t=opts.block_t, block_s=opts.block_s)
  if scores_BTK is not None:
    return _scores_at_given(q_BTHD, k_BSD, w_BTH, idx_BTK, scores_BTK, opts)
  return _scores_at(q_BTHD, k_BSD, w_BTH, idx_BTK, opts)
