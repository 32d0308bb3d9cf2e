"""Sinkhorn seam (SPEC §5 step 5): the Triton kernels (interpret mode) against float64 oracles.

Values: a NumPy float64 Sinkhorn written from the SPEC text. Gradients: central differences
(h = 1e-6) of that float64 oracle for the loss sum(w * comb); tokens are independent, so one
perturbation of entry (j, k) in every token at once gives that entry's derivative for all
tokens. The kernels run in fp32: values and gradients within atol 1e-5 (observed ~2e-7; the
differences' own error is ~1e-10). Logits mix N(0, 1) tokens with N(0, 30) ones (saturated
softmax: entries down at eps).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax.sharding import AxisType, Mesh

from helpers import np_sinkhorn
from v4jax.config import ConfigError, default_config, validate
from v4jax.kernels.sinkhorn import gpu, sinkhorn
from v4jax.model.mhc import HCSite
from v4jax.parallel import rules

EPS = 1e-6


def fd_grad(lam, w, iters, h=1e-6):
  """d/dlam of sum(w * Sinkhorn(lam)) per token, float64 central differences."""
  lam = np.asarray(lam, np.float64)
  loss = lambda l: (w * np_sinkhorn(l, iters, EPS)).sum((-1, -2))
  g = np.zeros_like(lam)
  for j in range(lam.shape[-1]):
    for k in range(lam.shape[-1]):
      d = np.zeros_like(lam)
      d[..., j, k] = h
      g[..., j, k] = (loss(lam + d) - loss(lam - d)) / (2 * h)
  return g


def _logits(lead, n, seed):
  rng = np.random.default_rng(seed)
  lam = rng.normal(0, 1.0, (*lead, n, n))
  big = rng.random(lead) < 0.5
  lam[big] *= 30.0                                          # large magnitudes
  return lam.astype(np.float32), rng.normal(size=lam.shape)


# (N, iters, leading dims, block_m, segment): tokens not a multiple of the block (38 = 4x8 + 6,
# 5 < 8, 7 < 32), a multiple (16), N = 3 padded to 4, backward segments 4 (lead 3), 3 (lead 1)
# and 4 > iters-1 (no full segment).
CASES = [(4, 20, (2, 19), 8, 4), (2, 3, (5,), 8, 4), (4, 1, (2, 8), 8, 4), (3, 3, (7,), 8, 4),
         (4, 20, (7,), 32, 3)]


@pytest.mark.parametrize('n,iters,lead,block_m,segment', CASES)
def test_kernel_values_and_gradients_match_float64_oracle(n, iters, lead, block_m, segment):
  lam, w = _logits(lead, n, seed=n * 100 + iters)

  def loss(l):
    comb = gpu.sinkhorn(l, iters, EPS, block_m=block_m, segment=segment, interpret=True)
    return jnp.sum(jnp.asarray(w, jnp.float32) * comb), comb

  (_, comb), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(lam))
  assert comb.dtype == jnp.float32 and comb.shape == lam.shape
  np.testing.assert_allclose(np.asarray(comb), np_sinkhorn(lam, iters, EPS), atol=1e-5)
  np.testing.assert_allclose(np.asarray(g), fd_grad(lam, w, iters), atol=1e-5)


def test_seam_pallas_per_device_on_mesh_saves_only_logits():
  """impl='pallas' through the seam, per device on a batch-sharded mesh, bf16 logits in (fp32
  out, bf16 gradient); the backward keeps only the logits. Same oracles, atol 1e-5 (values)
  and 1e-2 relative to max|g| for the bf16-rounded gradient."""
  lam, w = _logits((4, 6), 4, seed=7)
  lam = np.asarray(jnp.asarray(lam, jnp.bfloat16).astype(jnp.float32))    # bf16-exact values
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 1, 4), ('data', 'fsdp', 'expert', 'tensor'),
              axis_types=(AxisType.Auto,) * 4)
  loss = lambda l: jnp.sum(jnp.asarray(w, jnp.float32) * sinkhorn(l, 3, EPS, impl='pallas'))
  with rules.activate(mesh, 'fsdp'), jax.set_mesh(mesh):
    x = jnp.asarray(lam, jnp.bfloat16)
    comb = jax.jit(lambda l: sinkhorn(l, 3, EPS, impl='pallas'))(x)
    g = jax.jit(jax.grad(loss))(x)
  assert comb.dtype == jnp.float32 and g.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(comb), np_sinkhorn(lam, 3, EPS), atol=1e-5)
  want = fd_grad(lam, w, 3)
  np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), want,
                             atol=1e-2 * np.abs(want).max())
  _, vjp = jax.vjp(lambda l: sinkhorn(l, 3, EPS, impl='pallas'), jnp.asarray(lam))
  assert sum(x.size for x in jax.tree.leaves(vjp)) == lam.size


def test_hcsite_with_pallas_sinkhorn_equals_reference():
  """config.kernels.sinkhorn reaches HCSite: the pallas and reference sites agree (outputs and
  gradients wrt the streams and fn, fp32, atol 1e-5)."""
  B, T, N, D = 1, 5, 4, 16

  def site_grads(impl):
    c = default_config()
    c.model.d_model, c.mhc.streams, c.mhc.sinkhorn_iters, c.kernels.sinkhorn = D, N, 4, impl
    site = HCSite(c, 1, rngs=nnx.Rngs(0))
    site.base[...] = jnp.asarray(np.random.default_rng(1).normal(0, 2.0, site.base.shape),
                                 jnp.float32)
    site.scale[...] = jnp.ones((3,), jnp.float32)
    gdef, params = nnx.split(site)
    X = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, N, D)), jnp.float32)

    def loss(params, X):
      out, _ = nnx.merge(gdef, params)(X, lambda u: (jnp.tanh(u), {}))
      return jnp.sum(out * jnp.cos(out)), out
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, X)

  (gp, gx), out = site_grads('pallas')
  (gp_ref, gx_ref), out_ref = site_grads('reference')
  np.testing.assert_allclose(out, out_ref, atol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, atol=1e-5)
  np.testing.assert_allclose(gp['fn'][...], gp_ref['fn'][...], atol=1e-5)


def test_bad_arguments_raise():
  lam = jnp.zeros((2, 4, 4))
  with pytest.raises(ValueError, match='config.kernels.sinkhorn'):
    sinkhorn(lam, 3, EPS, impl='triton')
  with pytest.raises(ValueError, match=r'logits_NN .* expected \[.., N, N\]'):
    sinkhorn(jnp.zeros((2, 4, 3)), 3, EPS, impl='pallas')
  with pytest.raises(ValueError, match='iters=0'):
    sinkhorn(lam, 0, EPS)
  with pytest.raises(ValueError, match='block_m=12'):
    gpu.sinkhorn(lam, 3, EPS, block_m=12)
  cfg = default_config()
  cfg.kernels.sinkhorn = 'fast'
  with pytest.raises(ConfigError, match='kernels.sinkhorn'):
    validate(cfg)


def test_kernels_lower_to_triton_for_cuda():
  """Both kernels (N = 4 and padded N = 3, segments and a leading partial segment) lower to
  Triton IR for a CUDA target on this CPU host: every primitive has a Triton lowering. (PTX
  compilation and the run itself need a GPU: tools/bench_mhc.py.)"""
  check = export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
  for n, iters in ((4, 20), (3, 2)):
    x = jax.ShapeDtypeStruct((2, 300, n, n), jnp.float32)
    grad = jax.grad(lambda l: jnp.sum(jnp.sin(gpu.sinkhorn(l, iters, EPS, interpret=False))))
    exp = export.export(jax.jit(grad), platforms=['cuda'], disabled_checks=[check])(x)
    text = exp.mlir_module()
    assert text.count('__gpu$xla.gpu.triton') == 2          # forward and backward kernels
