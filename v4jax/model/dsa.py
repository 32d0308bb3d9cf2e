"""DeepSeek Sparse Attention: the lightning indexer and its KL losses (SPEC §3).

Dims: B batch, T query positions, S key positions, H MLA heads, K top-k, and for the indexer:
J indexer heads (H_I), I indexer head dim (d_I), R q LoRA rank (r_q).

The indexer scores every allowed key s for query t with
  I[t,s] = Σ_j w[t,j]·d_I^-1/2·ReLU(Q[t,j]·k[s]),  w = x·weights_proj·H_I^-1/2,
from detached inputs (sg(x), sg(c_q)), so it never sends gradient into the main model. Top-k on
I picks one key set per token for all MLA heads. The indexer learns only from a KL loss towards
the head-mean of the main attention's softmax (the teacher, detached): over all allowed keys
while attention is dense (warm-up), over the selected keys when it is sparse. The loss gradient
wrt I is exactly softmax(I) - p on the support (a custom_vjp).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from v4jax.kernels.blockwise import allowed_mask, map_query_blocks
from v4jax.kernels.indexer import indexer_scores, indexer_scores_at
from v4jax.model.layers import LayerNorm, dtype_of, matmul, param
from v4jax.model.rope import apply_rope_half, rope_cos_sin_scale, rope_inv_freq

F32 = jnp.float32
sg = jax.lax.stop_gradient


def _hadamard(n: int) -> np.ndarray:
  """Orthonormal Sylvester Hadamard matrix [n,n] (n a power of two)."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / math.sqrt(n)


