"""grouped_matmul seam: the reference against a numpy per-group loop; impl dispatch errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.kernels.grouped_matmul import grouped_matmul

TOL = dict(rtol=1e-5, atol=1e-5)   # fp32, K=16


def _oracle(x, w, sizes):
  y = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for g, n in enumerate(sizes):
    y[start:start + n] = x[start:start + n].astype(np.float64) @ w[g]
    start += n
  return y                         # rows past sum(sizes) stay zero


@pytest.mark.parametrize('impl', ['auto', 'ragged_dot', 'reference'])
def test_reference_matches_loop_values_and_grads(impl):
  rs = np.random.RandomState(0)
  sizes = np.array([3, 0, 5, 2], np.int32)          # an empty group; 10 of 12 rows used
  x = rs.randn(12, 16).astype(np.float32)
  w = rs.randn(4, 16, 8).astype(np.float32)
  y = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), impl=impl)
  assert y.dtype == jnp.float32 and y.shape == (12, 8)
  np.testing.assert_allclose(np.asarray(y), _oracle(x, w, sizes), **TOL)
  r = rs.randn(12, 8).astype(np.float32)
  gx, gw = jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, jnp.asarray(sizes), impl=impl) * r),
                    argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
  seg = np.repeat(np.arange(4), sizes)
  gx_or = np.zeros_like(x)
  gx_or[:10] = np.einsum('mn,mkn->mk', r[:10], w[seg])
  gw_or = np.zeros_like(w)
  np.add.at(gw_or, seg, np.einsum('mk,mn->mkn', x[:10], r[:10]))
  np.testing.assert_allclose(np.asarray(gx), gx_or, **TOL)
  np.testing.assert_allclose(np.asarray(gw), gw_or, **TOL)


def test_bf16_inputs_accumulate_to_fp32():
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.randn(6, 32), jnp.bfloat16)
  w = jnp.asarray(rs.randn(2, 32, 4), jnp.bfloat16)
  y = grouped_matmul(x, w, jnp.asarray([4, 2], jnp.int32), impl='ragged_dot')
  assert y.dtype == jnp.float32
  want = _oracle(np.asarray(x, np.float32), np.asarray(w, np.float32), [4, 2])
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)


def test_bad_impls():
  x, w, s = jnp.ones((4, 8)), jnp.ones((2, 8, 3)), jnp.asarray([2, 2], jnp.int32)
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match='needs a Hopper GPU'):
      grouped_matmul(x, w, s, impl='mgpu')
  with pytest.raises(ValueError, match='grouped_matmul'):
    grouped_matmul(x, w, s, impl='cutlass')
  with pytest.raises(ValueError, match='w_GKN'):
    grouped_matmul(x, jnp.ones((2, 7, 3)), s)
  with pytest.raises(ValueError, match='group_sizes_G'):
    grouped_matmul(x, w, jnp.asarray([4], jnp.int32))
