"""The Pallas Triton masked flash attention (kernels/attention/gpu.py) in interpret mode against the
jnp oracle `reference.dense_attention`, on fresh random inputs.

Shapes: T = S = 40 (not a multiple of the 16-row query blocks; 32-key blocks, so several tiles
either side of the diagonal), H = 2, K = 48 (split 32 + 16), V = 32 != K. Top-k sets: up to 10
distinct allowed keys (causal, same document) in 12 slots (-1 holes; early rows have fewer allowed
keys than slots), and one row whose set holds only the query itself.
Tolerances, relative to the largest magnitude of the expected array: fp32 inputs 2e-5 for o, lse
and dq / dk / dv (summation order only); bf16 inputs 2e-2 against the fp32 oracle on the same
bf16 values (p and the gradients' operands are rounded to bf16 in the kernel's matmuls), lse 1e-3
absolute (fp32 logits of bf16 products).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from v4jax.kernels.attention import causal_attention, gpu
from v4jax.kernels.attention.reference import dense_attention
from helpers import packed_words
from v4jax.kernels.blockwise import pack_mask

B, T, H, K, V = 2, 40, 2, 48, 32
SCALE = 0.3
BLK = dict(block_m=16, block_n=32)
ALONE = (1, 23)                       # (batch, row) whose top-k set is only the row itself


def _inputs(seed, segments, dtype=jnp.float32):
  rs = np.random.RandomState(seed)
  q, k = (jnp.asarray(rs.randn(B, T, H, K), dtype) for _ in range(2))
  v = jnp.asarray(rs.randn(B, T, H, V), dtype)
  seg = np.sort(rs.randint(0, 3, (B, T)), axis=1).astype(np.int32) if segments else None
  idx = np.full((B, T, 12), -1, np.int32)
  for b in range(B):
    for t in range(T):
      ok = [s for s in range(t + 1) if seg is None or seg[b, s] == seg[b, t]]
      pick = rs.permutation(ok)[:10]
      idx[b, t, :len(pick)] = pick
      idx[b, t] = rs.permutation(idx[b, t])
  idx[ALONE] = -1
  idx[ALONE + (5,)] = ALONE[1]
  do = jnp.asarray(rs.randn(B, T, H, V), dtype)
  return q, k, v, None if seg is None else jnp.asarray(seg), jnp.asarray(idx), do


def _kernel(seg, idx, **kw):
  return lambda q, k, v: gpu.causal_attention(q, k, v, SCALE, seg, select_BTK=idx, fwd=BLK,
                                              dkv=BLK, dq=BLK, interpret=True, **kw)


def _close(got, want, rtol_max):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)) and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol_max * np.abs(want).max())


@pytest.mark.parametrize('segments,dtype', [(False, jnp.float32), (True, jnp.float32),
                                            (True, jnp.bfloat16)])
def test_values_and_gradients_match_reference(segments, dtype):
  q, k, v, seg, idx, do = _inputs(1 + segments, segments, dtype)
  (o, lse), vjp = jax.vjp(_kernel(seg, idx), q, k, v)
  f32 = lambda *a: [x.astype(jnp.float32) for x in a]
  ref = lambda q, k, v: dense_attention(q, k, v, SCALE, seg, select_BTK=idx)
  (want_o, want_lse), ref_vjp = jax.vjp(ref, *f32(q, k, v))
  assert o.dtype == dtype and o.shape == (B, T, H, V)
  assert lse.dtype == jnp.float32 and lse.shape == (B, T, H)
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  _close(o, want_o, tol)
  np.testing.assert_allclose(lse, want_lse, atol=2e-5 * np.abs(want_lse).max()
                             if dtype == jnp.float32 else 1e-3)
  # The row attending only to itself: o = v at that row, lse = its own logit.
  b, t = ALONE
  _close(o[b, t], v[b, t], tol)
  # The mask matters: unmasked causal attention differs.
  plain_o, _ = dense_attention(*f32(q, k, v), SCALE, seg)
  assert np.abs(np.asarray(plain_o) - np.asarray(want_o)).max() > 0.1
  grads = vjp((do, jnp.asarray(np.random.RandomState(7).randn(B, T, H), jnp.float32)))
  want = ref_vjp((do.astype(jnp.float32), jnp.zeros((B, T, H), jnp.float32)))  # lse: no grad
  for g, x, w in zip(grads, (q, k, v), want):
    assert g.dtype == x.dtype
    _close(g, w, tol)


def test_row_without_keys_is_zero_and_finite():
  """A row whose top-k set is empty: o = 0, lse = -inf, all gradients finite; the other rows
  still match the reference (whose o is NaN at that row)."""
  q, k, v, seg, idx, do = _inputs(3, False)
  idx = idx.at[0, 30].set(-1)
  (o, lse), vjp = jax.vjp(_kernel(seg, idx), q, k, v)
  want_o, want_lse = dense_attention(q, k, v, SCALE, select_BTK=idx)
  assert np.all(np.asarray(o[0, 30]) == 0) and np.all(np.asarray(lse[0, 30]) == -np.inf)
  keep = np.ones((B, T), bool)
  keep[0, 30] = False
  _close(np.asarray(o)[keep], np.asarray(want_o)[keep], 2e-5)
  for g in vjp((do, jnp.zeros_like(lse))):
    assert np.all(np.isfinite(np.asarray(g)))


def test_pack_mask_matches_numpy_oracle():
  """S = 70 (a partial last word, its padding bits clear), -1 slots and repeated indices."""
  rs = np.random.RandomState(5)
  idx = jnp.asarray(rs.randint(-1, 70, (2, 9, 20)), jnp.int32)
  words = pack_mask(idx, 70)
  assert words.dtype == jnp.uint32 and words.shape == (2, 9, 3)
  np.testing.assert_array_equal(words, packed_words(idx, 70))


def test_seam_pallas_matches_reference():
  """kernels.attention=pallas through the seam (default blocks, interpret mode on CPU)."""
  q, k, v, seg, idx, _ = _inputs(4, True)
  o, lse = causal_attention(q, k, v, SCALE, seg, select_BTK=idx, impl='pallas')
  want_o, want_lse = causal_attention(q, k, v, SCALE, seg, select_BTK=idx, impl='reference')
  _close(o, want_o, 2e-5)
  _close(lse, want_lse, 2e-5)
  with pytest.raises(ValueError, match='per-head k/v'):
    causal_attention(q, k[:, :, 0], v[:, :, 0], SCALE, impl='pallas')


def test_packed_words_stand_in_for_the_indices():
  """select_words_BTW (the top-k kernel's packed set) gives the same o, lse and gradients as
  select_BTK, and replaces it: garbage indices beside the words change nothing. Wrongly shaped
  or typed words are refused."""
  q, k, v, seg, idx, do = _inputs(6, True)
  words = pack_mask(idx, T)
  run = lambda sel, w: jax.vjp(lambda q, k, v: gpu.causal_attention(
      q, k, v, SCALE, seg, select_BTK=sel, select_words_BTW=w, fwd=BLK, dkv=BLK, dq=BLK,
      interpret=True), q, k, v)
  (o, lse), vjp = run(idx, None)
  (o_w, lse_w), vjp_w = run(jnp.zeros_like(idx), words)
  np.testing.assert_array_equal(o_w, o)
  np.testing.assert_array_equal(lse_w, lse)
  for g_w, g in zip(vjp_w((do, jnp.zeros_like(lse))), vjp((do, jnp.zeros_like(lse)))):
    np.testing.assert_array_equal(g_w, g)
  with pytest.raises(ValueError, match='select_words_BTW'):
    gpu.causal_attention(q, k, v, SCALE, select_words_BTW=words[:, :, :1], interpret=True)
  with pytest.raises(ValueError, match='select_words_BTW'):
    gpu.causal_attention(q, k, v, SCALE, select_words_BTW=words.astype(jnp.int32),
                         interpret=True)


def test_lowers_to_triton_for_cuda():
  """Forward 1 Triton call, the gradient 2 more (dk/dv, dq), at bench_h200's widths (K = 192 =
  128 + 64, V = 128) with default blocks; values are checked in interpret mode above, PTX
  compilation needs a GPU."""
  bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  args = (bf(1, 192, 2, 192), bf(1, 192, 2, 192), bf(1, 192, 2, 128),
          jax.ShapeDtypeStruct((1, 192), jnp.int32), jax.ShapeDtypeStruct((1, 192, 64), jnp.int32))
  f = lambda q, k, v, s, i: gpu.causal_attention(q, k, v, 0.1, s, select_BTK=i,
                                                 interpret=False)[0]
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
  triton = '__gpu$xla.gpu.triton'
  for fn, calls in ((f, 1), (grad, 3)):
    exp = export.export(jax.jit(fn), platforms=['cuda'], disabled_checks=[
        export.DisabledSafetyCheck.custom_call(triton)])(*args)
    assert exp.mlir_module().count(triton) == calls


def test_seam_pallas_per_device_on_mesh():
  """On a mesh with batch over data and heads over tensor the kernel runs per device (shard_map)
  and matches the one-device reference (2e-5 of the largest magnitude)."""
  from jax.sharding import AxisType, Mesh
  from v4jax.parallel import rules
  q, k, v, seg, idx, _ = _inputs(6, True)
  want_o, want_lse = dense_attention(q, k, v, SCALE, seg, select_BTK=idx)
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 1, 2),
              ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
  call = lambda q, k, v: causal_attention(q, k, v, SCALE, seg, select_BTK=idx, impl='pallas')
  with rules.activate(mesh, 'fsdp_tp'), jax.set_mesh(mesh):
    assert 'shard_map' in str(jax.make_jaxpr(call)(q, k, v))
    o, lse = jax.jit(call)(q, k, v)
  _close(o, want_o, 2e-5)
  _close(lse, want_lse, 2e-5)


def _pallas_call_names(jaxpr) -> list:
  """Names of the pallas_calls in a jaxpr, nested jaxprs included, in order."""
  out = []
  for e in jaxpr.eqns:
    if e.primitive.name == 'pallas_call':
      n = e.params.get('name_and_src_info', e.params.get('name'))
      out.append(getattr(n, 'name', n))
    for p in e.params.values():
      inner = getattr(p, 'jaxpr', p)
      if hasattr(inner, 'eqns'):
        out += _pallas_call_names(inner)
  return out


def test_block_remat_keeps_the_forward_kernels_outputs():
  """The block remat policy's attention term (`forward_kernel_saveable`) saves the Pallas forward
  kernel's outputs: the gradient runs that kernel once; with nothing saveable, twice."""
  from v4jax.kernels.attention import forward_kernel_saveable
  q, k, v, seg, idx, _ = _inputs(7, False)
  f = lambda q, k, v: jnp.sum(jnp.sin(_kernel(seg, idx)(q * 1.0, k, v)[0]))
  runs = {}
  for label, policy in (('saved', forward_kernel_saveable),
                        ('nothing', jax.checkpoint_policies.nothing_saveable)):
    grad = jax.grad(jax.checkpoint(f, policy=policy), argnums=(0, 1, 2))
    runs[label] = _pallas_call_names(jax.make_jaxpr(grad)(q, k, v).jaxpr).count(gpu.FWD_KERNEL)
  assert runs == {'saved': 1, 'nothing': 2}, runs
  from types import SimpleNamespace
  from v4jax.kernels.attention.library import CUDNN_FWD_PRIMITIVE
  assert forward_kernel_saveable(SimpleNamespace(name=CUDNN_FWD_PRIMITIVE))   # cuDNN's, as before
  assert not forward_kernel_saveable(SimpleNamespace(name='pallas_call'), name='other_kernel')
  # a pallas_call with no name and no jaxpr parameter (another backend's kernel) is not kept and
  # does not break the policy
  assert not forward_kernel_saveable(SimpleNamespace(name='pallas_call'), name=None)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='compiled Triton kernels need a GPU; '
                    'CPU covers the same code in interpret mode above')
