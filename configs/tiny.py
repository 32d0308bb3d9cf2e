"""tiny: every V4 component on, CPU-sized (SPEC §12 tiny column; T=128 so the byte-level model
learns visibly within the default 300 steps on 2 cores)."""
from v4jax.config import default_config


def get_config():
  c = default_config()
  c.model.update(vocab_size=258, d_model=64, n_layers=4, n_dense_layers=1, d_ff=128, n_heads=4,
                 q_lora_rank=32, kv_lora_rank=32, qk_nope_dim=16, qk_rope_dim=8, v_head_dim=16,
                 dtype='float32', remat='none')
  c.moe.update(num_experts=8, num_shared=1, top_k=2, d_expert=32, n_groups=4, topk_groups=2)
  c.dsa.update(enabled=True, stage='sparse', n_heads=2, head_dim=16, topk=16)
  c.mhc.update(streams=4, sinkhorn_iters=20)
  c.engram.update(enabled=True, layer_ids=(1,), max_ngram=3, heads_per_ngram=2, d_mem=32,
                  base_rows=101, table_memory='device')
  c.mtp.depth = 1
  c.data.update(seq_len=128, global_batch=16)
  c.optim.update(lr=3e-3, warmup_steps=20)
  c.train.update(steps=300, log_every=10, eval_every=100, eval_steps=4)
  c.checkpoint.update(every=100, max_to_keep=3)
  return c
