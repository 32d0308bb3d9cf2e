"""FLOPs per token (MaxText-compatible model FLOPs, SPEC §10), hardware FLOPs, MFU, and
parameter counts (`param_counts`).

Model FLOPs follow [MT] `calculate_tflops_training_per_device`: matmul FLOPs only (2 per
multiply-add), x3 for forward + backward, no remat, dropless top-k expert counting, the
unembedding counted once, core attention with MHA-mode dims and the causal 1/2 (or the DSA
factor). mHC and Engram are added per SPEC §10. Everything here is a pure function of the config
and the sequence length; nothing touches jax.

Symbols as in SPEC §0: D model dim, L layers, L_d dense layers, H heads, T sequence length,
K DSA top-k, n mHC streams, V vocabulary.
"""
from __future__ import annotations

import dataclasses

# Dense (non-sparse) BF16 peak TFLOP/s per chip, from the vendors' data sheets. Checked in order
# against the lower-cased jax `device_kind`; the first substring that matches wins, so the more
# specific names come first.
PEAK_TFLOPS: dict[str, float] = {
    'h100 pcie': 756.0,     # NVIDIA H100 PCIe
    'h100 nvl': 835.0,      # NVIDIA H100 NVL
    'h100': 989.0,          # NVIDIA H100 SXM ("NVIDIA H100 80GB HBM3")
    'h200': 989.0,          # NVIDIA H200 (and GH200): same compute die as H100 SXM
    'h800': 989.0,
    'a100': 312.0,          # NVIDIA A100 (SXM and PCIe)
    'b200': 2250.0,         # NVIDIA B200
    'tpu v6 lite': 918.0,   # TPU v6e (Trillium)
    'tpu v6e': 918.0,
    'tpu v5 lite': 197.0,   # TPU v5e
    'tpu v5e': 197.0,
    'tpu v5p': 459.0,
    'tpu v5': 459.0,        # v5p reports itself as "TPU v5"
    'tpu v4': 275.0,
    'tpu v3': 123.0,
}


def peak_tflops_for(device) -> float | None:
  """Dense BF16 peak TFLOP/s of a jax device (or its `device_kind` string); None if unknown
  (CPU, or a chip not in `PEAK_TFLOPS`), so callers print 'n/a' instead of an MFU."""
  kind = device if isinstance(device, str) else getattr(device, 'device_kind', '')
  kind = ' '.join(str(kind).lower().split())
  if not kind or kind == 'cpu':
    return None
  if 'lite' in kind and kind.startswith('tpu v4'):
    return None   # TPU v4i: not a training chip, no trusted number
  for key, peak in PEAK_TFLOPS.items():
    if key in kind:
      return peak
  return None


