"""Reference gather-based sparse MLA in absorbed (MQA) form (SPEC §2 step 6, §3).

Dims: B batch, T query positions, S key positions, H heads, C entry width (r_kv + d_r),
V value width (the first V dims of an entry: the latent c_kv), K selected keys per token,
D per-head qk width (d_n + d_r, MHA form).

Every head of a token attends to the same K gathered entries e_s = [c_kv,s ; k_r,s]; slots
holding -1 are clamped to row 0 for the gather and masked to -inf. Autodiff of the gather is the
scatter-add into the entries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels.blockwise import map_query_blocks


def gather_entries(kv_BSC: jax.Array, idx_BTK: jax.Array) -> jax.Array:
  """kv[b, idx[b,t,k]] -> [B,T,K,C], with -1 read as row 0."""
  return jax.vmap(lambda kv_SC, i_TK: kv_SC[i_TK])(kv_BSC, jnp.maximum(idx_BTK, 0))


def sparse_mla(q_BTHC: jax.Array, kv_BSC: jax.Array, idx_BTK: jax.Array, v_dim: int,
               scale: float, *, query_block: int = 0) -> tuple[jax.Array, jax.Array]:
  """o [B,T,H,V] = Σ_k softmax_k(scale·q·e_k)·e_k[:V] and lse [B,T,H] (fp32, natural log)."""

  def block(_, q_blk, idx_blk):
    e_BTKC = gather_entries(kv_BSC, idx_blk)
    logits_BTHK = scale * jnp.einsum('bthc,btkc->bthk', q_blk, e_BTKC,
                                     preferred_element_type=jnp.float32)
    logits_BTHK = jnp.where((idx_blk >= 0)[:, :, None, :], logits_BTHK, -jnp.inf)
    lse_BTH = jax.nn.logsumexp(logits_BTHK, axis=-1)
    p_BTHK = jnp.exp(logits_BTHK - jnp.where(jnp.isfinite(lse_BTH), lse_BTH, 0.0)[..., None])
    o_BTHV = jnp.einsum('bthk,btkv->bthv', p_BTHK.astype(q_blk.dtype), e_BTKC[..., :v_dim],
                        preferred_element_type=jnp.float32)
    return o_BTHV.astype(q_blk.dtype), lse_BTH

  return map_query_blocks(block, query_block, q_BTHC, idx_BTK)


def attention_probs_mean(q_BTHC: jax.Array, kv_BSC: jax.Array, idx_BTK: jax.Array,
                         lse_BTH: jax.Array, scale: float, *, query_block: int = 0) -> jax.Array:
  """fp32 [B,T,K]: (1/H) Σ_h exp(scale·q_h·kv[idx] - lse_h), 0 at -1 slots (no gradient).

  The head-mean of the sparse attention softmax rebuilt from its saved lse (the sparse KL
  teacher, SPEC §3); gathers [B,Tq,K,C] entries one query block at a time.
  """
  q_BTHC, kv_BSC, lse_BTH = (jax.lax.stop_gradient(x) for x in (q_BTHC, kv_BSC, lse_BTH))

  def block(_, q_blk, idx_blk, lse_blk):
    logits_BTHK = scale * jnp.einsum('bthc,btkc->bthk', q_blk, gather_entries(kv_BSC, idx_blk),
                                     preferred_element_type=jnp.float32)
    p_BTHK = jnp.exp(logits_BTHK - lse_blk[..., None])
    return jnp.where(idx_blk >= 0, jnp.mean(p_BTHK, axis=2), 0.0)

  return map_query_blocks(block, query_block, q_BTHC, idx_BTK, lse_BTH)


def masked_probs_mean(q_BTHD: jax.Array, k_BSHD: jax.Array, idx_BTK: jax.Array,
                      lse_BTH: jax.Array, scale: float, *, query_block: int = 0) -> jax.Array:
  """fp32 [B,T,K]: (1/H) Σ_h exp(scale·q_h·k_h[idx] - lse_h), 0 at -1 slots (no gradient).

  The sparse KL teacher in the MHA form (per-head keys, DSA's masked form): dense logits
  [B,Tq,H,S] one query block at a time, head-mean probabilities, then taken at idx.
  """
  q_BTHD, k_BSHD, lse_BTH = (jax.lax.stop_gradient(x) for x in (q_BTHD, k_BSHD, lse_BTH))

  def block(_, q_blk, idx_blk, lse_blk):
    logits_BTHS = scale * jnp.einsum('bthd,bshd->bths', q_blk, k_BSHD,
                                     preferred_element_type=jnp.float32)
    p_BTS = jnp.mean(jnp.exp(logits_BTHS - lse_blk[..., None]), axis=2)
    p_BTK = jnp.take_along_axis(p_BTS, jnp.maximum(idx_blk, 0), axis=2)
    return jnp.where(idx_blk >= 0, p_BTK, 0.0)

  return map_query_blocks(block, query_block, q_BTHD, idx_BTK, lse_BTH)
