"""Sparse MLA seam (SPEC §3): absorbed-form attention over a per-token set of K keys.

Dims: B batch, T query positions, S key positions, H heads, C entry width (r_kv + d_r),
V value width (r_kv), K selected keys per token, D per-head qk width (d_n + d_r, MHA form).

`impl` takes `config.kernels.impl`: reference -> gather + jnp softmax (reference.py);
pallas -> gpu.py (Triton; interpret mode on CPU) or tpu.py (Mosaic); auto -> pallas when
compiling for GPU/TPU, reference on CPU. The model calls only these dispatch functions.
"""
from __future__ import annotations

import jax

from v4jax.kernels import pallas_common
from v4jax.kernels.sparse_attention import reference

IMPLS = ('auto', 'reference', 'pallas')
TEACHERS = ('auto', 'pallas', 'pallas_mgpu')   # masked_probs_mean's GPU kernel


def _check_impl(impl):
  if impl not in IMPLS:
    raise ValueError(f'config.kernels.impl={impl!r} is not one of {IMPLS}')


def sparse_mla(q_BTHC: jax.Array, kv_BSC: jax.Array, idx_BTK: jax.Array, v_dim: int,
               scale: float, *, query_block: int = 0,
               impl: str = 'auto') -> tuple[jax.Array, jax.Array]:
  """(o [B,T,H,V], lse [B,T,H] fp32) of softmax attention over the entries kv[idx] (-1 masked)."""
  if q_BTHC.ndim != 4 or kv_BSC.ndim != 3 or idx_BTK.ndim != 3:
    raise ValueError(f'sparse_mla: q_BTHC {q_BTHC.shape}, kv_BSC {kv_BSC.shape}, idx_BTK '
                     f'{idx_BTK.shape} must be [B,T,H,C], [B,S,C], [B,T,K]')
  if kv_BSC.shape[2] != q_BTHC.shape[3] or idx_BTK.shape[:2] != q_BTHC.shape[:2]:
    raise ValueError(f'sparse_mla: C of q_BTHC {q_BTHC.shape} and kv_BSC {kv_BSC.shape}, and '
                     f'[B,T] of idx_BTK {idx_BTK.shape} must agree')
  if not 0 < v_dim <= kv_BSC.shape[2]:
    raise ValueError(f'sparse_mla: v_dim={v_dim} must be in [1, C={kv_BSC.shape[2]}]')
  _check_impl(impl)
  if pallas_common.use_pallas(impl):   # GPU Triton / TPU Mosaic kernels, per device
    from v4jax.kernels.sparse_attention import gpu, tpu
    mod = tpu if pallas_common.target_platform() == 'tpu' else gpu
    fn = lambda q, kv, idx: mod.sparse_mla(q, kv, idx, v_dim, scale)
    q_axes = ('batch', 'seq', 'act_heads', None)
    return pallas_common.per_device(fn, (q_axes, ('batch', None, None), ('batch', 'seq', None)),
                                    (q_axes, q_axes[:3]))(q_BTHC, kv_BSC, idx_BTK)
  return reference.sparse_mla(q_BTHC, kv_BSC, idx_BTK, v_dim, scale, query_block=query_block)


def attention_probs_mean(q_BTHC: jax.Array, kv_BSC: jax.Array, idx_BTK: jax.Array,
                         lse_BTH: jax.Array, scale: float, *, v_dim: int | None = None,
                         query_block: int = 0, impl: str = 'auto') -> jax.Array:
  """fp32 p [B,T,K] = (1/H) Σ_h exp(scale·q_h·kv[idx] - lse_h), 0 at -1 slots; no gradient.

  The sparse KL teacher (SPEC §3) from sparse_mla's lse. v_dim only tells the GPU kernel how to
  split C into power-of-two parts (default: the largest power of two <= C, e.g. 128 + 16); the
  TPU kernel takes C whole.
  """
  B, T, H, C = q_BTHC.shape if q_BTHC.ndim == 4 else (None,) * 4
  if (B is None or kv_BSC.ndim != 3 or (kv_BSC.shape[0], kv_BSC.shape[2]) != (B, C)
      or idx_BTK.ndim != 3 or idx_BTK.shape[:2] != (B, T) or lse_BTH.shape != (B, T, H)):
    raise ValueError(f'attention_probs_mean: q_BTHC {q_BTHC.shape}, kv_BSC {kv_BSC.shape}, '
                     f'idx_BTK {idx_BTK.shape}, lse_BTH {lse_BTH.shape} must be [B,T,H,C], '
                     '[B,S,C], [B,T,K], [B,T,H]')
  _check_impl(impl)
  if pallas_common.use_pallas(impl):
    from v4jax.kernels.sparse_attention import gpu, tpu
    if pallas_common.target_platform() == 'tpu':
      fn = lambda q, kv, idx, lse: tpu.attention_probs_mean(q, kv, idx, lse, scale)
    else:
      v = v_dim or 1 << (C.bit_length() - 1)
      fn = lambda q, kv, idx, lse: gpu.attention_probs_mean(q, kv, idx, lse, v, scale)
    tok = ('batch', 'seq', None)
    return pallas_common.per_device(fn, (tok + (None,), ('batch', None, None), tok, tok), (tok,))(
        q_BTHC, kv_BSC, idx_BTK, lse_BTH)
  return reference.attention_probs_mean(q_BTHC, kv_BSC, idx_BTK, lse_BTH, scale,
                                        query_block=query_block)


