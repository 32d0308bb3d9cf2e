"""Ablation 'dsa': baseline + DeepSeek Sparse Attention, sparse stage from step 0: lightning
indexer (2 heads of dim 16), top-16 keys per query at T = 128, indexer KL loss on."""
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
  c = _load('baseline.py')
  c.dsa.update(enabled=True, stage='sparse', n_heads=2, head_dim=16, topk=16)
  return c
