"""Causal flash attention under DSA's top-k key sets as packed bits: Pallas Triton-style kernels.

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width,
W mask words per query (ceil(S/32), padded to whole key blocks), M query rows and N key columns
of a tile (block_m, block_n).

DSA's masked form attends every query t over the keys s <= t that are in its top-k set (and in
its document when segment ids are given). cuDNN takes that set as an additive [B,1,T,S] bias and
reads and adds it in every tile of every head; here it goes in as bits: uint32 words [B,T,W]
(bit s % 32 of word s // 32 = key s is in the set), 1/32 of a bool mask's bytes, and each tile
expands its [M, N/32] words with shifts. The GPU top-k kernel writes them as it selects
(select_words_BTW); from indices alone, `blockwise.pack_mask` builds them (an XLA scatter).

Forward: one program per (batch x head, query block) runs an online softmax over the key blocks
from 0 up to the causal diagonal. Rows without an allowed key give o = 0 and lse = -inf (the
jnp reference gives NaN o there; cuDNN's value for such a row is not relied on). Backward (FA2):
delta = rowsum(do·o) in XLA, then a dk/dv kernel (one program per key block, looping over the
query blocks from the diagonal down) and a dq kernel (one program per query block, looping over
key blocks up to the diagonal), p recomputed from the saved lse; fp32 accumulation throughout.
Each kernel splits its loop: tiles wholly below the diagonal skip the causal compare (known
true), the tiles the diagonal crosses make it (the same values as one loop, bit for bit). The
forward and dq load their program's query rows (and dq its do, lse and delta) once, before the
loop: the dots take them as register operands; dq loads each key tile once for both its dots.

lse [B,T,H] fp32 is a statistic without a gradient of its own, as in library.py (the DSA KL
teacher reads it detached): its cotangent is dropped.

Triton needs power-of-two tiles: the logits are summed over two qk parts, K's largest power of
two and the rest padded to a power of two >= 16 (192 = 128 + 64 unpadded, 48 = 32 + 16,
24 = 16 + 16); V is padded to a power of two >= 16, T and S to whole blocks. Padded keys are never
allowed to real rows; padded query rows are sliced off (lse +inf in the backward: p = 0).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from v4jax.kernels.blockwise import MASK_BITS as BITS, pack_mask
from v4jax.kernels.pallas_common import NEG_INF, gpu_interpret, next_pow2, pad_axis, round_up

_NT = (((1,), (1,)), ((), ()))   # a [M,C] . b [N,C] -> [M,N]
_TN = (((0,), (0,)), ((), ()))   # a [C,M] . b [C,N] -> [M,N]
FWD_KERNEL = 'masked_attention_fwd'   # the forward pallas_call's name (remat keeps its outputs)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """One kernel's tiling: block_m query rows x block_n key columns (powers of two; block_m >= 16,
  block_n >= 32 so a key block holds whole mask words; capped at the padded T and S), Triton
  warps and pipeline stages. None takes the kernel's default."""
  block_m: int | None = None
  block_n: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None


# (block_m, block_n, warps, stages) per kernel: the best of `bench_kernels --sections attn_sweep`
# on the H200 at K = 192, V = 128, T = 4096, top-2048 sets, bf16, both at B=4 x 16 heads and at
# B=1 x 128 heads (fwd+bwd 6.52 and 12.17 ms; docs/benchmarks.md, fifteenth and sixteenth
# measurements: the dq kernel's third stage took 0.27 and 0.97 ms off).
_DEFAULTS = {'fwd': (128, 64, 8, 3), 'dkv': (128, 64, 8, 2), 'dq': (128, 64, 8, 3)}


def _blocks(kind: str, b, T: int, S: int) -> Blocks:
  """Blocks (or a dict of its fields, or None) -> all fields set and checked."""
  b = Blocks(**b) if isinstance(b, dict) else (b or Blocks())
  bm, bn, warps, stages = _DEFAULTS[kind]
  for name, v, lo in (('block_m', b.block_m, 16), ('block_n', b.block_n, BITS)):
    if v is not None and (v < lo or v != next_pow2(v)):
      raise ValueError(f'masked attention gpu {kind}: {name}={v} must be a power of two >= {lo}')
  return Blocks(min(b.block_m or bm, max(16, next_pow2(T))),
                min(b.block_n or bn, max(BITS, next_pow2(S))),
                b.num_warps or warps, b.num_stages or stages)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  scale: float
  fwd: Blocks
  dkv: Blocks
  dq: Blocks
  interpret: bool
  mgpu: tuple = ()    # kernels ('fwd', 'dq', 'dkv') run as mgpu.py's Mosaic-GPU (WGMMA) kernels
                      # for bf16/fp16 inputs when a top-k set and no segment ids are given

  def mosaic(self, q, seg, words) -> tuple:
    ok = seg is None and words is not None and q.dtype in (jnp.bfloat16, jnp.float16)
    return self.mgpu if ok else ()


