"""compat.set_scan_outputs: 'empty' makes lax.scan's stacked outputs uninitialised buffers on GPU
(an `AllocateBuffer` custom call instead of a broadcast of zeros, checked in the CUDA lowering on
this CPU host) and changes no value or gradient (checked on CPU, where lax.empty is zeros, and by
construction: the loop writes every slice before anything reads it)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from v4jax import compat


def _layers(w_LDD, x_BD):
  """A scanned stack of tanh layers: stacked outputs in the forward (the per-layer activations)
  and, under grad, in the backward (the stacked weight gradients)."""
  def body(x, w):
    y = jnp.tanh(x @ w)
    return y, y
  x, ys = jax.lax.scan(body, x_BD, w_LDD)
  return jnp.sum(x ** 2) + jnp.sum(ys[1:] * 0.5)


def _cuda_text(fn, *args):
  return export.export(jax.jit(fn), platforms=['cuda'])(*args).mlir_module()


@pytest.fixture
def empty_mode():
  compat.set_scan_outputs('empty')
  yield
  compat.set_scan_outputs('zeros')


def test_empty_outputs_lower_to_allocate_buffer(empty_mode):
  args = (jax.ShapeDtypeStruct((6, 32, 32), jnp.float32), jax.ShapeDtypeStruct((4, 32), jnp.float32))
  grad = jax.grad(_layers)
  with_empty = _cuda_text(grad, *args)
  compat.set_scan_outputs('zeros')
  with_zeros = _cuda_text(grad, *args)
  assert with_empty.count('AllocateBuffer') >= 2        # forward ys and the backward's dw stack
  assert 'AllocateBuffer' not in with_zeros


def test_values_and_gradients_unchanged(empty_mode):
  rs = np.random.RandomState(0)
  w = jnp.asarray(rs.randn(5, 16, 16) * 0.3, jnp.float32)
  x = jnp.asarray(rs.randn(3, 16), jnp.float32)
  got = jax.jit(jax.value_and_grad(_layers, argnums=(0, 1)))(w, x)
  compat.set_scan_outputs('zeros')
  want = jax.jit(jax.value_and_grad(lambda w, x: _layers(w, x) + 0.0, argnums=(0, 1)))(w, x)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


def test_bad_mode_names_the_field():
  with pytest.raises(ValueError, match='train.scan_outputs'):
    compat.set_scan_outputs('uninit')
