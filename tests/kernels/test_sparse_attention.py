"""Sparse MLA Pallas kernels vs the jnp reference, in Pallas interpret mode on CPU.

GPU-flavoured (Triton) kernels run under interpret=True (forward; backward dkv, dq and
segment-sum kernels, or the atomic dkv variant; one or several token chunks), the TPU (Mosaic)
kernels under pltpu.InterpretParams at tiny shapes (TPU interpret costs ~12 ms per grid step and
~2.6 ms per DMA). Each case checks o, lse and the gradients of q and kv for random cotangents of
o and lse, in one compile (XLA CPU backend at -O0 to keep compile time down).

Tolerances: fp32 inputs, max |kernel - reference| <= 2e-5 x max|reference| (summation order only);
bf16 inputs, <= 3e-2 x max|reference| against the reference run on the same bf16 values in fp32
(the kernels round p and ds to bf16 before their matmuls, as the reference rounds p, and the
GPU backward rounds each slot's head-summed dE row to bf16 before the fp32 segment sum).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh

from helpers import random_topk_indices
from v4jax.kernels.sparse_attention import attention_probs_mean as probs_mean_seam
from v4jax.kernels.sparse_attention import gpu, reference, sparse_mla, tpu
from v4jax.parallel import rules

FAST = {'xla_backend_optimization_level': 0}


@pytest.fixture(autouse=True)
def _full_precision_dots():
  """fp32 dots at full precision on any backend: on a GPU XLA's default lets them run as TF32
  (10-bit mantissa), which the fp32 cases' 2e-5 tolerance rightly rejects."""
  with jax.default_matmul_precision('highest'):
    yield


def _inputs(B, T, S, H, C, K, dtype, seed):
  """q, kv, idx with distinct allowed indices per token (s <= t + S - T) in random order, fewer
  than K where few keys are allowed, and -1 holes in the middle of some rows."""
  rs = np.random.RandomState(seed)
  q = jnp.asarray(rs.randn(B, T, H, C), dtype)
  kv = jnp.asarray(rs.randn(B, S, C), dtype)
  idx = random_topk_indices(rs, B, T, S, K)
  return q, kv, jnp.asarray(idx)


def _run(f, q, kv, idx, v_dim, scale, seed, **kw):
  """(o, lse, dq, dkv) of f(q, kv, idx, v_dim, scale, **kw) for random cotangents; rows whose
  lse is -inf get a zero lse cotangent."""
  B, T, H, _ = q.shape
  rs = np.random.RandomState(seed + 100)
  do = jnp.asarray(rs.randn(B, T, H, v_dim), q.dtype)
  dlse = jnp.asarray(rs.randn(B, T, H), jnp.float32)

  def g(q, kv):
    (o, lse), vjp = jax.vjp(lambda q, kv: f(q, kv, idx, v_dim, scale, **kw), q, kv)
    return (o, lse) + vjp((do, jnp.where(jnp.isfinite(lse), dlse, 0.0)))
  return jax.jit(g).lower(q, kv).compile(FAST)(q, kv)