def _parts(k: int) -> tuple[tuple[int, int], ...]:
  """(offset, width) parts of qk width k, widths powers of two >= 16: the largest power of two
  <= k, then the rest padded. The first part is never padded when there are two, so the split
  layout is k zero-padded at the end to the parts' total width."""
  hi = 1 << (k.bit_length() - 1)
  if hi == k or k <= 16:
    return ((0, max(16, next_pow2(k))),)
  return ((0, hi), (hi, max(16, next_pow2(k - hi))))


def _qk_width(k: int) -> int:
  off, w = _parts(k)[-1]
  return off + w


def _dot(a, b, dims=None):
  if dims is None:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _params(b: Blocks):
  # Always Triton params: without them a GPU pallas_call may pick the Mosaic GPU backend.
  return pltriton.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages)


def _load_parts(ref, rows, parts):
  """ref[rows] as its qk parts: [[M, w] for each (offset, width)]."""
  return [ref[rows, pl.ds(off, w)] for off, w in parts]


def _logits(q_parts, k_parts, scale):
  """scale·q·k^T [M, N] in fp32 from the loaded qk parts of q [M, .] and k [N, .]."""
  s = None
  for qq, kk in zip(q_parts, k_parts):
    d = _dot(qq, kk, _NT)
    s = d if s is None else s + d
  return s * scale


