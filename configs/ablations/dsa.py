"""Ablation 'dsa': baseline + DeepSeek Sparse Attention, sparse stage from step 0: lightning
indexer (2 heads of dim 16), top-16 keys per query at T = 128, indexer KL loss on."""
from v4jax.config import load_config_file


def get_config():
  c = load_config_file('baseline.py', __file__)
  c.dsa.update(enabled=True, stage='sparse', n_heads=2, head_dim=16, topk=16)
  return c
