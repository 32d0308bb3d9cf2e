"""Reference lightning-indexer scores and causal top-k in plain jnp (SPEC §3).

Dims: B batch, T query positions, S key positions, H indexer heads (H_I), D indexer head dim
(d_I), K top-k.

The caller folds both scales into the head weights (w = x·weights_proj·H_I^-1/2·d_I^-1/2; a
positive factor commutes with ReLU), so here I[t,s] = Σ_h w[t,h]·ReLU(q[t,h]·k[s]).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.kernels import pallas_common
from v4jax.kernels.blockwise import allowed_mask, join_blocks, map_query_blocks, split_blocks


def indexer_scores(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array) -> jax.Array:
  """Unmasked fp32 scores I [B,T,S]; the dot products run in q's dtype, accumulating in fp32."""
  dots_BTHS = jnp.einsum('bthd,bsd->bths', q_BTHD, k_BSD.astype(q_BTHD.dtype),
                         preferred_element_type=jnp.float32)
  return jnp.einsum('bths,bth->bts', jax.nn.relu(dots_BTHS), w_BTH.astype(jnp.float32))


def indexer_topk(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, topk: int,
                 segment_ids_BT: jax.Array | None = None, *, query_block: int = 0) -> jax.Array:
  """int32 [B,T,K]: the K best allowed keys per query (ties toward the smaller s), -1 padded.

  One index set per query token, shared by all attention heads. Keys that are not allowed
  (s > t or another segment) are re-masked to -1 after `lax.top_k`, which covers early rows with
  fewer than K allowed keys.
  """
  S = k_BSD.shape[1]
  kk = min(topk, S)

  def block(q_offset, q_blk, w_blk, seg_blk):
    B, Tq = q_blk.shape[:2]
    mask_BTS = jnp.broadcast_to(allowed_mask(q_offset, Tq, S, seg_blk, segment_ids_BT), (B, Tq, S))
    scores_BTS = jnp.where(mask_BTS, indexer_scores(q_blk, k_BSD, w_blk), -jnp.inf)
    _, idx_BTK = jax.lax.top_k(scores_BTS, kk)
    ok_BTK = jnp.take_along_axis(mask_BTS, idx_BTK, axis=-1)
    idx_BTK = jnp.where(ok_BTK, idx_BTK, -1).astype(jnp.int32)
    return jnp.pad(idx_BTK, [(0, 0), (0, 0), (0, topk - kk)], constant_values=-1)

  return map_query_blocks(block, query_block, q_BTHD, w_BTH, segment_ids_BT)


def indexer_scores_at(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, idx_BTK: jax.Array,
                      *, query_block: int = 0, sort_slots: bool | None = None) -> jax.Array:
  """fp32 I [B,T,K] = Σ_h w·ReLU(q_h·k[idx]) at the selected keys, -inf at -1 slots.

  Gathers the [B,Tq,K,D] selected keys one query block at a time (-1 read as row 0). The custom
  VJP recomputes each block and adds its dk rows into k's rows; with sort_slots (default: when
  compiling for GPU/TPU) the slots are first sorted by key row, so the scatter-add is a segment
  sum over sorted indices (XLA:GPU's sorted scatter sums each run of equal rows before one
  atomic) rather than the unsorted, contended atomics of the gather's autodiff transpose. On CPU
  the scatter is sequential and sorting only adds cost.
  """
  if sort_slots is None:
    sort_slots = pallas_common.target_platform() != 'cpu'
  return _scores_at(q_BTHD, k_BSD, w_BTH, idx_BTK, int(query_block), bool(sort_slots))


