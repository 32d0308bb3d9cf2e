"""Trainer: sharded == single-device loss, NaN skip, gradient accumulation. (Exact resume after
SIGTERM and kill -9: tests/test_trainer_resume.py.)"""
import types

import jax
import numpy as np
import pytest

from helpers import small_tiny
from v4jax.trainer import Trainer


def _first_batch(tr):
  return next(tr.train_iter)


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.fixture(scope='module')
def single(tmp_path_factory):
  """The single-device fp32 trainer (small_tiny, one micro-batch per step): two steps on its first
  two batches, with the metrics of each step, the parameters after the first and the router
  biases after the second. The reference of both the sharded and the gradient-accumulation test
  (the same Trainer each built before), so it is built and compiled once."""
  tr = Trainer(small_tiny(**{'checkpoint.enabled': False}), str(tmp_path_factory.mktemp('single')),
               devices=jax.devices()[:1])
  batches = [_first_batch(tr) for _ in range(2)]
  stats, params = [], []
  for b in batches:
    stats.append(jax.device_get(tr.step(b)))
    params.append(_copy(tr.state['params']))
  return types.SimpleNamespace(batches=batches, stats=stats, params=params,
                               rest=_copy(tr.state['rest']))


def test_sharded_loss_matches_single_device(single, tmp_path):
  cfg8 = small_tiny(**{'checkpoint.enabled': False, 'mesh.data': 2, 'mesh.fsdp': 2,
                       'mesh.expert': 2, 'mesh.rules': 'fsdp_ep'})
  multi = Trainer(cfg8, str(tmp_path / 'b'))
  assert dict(multi.mesh.shape) == {'data': 2, 'fsdp': 2, 'expert': 2, 'tensor': 1}
  batch = single.batches[0]
  s1 = single.stats[0]
  s8 = multi.step(batch)
  # fp32 throughout; different reduction orders across 8 shards: 1e-5 relative.
  np.testing.assert_allclose(float(s8['loss']), float(s1['loss']), rtol=1e-5)
  np.testing.assert_allclose(float(s8['grad_norm']), float(s1['grad_norm']), rtol=1e-4)
  p1 = jax.tree.leaves(single.params[0])
  p8 = jax.tree.leaves(multi.state['params'])
  assert len(p1) == len(p8)
  for a, b in zip(p1, p8):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6)


def test_nan_batch_is_skipped(tmp_path):
  """A step whose loss is not finite changes no parameter or router bias and counts as skipped.
  On one device: the `single` fixture's step, which this file has compiled already."""
  tr = Trainer(small_tiny(**{'checkpoint.enabled': False}), str(tmp_path),
               devices=jax.devices()[:1])
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


def test_grad_accum_matches_one_batch(single, tmp_path):
  """train.grad_accum=2 (two micro-batches of 4 sequences; gradients and metrics summed in fp32
  and divided by 2, expert counts summed) against one batch of 8, on the fp32 tiny model with
  every component: the loss and gradient norm of two steps (the second after one update), the
  expert load and the router biases it moves. Every token counts in these batches (loss_mask all ones), so the
  micro-batches' mean losses average to the batch's mean: equal up to fp32 summation order
  (rtol 1e-5; the second step 1e-4, after Adam's first update, which divides by |g|).
  The one-batch run is the shared `single` fixture (the same config at grad_accum=1)."""
  two = Trainer(small_tiny(**{'checkpoint.enabled': False, 'train.grad_accum': 2}),
                str(tmp_path / 'accum2'), devices=jax.devices()[:1])
  batches = single.batches
  assert all(float(np.min(b['loss_mask'])) == 1.0 for b in batches)
  for i, b in enumerate(batches):
    s1, s2 = single.stats[i], two.step(b)
    tol = 1e-5 if i == 0 else 1e-4
    for k in ('loss', 'grad_norm'):
      np.testing.assert_allclose(float(s2[k]), float(s1[k]), rtol=tol, err_msg=f'step {i} {k}')
    assert float(s2['expert_load_max_over_mean']) == float(s1['expert_load_max_over_mean'])
  for a, b in zip(jax.tree.leaves(two.state['rest']), jax.tree.leaves(single.rest)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # router biases: counts summed
