"""Ablation 'baseline': MLA + DeepSeekMoE at tiny dims; no DSA, no mHC (one plain residual
stream), no Engram. MTP depth 1 stays on in all five ablations so that only the named component
differs between a run and this one."""
import importlib.util
import os


def _load(path: str):
  """get_config() of another config file, by path (config files are not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
  spec = importlib.util.spec_from_file_location('_ablation_' + os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def get_config():
  c = _load('full.py')
  c.dsa.update(enabled=False, stage='dense')
  c.mhc.streams = 1
  c.engram.enabled = False
  return c
