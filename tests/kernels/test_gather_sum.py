"""gather_sum seam: the Triton row gather-sum (interpret mode) against a float64 NumPy oracle,
and the MoE's slot sums through it.

Oracle: out[n] = sum_j x[idx[n, j]] in float64 from the same (bf16 or fp32) values, on fresh
random rows and indices drawn with repeats (a row may be summed twice for one output row, and
by several output rows). Shapes leave a partial last row block and column blocks narrower than
the cap (D = 200: blocks of 8), or tile exactly.

Tolerances: fp32 output rtol 1e-6 + atol 1e-6 (an fp32 sum of K <= 6 terms in another order);
bf16 output within one bf16 rounding of the float64 sum (rtol 2^-8). A wrong index column or
a missed term fails them. The row masks of a partial last block only matter on a GPU (interpret
mode neither faults nor writes past an array): the compiled test there covers them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import default_config, validate, ConfigError
from v4jax.kernels import gather_sum
from v4jax.kernels.gather_sum import gpu
from v4jax.model.moe import MoE
from v4jax.parallel.expert import inverse_permutation, permuted_rows, slot_sum

# (M, D, N, K, block_n, block_d): partial row block, narrow column blocks; exact tiles; K = 1
CASES = [(50, 200, 13, 3, 4, 64), (64, 256, 32, 6, 16, 128), (40, 96, 7, 1, 4, 512)]


def _oracle(x, idx):
  return np.asarray(x, np.float64)[np.asarray(idx)].sum(axis=1)


@pytest.mark.parametrize('M,D,N,K,bn,bd', CASES)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_kernel_matches_oracle(M, D, N, K, bn, bd, dtype):
  rng = np.random.default_rng(M + N + K)
  x = jnp.asarray(rng.normal(size=(M, D)) * rng.uniform(0.5, 4, (M, 1)), dtype)
  idx = jnp.asarray(rng.integers(0, M, (N, K)), jnp.int32)
  want = _oracle(x, idx)
  blocks = gpu.Blocks(block_n=bn, block_d=bd)
  got = gpu.gather_sum(x, idx, jnp.float32, blocks, interpret=True)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  got16 = gpu.gather_sum(x, idx, jnp.bfloat16, blocks, interpret=True)
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float64), want, rtol=2 ** -8, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='compiled Triton kernels need a GPU; '
                    'CPU covers the same code in interpret mode above')
def test_compiled_kernel_on_gpu_matches_oracle():
  """Compiled at the default tiling and bench_h200's row width (D = 1536, K = 6), 1000 output
  rows (a partial last block), with the interpret-mode bounds."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(6000, 1536)), jnp.bfloat16)
  idx = jnp.asarray(rng.integers(0, 6000, (1000, 6)), jnp.int32)
  got = jax.jit(lambda x, i: gpu.gather_sum(x, i, jnp.float32))(x, idx)
  np.testing.assert_allclose(np.asarray(got), _oracle(x, idx), rtol=1e-6, atol=1e-5)


def test_seam_impls_agree_and_check_shapes():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(30, 64)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 30, (9, 4)), jnp.int32)
  ref = gather_sum.gather_sum(x, idx, jnp.float32, impl='reference')
  pal = gather_sum.gather_sum(x, idx, jnp.float32, impl='pallas', interpret=True)
  np.testing.assert_allclose(np.asarray(pal), np.asarray(ref), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ref), _oracle(x, idx), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='must be'):
    gather_sum.gather_sum(x[None], idx, jnp.float32)
  with pytest.raises(ValueError, match='kernels.gather_sum'):
    gather_sum.gather_sum(x, idx, jnp.float32, impl='triton')
  c = default_config()
  c.kernels.gather_sum = 'triton'
  with pytest.raises(ConfigError, match='kernels.gather_sum'):
    validate(c)


@pytest.mark.parametrize('k', [1, 3])
def test_slot_sum_and_permuted_rows_through_the_kernel(k):
  """The MoE's two slot sums with impl='pallas' (interpret mode) against the numpy oracle:
  slot_sum's value and its gather VJP; permuted_rows' gather-sum VJP."""
  r = np.random.default_rng(20 + k)
  N, D = 11, 48
  src = r.permutation(N * k).astype(np.int32)
  inv = np.asarray(inverse_permutation(jnp.asarray(src)))
  ys = r.normal(size=(N * k, D)).astype(np.float32)
  dy = r.normal(size=(N, D)).astype(np.float32)
  y, vjp = jax.vjp(lambda a: slot_sum(a, jnp.asarray(inv), jnp.asarray(src), k, 'pallas'),
                   jnp.asarray(ys))
  np.testing.assert_allclose(np.asarray(y), ys[inv].reshape(N, k, D).sum(1), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(dy))[0]), dy[src // k])
  x = r.normal(size=(N, D)).astype(np.float32)
  dxs = r.normal(size=(N * k, D)).astype(np.float32)
  _, vjp = jax.vjp(lambda a: permuted_rows(a, jnp.asarray(src), jnp.asarray(inv), k, 'pallas'),
                   jnp.asarray(x))
  want = np.zeros_like(x)
  np.add.at(want, src // k, dxs)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dxs))[0]), want, rtol=1e-6, atol=1e-6)


def test_moe_layer_same_through_either_impl():
  """A dropless MoE layer (no mesh: the kernel runs) gives the same output and gradients with
  kernels.gather_sum = pallas (interpret mode on CPU) as with reference; fp32 at 1e-5."""
  def run(impl):
    c = default_config()
    c.model.d_model = 32
    c.model.init_std = 0.1
    c.moe.update(num_experts=8, num_shared=1, top_k=3, d_expert=16, n_groups=1, topk_groups=1)
    c.kernels.gather_sum = impl
    m = MoE(c, rngs=nnx.Rngs(0))
    gdef, st = nnx.split(m)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 9, 32)), jnp.float32)
    r = jnp.asarray(np.random.default_rng(6).normal(size=(2, 9, 32)), jnp.float32)
    f = lambda st, x: jnp.sum(nnx.merge(gdef, st)(x)[0] * r)
    return jax.value_and_grad(f, argnums=(0, 1))(st, x)
  (v0, (g0, gx0)), (v1, (g1, gx1)) = run('reference'), run('pallas')
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx0), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