class Indexer(nnx.Module):
  """Lightning indexer projections (params under `attn.indexer.`, SPEC §3 table)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m, d = cfg.model, cfg.dsa
    if d.head_dim <= m.qk_rope_dim:
      raise ValueError(f'config.dsa.head_dim={d.head_dim} must be > model.qk_rope_dim='
                       f'{m.qk_rope_dim} (the indexer head is [rope | nope])')
    if d.hadamard and d.head_dim & (d.head_dim - 1):
      raise ValueError(f'config.dsa.head_dim={d.head_dim} must be a power of two with dsa.hadamard')
    std, pd = m.init_std, dtype_of(m.param_dtype)
    self.wq_b = param(rngs, (m.q_lora_rank, d.n_heads, d.head_dim),
                      ('q_lora', 'indexer_heads', 'indexer_dim'), std, pd)
    self.wk = param(rngs, (m.d_model, d.head_dim), ('embed', 'indexer_dim'), std, pd)
    self.k_norm = LayerNorm(d.head_dim, eps=1e-6)
    self.weights_proj = param(rngs, (m.d_model, d.n_heads), ('embed', 'indexer_heads'), std, F32)
    self.rope_dim, self.n_heads, self.head_dim = m.qk_rope_dim, d.n_heads, d.head_dim
    self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg))
    self.cos_sin_scale = rope_cos_sin_scale(cfg)
    self.hadamard = d.hadamard
    self.dtype = dtype_of(m.dtype)
    self.keep_q = 'indexer_q' not in m.remat_recompute   # block remat keeps the queries

  def _rope(self, a, positions_BT):
    r = self.rope_dim
    rot = apply_rope_half(a[..., :r], positions_BT, self.inv_freq, self.cos_sin_scale)
    return jnp.concatenate([rot, a[..., r:]], axis=-1)

  def __call__(self, x_BTD: jax.Array, c_q_BTR: jax.Array, positions_BT: jax.Array):
    """(q [B,T,J,I], k [B,T,I], w [B,T,J] fp32) with both scales folded into w (they commute
    with ReLU), so that I = Σ_j w_j·ReLU(q_j·k)."""
    x_BTD, c_q_BTR = sg(x_BTD), sg(c_q_BTR)
    q_BTJI = self._rope(matmul('btr,rji->btji', c_q_BTR, self.wq_b[...], self.dtype,
                               saveable=self.keep_q), positions_BT)
    k_BTI = self.k_norm(matmul('btd,di->bti', x_BTD, self.wk[...], self.dtype))
    k_BTI = self._rope(k_BTI, positions_BT)
    if self.hadamard:
      h_II = jnp.asarray(_hadamard(self.head_dim))
      q_BTJI = jnp.einsum('btji,ik->btjk', q_BTJI.astype(F32), h_II)
      k_BTI = jnp.einsum('bti,ik->btk', k_BTI, h_II)
    w_BTJ = matmul('btd,dj->btj', x_BTD, self.weights_proj[...], F32)      # fp32 head weights
    w_BTJ = w_BTJ * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
    return q_BTJI.astype(self.dtype), k_BTI.astype(self.dtype), w_BTJ


@jax.custom_vjp
def kl_rows(scores_BTS: jax.Array, p_BTS: jax.Array, support_BTS: jax.Array) -> jax.Array:
  """KL(p ‖ softmax_support(I)) per row, fp32 [B,T]; 0·log 0 = 0; d/dI = softmax(I) - p."""
  return _kl_fwd(scores_BTS, p_BTS, support_BTS)[0]


def _kl_fwd(scores_BTS, p_BTS, support_BTS):
  s = jnp.where(support_BTS, scores_BTS.astype(F32), -jnp.inf)
  lse_BT = jax.nn.logsumexp(s, axis=-1)
  lse_BT = jnp.where(jnp.isfinite(lse_BT), lse_BT, 0.0)
  p = p_BTS.astype(F32)
  terms = p * (jnp.log(jnp.where(p > 0, p, 1.0)) - (s - lse_BT[..., None]))
  kl_BT = jnp.sum(jnp.where(support_BTS & (p > 0), terms, 0.0), axis=-1)
  return kl_BT, (s, p, support_BTS, lse_BT)


def _kl_bwd(res, g_BT):
  s, p, support_BTS, lse_BT = res
  d = jnp.where(support_BTS, jnp.exp(s - lse_BT[..., None]) - p, 0.0)
  return g_BT[..., None] * d, jnp.zeros_like(p), None


kl_rows.defvjp(_kl_fwd, _kl_bwd)


def _masked_sum(kl_BT, valid_BT):
  if valid_BT is not None:
    kl_BT = jnp.where(valid_BT, kl_BT, 0.0)
  return jnp.sum(kl_BT)


def dense_indexer_kl(qi_BTJI, ki_BSI, wi_BTJ, q_BTHK, k_BSHK, lse_BTH, scale: float,
                     valid_BT=None, segment_ids_BT=None, *, query_block: int = 0,
                     impl: str = 'auto') -> jax.Array:
  """Σ over valid t of KL(p_t ‖ softmax(I_t)) over all allowed keys (warm-up / dense attention).

  The teacher p = (1/H)Σ_h exp(scale·q_h·k_h - lse_h) is rebuilt per query block from detached
  MHA-form q/k and the attention's own lse, so no [B,T,S] tensor outlives a block.
  """
  k_BSHK, S = sg(k_BSHK), ki_BSI.shape[1]

  def block(q_offset, qi, wi, q, lse, seg):
    B, Tq = qi.shape[:2]
    mask_BTS = jnp.broadcast_to(allowed_mask(q_offset, Tq, S, seg, segment_ids_BT), (B, Tq, S))
    logits_BTHS = scale * jnp.einsum('bthk,bshk->bths', sg(q), k_BSHK, preferred_element_type=F32)
    logits_BTHS = jnp.where(mask_BTS[:, :, None], logits_BTHS, -jnp.inf)
    p_BTS = jnp.mean(jnp.exp(logits_BTHS - sg(lse)[..., None]), axis=2)
    return kl_rows(indexer_scores(qi, ki_BSI, wi, impl=impl), sg(p_BTS), mask_BTS)

  kl_BT = map_query_blocks(block, query_block, qi_BTJI, wi_BTJ, q_BTHK, lse_BTH, segment_ids_BT)
  return _masked_sum(kl_BT, valid_BT)


def sparse_indexer_kl(qi_BTJI, ki_BSI, wi_BTJ, idx_BTK, teacher: Callable[[], jax.Array],
                      valid_BT=None, *, topk_scores_BTK=None, query_block: int = 0,
                      impl: str = 'auto', student_dq: str = 'auto') -> jax.Array:
  """Σ over valid t of KL(p^S_t ‖ softmax(I_t)) over the selected keys S_t (sparse stage).

  teacher() gives p^S [B,T,K], the head-mean of the actual sparse attention softmax at the
  selected keys (0 at -1 slots; detached here): mla.py builds it from the form that attended
  (attention_probs_mean or masked_probs_mean). A callable, so that its cost stays inside this
  function (bench_train's indexer profile scope). The student is I at the selected keys through
  the indexer seam (`impl`; `query_block` rows at a time in the reference): the top-k kernels'
  own scores there when given (topk_scores_BTK, from indexer_topk's return_scores), else
  recomputed; its gradient is the seam's either way. Slots holding -1 are outside the support.
  """
  scores_BTK = checkpoint_name(indexer_scores_at(qi_BTJI, ki_BSI, wi_BTJ, idx_BTK,
                                                 scores_BTK=topk_scores_BTK,
                                                 query_block=query_block, impl=impl,
                                                 dq_form=student_dq),
                               'dsa_student')
  p_BTK = checkpoint_name(sg(teacher()), 'dsa_teacher')
  return _masked_sum(kl_rows(scores_BTK, p_BTK, idx_BTK >= 0), valid_BT)
