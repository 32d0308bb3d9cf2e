"""xent seam: the Triton cross-entropy kernel (interpret mode) against a float64 NumPy oracle.

Oracle (SPEC §9): lse = logsumexp of the logits row, the target's logit, and the gradient
weight * (softmax - onehot), in float64 from the same (bf16 or fp32) logits values, on fresh
random inputs with a spread of 3-6 (peaked rows), targets anywhere in [0, V) and a padding row
(weight 0). Shapes leave partial row blocks and a partial last column
chunk (V = 1000 in chunks of 256), or tile exactly.

Tolerances: lse and target logit rtol 1e-6 + atol 1e-5 (fp32 sums in another order); the
gradient in the logits' dtype within one rounding of it: bf16 atol 2^-8 (|d| <= 1, one ulp of
the largest entries), fp32 atol 1e-6. Dropping the online max's rescale, masking the last chunk
wrongly (interpret mode fills what lies past an array with NaN) or a target off by one column
each fail these bounds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from v4jax.kernels import xent
from v4jax.kernels.xent import gpu
from v4jax.model.loss import cross_entropy_sum
from v4jax.parallel import rules

# (B, C, V, block_m, block_v, programs): partial row block and column chunk; exact tiles; bm = 1;
# fewer programs than row blocks (each walks several, the last walk one block shorter)
CASES = [(2, 5, 1000, 4, 256, 0), (2, 4, 1024, 4, 256, 0), (3, 3, 777, 1, 128, 0),
         (2, 5, 1000, 2, 256, 2)]


def _inputs(B, C, V, dtype, seed):
  rng = np.random.default_rng(seed)
  spread = rng.uniform(3, 6, (B, C, 1))
  logits = jnp.asarray(rng.normal(size=(B, C, V)) * spread, dtype)
  tgt = rng.integers(0, V, (B, C))
  w = rng.uniform(0.1, 1.0, (B, C))
  w[0, 1] = 0.0                                    # padding: no weight
  return logits, jnp.asarray(tgt, jnp.int32), jnp.asarray(w, jnp.float32)


def oracle(logits, tgt, w):
  x = np.asarray(logits.astype(jnp.float32), np.float64)
  tgt, w = np.asarray(tgt), np.asarray(w, np.float64)
  m = x.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(x - m).sum(-1))
  onehot = np.arange(x.shape[-1]) == tgt[..., None]
  t = np.where(onehot, x, 0).sum(-1)
  return lse, t, w[..., None] * (np.exp(x - lse[..., None]) - onehot)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('B,C,V,bm,bv,programs', CASES)
def test_kernel_matches_float64_oracle(B, C, V, bm, bv, programs, dtype):
  logits, tgt, w = _inputs(B, C, V, dtype, seed=V + bm)
  lse, t, d = gpu.lse_target_grad(logits, tgt, w, gpu.Blocks(bm, bv, 4, 1, programs),
                                  interpret=True)
  want = oracle(logits, tgt, w)
  np.testing.assert_allclose(lse, want[0], rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(t, want[1], rtol=1e-6, atol=1e-5)
  assert d.dtype == dtype
  np.testing.assert_allclose(np.asarray(d, np.float64), want[2], rtol=0,
                             atol=2.0 ** -8 if dtype == jnp.bfloat16 else 1e-6)
  assert not np.any(np.asarray(d)[0, 1])           # the padding row: no gradient
  assert np.asarray(d, np.float64)[np.asarray(tgt) < V].min() < -0.05   # targets were hit


def test_seam_per_device_on_mesh_and_loss():
  """impl='pallas' through the seam per device on a batch-sharded 8-device mesh (the model's
  fsdp preset) gives the reference's loss and gradient; the chunked LM loss with either impl
  gives the same loss and head/hidden gradients (bf16 compute, within 2^-7 of the largest
  magnitude: the gradient's bf16 rounding chained through the head GEMMs)."""
  B, C, V = 8, 3, 300
  logits, tgt, w = _inputs(B, C, V, jnp.bfloat16, seed=1)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1, 1),
              ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
  with rules.activate(mesh, 'fsdp'), jax.set_mesh(mesh):
    nll, d = jax.jit(lambda *a: xent.nll_and_grad(*a, impl='pallas'))(logits, tgt, w)
  nll_ref, d_ref = xent.nll_and_grad(logits, tgt, w, impl='reference')
  np.testing.assert_allclose(nll, nll_ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(d, np.float32), np.asarray(d_ref, np.float32),
                             atol=2.0 ** -8)

  rng = np.random.default_rng(2)
  T, D = 8, 16
  h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(D, V)) / 4, jnp.float32)
  tg = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  wt = jnp.asarray(rng.uniform(size=(B, T)) > 0.2, jnp.float32)
  def run(impl):
    f = lambda h, hd: 0.3 * cross_entropy_sum(h, hd, tg, wt, jnp.bfloat16, 4, impl)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, head)
  (loss, g), (loss_ref, g_ref) = run('pallas'), run('reference')
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=2.0 ** -7 * np.abs(np.asarray(b)).max())


def test_auto_keeps_sharded_vocabulary_on_reference_and_bad_inputs_raise():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 1, 2),
              ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
  with rules.activate(mesh, 'fsdp_tp'):
    assert xent.resolve_impl('auto', 300) == 'reference'     # vocab over 'tensor'
    assert xent.resolve_impl('auto', 301) == xent.resolve_impl('auto')   # 301: not divisible
  with rules.activate(mesh, 'fsdp'):
    assert xent.resolve_impl('pallas', 300) == 'pallas'
  with pytest.raises(ValueError, match='config.kernels.xent'):
    xent.resolve_impl('triton')
  with pytest.raises(ValueError, match=r'\[B,C,V\]'):
    xent.nll_and_grad(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4)))


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='compiled Triton kernels need a GPU; '
                    'CPU covers the same code in interpret mode above')
def test_compiled_kernel_on_gpu_matches_oracle():
  """Compiled at the default tiling, bench_h200's vocabulary (129,280: a partial last chunk)
  and 300 rows, with the interpret-mode bounds."""
  logits, tgt, w = _inputs(3, 100, 129280, jnp.bfloat16, seed=3)
  lse, t, d = jax.jit(gpu.lse_target_grad)(logits, tgt, w)
  want = oracle(logits, tgt, w)
  np.testing.assert_allclose(lse, want[0], rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(t, want[1], rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d, np.float64), want[2], rtol=0, atol=2.0 ** -8)
