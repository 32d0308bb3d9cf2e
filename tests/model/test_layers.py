"""layers.linear_f32 / dot_f32: fp32 products of bf16 activations with fp32 weights (the router
logits, the mHC coefficients) against a float64 NumPy oracle.

The split-bf16 mode must match the fp32 result to fp32 accumulation error (1e-5 of the largest
magnitude); rounding the weight to bf16 instead would miss by ~1e-3.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.model.layers import f32_mode, linear_f32


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_linear_f32_values_and_gradients(dtype):
  rng = np.random.default_rng(21)
  M, K, N = 96, 80, 24
  x = jnp.asarray(rng.normal(size=(M, K)), dtype)
  w = jnp.asarray(rng.normal(0, 0.1, (K, N)), jnp.float32)
  g = rng.normal(size=(M, N))
  mode = f32_mode(dtype)
  assert mode == ('split' if dtype == jnp.bfloat16 else 'highest')
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)

  y = linear_f32(x, w, mode)
  assert y.dtype == jnp.float32
  want = x64 @ w64
  tol = 1e-5 * np.abs(want).max()
  np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=tol)
  if dtype == jnp.bfloat16:      # the split matters at this tolerance
    rough = x64 @ np.asarray(w.astype(jnp.bfloat16), np.float64)
    assert np.abs(rough - want).max() > 10 * tol

  dx, dw = jax.grad(lambda x, w: jnp.sum(jnp.asarray(g, jnp.float32) * linear_f32(x, w, mode)),
                    argnums=(0, 1))(x, w)
  assert dx.dtype == dtype and dw.dtype == jnp.float32
  want_dw, want_dx = x64.T @ g, g @ w64.T
  np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, atol=1e-5 * np.abs(want_dw).max())
  # dx is stored in x's dtype: bf16 rounds to 2^-9 relative
  rtol = 4e-3 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, atol=rtol * np.abs(want_dx).max())


def test_split_survives_xla_dropping_convert_pairs():
  """The split's parts come from reduce_precision, which XLA keeps, not from f32 -> bf16 -> f32
  round trips, which XLA:GPU's excess-precision pass removes (on the H200 that left hi = b and
  mid = lo = 0: dw off by ~1e-3 relative). Checked in the lowered program for CUDA (two
  reduce_precision ops, no bf16 -> f32 convert), and the parts sum to b exactly in bf16."""
  from jax import export
  from v4jax.model.layers import _split3
  b = jnp.asarray(np.random.default_rng(3).normal(0, 0.1, (64, 24)), jnp.float32)
  text = export.export(jax.jit(_split3), platforms=['cuda'])(b).mlir_module()
  assert text.count('stablehlo.reduce_precision') == 2
  assert 'tensor<64x24xbf16>) -> tensor<64x24xf32>' not in text
  parts = np.asarray(_split3(b), np.float64).reshape(64, 3, 24)
  np.testing.assert_array_equal(parts.sum(axis=1), np.asarray(b, np.float64))
