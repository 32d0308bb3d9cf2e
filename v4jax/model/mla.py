"""Multi-head latent attention with DeepSeek Sparse Attention (SPEC §2, §3).

Dims: B batch, T query positions, S key positions, D model dim, H heads, C kv latent (r_kv) or
absorbed entry width (r_kv + d_r), R q latent (r_q), N nope dim (d_n), P rope dim (d_r),
V value dim (d_v), K per-head qk dim (d_n + d_r) or top-k (idx_BTK).

Queries and keys come from low-rank latents. Keys/values share one latent c_kv per token plus one
rope key k_r shared by all heads. Two equal forms of attention:
  MHA: up-project c_kv to per-head k_n, v (dense attention, short sequences);
  MQA (absorbed): fold W^UK into the query, attend over entries e_s = [c_kv ; k_r] shared by all
       heads and apply W^UV after, which lets DSA gather K entries per token.
`dsa.stage`: dense (no indexer), warmup (dense attention + dense KL), sparse (top-k attention +
KL on the selected set). Attention stays dense when T <= max(K, dsa.min_seq_len). The sparse
stage attends in one of two equal ways (`dsa.sparse_attention`): gather (absorbed form over the K
selected entries per token, the sparse MLA kernels) or masked (MHA form over all keys, the
selection as a mask: the dense attention kernels, fewer FLOPs when K is a large part of T at few
heads). The KL teacher comes from the form that attended, at the selected keys, with the
attention's own log-sum-exp: gather, the absorbed q and latent entries (attention_probs_mean);
masked, the MHA-form q and k by a dense tile kernel (masked_probs_mean), so mqa_qkv never runs.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from v4jax.kernels.attention import causal_attention, dense_attention
from v4jax.kernels.attention import BIT_WORD_IMPLS, resolve_impl as resolve_attention_impl
from v4jax.kernels.indexer import indexer_topk
from v4jax.kernels.sparse_attention import attention_probs_mean, masked_probs_mean, sparse_mla
from v4jax.model.dsa import Indexer, dense_indexer_kl, sparse_indexer_kl
from v4jax.model.layers import RMSNorm, constrain, dtype_of, matmul, param
from v4jax.model.rope import (apply_rope_interleaved, attention_mscale, rope_cos_sin_scale,
                              rope_inv_freq)

ACT_BTHK = ('batch', 'seq', 'act_heads', None)


def _keep_narrow(idx_BTK: jax.Array, s_len: int) -> jax.Array:
  """idx named 'indexer_topk' for block remat, the kept copy in int16 while every key id (and
  -1) fits: half the bytes of one of the three [B,T,K] tensors it keeps per layer (idx, teacher,
  student), with the same values."""
  if s_len > jnp.iinfo(jnp.int16).max:
    return checkpoint_name(idx_BTK, 'indexer_topk')
  return checkpoint_name(idx_BTK.astype(jnp.int16), 'indexer_topk').astype(idx_BTK.dtype)


class Projections(NamedTuple):
  """Per-token MLA projections shared by both attention forms and the indexer."""
  c_q_BTR: jax.Array     # RMSNorm'd q latent (also the indexer's query input)
  q_n_BTHN: jax.Array
  q_r_BTHP: jax.Array    # RoPE'd (interleaved)
  c_kv_BSC: jax.Array    # RMSNorm'd kv latent
  k_r_BSP: jax.Array     # RoPE'd (interleaved), one per token, shared by heads


class MLA(nnx.Module):
  """MLA + DSA for one layer (params under `attn.`, SPEC §2; indexer under `attn.indexer.`)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m, d = cfg.model, cfg.dsa
    D, H, R, C = m.d_model, m.n_heads, m.q_lora_rank, m.kv_lora_rank
    N, P, V = m.qk_nope_dim, m.qk_rope_dim, m.v_head_dim
    std, pd = m.init_std, dtype_of(m.param_dtype)
    self.wq_a = param(rngs, (D, R), ('embed', 'q_lora'), std, pd)
    self.q_norm = RMSNorm(R, m.norm_eps)
    self.wq_b = param(rngs, (R, H, N + P), ('q_lora', 'heads', 'head_dim'), std, pd)
    self.wkv_a = param(rngs, (D, C + P), ('embed', 'kv_lora'), std, pd)
    self.kv_norm = RMSNorm(C, m.norm_eps)
    self.wkv_b = param(rngs, (C, H, N + V), ('kv_lora', 'heads', 'head_dim'), std, pd)
    self.wo = param(rngs, (H, V, D), ('heads', 'head_dim', 'embed'), std, pd)
    self.indexer = Indexer(cfg, rngs=rngs) if d.enabled else None
    self.d_model, self.n_heads, self.kv_rank, self.nope, self.rope = D, H, C, N, P
    self.scale = (N + P) ** -0.5 * attention_mscale(cfg) ** 2
    self.inv_freq = tuple(float(f) for f in rope_inv_freq(cfg))
    self.cos_sin_scale = rope_cos_sin_scale(cfg)
    self.dtype = dtype_of(m.dtype)
    self.attn_query_block = m.attn_query_block
    self.stage = d.stage if d.enabled else 'dense'
    self.topk, self.min_seq_len, self.dsa_query_block = d.topk, d.min_seq_len, d.query_block
    self.sparse_attention = d.sparse_attention
    self.impl, self.attention_impl = cfg.kernels.impl, cfg.kernels.attention
    self.student_dq, self.kl_teacher = cfg.kernels.student_dq, cfg.kernels.kl_teacher
    self.kl_key_group = cfg.kernels.kl_key_group
    self.keep_up = 'mla_up' not in m.remat_recompute   # block remat keeps the up-projections

  def project(self, x_BTD: jax.Array, positions_BT: jax.Array) -> Projections:
    """SPEC §2 steps 1-3: q latent, per-head [nope | rope] queries, kv latent and rope key."""
    dt, N, C = self.dtype, self.nope, self.kv_rank
    c_q_BTR = self.q_norm(matmul('btd,dr->btr', x_BTD, self.wq_a[...], dt))
    q_BTHK = constrain(matmul('btr,rhk->bthk', c_q_BTR, self.wq_b[...], dt,
                              saveable=self.keep_up), ACT_BTHK)
    q_r_BTHP = apply_rope_interleaved(q_BTHK[..., N:], positions_BT, self.inv_freq,
                                      self.cos_sin_scale)
    a_BTC = matmul('btd,dc->btc', x_BTD, self.wkv_a[...], dt)
    c_kv_BTC = checkpoint_name(self.kv_norm(a_BTC[..., :C]), 'mla_ckv')
    k_r_BTP = checkpoint_name(apply_rope_interleaved(a_BTC[..., C:], positions_BT, self.inv_freq,
                                                     self.cos_sin_scale), 'mla_ckv')
    return Projections(c_q_BTR, q_BTHK[..., :N], q_r_BTHP, c_kv_BTC, k_r_BTP)

  def mha_qkv(self, p: Projections):
    """MHA form: q [B,T,H,N+P], k [B,S,H,N+P] (k_r broadcast to heads), v [B,S,H,V]."""
    kv_BSHK = matmul('bsc,chk->bshk', p.c_kv_BSC, self.wkv_b[...], self.dtype,
                     saveable=self.keep_up)
    k_n_BSHN, v_BSHV = kv_BSHK[..., :self.nope], kv_BSHK[..., self.nope:]
    k_r_BSHP = jnp.broadcast_to(p.k_r_BSP[:, :, None], k_n_BSHN.shape[:3] + (self.rope,))
    q_BTHK = jnp.concatenate([p.q_n_BTHN, p.q_r_BTHP], axis=-1)
    return q_BTHK, jnp.concatenate([k_n_BSHN, k_r_BSHP], axis=-1), v_BSHV

  def mqa_qkv(self, p: Projections):
    """Absorbed form: q̄ [B,T,H,C+P] = [W^UK_h q_n ; q_r] and entries e [B,S,C+P] = [c_kv ; k_r]."""
    w_uk_CHN = self.wkv_b[...][..., :self.nope]
    q_c_BTHC = matmul('bthn,chn->bthc', p.q_n_BTHN, w_uk_CHN, self.dtype,
                      saveable=self.keep_up)
    q_abs_BTHC = jnp.concatenate([q_c_BTHC, p.q_r_BTHP.astype(self.dtype)], axis=-1)
    return q_abs_BTHC, jnp.concatenate([p.c_kv_BSC, p.k_r_BSP.astype(self.dtype)], axis=-1)

  def unabsorb(self, o_BTHC: jax.Array) -> jax.Array:
    """o_h = õ_h·W^UV_h: latent attention output [B,T,H,C] -> per-head values [B,T,H,V]."""
    return matmul('bthc,chv->bthv', o_BTHC, self.wkv_b[...][..., self.nope:], self.dtype)

  def attend_dense(self, p: Projections, segment_ids_BT=None, mode: str = 'mha'):
    """Dense causal attention in either form; (o [B,T,H,V], lse [B,T,H])."""
    if mode == 'mha':
      q, k, v = self.mha_qkv(p)
      return dense_attention(q, k, v, self.scale, segment_ids_BT, query_block=self.attn_query_block)
    if mode == 'mqa':
      q_abs, kv = self.mqa_qkv(p)
      o_c, lse = dense_attention(q_abs, kv, kv[..., :self.kv_rank], self.scale, segment_ids_BT,
                                 query_block=self.attn_query_block)
      return self.unabsorb(o_c), lse
    raise ValueError(f"attend_dense: mode={mode!r} is not one of ('mha', 'mqa')")

  def uses_sparse(self, seq_len: int) -> bool:
    """Top-k sparse attention runs only in the sparse stage and above max(K, dsa.min_seq_len)."""
    return self.stage == 'sparse' and seq_len > max(self.topk, self.min_seq_len)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT=None,
               valid_BT=None) -> tuple[jax.Array, dict]:
    """x is the block's pre-norm output. Returns (out [B,T,D], aux); aux['indexer_kl'] is the
    fp32 SUM over valid tokens of the per-token KL whenever the indexer runs."""
    B, T = x_BTD.shape[:2]
    if x_BTD.ndim != 3 or x_BTD.shape[2] != self.d_model:
      raise ValueError(f'MLA: x_BTD {x_BTD.shape} must be [B,T,D={self.d_model}]')
    for name, a in (('positions_BT', positions_BT), ('segment_ids_BT', segment_ids_BT),
                    ('valid_BT', valid_BT)):
      if a is not None and a.shape != (B, T):
        raise ValueError(f'MLA: {name} {a.shape} must be [B,T]={(B, T)}')
    p = self.project(x_BTD, positions_BT)
    aux = {}
    if self.stage in ('warmup', 'sparse'):
      qi, ki, wi = self.indexer(x_BTD, p.c_q_BTR, positions_BT)
    if self.uses_sparse(T):
      qb = self.dsa_query_block
      masked = self.sparse_attention == 'masked'
      if masked:
        q, k, v = self.mha_qkv(p)
      # The Pallas masked attention reads the set as bits, which the top-k kernel then writes.
      want_words = masked and resolve_attention_impl(self.attention_impl, q, k,
                                                     masked=True) in BIT_WORD_IMPLS
      # The top-k's scores at idx are the KL student's value. Unnamed: block remat keeps idx,
      # its bits and the student ('dsa_student', these same [B,T,K] values): top-k never reruns.
      idx_BTK, topk_scores_BTK, *words = indexer_topk(
          qi, ki, wi, self.topk, segment_ids_BT, return_scores=True, return_words=want_words,
          query_block=qb, impl=self.impl)
      idx_BTK = _keep_narrow(idx_BTK, T)
      words_BTW = checkpoint_name(words[0], 'indexer_topk') if words else None
      if masked:
        o_BTHV, lse_BTH = causal_attention(q, k, v, self.scale, segment_ids_BT,
                                           select_BTK=idx_BTK, select_words_BTW=words_BTW,
                                           query_block=self.attn_query_block,
                                           impl=self.attention_impl)
        probs_mean = functools.partial(masked_probs_mean, causal=True,   # causal top-k
                                       teacher=self.kl_teacher,
                                       key_group=self.kl_key_group)
      else:
        q, k = self.mqa_qkv(p)
        o_c, lse_BTH = sparse_mla(q, k, idx_BTK, self.kv_rank, self.scale, query_block=qb,
                                  impl=self.impl)
        o_BTHV = self.unabsorb(o_c)
        probs_mean = attention_probs_mean
      lse_BTH = checkpoint_name(lse_BTH, 'attn_lse')
      sg = jax.lax.stop_gradient
      teacher = lambda: probs_mean(sg(q), sg(k), idx_BTK, sg(lse_BTH), self.scale,
                                   query_block=qb, impl=self.impl)
      aux['indexer_kl'] = sparse_indexer_kl(qi, ki, wi, idx_BTK, teacher, valid_BT,
                                            topk_scores_BTK=topk_scores_BTK, query_block=qb,
                                            impl=self.impl, student_dq=self.student_dq)
    else:
      q, k, v = self.mha_qkv(p)
      with_kl = self.stage in ('warmup', 'sparse')
      o_BTHV, lse_BTH = causal_attention(q, k, v, self.scale, segment_ids_BT,
                                         query_block=self.attn_query_block,
                                         impl=self.attention_impl, need_lse=with_kl)
      if with_kl:
        lse_BTH = checkpoint_name(lse_BTH, 'attn_lse')
        aux['indexer_kl'] = dense_indexer_kl(qi, ki, wi, q, k, lse_BTH, self.scale, valid_BT,
                                             segment_ids_BT, query_block=self.attn_query_block,
                                             impl=self.impl)
    o_BTHV = constrain(o_BTHV, ACT_BTHK)
    out_BTD = matmul('bthv,hvd->btd', o_BTHV, self.wo[...], self.dtype)
    return constrain(out_BTD, ('batch', 'seq', 'act_embed')), aux
