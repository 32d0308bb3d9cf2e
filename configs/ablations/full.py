"""Ablation 'full': configs/tiny.py as is (MLA + MoE + DSA sparse top-16 + mHC n=4 + Engram at
layer 1 + MTP depth 1) with the training schedule all five ablations share. docs/ablations.md
has the command that runs them (tools/ablate.py) and the results."""
from v4jax.config import load_config_file


def get_config():
  c = load_config_file('../tiny.py', __file__)
  # Shared schedule: T = 128, batch 16 (2048 tokens/step); train loss logged every 5 steps, eval
  # every 25 steps on 4 validation batches (8192 tokens).
  c.data.update(seq_len=128, global_batch=16)
  c.train.update(steps=200, log_every=5, eval_every=25, eval_steps=4)
  c.checkpoint.update(every=1000, max_to_keep=1)   # the final checkpoint only (skip / resume)
  c.log.update(tensorboard=False)
  return c
