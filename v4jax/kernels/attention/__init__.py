"""Dense causal attention seam (SPEC §2, dense MLA in the MHA form).

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width.

`impl` takes `config.kernels.attention`:
  reference -> blockwise jnp softmax attention (reference.py; every backend; returns the lse);
  cudnn -> cuDNN flash attention (library.py; GPU, bf16/fp16, per-head k/v), fp32 lse on request;
  pallas -> Pallas Triton flash attention (gpu.py; per-head k/v; the top-k set as packed bits;
    interpret mode on CPU), always with its fp32 lse;
  pallas_mgpu -> the same as Pallas Mosaic-GPU (WGMMA) kernels on Hopper (mgpu.py: forward, dq,
    dk/dv) under a top-k set without segment ids (the Triton kernels otherwise);
  tpu_flash -> jax's bundled Pallas TPU flash attention kernels (tpu.py; per-head k/v, no top-k
    set; TPU interpret mode on CPU), always with its fp32 lse (differentiable). Compiled ahead
    of time for TPU in CI, not yet timed on a TPU;
  auto -> on a GPU for bf16/fp16 per-head k/v: under a DSA top-k set pallas_mgpu on Hopper
    (bench_h200's step 3.2% shorter than with pallas, docs/performance.md row 90) and pallas
    elsewhere (3.0% shorter than cuDNN's [B,1,T,S] bias, row 53), cudnn without one; on a TPU
    for per-head k/v without a top-k set: tpu_flash; the reference otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels.attention.reference import dense_attention
from v4jax.kernels.pallas_common import is_hopper, per_device, target_platform

IMPLS = ('auto', 'reference', 'cudnn', 'pallas', 'pallas_mgpu', 'tpu_flash')
BIT_WORD_IMPLS = ('pallas', 'pallas_mgpu')   # impls that read the top-k set as packed bits


def forward_kernel_saveable(prim, *_, **params) -> bool:
  """A remat policy term: True for the forward kernel of an attention implementation (cuDNN's
  forward primitive, the Pallas forward pallas_calls on GPU and TPU), whose outputs (o, lse or
  the softmax statistics) are the backward kernels' inputs, so block remat keeps them instead of
  running the forward again."""
  from v4jax.kernels.attention import gpu, mgpu, tpu
  from v4jax.kernels.attention.library import CUDNN_FWD_PRIMITIVE
  if prim.name == CUDNN_FWD_PRIMITIVE:
    return True
  if prim.name == 'name':     # the Mosaic-GPU forward's outputs carry a checkpoint name
    return params.get('name') == mgpu.FWD_NAME
  if prim.name != 'pallas_call':
    return False
  name = params.get('name_and_src_info', params.get('name'))
  name = getattr(name, 'name', name)
  if not name:   # jax's bundled TPU kernels pass no name: theirs is the kernel function's
    name = getattr(getattr(params.get('jaxpr'), 'debug_info', None), 'func_name', None)
  return name in (gpu.FWD_KERNEL, tpu.FWD_KERNEL)


def resolve_impl(impl: str, q_BTHK: jax.Array, k_BSK: jax.Array, masked: bool = False) -> str:
  """The concrete impl `auto` stands for with these inputs on this platform (`masked`: a DSA
  top-k set is given)."""
  if impl not in IMPLS:
    raise ValueError(f'config.kernels.attention={impl!r} is not one of {IMPLS}')
  if impl != 'auto':
    return impl
  platform = target_platform()
  if k_BSK.ndim != 4:                     # k/v shared by all heads: the reference only
    return 'reference'
  if platform == 'tpu' and not masked:
    return 'tpu_flash'
  if platform == 'gpu' and q_BTHK.dtype in (jnp.bfloat16, jnp.float16):
    if not masked:
      return 'cudnn'
    return 'pallas_mgpu' if is_hopper() else 'pallas'
  return 'reference'


def causal_attention(q_BTHK: jax.Array, k_BSK: jax.Array, v_BSV: jax.Array, scale: float,
                     segment_ids_BT: jax.Array | None = None, *,
                     select_BTK: jax.Array | None = None,
                     select_words_BTW: jax.Array | None = None, query_block: int = 0,
                     impl: str = 'auto', need_lse: bool = True):
  """(o [B,T,H,V], lse [B,T,H] fp32; None from the cuDNN path unless need_lse).

  k/v per head [B,S,H,*] or shared by all heads [B,S,*] (the reference only). select_BTK: DSA's
  top-k key set per query (-1 = empty slot), attended to as a mask over all keys.
  select_words_BTW: optionally the same set as packed bits (blockwise.pack_mask's uint32
  [B,T,ceil(S/32)], e.g. from indexer_topk's return_words), which the pallas kernels take
  instead of packing select_BTK themselves; the other impls read select_BTK.
  """
  impl = resolve_impl(impl, q_BTHK, k_BSK, masked=select_BTK is not None)
  if impl in ('cudnn', 'pallas', 'pallas_mgpu', 'tpu_flash') and k_BSK.ndim != 4:
    raise ValueError(f'config.kernels.attention={impl} needs per-head k/v [B,S,H,*] '
                     f'(k {k_BSK.shape}); use auto')
  heads = ('batch', None, 'act_heads', None)
  if impl == 'tpu_flash':
    if select_BTK is not None:
      raise ValueError('config.kernels.attention=tpu_flash takes no DSA top-k set (select_BTK; '
                       'its masked form would need a [B,H,T,S] bias); use auto or reference')
    from v4jax.kernels.attention import tpu
    fn = lambda q, k, v, seg: tpu.causal_attention(q, k, v, scale, seg)
    return per_device(fn, (heads, heads, heads, ('batch', None)),
                      (heads, heads[:3]))(q_BTHK, k_BSK, v_BSV, segment_ids_BT)
  if impl in BIT_WORD_IMPLS:
    from v4jax.kernels.attention import gpu
    mosaic = ('fwd', 'dq', 'dkv') if impl == 'pallas_mgpu' else ()
    fn = lambda q, k, v, seg, sel, words: gpu.causal_attention(
        q, k, v, scale, seg, select_BTK=sel, select_words_BTW=words, mgpu=mosaic)
    rows = ('batch', None, None)
    return per_device(fn, (heads, heads, heads, ('batch', None), rows, rows),
                      (heads, heads[:3]))(q_BTHK, k_BSK, v_BSV, segment_ids_BT, select_BTK,
                                          select_words_BTW)
  if impl == 'cudnn':
    from v4jax.kernels.attention import library
    out = library.causal_attention(q_BTHK, k_BSK, v_BSV, scale, segment_ids_BT,
                                   select_BTK=select_BTK, return_lse=need_lse)
    return out if need_lse else (out, None)
  return dense_attention(q_BTHK, k_BSK, v_BSV, scale, segment_ids_BT, select_BTK=select_BTK,
                         query_block=query_block)
