"""DeepSeek-V3.2-scale preset (671B + 11.6B MTP; SPEC §12 'V3.2-scale' column).

Exact V3.2 semantics: mHC off (1 stream), Engram off, MLA + DSA in its sparse stage, MoE 256
routed top-8 + 1 shared, MTP depth 1, YaRN on (as when a V3.x checkpoint is loaded). The
optimizer follows the V3 reference recipe (SPEC §9). Mesh sizes depend on the slice and are set
at launch (e.g. --config.mesh.rules=fsdp_ep --config.mesh.expert=...).
"""
from v4jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.vocab_size = 129280
  m.d_model = 7168
  m.n_layers = 61
  m.n_dense_layers = 3
  m.d_ff = 18432
  m.n_heads = 128
  m.q_lora_rank = 1536
  m.kv_lora_rank = 512
  m.qk_nope_dim = 128
  m.qk_rope_dim = 64
  m.v_head_dim = 128
  m.dtype = 'bfloat16'
  m.param_dtype = 'float32'
  m.remat = 'block'
  m.scan_layers = True           # stacked runs of identical blocks under lax.scan: compile time
                                 # independent of depth (docs/architecture.md, docs/scaling.md)
  m.logits_chunk = 512           # positions per CE chunk: fp32 logits never held for all of T

  c.rope.yarn_mode = 'on'        # s=40, L0=4096, beta 32/1, mscale 1/1 are the defaults

  e = c.moe
  e.enabled = True
  e.num_experts = 256
  e.num_shared = 1
  e.top_k = 8
  e.d_expert = 2048
  e.n_groups = 8
  e.topk_groups = 4
  e.route_scale = 2.5

  d = c.dsa
  d.enabled = True
  d.stage = 'sparse'
  d.n_heads = 64
  d.head_dim = 128
  d.topk = 2048

  c.mhc.streams = 1
  c.engram.enabled = False
  c.mtp.depth = 1

  c.data.seq_len = 4096
  c.data.global_batch = 15360    # V3's batch after its ramp (SPEC §9), 62.9M tokens per step

  o = c.optim
  o.lr = 2.2e-4
  o.warmup_steps = 2000
  o.schedule = 'cosine'
  o.min_lr_ratio = 0.1           # 2.2e-4 -> 2.2e-5
  o.weight_decay = 0.1
  o.clip_norm = 1.0

  c.train.steps = 235_000        # ~14.8T tokens at 15360 x 4096
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.checkpoint.every = 1000
  return c
