"""compat.set_scan_outputs: 'empty' makes lax.scan's stacked outputs uninitialised buffers on GPU
(an `AllocateBuffer` custom call instead of a broadcast of zeros, checked in the CUDA lowering on
this CPU host) and changes no value or gradient (checked on CPU, where lax.empty is zeros, and by
construction: the loop writes every slice before anything reads it)."""
import contextlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import export

from v4jax import compat
from v4jax.parallel import mesh, rules


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


def _constrained_layers(w_LDD, x_BD):
  """_layers with its activations under the model's sharding constraints: the scanned values
  then carry the mesh in their types (as every activation of the model does under a preset)."""
  def body(x, w):
    y = rules.constrain(jnp.tanh(x @ w), ('batch', 'act_embed'))
    return y, y
  x, ys = jax.lax.scan(body, rules.constrain(x_BD, ('batch', 'act_embed')), w_LDD)
  return jnp.sum(x ** 2) + jnp.sum(ys[1:] * 0.5)


def _check_empty_against_zeros(f, w, x, context=contextlib.nullcontext):
  """f's CUDA lowering holds uninitialised stacked outputs with 'empty' and none with 'zeros',
  and its values under both modes are exactly equal (each run inside `context()`)."""
  got = {}
  for mode in ('empty', 'zeros'):
    compat.set_scan_outputs(mode)
    with context():
      assert (_cuda_text(f, w, x).count('AllocateBuffer') >= 2) == (mode == 'empty'), mode
      got[mode] = jax.jit(f)(w, x)
  for g, r in zip(jax.tree.leaves(got['empty']), jax.tree.leaves(got['zeros'])):
    np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize('n_dev', [1, 8])
def test_empty_outputs_under_a_sharding_preset(empty_mode, n_dev):
  """Under rules.activate (the Trainer's step) the stacked outputs are still uninitialised
  buffers, though the constrained activations' types carry the mesh (a mesh-less check once
  sent them all to the zero fill), and values and gradients equal the zero-fill lowering's
  (fp32, exact: same ops, the fill is overwritten before any read)."""
  cfg = ml_collections.ConfigDict({a: -1 if a == 'fsdp' else 1 for a in rules.MESH_AXES})
  cfg.update({f'dcn_{a}': 1 for a in rules.MESH_AXES})
  mesh_ = mesh.make_mesh(cfg, jax.devices()[:n_dev])
  rs = np.random.RandomState(n_dev)
  w = jnp.asarray(rs.randn(5, 16, 16) * 0.3, jnp.float32)
  x = jnp.asarray(rs.randn(8, 16), jnp.float32)
  _check_empty_against_zeros(jax.value_and_grad(_constrained_layers, argnums=(0, 1)), w, x,
                             lambda: rules.activate(mesh_, 'fsdp'))


@pytest.mark.skipif(jax.device_count() < 8, reason='a 4 x 2 mesh (the fake 8-device CPU mesh)')
def test_empty_outputs_with_explicit_shardings(empty_mode):
  """Explicit mesh axes (the sharding is part of every type): the stacked outputs are
  uninitialised with the batch-sharded type, and values and gradients equal the zero fill's."""
  mesh_ = jax.make_mesh((4, 2), ('x', 'y'), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  rs = np.random.RandomState(3)
  with jax.set_mesh(mesh_):
    w = jax.device_put(jnp.asarray(rs.randn(5, 16, 16) * 0.3, jnp.float32),
                       jax.NamedSharding(mesh_, jax.P()))
    x = jax.device_put(jnp.asarray(rs.randn(8, 16), jnp.float32),
                       jax.NamedSharding(mesh_, jax.P('x', None)))
    _check_empty_against_zeros(jax.value_and_grad(_layers, argnums=(0, 1)), w, x)


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
