"""layers.linear_f32 / dot_f32: fp32 products of bf16 activations with fp32 weights (the router
logits, the mHC coefficients) against a float64 NumPy oracle; layers.matmul under
kept_matmuls_behind_barrier (model.remat_dot_barrier) against the same oracle.

The split-bf16 mode must match the fp32 result to fp32 accumulation error (1e-5 of the largest
magnitude); rounding the weight to bf16 instead would miss by ~1e-3.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.model.layers import (KEPT_MATMUL, f32_mode, kept_matmuls_behind_barrier, linear_f32,
                                 matmul)


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


def test_matmul_behind_barrier_values_gradients_and_saved_names(capsys):
  """Under kept_matmuls_behind_barrier, in a remat'd two-matmul chain with block remat's policy
  (dots without batch dimensions, or the name KEPT_MATMUL): values and gradients equal the
  float64 oracle (fp32: 1e-5 of the largest), the products are kept by their name, the gradient
  holds no dot beyond the 2 forward and 4 backward ones (nothing recomputed), and the backward
  no barrier. Outside the context the same chain keeps the dots themselves."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(4, 6, 16)), jnp.float32)
  w1 = jnp.asarray(rng.normal(0, 0.3, (16, 24)), jnp.float32)
  w2 = jnp.asarray(rng.normal(0, 0.3, (24, 8)), jnp.float32)
  cp = jax.checkpoint_policies
  policy = cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                      cp.save_only_these_names(KEPT_MATMUL))

  def chain(x, w1, w2):
    h = jnp.tanh(matmul('btd,df->btf', x, w1, jnp.float32))
    return jnp.sum(matmul('btf,fe->bte', h, w2, jnp.float32) ** 2)

  def barred(*a):
    with kept_matmuls_behind_barrier():
      return chain(*a)

  x64, w164, w264 = (np.asarray(a, np.float64) for a in (x, w1, w2))
  h64 = np.tanh(x64 @ w164)
  y64 = h64 @ w264
  dy = 2 * y64
  dh = dy @ w264.T * (1 - h64 ** 2)
  want_g = [dh @ w164.T, np.einsum('btd,btf->df', x64, dh), np.einsum('btf,bte->fe', h64, dy)]
  for fn, barrier in ((barred, True), (chain, False)):
    f = jax.checkpoint(fn, policy=policy)
    val, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w1, w2)
    np.testing.assert_allclose(float(val), (y64 ** 2).sum(), rtol=1e-5)
    for g, w in zip(grads, want_g):
      np.testing.assert_allclose(np.asarray(g, np.float64), w, atol=1e-5 * np.abs(w).max())
    jax.ad_checkpoint.print_saved_residuals(f, x, w1, w2)
    saved = capsys.readouterr().out
    assert (f"named '{KEPT_MATMUL}'" in saved) == barrier, saved
    assert ('output of dot_general' in saved) != barrier, saved
    jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(x, w1, w2))
    assert jaxpr.count('dot_general[') == 2 + 4, jaxpr     # forward 2; dw2, dh, dw1, dx
    # the backward alone: no barrier (lax.optimization_barrier's own JVP would put one on each
    # cotangent there)
    backward = str(jax.make_jaxpr(jax.vjp(f, x, w1, w2)[1])(jnp.float32(1.0)))
    assert 'optimization_barrier' not in backward, backward
