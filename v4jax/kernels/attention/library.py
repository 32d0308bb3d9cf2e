"""Causal attention through cuDNN flash attention (jax.nn.dot_product_attention's kernel).

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width, W the
common padded width.

Head widths are zero-padded to multiples of 8 (zero columns add nothing to q.k; padded value
columns are sliced off). cuDNN takes MLA's value heads at their own width (below); the public
API, used by the 'xla' implementation, wants one width W = max(K, V) for q, k and v. Document boundaries (segment ids)
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
from v4jax.kernels.pallas_common import pad_axis, per_device, round_up

# The cuDNN forward primitive: its outputs (o and the softmax statistic) are what the backward
# needs, so the block remat policy keeps them (v4jax.model.transformer) instead of re-running
# the forward kernel in the backward.
CUDNN_FWD_PRIMITIVE = 'dot_product_attention_fwd_wrapper'


def causal_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, scale: float,
                     segment_ids_BT: jax.Array | None = None, *,
                     select_BTK: jax.Array | None = None, implementation: str = 'cudnn',
                     return_lse: bool = False):
  """o [B,T,H,V] in q's dtype, and with return_lse also lse [B,T,H] fp32 (a statistic without a
  gradient of its own: the DSA teacher reads it detached). `implementation`:
  'cudnn' (GPU) or 'xla' (lets the CPU tests check the padding and masking against the
  reference).

  On a multi-device mesh (`parallel.rules.activate`) the call runs per device (shard_map over
  the batch and head axes, whole sequences on each device): jax's cuDNN partitioning rule
  assumes the mask bias is sharded like q, and a top-k key set computed by a per-device Pallas
  kernel broke that on 2 GPUs (cuDNN: "dimensions mismatch as broadcasting 2 non-one dimension
  sizes"). The mask is built on each device from its own rows, so it is never gathered."""
  heads = ('batch', None, 'act_heads', None)
  fn = lambda q, k, v, seg, sel: _attention(q, k, v, scale, seg, sel, implementation, return_lse)
  return per_device(fn, (heads, heads, heads, ('batch', None), ('batch', None, None)),
                    (heads, heads[:3]) if return_lse else (heads,))(
                        q_BTHK, k_BSHK, v_BSHV, segment_ids_BT, select_BTK)


def _attention(q_BTHK, k_BSHK, v_BSHV, scale, segment_ids_BT, select_BTK, implementation,
               return_lse):
  mask = None
  if segment_ids_BT is not None:
    mask = (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
  if select_BTK is not None:
    sel = selection_mask(select_BTK, k_BSHK.shape[1])[:, None]
    mask = sel if mask is None else mask & sel
  if implementation == 'cudnn':
    return _cudnn(q_BTHK, k_BSHK, v_BSHV, mask, scale, return_lse)
  V = v_BSHV.shape[-1]
  W = round_up(max(q_BTHK.shape[-1], V), 8)
  q, k, v = (pad_axis(a, 3, W) for a in (q_BTHK, k_BSHK, v_BSHV))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                     implementation=implementation, return_residual=return_lse)
  if not return_lse:
    return out[..., :V]
  return out[0][..., :V], out[1].astype(jnp.float32)


def cudnn_module():
  """jax's cuDNN attention module (private; its signature is the same in jax 0.10.2 and 0.11.2)."""
  from jax._src.cudnn import fused_attention_stablehlo
  return fused_attention_stablehlo


def _cudnn(q_BTHK, k_BSHK, v_BSHV, mask, scale, return_lse):
  """cuDNN through the private entry point: fp32 lse, and value heads narrower than the qk heads
  (cuDNN's MLA shapes, cuDNN >= 9.10 on Hopper), so MLA's values are not padded to the qk width
  (bench_h200: 128 instead of 192; the peer: qk 48 instead of 128). A cuDNN without MLA shapes
  gets one common padded width."""
  V = v_BSHV.shape[-1]
  Wqk, Wv = round_up(q_BTHK.shape[-1], 8), round_up(V, 8)
  try:
    cudnn = cudnn_module()
    call = lambda wqk, wv: cudnn.dot_product_attention(
        pad_axis(q_BTHK, 3, wqk), pad_axis(k_BSHK, 3, wqk), pad_axis(v_BSHV, 3, wv), None, mask,
        scale=scale, mask_type=cudnn.MaskType.CAUSAL, qkv_layout='BTNH',
        return_residual=return_lse)
    try:
      out = call(Wqk, Wv)
    except NotImplementedError:
      if Wqk == Wv:
        raise
      out = call(max(Wqk, Wv), max(Wqk, Wv))
  except (ImportError, AttributeError, TypeError) as e:   # a private API: say what broke
    raise RuntimeError(
        f'cuDNN attention through jax\'s cuDNN entry point is unavailable in jax '
        f'{jax.__version__} ({type(e).__name__}: {e}); set config.kernels.attention=reference'
    ) from e
  if not return_lse:
    return out[..., :V]
  o_BTHW, lse_BHT = out
  return o_BTHW[..., :V], jnp.swapaxes(lse_BHT, 1, 2).astype(jnp.float32)
