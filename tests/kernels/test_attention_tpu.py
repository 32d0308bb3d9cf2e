"""kernels.attention=tpu_flash (kernels/attention/tpu.py, jax's bundled Pallas TPU flash attention)
in TPU interpret mode against the jnp reference `reference.dense_attention`, on fresh random inputs.

Shapes: T = 40 (the kernels' 128-row blocks: T, S and the head width are padded), H = 2, K != V
(48 / 32 and 192 / 32: head widths 128 and 256); one T = 300 case (3 x 128 blocks, so the
multi-block online softmax and the causal block skipping run) and one S = 24 < T case (padded keys
masked by a segment id of their own). Values, lse, and dq / dk / dv under cotangents on both o
and lse. Tolerances, relative to the largest magnitude of the expected array: fp32 inputs 2e-5
(summation order only); bf16 inputs 2e-2 against the reference on the same bf16 values (p and the
gradients' operands are rounded to bf16 in the kernels' matmuls), lse 1e-3 absolute.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from v4jax.kernels import attention
from v4jax.kernels.attention import causal_attention, resolve_impl, tpu
from v4jax.kernels.attention.reference import dense_attention

SCALE = 0.3


def _inputs(seed, B, T, S, H, K, V, segments, dtype=jnp.float32):
  rs = np.random.RandomState(seed)
  q = jnp.asarray(rs.randn(B, T, H, K), dtype)
  k = jnp.asarray(rs.randn(B, S, H, K), dtype)
  v = jnp.asarray(rs.randn(B, S, H, V), dtype)
  seg = jnp.asarray(np.sort(rs.randint(0, 3, (B, T)), axis=1).astype(np.int32)) if segments \
      else None
  do = jnp.asarray(rs.randn(B, T, H, V), dtype)
  dlse = jnp.asarray(rs.randn(B, T, H), jnp.float32)
  return q, k, v, seg, do, dlse


def _close(got, want, rtol_max):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)) and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol_max * np.abs(want).max())


CASES = {   # name: (B, T, S, H, K, V, segments, dtype)
    'fp32_segments_k192': (1, 40, 40, 2, 192, 32, True, jnp.float32),
    'bf16_segments': (1, 40, 40, 2, 48, 32, True, jnp.bfloat16),
    'fp32_three_blocks': (1, 300, 300, 1, 48, 32, False, jnp.float32),
    'fp32_fewer_keys': (1, 40, 24, 2, 48, 32, False, jnp.float32),
}


@pytest.mark.parametrize('case', list(CASES))
def test_values_and_gradients_match_reference(case):
  *shape, segments, dtype = CASES[case]
  q, k, v, seg, do, dlse = _inputs(len(case), *shape, segments, dtype)
  kernel = jax.jit(lambda q, k, v: tpu.causal_attention(q, k, v, SCALE, seg))
  ref = lambda q, k, v: dense_attention(q, k, v, SCALE, seg)
  (o, lse), vjp = jax.vjp(kernel, q, k, v)
  (want_o, want_lse), want_vjp = jax.vjp(ref, q, k, v)
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  _close(o, want_o, tol)
  if dtype == jnp.float32:
    _close(lse, want_lse, 2e-5)
  else:
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-3)
  for g, e in zip(vjp((do, dlse)), want_vjp((do, dlse))):
    _close(g, e, tol)


def test_seam_per_device_on_mesh():
  """impl='tpu_flash' on a mesh with batch over data and heads over tensor runs per device
  (shard_map) and matches the one-device reference (2e-5 of the largest magnitude)."""
  q, k, v, seg, _, _ = _inputs(6, 2, 40, 40, 2, 48, 32, True)
  want_o, want_lse = dense_attention(q, k, v, SCALE, seg)
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 1, 2),
              ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
  from v4jax.parallel import rules
  call = lambda q, k, v: causal_attention(q, k, v, SCALE, seg, impl='tpu_flash', need_lse=False)
  with rules.activate(mesh, 'fsdp_tp'), jax.set_mesh(mesh):
    assert 'shard_map' in str(jax.make_jaxpr(call)(q, k, v))
    o, lse = jax.jit(call)(q, k, v)
  _close(o, want_o, 2e-5)
  _close(lse, want_lse, 2e-5)


def test_auto_picks_tpu_flash_on_tpu_without_a_topk_set(monkeypatch):
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  k4, k3 = jnp.zeros((1, 8, 2, 16), jnp.float32), jnp.zeros((1, 8, 16), jnp.float32)
  monkeypatch.setattr(attention, 'target_platform', lambda: 'tpu')
  assert resolve_impl('auto', q, k4) == 'tpu_flash'
  assert resolve_impl('auto', q.astype(jnp.bfloat16), k4) == 'tpu_flash'
  assert resolve_impl('auto', q, k4, masked=True) == 'reference'   # a top-k set: the reference
  assert resolve_impl('auto', q, k3) == 'reference'                # shared k/v
  idx = jnp.zeros((1, 8, 4), jnp.int32)
  with pytest.raises(ValueError, match='tpu_flash takes no DSA top-k set'):
    causal_attention(q, k4, k4, 1.0, select_BTK=idx, impl='tpu_flash')
  with pytest.raises(ValueError, match='per-head k/v'):
    causal_attention(q, k3, k3, 1.0, impl='tpu_flash')


def _kernel_names(jaxpr) -> list:
  """Function names of the pallas_call kernels in a jaxpr, nested jaxprs included."""
  out = []
  for e in jaxpr.eqns:
    if e.primitive.name == 'pallas_call':
      out.append(e.params['jaxpr'].debug_info.func_name)
    for p in e.params.values():
      inner = getattr(p, 'jaxpr', p)
      if hasattr(inner, 'eqns'):
        out += _kernel_names(inner)
  return out


def test_block_remat_keeps_the_forward_kernels_outputs(monkeypatch):
  """`forward_kernel_saveable` saves the bundled forward kernel's outputs: the gradient runs it
  once; with nothing saveable, twice. Traced for a TPU target (interpret mode's callbacks cannot
  be rematerialised), never run."""
  monkeypatch.setenv('V4JAX_TARGET_PLATFORM', 'tpu')
  q, k, v, _, _, _ = _inputs(7, 1, 40, 40, 2, 48, 32, False)
  f = lambda q, k, v: jnp.sum(jnp.sin(tpu.causal_attention(q * 1.0, k, v, SCALE)[0]))
  runs = {}
  for label, policy in (('saved', attention.forward_kernel_saveable),
                        ('nothing', jax.checkpoint_policies.nothing_saveable)):
    grad = jax.grad(jax.checkpoint(f, policy=policy), argnums=(0, 1, 2))
    runs[label] = _kernel_names(jax.make_jaxpr(grad)(q, k, v).jaxpr).count(tpu.FWD_KERNEL)
  assert runs == {'saved': 1, 'nothing': 2}, runs


@pytest.mark.parametrize('which', ['_flash_attention_impl', '_flash_attention_bwd_dq'])
def test_private_api_change_is_one_clear_error(monkeypatch, which):
  """tpu_flash calls the bundled module's private forward and backward functions; if a jax
  release changes one, the error (forward or gradient) names the jax version and the fallback
  setting instead of a bare TypeError."""
  def changed(*a, **k):
    raise TypeError(f"{which}() got an unexpected keyword argument 'block_b'")
  monkeypatch.setattr(tpu.fa, which, changed)
  q, k, v, _, _, _ = _inputs(3, 1, 8, 8, 1, 16, 16, False)
  f = lambda q: jnp.sum(tpu.causal_attention(q, k, v, SCALE)[0])
  with pytest.raises(RuntimeError, match=r'jax [0-9.]+ .*config\.kernels\.attention=reference'):
    jax.grad(f)(q)
