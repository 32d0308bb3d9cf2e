"""Ablation 'mhc': baseline + manifold-constrained hyper-connections with n = 4 streams and 20
Sinkhorn iterations (HyperHead stream reduction, zero bias init)."""
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
  c.mhc.update(streams=4, sinkhorn_iters=20)
  return c
