"""Trainer: sharded == single-device loss, exact resume (SIGTERM and kill -9), NaN skip."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from helpers import ROOT, small_tiny
from v4jax.trainer import Trainer


def _first_batch(tr):
  return next(tr.train_iter)


def test_sharded_loss_matches_single_device(tmp_path):
  cfg1 = small_tiny(**{'checkpoint.enabled': False})
  single = Trainer(cfg1, str(tmp_path / 'a'), devices=jax.devices()[:1])
  cfg8 = small_tiny(**{'checkpoint.enabled': False, 'mesh.data': 2, 'mesh.fsdp': 2,
                       'mesh.expert': 2, 'mesh.rules': 'fsdp_ep'})
  multi = Trainer(cfg8, str(tmp_path / 'b'))
  assert dict(multi.mesh.shape) == {'data': 2, 'fsdp': 2, 'expert': 2, 'tensor': 1}
  batch = _first_batch(single)
  s1 = single.step(batch)
  s8 = multi.step(batch)
  # fp32 throughout; different reduction orders across 8 shards: 1e-5 relative.
  np.testing.assert_allclose(float(s8['loss']), float(s1['loss']), rtol=1e-5)
  np.testing.assert_allclose(float(s8['grad_norm']), float(s1['grad_norm']), rtol=1e-4)
  p1 = jax.tree.leaves(single.state['params'])
  p8 = jax.tree.leaves(multi.state['params'])
  for a, b in zip(p1, p8):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6)


def test_nan_batch_is_skipped(tmp_path):
  tr = Trainer(small_tiny(**{'checkpoint.enabled': False}), str(tmp_path))
  before = jax.tree.map(np.asarray, tr.state['params'])
  bias_before = jax.tree.map(np.asarray, tr.state['rest'])
  batch = _first_batch(tr)
  batch = dict(batch, loss_mask=batch['loss_mask'].copy())
  batch['loss_mask'][0, 3] = np.nan
  s = tr.step(batch)
  assert not bool(s['finite']) and int(s['skipped']) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(tr.state['params'])):
    np.testing.assert_array_equal(a, np.asarray(b))
  for a, b in zip(jax.tree.leaves(bias_before), jax.tree.leaves(tr.state['rest'])):
    np.testing.assert_array_equal(a, np.asarray(b))
  s = tr.step(_first_batch(tr))
  assert bool(s['finite']) and int(s['skipped']) == 1


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


def test_grad_accum_matches_one_batch(tmp_path):
  """train.grad_accum=2 (two micro-batches of 4 sequences; gradients and metrics summed in fp32
  and divided by 2, expert counts summed) against one batch of 8, on the fp32 tiny model with
  every component: the loss and gradient norm of two steps (the second after one update), the
  expert load and the router biases it moves. Every token counts in these batches (loss_mask all ones), so the
  micro-batches' mean losses average to the batch's mean: equal up to fp32 summation order
  (rtol 1e-5; the second step 1e-4, after Adam's first update, which divides by |g|)."""
  make = lambda a: Trainer(small_tiny(**{'checkpoint.enabled': False, 'train.grad_accum': a}),
                           str(tmp_path / f'accum{a}'), devices=jax.devices()[:1])
  one, two = make(1), make(2)
  batches = [next(one.train_iter) for _ in range(2)]
  assert all(float(np.min(b['loss_mask'])) == 1.0 for b in batches)
  for i, b in enumerate(batches):
    s1, s2 = one.step(b), two.step(b)
    tol = 1e-5 if i == 0 else 1e-4
    for k in ('loss', 'grad_norm'):
      np.testing.assert_allclose(float(s2[k]), float(s1[k]), rtol=tol, err_msg=f'step {i} {k}')
    assert float(s2['expert_load_max_over_mean']) == float(s1['expert_load_max_over_mean'])
  for a, b in zip(jax.tree.leaves(two.state['rest']), jax.tree.leaves(one.state['rest'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # router biases: counts summed