@dataclasses.dataclass(frozen=True)
class FlopsReport:
  """Forward FLOPs per token, by term. The model terms follow SPEC §10; `hw_*` terms are what
  the model-FLOPs convention leaves out (they enter `hardware_fwd` only)."""
  seq_len: int
  sparse: bool             # DSA top-K attention counted (dsa sparse stage and T > K)
  dense_ffn: float         # L_d dense SwiGLU FFNs
  moe_ffn: float           # L - L_d MoE layers: router + (N_s + K_r) experts
  mla_proj: float          # L layers: q/kv down and up projections
  mla_out: float           # L layers: wo
  indexer_proj: float      # L layers, sparse only: indexer wq_b, wk, weights_proj
  attention: float         # L layers: core attention (MHA dims) + indexer scores if sparse
  unembed: float           # main head, 2DV
  mtp: float               # D_mtp blocks: FFN + MLA + indexer + out + core attention
  mtp_attention: float     # the core-attention part of `mtp` (already inside `mtp`)
  mhc: float               # (2n^3 + 6n^2 + 3n) D per site, 2 sites per block (main and MTP)
  engram: float            # per Engram layer: key/value projections, conv, gate
  hw_eh_proj: float        # MTP eh_proj, 2 * 2D * D per stream per depth
  hw_mtp_unembed: float    # MTP heads, 2DV per depth
  hw_hyper_head: float     # mHC stream reductions (main + per MTP depth)
  hw_sinkhorn: float       # Sinkhorn iterations at every mHC site
  hw_attention_extra: float  # executed minus counted core attention (MQA mode in the sparse path)
  hw_indexer: float        # indexer work the model count omits (warm-up stage, sparse with T <= K)
  hw_kl_teacher: float     # recomputed attention logits for the indexer KL teacher

  @property
  def attention_fwd(self) -> float:
    """Core attention of every block, main and MTP (SPEC §10 'attention' column)."""
    return self.attention + self.mtp_attention

  @property
  def model_fwd(self) -> float:
    """MaxText-compatible model FLOPs per token, forward (SPEC §10 F_fwd)."""
    return (self.dense_ffn + self.moe_ffn + self.mla_proj + self.mla_out + self.indexer_proj
            + self.attention + self.unembed + self.mtp + self.mhc + self.engram)

  @property
  def weights_fwd(self) -> float:
    """Everything but core attention (SPEC §10 'weights' column)."""
    return self.model_fwd - self.attention_fwd

  @property
  def model_train_per_token(self) -> float:
    return 3.0 * self.model_fwd

  @property
  def hardware_fwd(self) -> float:
    """Model FLOPs plus the uncounted terms (eh_proj, MTP unembedding, HyperHead, Sinkhorn,
    MQA-mode sparse attention, indexer work outside the count, KL teacher). Remat recompute is
    not included."""
    return (self.model_fwd + self.hw_eh_proj + self.hw_mtp_unembed + self.hw_hyper_head
            + self.hw_sinkhorn + self.hw_attention_extra + self.hw_indexer + self.hw_kl_teacher)

  @property
  def hardware_train_per_token(self) -> float:
    return 3.0 * self.hardware_fwd


def _sparse_active(cfg, T: int) -> bool:
  """DSA top-K attention runs (SPEC §3): sparse stage and T above both K and dsa.min_seq_len."""
  d = cfg.dsa
  return bool(d.enabled and d.stage == 'sparse' and T > max(d.topk, d.min_seq_len))


