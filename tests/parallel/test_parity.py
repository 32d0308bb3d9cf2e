"""Every rules preset on the fake 8-device CPU mesh gives the single-device loss and gradients of
the tiny config (n_layers=2, T=32, batch 8: tests/helpers.py small_tiny).

Reference: the same Trainer on one device (no mesh axes > 1, so no collectives and, for the MoE,
the local dropless path). Both trainers initialise from the same seed; the sharded init gives
the same values (threefry is partitionable). Gradients come from jax.value_and_grad of
Trainer._loss, i.e. everything the train step differentiates.
"""
import jax
import numpy as np
import pytest

from helpers import small_tiny
from v4jax.trainer import Trainer

# fp32 end to end; only reduction order and partitioning differ: losses 1e-5 relative, plus
# 1e-8 absolute for the indexer KL, which is ~1e-6 at init (a difference of nearly equal
# terms); gradient elements 1e-4 relative plus 1e-5 of the leaf's largest magnitude, with a
# 1e-9 floor: leaves that barely touch the loss at init (the MTP head's mHC coefficients,
# |g| < 1e-8) carry only fp32 rounding noise of the O(5) loss (measured: up to 4e-11 apart).
LOSS_RTOL, LOSS_ATOL, GRAD_RTOL, GRAD_ATOL_FRAC, GRAD_ATOL_MIN = 1e-5, 1e-8, 1e-4, 1e-5, 1e-9

CASES = {
    'fsdp': dict(data=2, fsdp=4, expert=1, tensor=1),
    'fsdp_ep': dict(data=1, fsdp=4, expert=2, tensor=1),         # dropless exchange buffers
    # under block remat recomputing model.remat_recompute's unit-batch dots, heads and FFN
    # columns split over `tensor`
    'fsdp_tp': dict(data=1, fsdp=4, expert=1, tensor=2),
    'fsdp_ep_capacity': dict(data=1, fsdp=2, expert=4, tensor=1),  # fixed-capacity exchange
}


def _loss_and_grads(tr, batch):
  f = jax.jit(jax.value_and_grad(tr._loss, has_aux=True))
  (_, metrics), grads = f(tr.state['params'], tr.state['rest'], tr.to_global(batch), 0.3)
  return jax.device_get((metrics, grads))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  tr = Trainer(small_tiny(**{'checkpoint.enabled': False}), str(tmp_path_factory.mktemp('one')),
               devices=jax.devices()[:1])
  batch = next(tr.train_iter)
  return batch, _loss_and_grads(tr, batch)


@pytest.mark.parametrize('case', sorted(CASES))
def test_preset_matches_single_device(reference, tmp_path, case):
  batch, (m1, g1) = reference
  over = {'checkpoint.enabled': False, 'mesh.rules': case.replace('_capacity', '')}
  over.update({f'mesh.{k}': v for k, v in CASES[case].items()})
  if case == 'fsdp_ep_capacity':
    over.update({'moe.ep_exchange': 'padded', 'moe.ep_capacity_factor': 2.0})
  if case == 'fsdp_tp':
    over.update({'model.remat': 'block',
                 'model.remat_recompute': ('mla_up', 'indexer_q', 'ffn_in')})
  tr = Trainer(small_tiny(**over), str(tmp_path))
  assert dict(tr.mesh.shape) == CASES[case]
  m8, g8 = _loss_and_grads(tr, batch)
  assert float(m8['dropped']) == 0.0
  for k in ('loss', 'mtp_loss', 'bal_loss', 'indexer_loss'):
    np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=LOSS_RTOL, atol=LOSS_ATOL,
                               err_msg=k)
  np.testing.assert_array_equal(np.asarray(m8['expert_counts']), np.asarray(m1['expert_counts']))
  flat1 = jax.tree_util.tree_flatten_with_path(g1)[0]
  flat8 = jax.tree.leaves(g8)
  assert len(flat1) == len(flat8)
  for (path, a), b in zip(flat1, flat8):
    a = np.asarray(a)
    np.testing.assert_allclose(np.asarray(b), a, rtol=GRAD_RTOL,
                               atol=max(GRAD_ATOL_FRAC * np.abs(a).max(), GRAD_ATOL_MIN),
                               err_msg=jax.tree_util.keystr(path))
