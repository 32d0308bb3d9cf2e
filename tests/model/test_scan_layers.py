"""model.scan_layers: a scanned model computes exactly what the unrolled one does.

Oracle: the unrolled Transformer (scan_layers=False), whose per-layer blocks are independently
tested. Its per-layer variables are stacked into the scanned model (built from a different
seed, so nothing is equal by accident), then loss, every metric (per-layer aux: balance loss,
indexer KL, expert counts in forward order, mHC diagnostics, drops) and every gradient are
compared at fp32 rtol 1e-5 (same ops, only scan-vs-unrolled fusion differs). Config: small_tiny
at 5 layers with 2 dense layers and Engram at layer 3, so the runs are a dense stack [0-1], MoE
block 2 alone and an MoE stack [3-4] whose first layer takes the Engram injection, plus the MTP
block; DSA in its warmup and sparse
stages, mHC with 4 streams. The Trainer step with scanned layers: tests/test_trainer_scan.py.
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import small_tiny
from v4jax.config import ConfigError, validate
from v4jax.data.engram_hash import hash_rows, make_hash_spec
from v4jax.model.layers import batched_draws
from v4jax.model.transformer import Transformer, layer_groups
from v4jax.optim import decay_mask
from v4jax.trainer import engram_setup

B, T = 2, 32


def _cfg(scan, **over):
  return small_tiny(**{'model.n_layers': 5, 'model.n_dense_layers': 2, 'engram.layer_ids': (3,),
                       'model.scan_layers': scan, **over})


def _model(cfg, seed):
  cfg = validate(cfg)
  _, rows = engram_setup(cfg, None)
  return Transformer(cfg, rngs=nnx.Rngs(params=seed), engram_rows_per_layer=rows)


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, 256, (B, T + 1), dtype=np.int32)
  batch = {'tokens': toks[:, :T], 'targets': toks[:, 1:],
           'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
           'segment_ids': np.ones((B, T), np.int32), 'loss_mask': np.ones((B, T), np.float32)}
  for lid, r in hash_rows(make_hash_spec(cfg), batch['tokens']).items():
    batch[f'engram_rows_{lid}'] = r
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _flat(tree):
  return {'/'.join(map(str, p)): v for p, v in nnx.to_flat_state(tree)}


def _unstacked(flat):
  """{path: array} with every 'blocks/a-b/rest' [L,...] split into 'blocks/i/rest' (numpy)."""
  out = {}
  for path, v in flat.items():
    v = np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
    m = re.match(r'blocks/(\d+)-(\d+)/(.+)$', path)
    if not m:
      out[path] = v
      continue
    a, b = int(m.group(1)), int(m.group(2))
    assert v.shape[0] == b - a + 1, (path, v.shape)
    out.update({f'blocks/{i}/{m.group(3)}': v[i - a] for i in range(a, b + 1)})
  return out


def _load_unrolled(src, dst):
  """dst (scanned) := src (unrolled): stacks the per-layer variables of each run."""
  s = _unstacked(_flat(nnx.state(src)))
  d = _flat(nnx.state(dst))
  assert set(_unstacked(d)) == set(s)
  for path, var in d.items():
    m = re.match(r'blocks/(\d+)-(\d+)/(.+)$', path)
    layers = range(int(m.group(1)), int(m.group(2)) + 1) if m else ()
    new = np.stack([s[f'blocks/{i}/{m.group(3)}'] for i in layers]) if m else s[path]
    assert new.shape == var.get_value().shape, path
    var.set_value(jnp.asarray(new))


def _loss_and_grads(model, batch):
  gdef, params, rest = nnx.split(model, nnx.Param, ...)
  f = lambda p: nnx.merge(gdef, p, rest)(batch, 0.3)
  (_, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return metrics, _unstacked(_flat(grads))


def test_layer_groups_and_config():
  assert layer_groups(_cfg(False)) == [(i, i + 1) for i in range(5)]
  # An Engram layer starts a run (its injection precedes its block) but never ends one early.
  assert layer_groups(_cfg(True)) == [(0, 2), (2, 3), (3, 5)]
  assert layer_groups(_cfg(True, **{'engram.layer_ids': (2,)})) == [(0, 2), (2, 5)]
  assert layer_groups(_cfg(True, **{'engram.layer_ids': (1, 3)})) == [(0, 1), (1, 2), (2, 3),
                                                                       (3, 5)]
  assert layer_groups(_cfg(True, **{'engram.enabled': False})) == [(0, 2), (2, 5)]
  assert layer_groups(_cfg(True, **{'moe.enabled': False})) == [(0, 3), (3, 5)]
  assert layer_groups(_cfg(True, **{'moe.enabled': False, 'engram.enabled': False})) == [(0, 5)]
  d = _cfg(False).to_dict()
  d['model']['scan_layers'] = 1      # e.g. from a JSON config; ConfigDict's own type check is off
  with pytest.raises(ConfigError, match='model.scan_layers'):
    validate(ml_collections.ConfigDict(d))


def test_batched_draws_equal_one_by_one_init():
  """layers.batched_draws (the Trainer's jitted init) on the scanned model against the unrolled
  model drawn one parameter at a time: the same keys and parameters; the stacks hold the drawn
  values (a stack of the zero placeholders would fail), and the draws happen in fewer normal
  calls. Tolerance: the vmapped normal may round its inverse-erf transform differently, ~1 ulp
  (rtol 1e-5, atol 1e-8 against std 0.02)."""
  cfg = _cfg(True)
  want = _unstacked(_flat(nnx.state(_model(_cfg(False), 3))))

  def batched():
    with batched_draws():
      return nnx.state(_model(cfg, 3))
  got = _unstacked(_flat(jax.jit(batched)()))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-8, err_msg=k)
  assert np.abs(got['blocks/4/attn/wq_a']).max() > 0
  n_normal = lambda f: jax.jit(f).lower().as_text().count('call @_normal')
  assert n_normal(batched) < n_normal(lambda: nnx.state(_model(cfg, 3)))   # draws grouped


def test_stacked_init_layout_and_decay_mask():
  """Each layer of a stack has its own init (the same draws as the unrolled model: equal at
  one seed), params carry the 'layers' axis, and weight decay skips stacked 1-D weights."""
  scan, unrolled = _model(_cfg(True), 0), _model(_cfg(False), 0)
  s, u = _unstacked(_flat(nnx.state(scan))), _unstacked(_flat(nnx.state(unrolled)))
  assert set(s) == set(u)
  for k in s:
    np.testing.assert_array_equal(s[k], u[k], err_msg=k)
  assert not np.array_equal(s['blocks/3/attn/wq_a'], s['blocks/4/attn/wq_a'])
  wq = scan.blocks['3-4'].attn.wq_a
  assert wq.shape[0] == 2 and wq.get_metadata()['logical_axes'][0] == 'layers'
  params = nnx.state(scan, nnx.Param)
  mask_s = _flat(decay_mask(params))
  mask_u = _flat(decay_mask(nnx.state(unrolled, nnx.Param)))
  for path, m in mask_s.items():
    per_layer = re.sub(r'blocks/(\d+)-\d+/', r'blocks/\1/', path)
    assert m == mask_u[per_layer], path


@pytest.mark.parametrize('stage,remat,mtp', [('warmup', 'none', 0), ('sparse', 'block', 1)])
def test_scanned_loss_metrics_grads_equal_unrolled(stage, remat, mtp):
  over = {'dsa.stage': stage, 'model.remat': remat, 'mtp.depth': mtp}
  unrolled, scan = _model(_cfg(False, **over), 0), _model(_cfg(True, **over), 1)
  _load_unrolled(unrolled, scan)
  batch = _batch(_cfg(False))
  mu, gu = _loss_and_grads(unrolled, batch)
  ms, gs = _loss_and_grads(scan, batch)
  assert set(mu) == set(ms)
  assert mu['expert_counts'].shape == (3 + mtp, 8)     # MoE layers 2, 3, 4 (and the MTP block)
  for k in mu:   # fp32; scan vs unrolled differ only in fusion: rtol 1e-5
    np.testing.assert_allclose(np.asarray(ms[k]), np.asarray(mu[k]), rtol=1e-5, atol=1e-7,
                               err_msg=k)
  assert set(gu) == set(gs)
  # Whole gradient: relative error 1e-5. Per tensor: relative error 1e-3 plus 1e-7 of the whole
  # gradient's norm. fp32 rounding differs between two compiles, and a few gradients amplify it:
  # two unrolled compiles (remat none vs full) already differ by up to 4e-5 (Engram gate through
  # the signed sqrt, indexer KL) and by O(1) on rounding-only gradients (MTP HyperHead scale,
  # ~3e-11); a wrong layer or slice would differ by O(1) on a real gradient.
  flat_u = np.concatenate([g.ravel() for g in gu.values()])
  flat_s = np.concatenate([gs[k].ravel() for k in gu])
  total = np.linalg.norm(flat_u)
  assert np.linalg.norm(flat_s - flat_u) <= 1e-5 * total
  for k in gu:
    err = np.linalg.norm(gs[k] - gu[k])
    assert err <= 1e-3 * np.linalg.norm(gu[k]) + 1e-7 * total, (k, err, np.linalg.norm(gu[k]))
  nonzero = [k for k in gu if np.any(gu[k] != 0)]
  assert any('blocks/4/' in k for k in nonzero) and any('blocks/0/' in k for k in nonzero)