def test_compiled_kernel_on_gpu_matches_reference():
  """bench_h200's widths (K = 192, V = 128) in bf16 with default blocks, compiled for the GPU:
  o, lse and the gradients against the fp32 oracle (full-precision dots) on the same bf16 values,
  within 2e-2 of the largest magnitude (lse 1e-2 absolute)."""
  rs = np.random.RandomState(11)
  b, t, h, kw, vw, top = 2, 384, 4, 192, 128, 96
  q, k = (jnp.asarray(rs.randn(b, t, h, kw), jnp.bfloat16) for _ in range(2))
  v, do = (jnp.asarray(rs.randn(b, t, h, vw), jnp.bfloat16) for _ in range(2))
  idx = np.full((b, t, top), -1, np.int32)
  for bb in range(b):
    for tt in range(t):
      pick = rs.permutation(tt + 1)[:top]
      idx[bb, tt, :len(pick)] = pick
  idx = jnp.asarray(idx)
  (o, lse), vjp = jax.vjp(lambda q, k, v: gpu.causal_attention(q, k, v, kw ** -0.5,
                                                               select_BTK=idx), q, k, v)
  with jax.default_matmul_precision('highest'):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (want_o, want_lse), ref_vjp = jax.vjp(
        lambda q, k, v: dense_attention(q, k, v, kw ** -0.5, select_BTK=idx), *f32)
    want = ref_vjp((do.astype(jnp.float32), jnp.zeros_like(want_lse)))
  _close(o, want_o, 2e-2)
  np.testing.assert_allclose(lse, want_lse, atol=1e-2)
  for g, w in zip(vjp((do, jnp.zeros_like(lse))), want):
    _close(g, w, 2e-2)
