"""Causal attention through cuDNN flash attention (jax.nn.dot_product_attention's kernel).

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width, W the
common padded width.

The API wants q, k and v of one head width, so MLA's narrow qk heads (d_n + d_r, e.g. 48) and
wider value heads (e.g. 128) are zero-padded to W = max(K, V) rounded up to 8: zero columns add
nothing to q.k, and the padded value columns are sliced off. Document boundaries (segment ids)
and DSA's top-k key sets go in as one boolean mask [B,1,T,S] (jax turns it into an additive
bias for cuDNN).

The log-sum-exp (the DSA KL teacher needs it) is cuDNN's fp32 softmax statistic. The public
`jax.nn.dot_product_attention(..., return_residual=True)` rounds it to the output dtype (bf16:
errors of ~0.03 in lse, 3% in every teacher probability), so the cuDNN path calls the function
behind it, `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, which returns it in
fp32 (the same signature in jax 0.10.2 and 0.11.2; checked on the GPU with 0.11.2,
docs/benchmarks.md). The 'xla' implementation (CPU tests of this padding and masking) uses the
public call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels.blockwise import selection_mask
from v4jax.kernels.pallas_common import pad_axis, round_up

# The cuDNN forward primitive: its outputs (o and the softmax statistic) are what the backward
# needs, so the block remat policy keeps them (v4jax.model.transformer) instead of re-running
# the forward kernel in the backward.
CUDNN_FWD_PRIMITIVE = 'dot_product_attention_fwd_wrapper'


def causal_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, scale: float,
                     segment_ids_BT: jax.Array | None = None, *,
                     select_BTK: jax.Array | None = None, implementation: str = 'cudnn',
                     return_lse: bool = False):
  """o [B,T,H,V] in q's dtype, and with return_lse also lse [B,T,H] fp32. `implementation`:
  'cudnn' (GPU) or 'xla' (lets the CPU tests check the padding and masking against the
  reference)."""
  V = v_BSHV.shape[-1]
  W = round_up(max(q_BTHK.shape[-1], V), 8)
  q, k, v = (pad_axis(a, 3, W) for a in (q_BTHK, k_BSHK, v_BSHV))
  mask = None
  if segment_ids_BT is not None:
    mask = (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
  if select_BTK is not None:
    sel = selection_mask(select_BTK, k_BSHK.shape[1])[:, None]
    mask = sel if mask is None else mask & sel
  if not return_lse:
    o_BTHW = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                          implementation=implementation)
    return o_BTHW[..., :V]
  if implementation == 'cudnn':
    try:
      from jax._src.cudnn import fused_attention_stablehlo as cudnn
      o_BTHW, lse_BHT = cudnn.dot_product_attention(
          q, k, v, None, mask, scale=scale, mask_type=cudnn.MaskType.CAUSAL, qkv_layout='BTNH',
          return_residual=True)
    except (ImportError, AttributeError, TypeError) as e:   # a private API: say what broke
      raise RuntimeError(
          f'cuDNN attention with its fp32 log-sum-exp is unavailable in jax {jax.__version__} '
          f'({type(e).__name__}: {e}); set config.kernels.attention=reference') from e
    lse_BTH = jnp.swapaxes(lse_BHT, 1, 2)
  else:
    o_BTHW, lse_BTH = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                                   is_causal=True, implementation=implementation,
                                                   return_residual=True)
  return o_BTHW[..., :V], lse_BTH.astype(jnp.float32)
