"""train.cast_params_once (v4jax/cast_once.py): which parameters the step casts once per step,
and that doing so leaves the training step bit-identical."""
import jax
import jax.numpy as jnp
import numpy as np

from helpers import small_tiny
from v4jax.cast_once import cast_mask
from v4jax.optim import path_str
from v4jax.trainer import Trainer

BF16 = jnp.bfloat16


def test_cast_mask_finds_single_casts_only():
  """One cast (also after a reshape, inside scan / remat / jit) -> True; two uses, fp32 math, a
  cast to another dtype, a gather, or a custom_vjp function -> False."""
  @jax.custom_vjp
  def cv(w, x):
    return x @ w.astype(BF16)
  cv.defvjp(lambda w, x: (cv(w, x), (w, x)), lambda r, g: (jnp.zeros_like(r[0]), g @ r[0].T.astype(BF16)))

  def loss(p):
    x = jnp.ones((4, 8), BF16)
    h, _ = jax.lax.scan(lambda c, w: (jax.checkpoint(lambda c, w: c @ w.astype(BF16))(c, w), None),
                        x, p['scanned'])
    h = jax.jit(lambda h, w: h @ w.reshape(8, 8).astype(BF16))(h, p['reshaped'])
    h = h @ p['twice'].astype(BF16) + h @ p['twice'].astype(BF16)
    h = h.astype(jnp.float32) @ p['fp32_math']
    h = h @ p['to_f16'].astype(jnp.float16).astype(jnp.float32)
    h = h + jnp.take(p['gathered'], jnp.array([0, 1, 2, 3]), axis=0).astype(jnp.float32)
    h = cv(p['custom_vjp'], h.astype(BF16))
    return jnp.sum(h.astype(jnp.float32))

  p = {k: jnp.ones(s, jnp.float32) for k, s in (
      ('scanned', (3, 8, 8)), ('reshaped', (64,)), ('twice', (8, 8)), ('fp32_math', (8, 8)),
      ('to_f16', (8, 8)), ('gathered', (16, 8)), ('custom_vjp', (8, 8)))}
  p['already_bf16'] = jnp.ones((8,), BF16)
  got = cast_mask(lambda q: loss(q) + jnp.sum(q['already_bf16']), p, jnp.dtype(BF16))
  assert got == {'scanned': True, 'reshaped': True, 'twice': False, 'fp32_math': False,
                 'to_f16': False, 'gathered': False, 'custom_vjp': False, 'already_bf16': False}
  # the loss's output shapes from the same trace (the step sizes its accumulators by them)
  again, shape = cast_mask(lambda q: (loss(q), {'h': q['twice'][0]}), p, jnp.dtype(BF16),
                           return_shape=True)
  assert again == got
  assert shape[0].shape == () and shape[1]['h'].shape == (8,) and shape[1]['h'].dtype == jnp.float32


def _trainer(tmp_path, name, on):
  cfg = small_tiny(**{'checkpoint.enabled': False, 'train.grad_accum': 2,
                      'train.cast_params_once': on})
  cfg.model.dtype = 'bfloat16'
  cfg.model.remat = 'block'
  return Trainer(cfg, str(tmp_path / name), devices=jax.devices()[:1])


def test_cast_params_once_is_bit_identical(tmp_path):
  """Two steps of the bf16 tiny model (every component, 2 micro-batches, block remat) with and
  without the once-per-step cast: every parameter, moment and metric equal bit for bit; the
  cast set holds the projection and expert weights, not norms, router, mHC or embeddings."""
  on, off = _trainer(tmp_path, 'on', True), _trainer(tmp_path, 'off', False)
  batches = [next(off.train_iter) for _ in range(2)]
  for b in batches:
    s_on, s_off = on.step(b), off.step(b)
    assert float(s_on['loss']) == float(s_off['loss'])
    assert float(s_on['grad_norm']) == float(s_off['grad_norm'])
  for a, b in zip(jax.tree.leaves(on.state), jax.tree.leaves(off.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  params, rest = on.state['params'], on.state['rest']
  batch = on.to_global(batches[0])
  mask = cast_mask(lambda p: on._loss(p, rest, batch, 1.0)[0], params, jnp.dtype(BF16))
  cast = {path_str(k) for k, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
  assert any('experts' in k for k in cast) and any('wq_a' in k for k in cast), sorted(cast)
  for k in cast:
    assert not any(s in k for s in ('norm', 'router', 'hc_', 'embed', '/fn')), k