def _check(got, want, rel):
  names = ('o', 'lse', 'dq', 'dkv')
  for name, a, b in zip(names, got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    fin = np.isfinite(b)
    np.testing.assert_array_equal(np.isfinite(a), fin, err_msg=name)
    err = np.max(np.abs(np.where(fin, a, 0.0) - np.where(fin, b, 0.0)))
    assert err <= rel * np.max(np.abs(b[fin])), (name, err)


# B, T, S, H, C, V, K, block_h, block_k, options: K above the allowed count for early rows and
# not a multiple of block_k; H below / above block_h (two head blocks share dkv rows); V and C - V
# both powers of two (V3 style), or not (padded split); S > T (keys before the first query); dkv
# summed by the sorted segment kernel or by atomics; the backward in one or several token chunks
# (T not a multiple of the chunk).
GPU_CASES = [
    (2, 7, 7, 4, 40, 32, 16, 16, 16, {}),
    (1, 5, 9, 3, 48, 24, 20, 16, 16, dict(reduce='atomic', token_chunk=2)),
    (1, 4, 6, 32, 64, 32, 8, 16, 16, dict(token_chunk=3)),
]


@pytest.mark.parametrize('case', GPU_CASES)
def test_gpu_kernel_matches_reference_fp32(case):
  B, T, S, H, C, V, K, bh, bk, opts = case
  q, kv, idx = _inputs(B, T, S, H, C, K, jnp.float32, seed=sum(case[:9]))
  scale = C ** -0.5
  blocks = gpu.Blocks(block_h=bh, block_k=bk)
  got = _run(gpu.sparse_mla, q, kv, idx, V, scale, 0, fwd=blocks, dkv=blocks, dq=blocks,
             interpret=True, **opts)
  want = _run(reference.sparse_mla, q, kv, idx, V, scale, 0)
  _check(got, want, 2e-5)


def test_gpu_kernel_bf16_and_empty_row():
  B, T, S, H, C, V, K = 1, 4, 6, 16, 64, 48, 16
  q, kv, idx = _inputs(B, T, S, H, C, K, jnp.bfloat16, seed=3)
  idx = idx.at[0, 1].set(-1)                     # a token with no key at all: o = 0, lse = -inf
  scale = C ** -0.5
  got = _run(gpu.sparse_mla, q, kv, idx, V, scale, 1, interpret=True)
  want = _run(reference.sparse_mla, q.astype(jnp.float32), kv.astype(jnp.float32), idx, V, scale,
              1)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
  assert np.all(np.asarray(got[0][0, 1]) == 0) and np.all(np.isneginf(np.asarray(got[1][0, 1])))
  _check(got, want, 3e-2)


def test_tpu_kernel_matches_reference_interpret():
  # block_k=4 < K=8: two chunks per token, so the double-buffered DMA path runs.
  B, T, S, H, C, V, K = 1, 4, 6, 4, 40, 32, 8
  q, kv, idx = _inputs(B, T, S, H, C, K, jnp.float32, seed=5)
  scale = C ** -0.5
  got = _run(tpu.sparse_mla, q, kv, idx, V, scale, 2, block_k=4)
  want = _run(reference.sparse_mla, q, kv, idx, V, scale, 2)
  _check(got, want, 2e-5)


def test_dispatch_pallas_per_device_on_mesh():
  """impl='pallas' on CPU = the GPU kernels in interpret mode, per device over a mesh with
  batch and heads sharded (dkv is summed over the head shards)."""
  B, T, S, H, C, V, K = 2, 5, 5, 8, 40, 32, 8
  q, kv, idx = _inputs(B, T, S, H, C, K, jnp.float32, seed=7)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 1, 4), ('data', 'fsdp', 'expert', 'tensor'),
              axis_types=(AxisType.Auto,) * 4)
  with rules.activate(mesh, 'fsdp_tp'), jax.set_mesh(mesh):
    got = _run(sparse_mla, q, kv, idx, V, 0.2, 3, impl='pallas')
  want = _run(reference.sparse_mla, q, kv, idx, V, 0.2, 3)
  _check(got, want, 2e-5)


def test_bad_arguments_raise():
  q, kv, idx = _inputs(1, 2, 2, 2, 8, 2, jnp.float32, seed=0)
  with pytest.raises(ValueError, match='config.kernels.impl'):
    sparse_mla(q, kv, idx, 4, 1.0, impl='triton')
  with pytest.raises(ValueError, match='block_h=24'):
    gpu.sparse_mla(q, kv, idx, 4, 1.0, dq=gpu.Blocks(block_h=24))
  with pytest.raises(ValueError, match="reduce='scatter'"):
    gpu.sparse_mla(q, kv, idx, 4, 1.0, reduce='scatter')
  with pytest.raises(ValueError, match='block_k=64 must be a multiple of 128'):
    tpu.sparse_mla(q, kv, jnp.zeros((1, 2, 200), jnp.int32), 4, 1.0, block_k=64, interpret=False)


def _np_probs_mean(q, kv, idx, scale):
  """float64 oracle of the sparse-KL teacher: (lse [B,T,H] over the valid slots, -inf where a
  token has none; softmax over the slots averaged over heads [B,T,K], 0 at -1 slots)."""
  kv, safe = np.asarray(kv), np.maximum(np.asarray(idx), 0)
  e_BTKC = np.stack([kv[b][safe[b]] for b in range(kv.shape[0])])
  logits = scale * np.einsum('bthc,btkc->bthk', np.asarray(q, np.float64), e_BTKC)
  ok = np.asarray(idx)[:, :, None] >= 0
  mx = np.max(np.where(ok, logits, 0.0), -1)
  z = np.sum(np.where(ok, np.exp(logits - mx[..., None]), 0.0), -1)
  lse = np.where(z > 0, np.log(np.where(z > 0, z, 1.0)) + mx, -np.inf)
  return lse, np.where(ok, np.exp(logits - lse[..., None]), 0.0).mean(axis=2)


