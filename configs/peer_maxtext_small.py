"""peer_maxtext_small: MaxText's small `deepseek-custom` model in v4jax terms (issue 8 peer run).

Same dims and batch as the MaxText side-by-side on one H200 (MaxText e591f30, jax 0.11.2):
6 layers (1 dense, 5 MoE), D 1024, dense FFN 2048, 16 routed experts top-2 + 1 shared of width
512, sigmoid routing with a selection bias that is never updated, dropless; MLA with 16 heads,
q_lora 384, kv_lora 128, qk_nope 32, qk_rope 16, v_head 128; vocabulary 129,280, untied head;
8 x 2048 tokens per device (global_batch 8 = one H200; tools/bench_train.py --per_device_batch 8
scales it to the devices present); bf16 compute, fp32 master weights, AdamW. Uniform random
token ids over the whole vocabulary (data.source='synthetic'), as MaxText's synthetic data.

Mapping notes: MaxText has no expert groups here, so n_groups = topk_groups = 1 (v4jax's group
limit is off for one group); no MTP, mHC 1 (plain residual), no Engram, DSA off. YaRN factor 1
in MaxText is plain RoPE (yarn_mode off). No remat: the activations of 16K tokens fit easily
(21.5 GiB peak on the H200) and nothing is recomputed; `--config.model.remat=block` saves only
the weight matmuls (MaxText's 'minimal'), `--config.model.remat=full` is MaxText's default.
Chunked cross entropy is off: MaxText computes the full logits (8.5 GB fp32 here, which fits).

Variants (`--config configs/peer_maxtext_small.py:VARIANT`, or `get_config(VARIANT)`):
  plain  the MaxText model above (default);
  dsa    + DSA sparse stage, indexer 16 heads x 64, top-k 256; the same as the overrides
         --config.dsa.enabled=True --config.dsa.stage=sparse --config.dsa.n_heads=16
         --config.dsa.head_dim=64 --config.dsa.topk=256;
  full   dsa + mHC n=4 + Engram at layers 1 and 4 with the tables in host memory (Engram demo
         sizes: N=3, 8 heads per order, d_mem 1024 so d_h 64, base_rows 5 x 129,280, conv 4),
         layers scanned (model.scan_layers: blocks 0, 1-3, 4-5): on the H200 it compiles in
         47.4 s instead of 64.8-85.5 s unrolled, at 145.7 ms per step instead of 105.1 ms
         (docs/performance.md #15); --config.model.scan_layers=False trades back.
"""
from v4jax.config import default_config

VARIANTS = ('plain', 'dsa', 'full')


def get_config(variant: str = 'plain'):
  if variant not in VARIANTS:
    raise ValueError(f'configs/peer_maxtext_small.py: variant {variant!r} is not one of {VARIANTS}')
  c = default_config()
  c.model.update(vocab_size=129280, d_model=1024, n_layers=6, n_dense_layers=1, d_ff=2048,
                 n_heads=16, q_lora_rank=384, kv_lora_rank=128, qk_nope_dim=32, qk_rope_dim=16,
                 v_head_dim=128, dtype='bfloat16', param_dtype='float32', remat='none',
                 logits_chunk=0, attn_query_block=512)
  c.rope.yarn_mode = 'off'
  c.moe.update(enabled=True, num_experts=16, num_shared=1, top_k=2, d_expert=512, n_groups=1,
               topk_groups=1, route_scale=2.5, bias_update_rate=0.0, dispatch='dropless')
  c.dsa.update(enabled=False, stage='dense')
  c.mhc.streams = 1
  c.engram.enabled = False
  c.mtp.depth = 0
  c.data.update(source='synthetic', seq_len=2048, global_batch=8)
  c.optim.update(lr=3e-4, warmup_steps=10, schedule='constant')
  c.train.update(steps=1000, log_every=10, eval_every=0)
  c.checkpoint.enabled = False
  c.log.update(tensorboard=False, progress=False)

  if variant in ('dsa', 'full'):
    c.dsa.update(enabled=True, stage='sparse', n_heads=16, head_dim=64, topk=256)
  if variant == 'full':
    c.mhc.update(streams=4, sinkhorn_iters=20, alpha_init=0.01)
    c.engram.update(enabled=True, layer_ids=(1, 4), max_ngram=3, heads_per_ngram=8, d_mem=1024,
                    base_rows=646_400, conv_kernel=4, table_memory='host')
    c.model.scan_layers = True
  return c