def _allowed(t0, s0, bm, bn, s_len, rows, segq_ref, segk_ref, words_ref, causal):
  """Bool [M, N]: key s0+n is allowed for query t0+m (causal, below s_len, in the top-k set and
  the same document where given), or None when every pair is. `rows` indexes the tile's rows in
  segq_ref and words_ref; segk_ref and words_ref's columns cover all keys. causal=False for a
  tile wholly below the diagonal (every key s <= every query t: the compare is known true)."""
  conds = []
  s = s0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
  if causal:
    conds.append(s <= t0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0))
  if s_len is not None:
    conds.append(s < s_len)
  if segq_ref is not None:
    conds.append(segq_ref[rows][:, None] == segk_ref[pl.ds(s0, bn)][None, :])
  if words_ref is not None:
    nw = bn // BITS
    words = words_ref[rows, pl.ds(pl.multiple_of(s0 // BITS, nw), nw)]       # [M, N/32]
    shift = jax.lax.broadcasted_iota(jnp.uint32, (bm, nw, BITS), 2)
    bits = jnp.right_shift(words[:, :, None], shift) & jnp.uint32(1)
    conds.append(bits.reshape(bm, bn) != 0)
  return functools.reduce(jnp.logical_and, conds) if conds else None


def _below_diagonal(t0, bn):
  """Key blocks 0.. of this count lie wholly below query row t0 (every key s <= t0)."""
  return (t0 + 1) // bn


def _split_refs(refs, has_seg, has_mask, n_tail):
  """(segq, segk, words, tail refs) from the kernel's optional inputs and its tail refs."""
  refs = list(refs)
  segq, segk = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
  words = refs.pop(0) if has_mask else None
  assert len(refs) == n_tail
  return segq, segk, words, refs


# ------------------------------------------------------------------------------------- forward
def _fwd_kernel(q_ref, k_ref, v_ref, *refs, scale, parts, bn, s_len, has_seg, has_mask):
  segq, segk, words, (o_ref, lse_ref) = _split_refs(refs, has_seg, has_mask, 2)
  bm = o_ref.shape[0]
  t0 = pl.program_id(1) * bm
  rows = pl.ds(0, bm)
  q_parts = _load_parts(q_ref, rows, parts)          # the program's rows: loaded once

  def block(j, carry, causal):
    m, l, acc = carry
    s0 = pl.multiple_of(j * bn, bn)
    keys = pl.ds(s0, bn)
    s = _logits(q_parts, _load_parts(k_ref, keys, parts), scale)
    ok = _allowed(t0, s0, bm, bn, s_len, rows, segq, segk, words, causal)
    s = s if ok is None else jnp.where(ok, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)      # rows with no key yet stay finite
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    v = v_ref[keys, :]
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return m_new, alpha * l + jnp.sum(p, axis=1), acc

  init = (jnp.full((bm,), NEG_INF, jnp.float32), jnp.zeros((bm,), jnp.float32),
          jnp.zeros(o_ref.shape, jnp.float32))
  n_blocks = jnp.minimum((t0 + bm + bn - 1) // bn, k_ref.shape[0] // bn)   # up to the diagonal
  n_full = jnp.minimum(_below_diagonal(t0, bn), n_blocks)
  carry = jax.lax.fori_loop(0, n_full, functools.partial(block, causal=False), init)
  m, l, acc = jax.lax.fori_loop(n_full, n_blocks, functools.partial(block, causal=True), carry)
  ok = l > 0
  l_safe = jnp.where(ok, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(l_safe), NEG_INF)


def _prep(q, k, v, seg, words, tp, sp):
  """Pads q [B,T,H,K], k [B,S,H,K], v [B,S,H,V], seg [B,T] and words [B,T,W] to tp query rows,
  sp keys and the kernel widths; (q, k, v, optional inputs, s_len). s_len = S when the causal
  condition alone would let real rows see padded keys (S < T), else None (no bound needed)."""
  S, T = k.shape[1], q.shape[1]
  vp = max(16, next_pow2(v.shape[-1]))
  wq = _qk_width(q.shape[-1])
  qp = pad_axis(pad_axis(q, 3, wq), 1, tp)
  kp = pad_axis(pad_axis(k, 3, wq), 1, sp)
  vpad = pad_axis(pad_axis(v, 3, vp), 1, sp)
  extra = []
  if seg is not None:
    seg = seg.astype(jnp.int32)
    extra += [pad_axis(seg, 1, tp), pad_axis(seg[:, :S], 1, sp)]
  if words is not None:
    extra.append(pad_axis(pad_axis(words, 2, sp // BITS), 1, tp))
  return qp, kp, vpad, extra, (S if S < T else None)


def _specs(H, bm, tp, sp, row_block):
  """BlockSpecs on grid (b·H + h, x) for q-like [B,tp,H,w] (a block of bm rows at x when
  row_block, else all rows), k-like [B,sp,H,w] (all keys) and row statistics [B,tp,H]."""
  if row_block:
    rows = lambda w: pl.BlockSpec((None, bm, None, w), lambda g, x: (g // H, x, g % H, 0))
    stat = pl.BlockSpec((None, bm, None), lambda g, x: (g // H, x, g % H))
  else:
    rows = lambda w: pl.BlockSpec((None, tp, None, w), lambda g, x: (g // H, 0, g % H, 0))
    stat = pl.BlockSpec((None, tp, None), lambda g, x: (g // H, 0, g % H))
  keys = lambda w: pl.BlockSpec((None, sp, None, w), lambda g, x: (g // H, 0, g % H, 0))
  return rows, keys, stat


def _opt_specs(H, bm, tp, sp, has_seg, has_mask, row_block):
  """BlockSpecs of the optional inputs: the query rows' segment ids (a block of bm rows or all),
  every key's segment id, and the query rows' mask words (all words of each row)."""
  specs = []
  if has_seg:
    specs += [pl.BlockSpec((None, bm), lambda g, x: (g // H, x)) if row_block else
              pl.BlockSpec((None, tp), lambda g, x: (g // H, 0)),
              pl.BlockSpec((None, sp), lambda g, x: (g // H, 0))]
  if has_mask:
    specs.append(pl.BlockSpec((None, bm, sp // BITS), lambda g, x: (g // H, x, 0)) if row_block
                 else pl.BlockSpec((None, tp, sp // BITS), lambda g, x: (g // H, 0, 0)))
  return specs


def _forward(q, k, v, seg, words, cfg):
  if 'fwd' in cfg.mosaic(q, seg, words):
    from v4jax.kernels.attention import mgpu
    o, lse = mgpu.forward(q, k, v, words, cfg.scale)
    return checkpoint_name(o, mgpu.FWD_NAME), checkpoint_name(lse, mgpu.FWD_NAME)
  B, T, H, K = q.shape
  V = v.shape[-1]
  f = cfg.fwd
  bm, bn = f.block_m, f.block_n
  tp, sp = round_up(T, bm), round_up(k.shape[1], bn)
  qp, kp, vp, extra, s_len = _prep(q, k, v, seg, words, tp, sp)
  wq, wv = qp.shape[-1], vp.shape[-1]
  rows, keys, stat = _specs(H, bm, tp, sp, row_block=True)
  kernel = functools.partial(_fwd_kernel, scale=cfg.scale, parts=_parts(K), bn=bn,
                             s_len=s_len, has_seg=seg is not None, has_mask=words is not None)
  o, lse = pl.pallas_call(
      kernel,
      grid=(B * H, tp // bm),
      in_specs=[rows(wq), keys(wq), keys(wv)]
               + _opt_specs(H, bm, tp, sp, seg is not None, words is not None, True),
      out_specs=[rows(wv), stat],
      out_shape=[jax.ShapeDtypeStruct((B, tp, H, wv), q.dtype),
                 jax.ShapeDtypeStruct((B, tp, H), jnp.float32)],
      compiler_params=_params(f), interpret=cfg.interpret, name=FWD_KERNEL,
  )(qp, kp, vp, *extra)
  return o[:, :T, :, :V], lse[:, :T]


# ------------------------------------------------------------------------------------ backward
def _p_ds(q_parts, k_parts, do, v, lse, dl, ok, scale):
  """p = exp(s - lse) on allowed pairs (ok; None: all) and ds = p·(do·v^T - delta), [M, N] fp32,
  from the tile's loaded q, k parts, do [M, V], v [N, V] and the rows' lse, delta [M]."""
  p = jnp.exp(_logits(q_parts, k_parts, scale) - lse[:, None])
  p = p if ok is None else jnp.where(ok, p, 0.0)
  return p, p * (_dot(do, v, _NT) - dl[:, None])


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *refs, scale, parts, bm, s_len,
                has_seg, has_mask):
  """One key block: dv = Σ_t p^T·do, dk = scale·Σ_t ds^T·q over the query blocks it reaches."""
  segq, segk, words, (dk_ref, dv_ref) = _split_refs(refs, has_seg, has_mask, 2)
  bn = k_ref.shape[0]
  s0 = pl.program_id(1) * bn
  keys = pl.ds(0, bn)

  # Every operand is loaded where its dot uses it, q and do twice: k, v and the second q and do
  # are the dots' shared-memory operands, which Triton fills by pipelined copies; loaded once
  # they would be register values that each tile copies into shared memory again.
  def block(i, carry, causal):
    dv, dks = carry
    t0 = pl.multiple_of(i * bm, bm)
    rows = pl.ds(t0, bm)
    ok = _allowed(t0, s0, bm, bn, s_len, rows, segq, segk, words, causal)
    p, ds = _p_ds(_load_parts(q_ref, rows, parts), _load_parts(k_ref, keys, parts),
                  do_ref[rows, :], v_ref[keys, :], lse_ref[rows], dl_ref[rows], ok, scale)
    do = do_ref[rows, :]
    dv = dv + _dot(p.astype(do.dtype), do, _TN)
    dks = tuple(a + _dot(ds.astype(qq.dtype), qq, _TN)
                for a, qq in zip(dks, _load_parts(q_ref, rows, parts)))
    return dv, dks

  init = (jnp.zeros(dv_ref.shape, jnp.float32),
          tuple(jnp.zeros((bn, w), jnp.float32) for _, w in parts))
  # from the diagonal down: the query blocks the key block straddles, then those wholly past it
  n_q = q_ref.shape[0] // bm
  first_full = jnp.minimum((s0 + bn + bm - 2) // bm, n_q)     # first i with i·bm >= s0 + bn - 1
  carry = jax.lax.fori_loop(s0 // bm, first_full, functools.partial(block, causal=True), init)
  dv, dks = jax.lax.fori_loop(first_full, n_q, functools.partial(block, causal=False), carry)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  for (off, w), dk in zip(parts, dks):
    dk_ref[:, pl.ds(off, w)] = (scale * dk).astype(dk_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *refs, scale, parts, bn, s_len,
               has_seg, has_mask):
  """One query block: dq = scale·Σ_s ds·k over the key blocks up to the diagonal."""
  segq, segk, words, (dq_ref,) = _split_refs(refs, has_seg, has_mask, 1)
  bm = q_ref.shape[0]
  t0 = pl.program_id(1) * bm
  rows = pl.ds(0, bm)
  q_parts, do = _load_parts(q_ref, rows, parts), do_ref[rows, :]     # the program's rows: once
  lse, dl = lse_ref[rows], dl_ref[rows]

  def block(j, dqs, causal):
    s0 = pl.multiple_of(j * bn, bn)
    keys = pl.ds(s0, bn)
    k_parts = _load_parts(k_ref, keys, parts)                          # once per tile
    ok = _allowed(t0, s0, bm, bn, s_len, rows, segq, segk, words, causal)
    _, ds = _p_ds(q_parts, k_parts, do, v_ref[keys, :], lse, dl, ok, scale)
    return tuple(a + _dot(ds.astype(kk.dtype), kk) for a, kk in zip(dqs, k_parts))

  init = tuple(jnp.zeros((bm, w), jnp.float32) for _, w in parts)
  n_blocks = jnp.minimum((t0 + bm + bn - 1) // bn, k_ref.shape[0] // bn)
  n_full = jnp.minimum(_below_diagonal(t0, bn), n_blocks)
  dqs = jax.lax.fori_loop(0, n_full, functools.partial(block, causal=False), init)
  dqs = jax.lax.fori_loop(n_full, n_blocks, functools.partial(block, causal=True), dqs)
  for (off, w), dq in zip(parts, dqs):
    dq_ref[:, pl.ds(off, w)] = (scale * dq).astype(dq_ref.dtype)


def _backward(q, k, v, seg, words, o, lse, do, cfg):
  mosaic = tuple(n for n in ('dq', 'dkv') if n in cfg.mosaic(q, seg, words))
  dq = dk = dv = None
  if mosaic:
    from v4jax.kernels.attention import mgpu
    dq, dk, dv = mgpu.backward(q, k, v, words, o, lse, do, cfg.scale, kernels=mosaic)
    if len(mosaic) == 2:
      return dq, dk, dv
  B, T, H, K = q.shape
  S, V = k.shape[1], v.shape[-1]
  a, d = cfg.dkv, cfg.dq
  tp = round_up(T, max(a.block_m, d.block_m))
  sp = round_up(S, max(a.block_n, d.block_n))
  qp, kp, vp, extra, s_len = _prep(q, k, v, seg, words, tp, sp)
  wq, wv = qp.shape[-1], vp.shape[-1]
  dop = pad_axis(pad_axis(do, 3, wv), 1, tp)
  # delta = rowsum(do·o); rows without a key (lse -inf) and padded rows get lse +inf: p = 0.
  dl = jnp.einsum('bthv,bthv->bth', do.astype(jnp.float32), o.astype(jnp.float32))
  lsep = pad_axis(jnp.where(lse == NEG_INF, jnp.inf, lse), 1, tp, value=jnp.inf)
  args = (qp, kp, vp, dop, lsep, pad_axis(dl, 1, tp), *extra)
  has_seg, has_mask = seg is not None, words is not None
  opts = dict(scale=cfg.scale, parts=_parts(K), s_len=s_len, has_seg=has_seg,
              has_mask=has_mask)

  # dk, dv: one program per key block; all query rows (and keys) resident, sliced in the loop.
  if dk is None:
    bn = a.block_n
    rows, keys, stat = _specs(H, a.block_m, tp, sp, row_block=False)
    key_block = lambda w: pl.BlockSpec((None, bn, None, w), lambda g, j: (g // H, j, g % H, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bm=a.block_m, **opts),
        grid=(B * H, sp // bn),
        in_specs=[rows(wq), key_block(wq), key_block(wv), rows(wv), stat, stat]
                 + _opt_specs(H, a.block_m, tp, sp, has_seg, has_mask, False),
        out_specs=[key_block(wq), key_block(wv)],
        out_shape=[jax.ShapeDtypeStruct((B, sp, H, wq), k.dtype),
                   jax.ShapeDtypeStruct((B, sp, H, wv), v.dtype)],
        compiler_params=_params(a), interpret=cfg.interpret, name='masked_attention_bwd_dkv',
    )(*args)
    dk, dv = dk[:, :S, :, :K], dv[:, :S, :, :V]

  # dq: one program per query block; all keys resident.
  if dq is None:
    bm = d.block_m
    rows, keys, stat = _specs(H, bm, tp, sp, row_block=True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bn=d.block_n, **opts),
        grid=(B * H, tp // bm),
        in_specs=[rows(wq), keys(wq), keys(wv), rows(wv), stat, stat]
                 + _opt_specs(H, bm, tp, sp, has_seg, has_mask, True),
        out_specs=rows(wq),
        out_shape=jax.ShapeDtypeStruct((B, tp, H, wq), q.dtype),
        compiler_params=_params(d), interpret=cfg.interpret, name='masked_attention_bwd_dq',
    )(*args)[:, :T, :, :K]
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, seg, words, cfg):
  return _forward(q, k, v, seg, words, cfg)


def _attention_fwd(q, k, v, seg, words, cfg):
  o, lse = _forward(q, k, v, seg, words, cfg)
  return (o, lse), (q, k, v, seg, words, o, lse)


def _attention_bwd(cfg, res, cts):
  q, k, v, seg, words, o, lse = res
  do, _ = cts                        # lse has no gradient of its own (module docstring)
  dq, dk, dv = _backward(q, k, v, seg, words, o, lse, do, cfg)
  no_grad = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)
  return dq, dk, dv, no_grad(seg), no_grad(words)


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, scale: float,
                     segment_ids_BT: jax.Array | None = None, *,
                     select_BTK: jax.Array | None = None,
                     select_words_BTW: jax.Array | None = None,
                     fwd: Blocks | dict | None = None, dkv: Blocks | dict | None = None,
                     dq: Blocks | dict | None = None, mgpu: tuple = (),
                     interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """(o [B,T,H,V] in q's dtype, lse [B,T,H] fp32) of causal softmax attention of query t over
  the keys s <= t in its top-k set (select_BTK, -1 = empty slot; all keys when None) and its
  document (segment_ids_BT, when given). select_words_BTW: the same set as uint32 words
  [B,T,ceil(S/32)] (blockwise.pack_mask's layout), used instead of select_BTK when given.
  Per-head k/v. Differentiable in q, k, v (kernels both ways); lse carries no gradient.
  fwd / dkv / dq: each kernel's Blocks. mgpu: the kernels ('fwd', 'dq', 'dkv') that run as
  mgpu.py's Mosaic-GPU (Hopper) kernels for bf16/fp16 inputs when a top-k set and no segment
  ids are given (Triton's otherwise)."""
  B, T, H, K = q_BTHK.shape
  S = k_BSHK.shape[1]
  if (k_BSHK.shape != (B, S, H, K) or v_BSHV.shape[:3] != (B, S, H)
      or (select_BTK is not None and select_BTK.shape[:2] != (B, T))
      or (segment_ids_BT is not None and (segment_ids_BT.shape != (B, T) or S > T))):
    raise ValueError(f'masked attention gpu: q_BTHK {q_BTHK.shape}, k_BSHK {k_BSHK.shape}, '
                     f'v_BSHV {v_BSHV.shape} must be [B,T,H,K], [B,S,H,K], [B,S,H,V]; select_BTK '
                     f'[B,T,*], segment_ids_BT [B,T] (then S <= T)')
  W = -(-S // BITS)
  if select_words_BTW is not None and (select_words_BTW.shape != (B, T, W)
                                       or select_words_BTW.dtype != jnp.uint32):
    raise ValueError(f'masked attention gpu: select_words_BTW {select_words_BTW.shape} '
                     f'{select_words_BTW.dtype} must be uint32 [B,T,ceil(S/32)]={(B, T, W)}')
  if not set(mgpu) <= {'fwd', 'dq', 'dkv'}:
    raise ValueError(f"masked attention gpu: mgpu={mgpu!r} names kernels other than 'fwd', "
                     "'dq', 'dkv'")
  cfg = _Cfg(float(scale), _blocks('fwd', fwd, T, S), _blocks('dkv', dkv, T, S),
             _blocks('dq', dq, T, S), gpu_interpret(interpret), tuple(mgpu))
  words = select_words_BTW
  if words is None and select_BTK is not None:
    words = pack_mask(select_BTK, S)
  return _attention(q_BTHK, k_BSHK, v_BSHV, segment_ids_BT, words, cfg)
