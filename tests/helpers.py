"""Shared test fixtures: small configs built from the shipped presets."""
import json
import os
import subprocess
import sys

import numpy as np

from v4jax.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(tool: str):
  """tools/<tool>.py imported as a module (tools/ is not a package), registered in sys.modules
  as `tools.<tool>` (dataclasses look their module up there)."""
  import importlib.util
  name = f'tools.{tool}'
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'tools', f'{tool}.py'))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


def run_tool_smoke(tmp_path, tool: str, *args) -> dict:
  """Runs `tools/<tool>.py --smoke --out <tmp_path>/bench.json *args` in a child process (the
  repo on PYTHONPATH), asserts it exited 0 and returns its JSON report."""
  out = tmp_path / 'bench.json'
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', f'{tool}.py'), '--smoke',
                      '--out', str(out), *args], env=dict(os.environ, PYTHONPATH=ROOT),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.load(open(out))


def load_preset(name: str):
  return load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))


def small_tiny(**over):
  """configs/tiny.py with CI-sized data and steps; every component still on."""
  c = load_preset('tiny')
  c.model.n_layers = 2
  c.engram.layer_ids = (1,)
  c.dsa.topk = 8
  c.data.update(seq_len=32, global_batch=8, max_docs=24)
  c.train.update(steps=6, log_every=1, eval_every=0, eval_steps=1)
  c.checkpoint.update(every=2, async_save=False)
  c.log.update(tensorboard=False, progress=False)
  for k, v in over.items():
    sec, field = k.split('.')
    c[sec][field] = v
  return c


def np_sinkhorn(lam, iters: int, eps: float):
  """SPEC §5 Sinkhorn in float64 numpy (the oracle of the mHC module and the Sinkhorn kernel):
  row softmax + eps, column step, then (iters - 1) x (row step, column step)."""
  lam = np.asarray(lam, np.float64)
  e = np.exp(lam - lam.max(-1, keepdims=True))
  m = e / e.sum(-1, keepdims=True) + eps                    # softmax over k, per row j, + eps
  m = m / (m.sum(-2, keepdims=True) + eps)                  # column
  for _ in range(iters - 1):
    m = m / (m.sum(-1, keepdims=True) + eps)                # row
    m = m / (m.sum(-2, keepdims=True) + eps)                # column
  return m


def random_topk_indices(rs: np.random.RandomState, B: int, T: int, S: int, K: int) -> np.ndarray:
  """int32 [B,T,K] DSA-like key sets: distinct allowed keys per token (s <= t + S - T) in random
  order, fewer than K where few keys are allowed, and -1 holes in the middle of some rows."""
  idx = np.full((B, T, K), -1, np.int32)
  for b in range(B):
    for t in range(T):
      allowed = t + S - T + 1
      n = min(K, allowed)
      idx[b, t, :n] = rs.permutation(allowed)[:n]
      if t % 3 == 1:
        idx[b, t, rs.randint(0, K)] = -1
      idx[b, t] = rs.permutation(idx[b, t])
  return idx


def packed_words(idx: np.ndarray, S: int) -> np.ndarray:
  """numpy oracle of a packed top-k set: uint32 [B,T,ceil(S/32)], bit s % 32 of word s // 32 set
  for each selected key s of idx [B,T,K] (-1 = empty slot, repeats allowed)."""
  idx = np.asarray(idx)
  B, T, _ = idx.shape
  n = -(-S // 32) * 32
  bits = np.zeros((B, T, n + 1), bool)
  np.put_along_axis(bits, np.where(idx >= 0, idx, n), True, axis=-1)
  packed = np.packbits(bits[..., :n].reshape(B, T, n // 32, 32), axis=-1, bitorder='little')
  return packed.view('<u4')[..., 0].astype(np.uint32)
