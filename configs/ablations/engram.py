"""Ablation 'engram': baseline + Engram at layer 1, iso-parameter with the baseline as in the
Engram paper's setup: routed experts are traded for table parameters at the same top-k, so the
activated expert compute is unchanged and the total parameter count matches.

- Experts: 8 -> 6 routed per MoE layer (4 MoE layers: 3 main + MTP), top-2 kept, groups of 2
  experts kept (n_groups 4 -> 3, top-2 groups): frees 4 x 2 x (3 x 64 x 32 + 64) = 49,664 params.
- Engram (orders 2-3, 2 hash heads each, d_mem 32, so d_h = 8): base_rows 1380 gives the primes
  1381, 1399, 1409, 1423 = 5,612 rows = 44,896 table params, plus 4,672 projection/norm/conv
  params: 49,568.
- Totals (v4jax.flops.param_counts): baseline 369,600, engram 369,504 (-96, -0.03%); active
  222,144 vs 226,336 (+4,192: the Engram projections and the 32 gathered values per token).
"""
from v4jax.config import load_config_file


def get_config():
  c = load_config_file('baseline.py', __file__)
  c.moe.update(num_experts=6, n_groups=3, topk_groups=2)
  c.engram.update(enabled=True, layer_ids=(1,), max_ngram=3, heads_per_ngram=2, d_mem=32,
                  base_rows=1380, table_memory='device')
  return c