def flops_per_token(cfg, seq_len: int | None = None) -> FlopsReport:
  """Forward FLOPs per token of `cfg` at sequence length `seq_len` (default data.seq_len)."""
  m, e, d, h, g = cfg.model, cfg.moe, cfg.dsa, cfg.mhc, cfg.engram
  T = int(seq_len if seq_len is not None else cfg.data.seq_len)
  if T <= 0:
    raise ValueError(f'seq_len={T} must be a positive integer')
  D, L, Ld, H, V = m.d_model, m.n_layers, m.n_dense_layers, m.n_heads, m.vocab_size
  r_q, r_kv = m.q_lora_rank, m.kv_lora_rank
  d_n, d_r, d_v = m.qk_nope_dim, m.qk_rope_dim, m.v_head_dim
  d_qk = d_n + d_r
  H_I, d_I, K = d.n_heads, d.head_dim, d.topk
  n = h.streams
  n_mtp = cfg.mtp.depth
  sparse = _sparse_active(cfg, T)

  # Per-layer terms.
  dense_ffn = 6 * D * m.d_ff
  moe_ffn = 2 * D * e.num_experts + 6 * D * e.d_expert * (e.num_shared + e.top_k)
  mla_proj = 2 * (D * r_q + r_q * H * d_qk) + 2 * (D * (r_kv + d_r) + r_kv * H * (d_n + d_v))
  mla_out = 2 * D * H * d_v
  idx_proj = 2 * r_q * H_I * d_I + 2 * D * d_I + 2 * D * H_I
  idx_scores = (2 * T * H_I * d_I + 2 * T * H_I) / 2        # causal half of Q.k and the weighting
  if sparse:
    frac = K / T
    core = 2 * T * H * (d_qk + d_v) * (frac - frac * frac / 2) + idx_scores
  else:
    core = T * H * (d_qk + d_v)                              # causal 1/2 of 2 T H (d_qk + d_v)
  idx_model = idx_proj if sparse else 0

  # Which FFN each block has (matches the model: without MoE every block, MTP too, is dense).
  n_moe = (L - Ld) if e.enabled else 0
  mtp_ffn = moe_ffn if e.enabled else dense_ffn
  mtp_block = mtp_ffn + mla_proj + idx_model + mla_out + core

  blocks = L + n_mtp
  mhc_site = (2 * n**3 + 6 * n**2 + 3 * n) * D if n > 1 else 0
  engram_layer = (2 * g.d_mem * n * D + 2 * g.d_mem * D
                  + (2 * g.conv_kernel * n * D if g.use_short_conv else 0) + 2 * n * D)
  n_engram = len(g.layer_ids) if g.enabled else 0

  # Hardware-only terms.
  attn_extra = hw_indexer = kl_teacher = 0
  if sparse:
    # MQA ("absorbed") mode over K gathered latent rows per query (SPEC §2.6): logits over
    # r_kv + d_r dims and values over r_kv dims, for all K slots (masked ones included).
    executed = 2 * H * K * ((r_kv + d_r) + r_kv) + idx_scores
    attn_extra = blocks * (executed - core)
    kl_teacher = blocks * 2 * H * K * (r_kv + d_r)      # sparse teacher logits over S_t
  elif d.enabled and d.stage in ('warmup', 'sparse'):
    # Warm-up, or the sparse stage at T <= K: attention is dense but the indexer still runs for
    # its KL loss, whose dense teacher recomputes the (causal) attention logits.
    hw_indexer = blocks * (idx_proj + idx_scores)
    kl_teacher = blocks * T * H * d_qk
  hyper_head = (1 + n_mtp) * (2 * n * D * n + 2 * n * D) if n > 1 else 0
  # Sinkhorn, approximately: per iteration a row and a column step of n^2 adds + n^2 divides.
  sinkhorn = 2 * blocks * h.sinkhorn_iters * 4 * n * n if n > 1 else 0

  return FlopsReport(
      seq_len=T, sparse=sparse,
      dense_ffn=float((L if not e.enabled else Ld) * dense_ffn),
      moe_ffn=float(n_moe * moe_ffn),
      mla_proj=float(L * mla_proj),
      mla_out=float(L * mla_out),
      indexer_proj=float(L * idx_model),
      attention=float(L * core),
      unembed=float(2 * D * V),
      mtp=float(n_mtp * mtp_block),
      mtp_attention=float(n_mtp * core),
      mhc=float(2 * blocks * mhc_site),
      engram=float(n_engram * engram_layer),
      hw_eh_proj=float(n_mtp * 2 * (2 * D) * D * n),
      hw_mtp_unembed=float(n_mtp * 2 * D * V),
      hw_hyper_head=float(hyper_head),
      hw_sinkhorn=float(sinkhorn),
      hw_attention_extra=float(attn_extra),
      hw_indexer=float(hw_indexer),
      hw_kl_teacher=float(kl_teacher),
  )


def model_tflops_per_step(cfg, tokens_per_step: int, seq_len: int | None = None) -> float:
  """Model TFLOPs of one training step over `tokens_per_step` tokens (all devices, all
  micro-batches): 3 * F_fwd * tokens / 1e12. Divide by the device count for per-device TFLOPs
  (SPEC §10 writes it per device: tokens_per_microbatch_per_device * grad_accum)."""
  return flops_per_token(cfg, seq_len).model_train_per_token * tokens_per_step / 1e12


def hardware_tflops_per_step(cfg, tokens_per_step: int, seq_len: int | None = None) -> float:
  """As `model_tflops_per_step`, with `hardware_fwd` (no remat recompute counted)."""
  return flops_per_token(cfg, seq_len).hardware_train_per_token * tokens_per_step / 1e12


