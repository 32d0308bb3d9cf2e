"""Reference lightning-indexer scores and causal top-k in plain jnp (SPEC §3).

Dims: B batch, T query positions, S key positions, H indexer heads (H_I), D indexer head dim
(d_I), K top-k.

The caller folds both scales into the head weights (w = x·weights_proj·H_I^-1/2·d_I^-1/2; a
positive factor commutes with ReLU), so here I[t,s] = Σ_h w[t,h]·ReLU(q[t,h]·k[s]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels.blockwise import allowed_mask, map_query_blocks


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
                      *, query_block: int = 0) -> jax.Array:
  """fp32 I [B,T,K] = Σ_h w·ReLU(q_h·k[idx]) at the selected keys, -inf at -1 slots.

  Gathers the [B,Tq,K,D] selected keys one query block at a time (-1 read as row 0); autodiff of
  the gather scatter-adds into k.
  """
  def block(_, q_blk, w_blk, idx_blk):
    k_BTKD = jax.vmap(lambda k_SD, i_TK: k_SD[i_TK])(k_BSD, jnp.maximum(idx_blk, 0))
    dots_BTHK = jnp.einsum('bthd,btkd->bthk', q_blk, k_BTKD.astype(q_blk.dtype),
                           preferred_element_type=jnp.float32)
    s_BTK = jnp.einsum('bthk,bth->btk', jax.nn.relu(dots_BTHK), w_blk.astype(jnp.float32))
    return jnp.where(idx_blk >= 0, s_BTK, -jnp.inf)

  return map_query_blocks(block, query_block, q_BTHD, w_BTH, idx_BTK)
