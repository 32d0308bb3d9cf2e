"""Ablation 'baseline': MLA + DeepSeekMoE at tiny dims; no DSA, no mHC (one plain residual
stream), no Engram. MTP depth 1 stays on in all five ablations so that only the named component
differs between a run and this one."""
from v4jax.config import load_config_file


def get_config():
  c = load_config_file('full.py', __file__)
  c.dsa.update(enabled=False, stage='dense')
  c.mhc.streams = 1
  c.engram.enabled = False
  return c
