"""V4-ext at V3.2 scale (SPEC §12): the V3.2-scale preset plus mHC with 4 streams and Engram at
layers 1 and 30 (N=3, K_e=8, d_mem=2048, R=7,239,680; 29.7B host params).

It cannot start from a V3.2 checkpoint (the mHC and Engram weights are new), so it trains from
scratch and YaRN is off until a context-extension stage (SPEC §1).
"""
from v4jax.config import load_config_file


def get_config():
  c = load_config_file('v3_2_671b.py', __file__)
  c.rope.yarn_mode = 'off'

  c.mhc.streams = 4
  c.mhc.sinkhorn_iters = 20

  g = c.engram
  g.enabled = True
  g.layer_ids = (1, 30)
  g.max_ngram = 3
  g.heads_per_ngram = 8
  g.d_mem = 2048                 # d_h = 2048 / (2 * 8) = 128
  g.base_rows = 7_239_680        # [Engram] 40B
  g.table_memory = 'host'
  return c
