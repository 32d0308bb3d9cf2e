"""Causal attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width, W the
common padded width.

The public API wants q, k and v of one head width, so MLA's narrow qk heads (d_n + d_r, e.g.
48) and wider value heads (e.g. 128) are zero-padded to W = max(K, V) rounded up to 8: zero
columns add nothing to q.k, and the padded value columns are sliced off. Document boundaries
(segment ids) and DSA's top-k key sets go in as one boolean mask [B,1,T,S] (jax turns it into an
additive bias for cuDNN). cuDNN does not return the log-sum-exp in fp32, so callers that need it
(the DSA warm-up KL) use the reference.
"""
from __future__ import annotations

import jax

from v4jax.kernels.blockwise import selection_mask
from v4jax.kernels.pallas_common import pad_axis, round_up


def causal_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, scale: float,
                     segment_ids_BT: jax.Array | None = None, *,
                     select_BTK: jax.Array | None = None,
                     implementation: str = 'cudnn') -> jax.Array:
  """o [B,T,H,V] in q's dtype; `implementation` is jax.nn.dot_product_attention's ('cudnn' on
  GPU; 'xla' lets the CPU tests check this padding and masking against the reference)."""
  V = v_BSHV.shape[-1]
  W = round_up(max(q_BTHK.shape[-1], V), 8)
  q, k, v = (pad_axis(a, 3, W) for a in (q_BTHK, k_BSHK, v_BSHV))
  mask = None
  if segment_ids_BT is not None:
    mask = (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
  if select_BTK is not None:
    sel = selection_mask(select_BTK, k_BSHK.shape[1])[:, None]
    mask = sel if mask is None else mask & sel
  o_BTHW = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                        implementation=implementation)
  return o_BTHW[..., :V]
