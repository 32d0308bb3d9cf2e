"""Dense causal attention seam: reference and library (jax.nn.dot_product_attention) paths against
a numpy oracle written from SPEC §2 (softmax(scale·q·k) over s <= t in the same document).

The library path runs here with implementation='xla' (cuDNN needs a GPU): that checks the MLA
plumbing around the call (zero-padding of unequal qk / value widths, the scale, the document
mask, slicing the value columns back). Tolerances: fp32 values rtol/atol 2e-5 (different
summation orders); gradients vs jax.grad of a jnp copy of the oracle, rtol 1e-4 / atol 1e-5.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from v4jax.kernels import attention
from v4jax.kernels.attention import causal_attention, resolve_impl
from v4jax.kernels.attention import library
from v4jax.parallel import rules

B, T, H, K, V = 2, 24, 3, 12, 20   # K, V not multiples of 8 and unequal: both get padded


def oracle_np(q, k, v, scale, seg, sel=None):
  logits = scale * np.einsum('bthk,bshk->bhts', q, k)
  allowed = np.tril(np.ones((T, T), bool))[None, None]
  if seg is not None:
    allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
  if sel is not None:
    allowed = allowed & sel[:, None]
  logits = np.where(allowed, logits, -np.inf)
  m = logits.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.sum(np.exp(logits - m), -1))
  p = np.exp(logits - lse[..., None])
  return np.einsum('bhts,bshv->bthv', p, v), np.transpose(lse, (0, 2, 1))


def oracle_jnp(q, k, v, scale, seg, sel=None, with_lse=False):
  logits = scale * jnp.einsum('bthk,bshk->bhts', q, k)
  allowed = jnp.tril(jnp.ones((T, T), bool))[None, None]
  if seg is not None:
    allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
  if sel is not None:
    allowed = allowed & sel[:, None]
  logits = jnp.where(allowed, logits, -jnp.inf)
  o = jnp.einsum('bhts,bshv->bthv', jax.nn.softmax(logits, axis=-1), v)
  if not with_lse:
    return o
  return o, jnp.swapaxes(jax.nn.logsumexp(logits, axis=-1), 1, 2)


def draw(seed, segments):
  r = np.random.RandomState(seed)
  q, k = r.randn(B, T, H, K), r.randn(B, T, H, K)
  v = r.randn(B, T, H, V)
  seg = np.sort(r.randint(0, 3, size=(B, T)), axis=1).astype(np.int32) if segments else None
  return q, k, v, seg


def draw_selection(seed, seg, k_sel=5):
  """DSA-like key sets: per query up to k_sel random allowed keys (causal, same document), the
  rest of the K slots -1 (early rows have fewer allowed keys than slots); and the [B,T,S] mask."""
  r = np.random.RandomState(seed)
  idx = np.full((B, T, k_sel), -1, np.int32)
  sel = np.zeros((B, T, T), bool)
  for b in range(B):
    for t in range(T):
      ok = [s for s in range(t + 1) if seg is None or seg[b, s] == seg[b, t]]
      pick = r.permutation(ok)[:k_sel]
      idx[b, t, :len(pick)] = r.permutation(pick)
      sel[b, t, pick] = True
  return idx, sel


@pytest.mark.parametrize('segments,select', [(False, False), (True, False), (True, True)])
def test_reference_and_library_match_oracle(segments, select):
  q, k, v, seg = draw(0 + segments, segments)
  idx, sel = draw_selection(5, seg) if select else (None, None)
  scale = 0.37
  want_o, want_lse = oracle_np(q, k, v, scale, seg, sel)
  f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32 if a.dtype != np.int32 else a.dtype)
  o, lse = causal_attention(f32(q), f32(k), f32(v), scale, f32(seg), select_BTK=f32(idx),
                            query_block=7, impl='reference')
  np.testing.assert_allclose(o, want_o, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)
  o_lib = library.causal_attention(f32(q), f32(k), f32(v), scale, f32(seg), select_BTK=f32(idx),
                                   implementation='xla')
  assert o_lib.shape == (B, T, H, V)
  np.testing.assert_allclose(o_lib, want_o, rtol=2e-5, atol=2e-5)
  o_lib, lse_lib = library.causal_attention(f32(q), f32(k), f32(v), scale, f32(seg),
                                            select_BTK=f32(idx), implementation='xla',
                                            return_lse=True)
  assert lse_lib.shape == (B, T, H) and lse_lib.dtype == jnp.float32
  np.testing.assert_allclose(o_lib, want_o, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(lse_lib, want_lse, rtol=2e-5, atol=2e-5)


def test_library_per_device_on_mesh_matches_oracle():
  """On a mesh with batch over data x fsdp and heads over tensor, the library call runs per
  device (its mask built from each device's own rows) and matches the oracles' values, lse and
  gradients of o (the tolerances of the one-device tests above)."""
  Hm = 4   # heads divisible by the tensor axis
  r = np.random.RandomState(11)
  q, k = r.randn(B, T, Hm, K), r.randn(B, T, Hm, K)
  v = r.randn(B, T, Hm, V)
  seg = np.sort(r.randint(0, 3, (B, T)), axis=1).astype(np.int32)
  idx, sel = draw_selection(12, seg)
  want_o, want_lse = oracle_np(q, k, v, 0.37, seg, sel)
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
  w = jnp.asarray(r.randn(B, T, Hm, V), jnp.float32)
  call = lambda q, k, v: library.causal_attention(q, k, v, 0.37, jnp.asarray(seg),
                                                  select_BTK=jnp.asarray(idx),
                                                  implementation='xla', return_lse=True)

  def loss_of(attn):   # through o only: the library's lse is a detached statistic
    return lambda *a: jnp.sum(w * attn(*a)[0])
  oracle = lambda q, k, v: oracle_jnp(q, k, v, 0.37, jnp.asarray(seg), jnp.asarray(sel),
                                      with_lse=True)
  want_g = jax.grad(loss_of(oracle), argnums=(0, 1, 2))(*args)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 1, 4), ('data', 'fsdp', 'expert', 'tensor'),
              axis_types=(AxisType.Auto,) * 4)
  with rules.activate(mesh, 'fsdp_tp'), jax.set_mesh(mesh):
    assert 'shard_map' in str(jax.make_jaxpr(call)(*args))
    o, lse = jax.jit(call)(*args)
    got_g = jax.jit(jax.grad(loss_of(call), argnums=(0, 1, 2)))(*args)
  np.testing.assert_allclose(o, want_o, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)
  for g, e in zip(got_g, want_g):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(e))))


def test_library_gradients_match_oracle():
  q, k, v, seg = draw(3, True)
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
  w = jnp.asarray(np.random.RandomState(4).randn(B, T, H, V), jnp.float32)
  seg = jnp.asarray(seg)
  lib = lambda *a: jnp.sum(w * library.causal_attention(*a, 0.5, seg, implementation='xla'))
  ora = lambda *a: jnp.sum(w * oracle_jnp(*a, 0.5, seg))
  got = jax.grad(lib, argnums=(0, 1, 2))(*args)
  want = jax.grad(ora, argnums=(0, 1, 2))(*args)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(e))))


def test_impl_selection_and_errors(monkeypatch):
  q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
  k4, k3 = jnp.zeros((1, 8, 2, 16), jnp.bfloat16), jnp.zeros((1, 8, 16), jnp.bfloat16)
  assert resolve_impl('auto', q, k4) == 'reference'   # CPU: no cuDNN
  assert resolve_impl('auto', q, k4, masked=True) == 'reference'
  assert resolve_impl('cudnn', q, k4) == 'cudnn'
  monkeypatch.setattr(attention, 'target_platform', lambda: 'gpu')
  assert resolve_impl('auto', q, k4) == 'cudnn'                   # dense: cuDNN
  assert resolve_impl('auto', q, k4, masked=True) == 'pallas'     # under a top-k set: Triton
  monkeypatch.setattr(attention, 'is_hopper', lambda: True)
  assert resolve_impl('auto', q, k4, masked=True) == 'pallas_mgpu'   # on Hopper: Mosaic GPU
  assert resolve_impl('auto', q, k4) == 'cudnn'
  monkeypatch.setattr(attention, 'is_hopper', lambda: False)
  assert resolve_impl('auto', q, k3) == 'reference'               # shared k/v: neither
  assert resolve_impl('auto', q.astype(jnp.float32), k4, masked=True) == 'reference'
  with pytest.raises(ValueError, match='config.kernels.attention'):
    resolve_impl('flash', q, k4)
  with pytest.raises(ValueError, match='per-head k/v'):
    causal_attention(q, k3, k3, 1.0, impl='cudnn', need_lse=False)


def test_cudnn_lse_entry_point_failure_is_one_clear_error(monkeypatch):
  """The fp32 lse comes from jax's private cuDNN function; if a jax release moves or changes
  it, the error names the jax version and the fallback setting instead of a bare TypeError."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  def changed(*a, **k):
    raise TypeError("dot_product_attention() got an unexpected keyword argument 'mask_type'")
  monkeypatch.setattr(cudnn, 'dot_product_attention', changed)
  q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
  with pytest.raises(RuntimeError, match=r'kernels.attention=reference'):
    library.causal_attention(q, q, q, 0.5, return_lse=True)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN flash attention needs a GPU')
@pytest.mark.parametrize('return_lse', [False, True])
def test_cudnn_mla_widths_match_oracle(return_lse):
  """The cuDNN path with unequal qk / value widths (K=12, V=20: padded to 16 and 24, cuDNN's MLA
  shapes) under a document + top-k mask: o, lse and the gradients of q, k, v against the float64
  oracle / fp32 autodiff. bf16 inputs: 2e-2 of the largest magnitude."""
  q, k, v, seg = draw(7, True)
  idx, sel = draw_selection(8, seg)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  q, k, v = (np.asarray(bf(a), np.float64) for a in (q, k, v))   # the values cuDNN sees
  want_o, want_lse = oracle_np(q, k, v, 0.37, seg, sel)
  out = library.causal_attention(bf(q), bf(k), bf(v), 0.37, jnp.asarray(seg),
                                 select_BTK=jnp.asarray(idx), return_lse=return_lse)
  o = out[0] if return_lse else out
  assert o.shape == (B, T, H, V)
  np.testing.assert_allclose(np.asarray(o, np.float64), want_o, atol=2e-2 * np.abs(want_o).max())
  if return_lse:
    np.testing.assert_allclose(np.asarray(out[1]), want_lse, atol=2e-2)
  w = np.random.RandomState(9).randn(B, T, H, V)
  segj, idxj = jnp.asarray(seg), jnp.asarray(idx)

  def lib(q, k, v):
    o = library.causal_attention(q, k, v, 0.37, segj, select_BTK=idxj, return_lse=return_lse)
    return jnp.sum(jnp.asarray(w, jnp.float32) * (o[0] if return_lse else o).astype(jnp.float32))

  def ora(q, k, v):
    return jnp.sum(jnp.asarray(w, jnp.float32) * _oracle_jnp_sel(q, k, v, 0.37, segj, sel))
  got = jax.grad(lib, argnums=(0, 1, 2))(bf(q), bf(k), bf(v))
  want = jax.grad(ora, argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  for g, e in zip(got, want):
    e = np.asarray(e, np.float64)
    np.testing.assert_allclose(np.asarray(g, np.float64), e, atol=2e-2 * np.abs(e).max())


def _oracle_jnp_sel(q, k, v, scale, seg, sel):
  logits = scale * jnp.einsum('bthk,bshk->bhts', q, k, precision='highest')
  allowed = jnp.tril(jnp.ones((T, T), bool))[None, None]
  allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :]) & jnp.asarray(sel)[:, None]
  p = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  return jnp.einsum('bhts,bshv->bthv', p, v, precision='highest')
