"""precision.py: the jaxpr analysis of which parameters the loss reads only as one bf16 cast, and
the gradient-accumulation step that differentiates those in bf16 (bit-identical to fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import small_tiny
from v4jax import precision
from v4jax.optim import path_str
from v4jax.trainer import Trainer

BF16 = jnp.bfloat16


def test_cast_only_mask_on_a_toy_loss():
  def loss(p, x):
    h = jnp.einsum('bd,de->be', x.astype(BF16), p['once'].astype(BF16))
    h = h + jnp.einsum('be,ef->bf', h, p['twice'].astype(BF16)) + jnp.sum(p['twice'].astype(BF16))
    h = h.astype(jnp.float32) * p['fp32']                      # read in fp32
    h = h + jnp.sum(p['to_fp16'].astype(jnp.float16)).astype(jnp.float32)

    def body(c, w):                                             # scanned input, reshaped first
      return c + jnp.sum(w.reshape(-1).astype(BF16)).astype(jnp.float32), None
    c, _ = jax.lax.scan(body, 0.0, p['stacked'])
    c2, _ = jax.lax.scan(lambda c, _: (c * p['carry_const'].astype(BF16).astype(jnp.float32).sum(),
                                       None), 1.0, None, length=2)
    g = jax.jit(lambda w: w.T.astype(BF16))(p['in_jit'])
    return jnp.sum(h) + c + c2 + jnp.sum(g.astype(jnp.float32)) + jnp.sum(p['returned'])
  rng = np.random.default_rng()
  shapes = {'once': (4, 4), 'twice': (4, 4), 'fp32': (4,), 'to_fp16': (3,), 'stacked': (3, 2, 2),
            'carry_const': (2,), 'in_jit': (4, 4), 'returned': (2,)}
  p = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  mask = precision.cast_only_mask(loss, p, jnp.ones((2, 4)), dtype=BF16)
  assert mask == {'once': True, 'twice': False, 'fp32': False, 'to_fp16': False, 'stacked': True,
                  'carry_const': True, 'in_jit': True, 'returned': False}, mask


@pytest.fixture(scope='module')
def bf16_trainer(tmp_path_factory):
  cfg = small_tiny(**{'model.dtype': 'bfloat16', 'checkpoint.enabled': False})
  return Trainer(cfg, str(tmp_path_factory.mktemp('bf16')))


def test_masked_gradients_are_bit_identical_in_bf16(bf16_trainer):
  """The tiny model in bf16 compute: differentiating the masked leaves in bf16 gives exactly the
  fp32 path's gradients (and the same loss); the big matmul weights are among them and the
  norms, router and the twice-read head are not."""
  tr = bf16_trainer
  params, rest = tr.state['params'], tr.state['rest']
  batch = tr.to_global(next(tr.train_iter))
  mask = precision.cast_only_mask(tr._loss, params, rest, batch, 0.3, None, dtype=BF16)
  names = {path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert names['head/value'] is False and names['norm/scale/value'] is False
  assert any(v for k, v in names.items() if '/experts/' in k or 'w_gate' in k), names
  assert not any(v for k, v in names.items() if 'router' in k or '_norm' in k)
  grad = jax.jit(jax.value_and_grad(lambda p: tr._loss(p, rest, batch, 0.3)[0]))
  l32, g32 = grad(params)
  l16, g16 = grad(precision.lower_params(params, mask, BF16))
  assert float(l16) == float(l32)
  n_low = 0
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(g32), jax.tree.leaves(g16)):
    assert b.dtype == (BF16 if m else jnp.float32)
    np.testing.assert_array_equal(np.asarray(b.astype(jnp.float32)), np.asarray(a))
    n_low += int(m) * a.size
  assert n_low > 0.5 * sum(x.size for x in jax.tree.leaves(params))    # most of the weights


def test_accumulated_step_matches_the_fp32_gradient_path(tmp_path, monkeypatch):
  """grad_accum=2 in bf16 compute with scanned layers: one step with the bf16 gradients equals,
  bit for bit, the step with every gradient taken in fp32 (the analysis switched off), and its
  compiled step needs less temporary memory (the scan's stacked weight gradients are bf16)."""
  cfg = small_tiny(**{'model.dtype': 'bfloat16', 'train.grad_accum': 2, 'data.global_batch': 16,
                      'model.n_layers': 4, 'model.scan_layers': True, 'engram.enabled': False,
                      'checkpoint.enabled': False})
  a = Trainer(cfg, str(tmp_path / 'a'))
  b = Trainer(cfg, str(tmp_path / 'b'))
  batch = next(a.train_iter)

  def step(tr):      # one compile: its memory analysis, then the step itself
    c = tr._train_step.lower(tr.state, tr.to_global(batch)).compile()
    state, scalars = c(tr.state, tr.to_global(batch))
    return c.memory_analysis().temp_size_in_bytes, state, scalars
  temp_a, state_a, sa = step(a)
  monkeypatch.setattr(precision, 'cast_only_mask',
                      lambda fn, params, *args, dtype: jax.tree.map(lambda _: False, params))
  temp_b, state_b, sb = step(b)
  assert float(sa['loss']) == float(sb['loss']) and float(sa['grad_norm']) == float(sb['grad_norm'])
  for x, y in zip(jax.tree.leaves(state_a['params']), jax.tree.leaves(state_b['params'])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The scanned blocks' stacked weights, FSDP-sharded over the devices: their gradients take 2
  # bytes per element less on each device's share (XLA's buffer reuse keeps some of it).
  scanned = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(a.state['params'])
                if path_str(p).startswith('blocks/1-3/') and x.ndim >= 3)
  assert temp_b - temp_a >= 0.5 * 2 * scanned / jax.device_count(), (temp_a, temp_b, scanned)