def masked_probs_mean(q_BTHD: jax.Array, k_BSHD: jax.Array, idx_BTK: jax.Array,
                      lse_BTH: jax.Array, scale: float, *, query_block: int = 0,
                      impl: str = 'auto', causal: bool = False,
                      teacher: str = 'auto', key_group: int = 0) -> jax.Array:
  """fp32 p [B,T,K] = (1/H) Σ_h exp(scale·q_h·k_h[idx] - lse_h), 0 at -1 slots; no gradient.

  attention_probs_mean in the MHA form (per-head keys): the KL teacher of DSA's masked form from
  the q/k it attends with and its lse. GPU (pallas): a dense tile kernel (gpu.py; on Hopper the
  Mosaic GPU kernel of mgpu.py when `causal`), then an XLA gather at idx; TPU: always the
  reference (dense XLA einsums per query block, which XLA does well there; no Mosaic kernel).
  causal: the caller promises S == T and idx[t] <= t (DSA's causal top-k), so tiles past the
  diagonal need not be computed; the result is the same. teacher (config.kernels.kl_teacher):
  the GPU kernel, auto (the Mosaic one where it runs) | pallas (Triton) | pallas_mgpu (Mosaic:
  a Hopper GPU and `causal` required). key_group (config.kernels.kl_key_group): the Mosaic
  kernel's key tiles per CTA (0: all up to the diagonal).
  """
  B, T, H, D = q_BTHD.shape if q_BTHD.ndim == 4 else (None,) * 4
  if (B is None or k_BSHD.ndim != 4 or (k_BSHD.shape[0],) + k_BSHD.shape[2:] != (B, H, D)
      or idx_BTK.ndim != 3 or idx_BTK.shape[:2] != (B, T) or lse_BTH.shape != (B, T, H)):
    raise ValueError(f'masked_probs_mean: q_BTHD {q_BTHD.shape}, k_BSHD {k_BSHD.shape}, '
                     f'idx_BTK {idx_BTK.shape}, lse_BTH {lse_BTH.shape} must be [B,T,H,D], '
                     '[B,S,H,D], [B,T,K], [B,T,H]')
  _check_impl(impl)
  if teacher not in TEACHERS:
    raise ValueError(f'config.kernels.kl_teacher={teacher!r} is not one of {TEACHERS}')
  if teacher == 'pallas_mgpu' and not (causal and pallas_common.is_hopper()):
    raise ValueError("config.kernels.kl_teacher='pallas_mgpu' needs a Hopper GPU (H100/H200) "
                     "and a causal top-k set (causal=True); 'auto' takes it where it runs")
  if pallas_common.use_pallas(impl) and pallas_common.target_platform() != 'tpu':
    from v4jax.kernels.sparse_attention import gpu
    fn = lambda q, k, idx, lse: gpu.masked_probs_mean(q, k, idx, lse, scale, causal=causal,
                                                      mosaic_teacher=teacher != 'pallas',
                                                      key_group=key_group)
    tok = ('batch', 'seq', None)
    return pallas_common.per_device(fn, (tok + (None,), ('batch', None, None, None), tok, tok),
                                    (tok,))(q_BTHD, k_BSHD, idx_BTK, lse_BTH)
  return reference.masked_probs_mean(q_BTHD, k_BSHD, idx_BTK, lse_BTH, scale,
                                     query_block=query_block)
