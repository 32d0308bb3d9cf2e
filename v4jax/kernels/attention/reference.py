"""Reference causal softmax attention in plain jnp, one block of query rows at a time.

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels.blockwise import allowed_mask, map_query_blocks, selection_mask

F32 = jnp.float32


def dense_attention(q_BTHK: jax.Array, k_BSK: jax.Array, v_BSV: jax.Array, scale: float,
                    segment_ids_BT: jax.Array | None = None, *, select_BTK: jax.Array | None = None,
                    query_block: int = 0) -> tuple[jax.Array, jax.Array]:
  """Causal softmax attention over query blocks; (o [B,T,H,V], lse [B,T,H] fp32).

  k/v are per-head [B,S,H,*] (MHA form) or shared by all heads [B,S,*] (MQA form). Logits and
  softmax are fp32; only one block's [B,Tq,H,S] logits is live at a time. select_BTK (DSA's top-k
  key sets, -1 = empty) further restricts each query to its own keys.
  """
  shared = k_BSK.ndim == 3
  ks, vs = ('bsk', 'bsv') if shared else ('bshk', 'bshv')
  S = k_BSK.shape[1]

  def block(q_offset, q, seg, sel):
    logits_BTHS = scale * jnp.einsum(f'bthk,{ks}->bths', q, k_BSK, preferred_element_type=F32)
    mask_BTS = allowed_mask(q_offset, q.shape[1], S, seg, segment_ids_BT)
    if sel is not None:
      mask_BTS = mask_BTS & selection_mask(sel, S)
    logits_BTHS = jnp.where(mask_BTS[:, :, None], logits_BTHS, -jnp.inf)
    lse_BTH = jax.nn.logsumexp(logits_BTHS, axis=-1)
    p_BTHS = jnp.exp(logits_BTHS - lse_BTH[..., None])
    o_BTHV = jnp.einsum(f'bths,{vs}->bthv', p_BTHS.astype(q.dtype), v_BSV,
                        preferred_element_type=F32)
    return o_BTHV.astype(q.dtype), lse_BTH

  return map_query_blocks(block, query_block, q_BTHK, segment_ids_BT, select_BTK)
