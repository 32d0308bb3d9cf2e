"""Trainer: exact resume after SIGTERM and after kill -9 (child `python -m v4jax.train` runs on one
CPU device against an uninterrupted run). Split from tests/test_trainer.py so that pytest-xdist's
per-file scheduling can run the two files on different workers."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from helpers import ROOT, small_tiny


def _cmd(workdir, steps):
  c = small_tiny()
  over = [f'--config.data.seq_len={c.data.seq_len}', f'--config.data.global_batch={c.data.global_batch}',
          f'--config.data.max_docs={c.data.max_docs}', '--config.model.n_layers=2',
          '--config.dsa.topk=8', f'--config.train.steps={steps}', '--config.train.log_every=1',
          '--config.train.eval_every=0', '--config.checkpoint.every=2',
          '--config.checkpoint.async_save=False', '--config.log.tensorboard=False']
  return [sys.executable, '-m', 'v4jax.train', '--config', os.path.join(ROOT, 'configs/tiny.py'),
          *over, '--workdir', str(workdir)]


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0'
  return env


def _run_until(workdir, steps, sig, ready):
  p = subprocess.Popen(_cmd(workdir, steps), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while not ready() and time.time() < deadline and p.poll() is None:
    time.sleep(0.05)
  p.send_signal(sig)
  _, err = p.communicate(timeout=120)
  return p.returncode, err.decode()[-2000:]


def test_resume_after_sigterm_and_kill9_is_exact(tmp_path):
  steps = 8
  ref = tmp_path / 'ref'
  subprocess.run(_cmd(ref, steps), cwd=ROOT, env=_env(), check=True, capture_output=True)
  expect = _losses(ref)
  assert sorted(expect) == list(range(1, steps + 1))

  # SIGTERM once step 3 is logged: the trainer saves and exits 0.
  a = tmp_path / 'term'
  rc, err = _run_until(a, steps, signal.SIGTERM,
                       lambda: os.path.exists(a / 'metrics.jsonl') and len(_losses(a)) >= 3)
  assert rc == 0, err
  subprocess.run(_cmd(a, steps), cwd=ROOT, env=_env(), check=True, capture_output=True)

  # kill -9 once the step-4 checkpoint is complete (Orbax renames the directory when done).
  b = tmp_path / 'kill'
  ck = b / 'checkpoints' / '4'
  rc, _ = _run_until(b, steps, signal.SIGKILL, lambda: ck.exists())
  assert rc == -signal.SIGKILL
  subprocess.run(_cmd(b, steps), cwd=ROOT, env=_env(), check=True, capture_output=True)

  for wd in (a, b):
    got = _losses(wd)   # later rows for a re-run step overwrite the killed run's rows
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
      np.testing.assert_allclose(got[s], expect[s], rtol=1e-6, err_msg=f'{wd.name} step {s}')