def _gather_rows(k_BSD, idx_BTK):
  """k[b, idx[b,t,k]] -> [B,T,K,D] in k's dtype, -1 read as row 0."""
  B, S, D = k_BSD.shape
  flat = jnp.maximum(idx_BTK, 0) + (jnp.arange(B, dtype=jnp.int32) * S)[:, None, None]
  return k_BSD.reshape(B * S, D)[flat]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _scores_at(q_BTHD, k_BSD, w_BTH, idx_BTK, query_block, sort_slots):
  k_BSD = k_BSD.astype(q_BTHD.dtype)

  def block(_, q_blk, w_blk, idx_blk):
    dots_BTHK = jnp.einsum('bthd,btkd->bthk', q_blk, _gather_rows(k_BSD, idx_blk),
                           preferred_element_type=jnp.float32)
    s_BTK = jnp.einsum('bthk,bth->btk', jax.nn.relu(dots_BTHK), w_blk.astype(jnp.float32))
    return jnp.where(idx_blk >= 0, s_BTK, -jnp.inf)

  return map_query_blocks(block, query_block, q_BTHD, w_BTH, idx_BTK)


def _scores_at_fwd(q_BTHD, k_BSD, w_BTH, idx_BTK, query_block, sort_slots):
  out = _scores_at(q_BTHD, k_BSD, w_BTH, idx_BTK, query_block, sort_slots)
  return out, (q_BTHD, k_BSD, w_BTH, idx_BTK)


def _scores_at_bwd(query_block, sort_slots, res, g_BTK):
  """Per query block (a scan carrying dk): dd = [q·k > 0]·w·g, dq = dd·k[idx], dw = Σ_k
  ReLU(q·k)·g, and the dk rows dd^T·q added into k's rows (in sorted-slot order if asked)."""
  q_BTHD, k_BSD, w_BTH, idx_BTK = res
  B, T, H, D = q_BTHD.shape
  S = k_BSD.shape[1]
  bt = T if query_block <= 0 or query_block >= T else query_block
  split = lambda x, fill: split_blocks(x, bt, fill)   # padded rows hold idx -1 and g 0
  join = lambda x: join_blocks(x, T)

  kq = k_BSD.astype(q_BTHD.dtype)
  row0 = (jnp.arange(B, dtype=jnp.int32) * S)[:, None, None]

  def step(dk_ND, xs):
    q_blk, w_blk, idx_blk, g_blk = xs
    k_BTKD = _gather_rows(kq, idx_blk)
    dots_BTHK = jnp.einsum('bthd,btkd->bthk', q_blk, k_BTKD, preferred_element_type=jnp.float32)
    dd_BTHK = jnp.where(dots_BTHK > 0, w_blk.astype(jnp.float32)[..., None] * g_blk[:, :, None],
                        0.0).astype(q_blk.dtype)
    dq = jnp.einsum('bthk,btkd->bthd', dd_BTHK, k_BTKD, preferred_element_type=jnp.float32)
    dw = jnp.einsum('bthk,btk->bth', jax.nn.relu(dots_BTHK), g_blk)
    dk_rows = jnp.einsum('bthk,bthd->btkd', dd_BTHK, q_blk, preferred_element_type=jnp.float32)
    key = jnp.where(idx_blk >= 0, idx_blk + row0, B * S).reshape(-1)      # -1 -> dropped row
    rows_ND = dk_rows.reshape(-1, D)
    if sort_slots:
      key, order = jax.lax.sort_key_val(key, jnp.arange(key.size, dtype=jnp.int32))
      rows_ND = rows_ND[order]
    dk_ND = dk_ND.at[key].add(rows_ND, indices_are_sorted=sort_slots, mode='drop')
    return dk_ND, (dq.astype(q_blk.dtype), dw)

  g_BTK = jnp.where(idx_BTK >= 0, g_BTK, 0.0).astype(jnp.float32)
  xs = (split(q_BTHD, 0), split(w_BTH, 0), split(idx_BTK, -1), split(g_BTK, 0))
  dk_ND, (dq, dw) = jax.lax.scan(step, jnp.zeros((B * S, D), jnp.float32), xs)
  return (join(dq), dk_ND.reshape(B, S, D).astype(k_BSD.dtype), join(dw).astype(w_BTH.dtype),
          np.zeros(idx_BTK.shape, jax.dtypes.float0))


_scores_at.defvjp(_scores_at_fwd, _scores_at_bwd)
