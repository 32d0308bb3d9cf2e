"""Ablation 'mhc': baseline + manifold-constrained hyper-connections with n = 4 streams and 20
Sinkhorn iterations (HyperHead stream reduction, zero bias init)."""
from v4jax.config import load_config_file


def get_config():
  c = load_config_file('baseline.py', __file__)
  c.mhc.update(streams=4, sinkhorn_iters=20)
  return c
