"""masked_probs_mean (the KL teacher of DSA's masked form) vs a float64 numpy oracle.

The oracle is written from the formula: per head the softmax of scale·q_h·k_h over the token's
selected keys (so lse is a real masked-attention lse and p sums to 1 over the set), averaged over
heads, read at each slot, 0 at -1 slots. The GPU kernel runs in Triton interpret mode.

Inputs: distinct allowed keys per token (s <= t + S - T) in random order, fewer than K on early
rows (top-k larger than the allowed count), -1 holes, one token with no key (lse = -inf, p = 0).
Tolerances: fp32 q/k, atol 1e-6 (p <= 1; summation order only); bf16 q/k against the oracle on the
same bf16 values, atol 1e-6 (products of bf16 values are exact in fp32, fp32 accumulation).
On a Hopper GPU the Mosaic GPU kernel (mgpu.py, taken under causal top-k) against the same
oracle, atol 1e-5 (its exp2 is the hardware's approximate one).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh

from helpers import random_topk_indices
from v4jax.kernels import pallas_common
from v4jax.kernels.sparse_attention import gpu, masked_probs_mean, mgpu, reference
from v4jax.parallel import rules

FAST = {'xla_backend_optimization_level': 0}


def _inputs(B, T, S, H, D, K, dtype, seed):
  rs = np.random.RandomState(seed)
  q = jnp.asarray(rs.randn(B, T, H, D), dtype)
  k = jnp.asarray(rs.randn(B, S, H, D), dtype)
  idx = random_topk_indices(rs, B, T, S, K)
  idx[B - 1, T // 2] = -1
  return q, k, jnp.asarray(idx)


def _oracle(q, k, idx, scale):
  """float64 (lse [B,T,H] of the attention masked to the selected keys, -inf without a key;
  p [B,T,K] = (1/H) Σ_h exp(scale·q_h·k_h[idx] - lse_h), 0 at -1 slots)."""
  q, k, idx = np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(idx)
  B, T, _ = idx.shape
  logits = scale * np.einsum('bthd,bshd->bths', q, k)
  sel = np.zeros((B, T, k.shape[1]), bool)
  for b in range(B):
    for t in range(T):
      sel[b, t, idx[b, t][idx[b, t] >= 0]] = True
  z = np.where(sel[:, :, None], logits, -np.inf)
  mx = np.max(np.where(sel[:, :, None], logits, 0.0), -1)
  tot = np.sum(np.exp(z - mx[..., None]), -1)
  lse = np.where(tot > 0, np.log(np.where(tot > 0, tot, 1.0)) + mx, -np.inf)
  safe = np.maximum(idx, 0)
  at = np.take_along_axis(logits, safe[:, :, None, :], axis=-1)          # [B,T,H,K]
  p = np.where(idx[:, :, None] >= 0, np.exp(at - lse[..., None]), 0.0).mean(axis=2)
  return lse, p


def _check(p, want, idx, atol):
  p = np.asarray(p)
  assert p.dtype == np.float32 and p.shape == want.shape
  np.testing.assert_allclose(p, want, atol=atol)
  has_key = (np.asarray(idx) >= 0).any(-1)
  np.testing.assert_allclose(p.sum(-1)[has_key], 1.0, atol=1e-5)
  assert np.all(p[~has_key] == 0) and np.all(p[np.asarray(idx) < 0] == 0)


def _jit(f, *args):
  return jax.jit(f).lower(*args).compile(FAST)(*args)


def test_reference_matches_oracle():
  """Query blocks of 5 over T = 13 (not a multiple), B = 2, S > T."""
  B, T, S, H, D, K = 2, 13, 15, 3, 24, 10
  q, k, idx = _inputs(B, T, S, H, D, K, jnp.float32, seed=1)
  scale = 0.3
  lse, want = _oracle(q, k, idx, scale)
  args = (q, k, idx, jnp.asarray(lse, jnp.float32))
  p = _jit(lambda *a: reference.masked_probs_mean(*a, scale, query_block=5), *args)
  _check(p, want, idx, 1e-6)


# B, T, S, H, D, K, block_q, block_s, buf_bytes: T not a multiple of block_q; D = 16 + 8 (the
# second part padded to 16) or 128 + 64 (the model's d_n + d_r, split unpadded); one query chunk,
# or a buffer of one block row so T runs in 3 chunks through lax.map.
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('B,T,S,H,D,K,bq,bs,buf', [
    (2, 37, 37, 3, 24, 12, 16, 16, None),
    (1, 40, 44, 2, 192, 20, 16, 32, 4 * 16 * 64),
])
def test_gpu_kernel_matches_oracle(B, T, S, H, D, K, bq, bs, buf, dtype):
  q, k, idx = _inputs(B, T, S, H, D, K, dtype, seed=T + D)
  scale = D ** -0.5
  lse, want = _oracle(q, k, idx, scale)
  opts = dict(block_q=bq, block_s=bs, interpret=True) | ({'buf_bytes': buf} if buf else {})
  p = _jit(lambda *a: gpu.masked_probs_mean(*a, scale, **opts),
           q, k, idx, jnp.asarray(lse, jnp.float32))
  _check(p, want, idx, 1e-6)


def _hopper():
  return jax.default_backend() == 'gpu' and pallas_common.is_hopper()


# B, T, H, D, K, block_s, stages, buf_bytes: T not a multiple of the 128-row CTA; D = 192 (3
# streamed chunks of 64) or 96 (padded to 128); 64-key tiles with 2 stages; a buffer of 128
# query rows, so T runs in 3 chunks through lax.map.
@pytest.mark.skipif(not _hopper(), reason='Mosaic-GPU kernel: a Hopper GPU (H100/H200) only')
@pytest.mark.parametrize('B,T,H,D,K,bs,stages,buf,group', [
    (2, 200, 4, 192, 64, None, None, None, 0),
    (1, 333, 16, 192, 128, 64, 2, None, 0),
    (2, 300, 3, 96, 40, 128, 3, 4 * 2 * 384 * 128, 0),
    (1, 333, 4, 192, 128, 64, None, None, 2),     # 6 key tiles: groups of 2, one CTA empty
    (2, 300, 3, 96, 40, 128, 3, 4 * 2 * 384 * 128, 1),
])
def test_mosaic_kernel_matches_oracle_on_hopper(B, T, H, D, K, bs, stages, buf, group):
  q, k, idx = _inputs(B, T, T, H, D, K, jnp.bfloat16, seed=T + D)
  scale = D ** -0.5
  lse, want = _oracle(q, k, idx, scale)
  opts = dict(block_s=bs, num_stages=stages, causal=True, key_group=group) | (
      {'buf_bytes': buf} if buf else {})
  f = lambda *a: gpu.masked_probs_mean(*a, scale, **opts)
  args = (q, k, idx, jnp.asarray(lse, jnp.float32))
  assert 'name=masked_probs_mean' not in str(jax.make_jaxpr(f)(*args))   # not the Triton one
  _check(jax.jit(f)(*args), want, idx, 1e-5)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('impl,mesh_shape', [('reference', None), ('pallas', (2, 1, 1, 4))])
def test_seam(impl, mesh_shape, causal):
  """The seam: the reference, or the GPU kernel (interpret) per device over a batch x heads mesh;
  no gradient flows into q, k or lse."""
  B, T, S, H, D, K = 2, 9, 9, 4, 24, 6
  q, k, idx = _inputs(B, T, S, H, D, K, jnp.float32, seed=5)
  scale = 0.25
  lse, want = _oracle(q, k, idx, scale)
  args = (q, k, idx, jnp.asarray(lse, jnp.float32))
  f = lambda *a: masked_probs_mean(*a, scale, query_block=4, impl=impl, causal=causal)
  if mesh_shape is None:
    p = _jit(f, *args)
  else:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape),
                ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
    with rules.activate(mesh, 'fsdp_tp'), jax.set_mesh(mesh):
      p = _jit(f, *args)
  _check(p, want, idx, 1e-6)
  g = jax.grad(lambda q, k, l: jnp.sum(f(q, k, idx, l)), argnums=(0, 1, 2))(*args[:2], args[3])
  assert all(not np.asarray(x).any() for x in g)


# T = 300 with a buffer of 128 query rows: 3 chunks of 128, the last one padded; T = 200: one
# chunk of 256 (T rounded up to whole 128-row CTAs)
@pytest.mark.parametrize('T,buf,chunks', [
    (300, 4 * 2 * 384 * 128, [(128, 0), (128, 128), (128, 256)]), (200, None, [(256, 0)])])
def test_mosaic_chunks_on_cpu_with_a_stand_in_kernel(monkeypatch, T, buf, chunks):
  """The Mosaic path's XLA side on the CPU: query chunks sliced out of q, lse and idx (the last
  one padded), each kernel call told its first row, the outputs joined along T. A jnp stand-in
  for the kernel computes its contract (head-mean probabilities of keys <= row0 + t) and leaves
  NaN where the kernel writes nothing (keys past a query), so reading those fails the oracle."""
  B, H, D, K = 2, 3, 96, 40
  q, k, idx = _inputs(B, T, T, H, D, K, jnp.bfloat16, seed=T)
  scale = D ** -0.5
  lse, want = _oracle(q, k, idx, scale)
  calls = []

  def dense_probs(q_c, k_c, lse_c, scale, *, block_kv, stages, row0, key_group):
    calls.append((q_c.shape[1], row0))
    s = scale * jnp.einsum('bthd,bshd->bhts', q_c.astype(jnp.float32), k_c.astype(jnp.float32))
    p = jnp.exp(s - jnp.swapaxes(lse_c, 1, 2)[..., None]).mean(axis=1)
    rows = row0 + jnp.arange(q_c.shape[1])[:, None]
    return jnp.where(jnp.arange(k_c.shape[1])[None] <= rows, p, jnp.nan)

  monkeypatch.setattr(gpu, 'is_hopper', lambda: True)
  monkeypatch.setattr(gpu.mgpu, 'dense_probs', dense_probs)
  opts = dict(causal=True, interpret=False) | ({'buf_bytes': buf} if buf else {})
  p = jax.jit(lambda *a: gpu.masked_probs_mean(*a, scale, **opts))(
      q, k, idx, jnp.asarray(lse, jnp.float32))
  _check(p, want, idx, 1e-5)
  assert calls == chunks, calls


def test_seam_forwards_teacher_and_key_group(monkeypatch):
  """config.kernels.kl_teacher / kl_key_group reach the GPU kernel's arguments (the Mosaic
  kernel itself needs a Hopper GPU, so a recorder stands in for it here)."""
  seen = []
  monkeypatch.setattr(gpu, 'masked_probs_mean',
                      lambda q, k, idx, lse, scale, **kw: seen.append(kw) or
                      jnp.zeros(idx.shape, jnp.float32))
  q, k, idx = _inputs(1, 8, 8, 2, 16, 4, jnp.bfloat16, seed=9)
  lse = jnp.zeros((1, 8, 2), jnp.float32)
  for teacher, group in (('pallas', 0), ('auto', 3)):
    masked_probs_mean(q, k, idx, lse, 0.5, impl='pallas', causal=True, teacher=teacher,
                      key_group=group)
  assert [(kw['mosaic_teacher'], kw['key_group'], kw['causal']) for kw in seen] == [
      (False, 0, True), (True, 3, True)], seen


def test_mosaic_kernel_limits():
  """The Mosaic kernel's shared-memory budget: 4 slots at 16 heads and 128-key tiles, fewer at
  more heads, none past ~200 heads (the seam then keeps the Triton kernel); bad tiles and
  stage counts are refused before anything lowers."""
  assert mgpu.max_stages(16, 128, 2) == 4 and mgpu.max_stages(16, 64, 2) == 7
  assert mgpu.max_stages(128, 128, 2) == 3 and mgpu.max_stages(256, 128, 2) < 2
  q = jnp.zeros((1, 8, 2, 192), jnp.bfloat16)
  lse = jnp.zeros((1, 8, 2))
  with pytest.raises(ValueError, match='block_kv=96 must be 64 or 128'):
    mgpu.dense_probs(q, q, lse, 1.0, block_kv=96)
  with pytest.raises(ValueError, match=r'stages=6 in \[2, 5\]'):
    mgpu.dense_probs(q, q, lse, 1.0, stages=6)
  with pytest.raises(ValueError, match='key_group=-1 >= 0'):
    mgpu.dense_probs(q, q, lse, 1.0, key_group=-1)


def test_bad_arguments_raise():
  q, k, idx = _inputs(1, 4, 4, 2, 8, 2, jnp.float32, seed=0)
  lse = jnp.zeros((1, 4, 2))
  with pytest.raises(ValueError, match=r'masked_probs_mean: q_BTHD .* k_BSHD \(1, 4, 3, 8\)'):
    masked_probs_mean(q, k[:, :, :1].repeat(3, 2), idx, lse, 1.0)
  with pytest.raises(ValueError, match='config.kernels.impl'):
    masked_probs_mean(q, k, idx, lse, 1.0, impl='triton')
  with pytest.raises(ValueError, match='config.kernels.kl_teacher'):
    masked_probs_mean(q, k, idx, lse, 1.0, teacher='mosaic')
  if not _hopper():
    with pytest.raises(ValueError, match="kl_teacher='pallas_mgpu' needs a Hopper GPU"):
      masked_probs_mean(q, k, idx, lse, 1.0, causal=True, teacher='pallas_mgpu')
  with pytest.raises(ValueError, match='block_s=24'):
    gpu.masked_probs_mean(q, k, idx, lse, 1.0, block_s=24)