def mfu(model_tflops_per_step: float, step_time_s: float, n_devices: int,
        peak: float | None) -> float | None:
  """Model FLOPs utilisation as a fraction in [0, 1]: step TFLOPs / (time * devices * peak).
  None when the peak is unknown (CPU)."""
  if peak is None:
    return None
  if step_time_s <= 0:
    raise ValueError(f'step_time_s={step_time_s} must be > 0')
  if n_devices <= 0 or peak <= 0:
    raise ValueError(f'n_devices={n_devices} and peak={peak} must be > 0')
  return model_tflops_per_step / (step_time_s * n_devices * peak)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Trainable parameters of `Transformer(cfg)`, from the config alone (router biases are state,
  not parameters). `total` is everything the optimizer updates, MTP and Engram tables included;
  `active` is what one token touches: K_r of the N_r routed experts and, per Engram layer, the
  J gathered table rows (d_mem values) instead of the whole table."""
  total: int
  active: int
  embedding: int         # embedding + output head
  routed_experts: int    # all routed-expert weights (main and MTP blocks)
  engram_tables: int     # all Engram tables (device or host)
  mtp: int               # MTP modules (they share the embedding and head)


def param_counts(cfg) -> ParamCounts:
  """Parameter counts of `cfg` (Engram table sizes from its frozen hash primes, identity lookup)."""
  m, e, d, h, g = cfg.model, cfg.moe, cfg.dsa, cfg.mhc, cfg.engram
  D, V, H = m.d_model, m.vocab_size, m.n_heads
  r_q, r_kv = m.q_lora_rank, m.kv_lora_rank
  d_n, d_r, d_v = m.qk_nope_dim, m.qk_rope_dim, m.v_head_dim
  n = h.streams
  mla = (D * r_q + r_q + r_q * H * (d_n + d_r) + D * (r_kv + d_r) + r_kv
         + r_kv * H * (d_n + d_v) + H * d_v * D)
  indexer = (r_q * d.n_heads * d.head_dim + D * d.head_dim + 2 * d.head_dim + D * d.n_heads
             if d.enabled else 0)
  experts = e.num_experts * 3 * D * e.d_expert
  moe = D * e.num_experts + experts + 3 * D * e.num_shared * e.d_expert
  hc = 2 * (n * D * (2 + n) * n + (2 + n) * n + 3) if n > 1 else 0
  head_reduce = n * D * n + n + 1 if n > 1 and h.head == 'hyper' else 0

  def block(layer, is_mtp=False):
    use_moe = e.enabled and (is_mtp or layer >= m.n_dense_layers)
    return 2 * D + mla + indexer + (moe if use_moe else 3 * D * m.d_ff) + hc

  tables = engram_other = 0
  if g.enabled:
    from v4jax.data.engram_hash import make_hash_spec
    spec = make_hash_spec(cfg)
    d_h = g.d_mem // spec.num_heads
    tables = sum(spec.rows_in_layer(l) for l in g.layer_ids) * d_h
    per_layer = (g.d_mem * D + n * g.d_mem * D + (1 + n) * D * bool(g.proj_bias) + 2 * n * D
                 + ((1 + g.conv_kernel) * n * D if g.use_short_conv else 0))
    engram_other = len(g.layer_ids) * per_layer
  embedding = 2 * V * D
  main = embedding + D + head_reduce + sum(block(i) for i in range(m.n_layers))
  mtp = cfg.mtp.depth * (3 * D + 2 * D * D + block(m.n_layers, is_mtp=True) + head_reduce)
  n_moe = ((m.n_layers - m.n_dense_layers) + cfg.mtp.depth) if e.enabled else 0
  total = main + mtp + tables + engram_other
  idle_experts = n_moe * (e.num_experts - e.top_k) * 3 * D * e.d_expert
  active = total - idle_experts - tables + (len(g.layer_ids) * g.d_mem if g.enabled else 0)
  return ParamCounts(total=int(total), active=int(active), embedding=int(embedding),
                     routed_experts=int(n_moe * experts), engram_tables=int(tables), mtp=int(mtp))