def test_gpu_probs_mean_is_the_sparse_kl_teacher():
  """(1/H) Σ_h softmax over the selected keys, from the kernel's lse, vs a gathered oracle."""
  B, T, S, H, C, V, K = 1, 6, 8, 20, 40, 32, 16                 # H padded to two head blocks
  q, kv, idx = _inputs(B, T, S, H, C, K, jnp.float32, seed=11)
  scale = C ** -0.5
  _, lse = reference.sparse_mla(q, kv, idx, V, scale)
  p = jax.jit(lambda *a: gpu.attention_probs_mean(*a, V, scale, block_h=16, interpret=True)).lower(
      q, kv, idx, lse).compile(FAST)(q, kv, idx, lse)
  e = np.asarray(reference.gather_entries(kv, idx))
  logits = scale * np.einsum('bthc,btkc->bthk', np.asarray(q), e)
  want = np.where(np.asarray(idx)[:, :, None] >= 0, np.exp(logits - np.asarray(lse)[..., None]), 0)
  np.testing.assert_allclose(np.asarray(p), want.mean(axis=2), atol=1e-6)
  np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize('impl,mesh_shape', [('reference', None), ('pallas', (2, 1, 1, 4))])
def test_probs_mean_seam(impl, mesh_shape):
  """attention_probs_mean seam vs a numpy oracle: the reference in query blocks of 4 (T=6 not a
  multiple), the GPU kernel (interpret) per device over a batch x heads mesh; C = 128 + 16 (the
  peer's width, split without padding) and H = 5 (padded to one 16-head block). atol 1e-6."""
  B, T, S, H, C, K = 2, 6, 6, 5, 144, 8
  q, kv, idx = _inputs(B, T, S, H, C, K, jnp.float32, seed=13)
  q = q * 0.2
  scale = 0.3
  idx = idx.at[1, 2].set(-1)                                    # a token with no key at all
  lse, want = _np_probs_mean(q, kv, idx, scale)
  f = lambda *a: probs_mean_seam(*a, scale, query_block=4, impl=impl)
  args = (q, kv, idx, jnp.asarray(lse, jnp.float32))
  if mesh_shape is None:
    p = jax.jit(f).lower(*args).compile(FAST)(*args)
  else:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape),
                ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
    with rules.activate(mesh, 'fsdp_tp'), jax.set_mesh(mesh):
      p = jax.jit(f).lower(*args).compile(FAST)(*args)
  np.testing.assert_allclose(np.asarray(p), want, atol=1e-6)
  assert np.all(np.asarray(p)[1, 2] == 0)


def test_tpu_probs_mean_interpret():
  """The TPU sparse-KL teacher (interpret) vs a numpy oracle: K=12 in two chunks of 8 (K not a
  multiple of the chunk, early rows with fewer allowed keys), -1 holes, a token with no key
  (lse = -inf, p = 0); S > T. atol 1e-6 (fp32, summation order only)."""
  B, T, S, H, C, K = 1, 5, 7, 4, 40, 12
  q, kv, idx = _inputs(B, T, S, H, C, K, jnp.float32, seed=17)
  idx = idx.at[0, 3].set(-1)
  scale = C ** -0.5
  lse, want = _np_probs_mean(q, kv, idx, scale)
  args = (q, kv, idx, jnp.asarray(lse, jnp.float32))
  p = jax.jit(lambda *a: tpu.attention_probs_mean(*a, scale, block_k=8)).lower(*args).compile(
      FAST)(*args)
  np.testing.assert_allclose(np.asarray(p), want, atol=1e-6)
  assert np.all(np.asarray(p)[0, 3] == 0)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='shared memory is checked only by a '
                    'real GPU compile (interpret mode has no limit)')
def test_gpu_probs_mean_fits_at_v32_shapes():
  """The KL teacher at DeepSeek-V3.2's attention shapes (H=128, C=576, K=2048) with its default
  blocks compiles within the GPU's shared memory (64-head blocks asked for 258-295 KiB of the
  H200's 227 KiB) and equals the gathered oracle; a few tokens suffice, the blocks do not
  depend on T."""
  B, T, S, H, C, V, K = 1, 8, 2304, 128, 576, 512, 2048
  q, kv, idx = _inputs(B, T, S, H, C, K, jnp.bfloat16, seed=12)
  scale = C ** -0.5
  _, lse = reference.sparse_mla(q, kv, idx, V, scale)
  p = jax.jit(lambda *a: gpu.attention_probs_mean(*a, V, scale))(q, kv, idx, lse)
  _, want = _np_probs_mean(np.asarray(q, np.float32), np.asarray(kv, np.float32), idx, scale)
  np.testing.assert_allclose(np.asarray(p), want, rtol=2e-3, atol=1e-7)   # fp32 sums of exact
  np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, atol=1e-3)        # bf16 products
