"""Ablation 'full': configs/tiny.py as is (MLA + MoE + DSA sparse top-16 + mHC n=4 + Engram at
layer 1 + MTP depth 1) with the training schedule all five ablations share. docs/ablations.md
has the command that runs them (tools/ablate.py) and the results."""
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
  c = _load('../tiny.py')
  # Shared schedule: T = 128, batch 16 (2048 tokens/step); train loss logged every 5 steps, eval
  # every 25 steps on 4 validation batches (8192 tokens).
  c.data.update(seq_len=128, global_batch=16)
  c.train.update(steps=200, log_every=5, eval_every=25, eval_steps=4)
  c.checkpoint.update(every=1000, max_to_keep=1)   # the final checkpoint only (skip / resume)
  c.log.update(tensorboard=False)
  return c
