"""Dense causal attention seam (SPEC §2, dense MLA in the MHA form).

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width.

`impl` takes `config.kernels.attention`:
  reference -> blockwise jnp softmax attention (reference.py; every backend; returns the lse);
  cudnn -> cuDNN flash attention (library.py; GPU, bf16/fp16, per-head k/v), fp32 lse on request;
  auto -> cudnn on a GPU for bf16/fp16 per-head k/v, the reference otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels.attention.reference import dense_attention
from v4jax.kernels.pallas_common import target_platform

IMPLS = ('auto', 'reference', 'cudnn')


def resolve_impl(impl: str, q_BTHK: jax.Array, k_BSK: jax.Array) -> str:
  """The concrete impl `auto` stands for with these inputs on this platform."""
  if impl not in IMPLS:
    raise ValueError(f'config.kernels.attention={impl!r} is not one of {IMPLS}')
  if impl != 'auto':
    return impl
  library_ok = (target_platform() == 'gpu' and k_BSK.ndim == 4
                and q_BTHK.dtype in (jnp.bfloat16, jnp.float16))
  return 'cudnn' if library_ok else 'reference'


def causal_attention(q_BTHK: jax.Array, k_BSK: jax.Array, v_BSV: jax.Array, scale: float,
                     segment_ids_BT: jax.Array | None = None, *,
                     select_BTK: jax.Array | None = None, query_block: int = 0,
                     impl: str = 'auto', need_lse: bool = True):
  """(o [B,T,H,V], lse [B,T,H] fp32; None from the library path unless need_lse).

  k/v per head [B,S,H,*] or shared by all heads [B,S,*] (the reference only). select_BTK: DSA's
  top-k key set per query (-1 = empty slot), attended to as a mask over all keys.
  """
  impl = resolve_impl(impl, q_BTHK, k_BSK)
  if impl == 'cudnn':
    if k_BSK.ndim != 4:
      raise ValueError('config.kernels.attention=cudnn needs per-head k/v [B,S,H,*] '
                       f'(k {k_BSK.shape}); use auto')
    from v4jax.kernels.attention import library
    out = library.causal_attention(q_BTHK, k_BSK, v_BSV, scale, segment_ids_BT,
                                   select_BTK=select_BTK, return_lse=need_lse)
    return out if need_lse else (out, None)
  return dense_attention(q_BTHK, k_BSK, v_BSV, scale, segment_ids_BT, select_BTK=select_BTK,
                         query_block=query_block)
