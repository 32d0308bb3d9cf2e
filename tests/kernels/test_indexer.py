"""Lightning-indexer Pallas kernels vs the jnp reference and a numpy top-k oracle (interpret mode).

GPU-flavoured (Triton) kernels run under interpret=True, the TPU kernels (scores, top-k, scores
at the selected keys) under pltpu.InterpretParams at tiny shapes. Top-k sets are compared as
sets (the kernels order slots by position, the reference by score); with continuous random inputs
the sets must be identical.
The tie rule (ties to the smaller s, -0.0 == +0.0, -1 past the allowed count) is checked on
integer-valued score slabs against a numpy stable sort.

Tolerances: scores and their gradients (the reference VJP) within 1e-5 x max|reference| (fp32,
summation order only); selected scores equal the reference scores at the selected keys within
the same tolerance; the TPU scores-at-keys kernel and its q, k, w gradients (fp32) within 1e-5 x
max|oracle|, with bf16 inputs within 2e-2 x max|oracle| of the oracle run in fp32 on the same
bf16 values (the kernel rounds dL/d(q.k) to bf16 before its dq / dk matmuls).
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh

from helpers import packed_words
from v4jax.kernels.indexer import (gpu, indexer_scores, indexer_scores_at, indexer_topk, reference,
                                   tpu)
from v4jax.parallel import rules

FAST = {'xla_backend_optimization_level': 0}


def _inputs(B, T, S, H, D, seed):
  rs = np.random.RandomState(seed)
  return (jnp.asarray(rs.randn(B, T, H, D), jnp.float32), jnp.asarray(rs.randn(B, S, D), jnp.float32),
          jnp.asarray(rs.randn(B, T, H), jnp.float32))


def _segments(B, T, seed):
  rs = np.random.RandomState(seed)
  return jnp.asarray(np.cumsum(rs.rand(B, T) < 0.15, axis=1), jnp.int32)


def _jit(f, *args):
  return jax.jit(f).lower(*args).compile(FAST)(*args)


def _close(a, b, rel=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  assert np.max(np.abs(a - b)) <= rel * np.max(np.abs(b)), np.max(np.abs(a - b))


def _same_sets(idx, ref):
  np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(ref), -1))


def _selected_scores(q, k, w, idx):
  full = np.asarray(reference.indexer_scores(q, k, w))
  i = np.asarray(idx)
  return np.where(i >= 0, np.take_along_axis(full, np.maximum(i, 0), -1), -np.inf)


def _score_and_grads(f, q, k, w):
  r = jnp.asarray(np.random.RandomState(9).randn(q.shape[0], q.shape[1], k.shape[1]), jnp.float32)
  return _jit(lambda q, k, w: (f(q, k, w),) + jax.grad(lambda *a: jnp.sum(f(*a) * r),
                                                       argnums=(0, 1, 2))(q, k, w), q, k, w)


def test_gpu_scores_and_reference_vjp():
  q, k, w = _inputs(2, 37, 29, 3, 16, seed=0)       # T, S not multiples of the 16 blocks
  got = _score_and_grads(lambda *a: gpu.indexer_scores(*a, block_t=16, block_s=16, interpret=True),
                         q, k, w)
  want = _score_and_grads(reference.indexer_scores, q, k, w)
  for a, b in zip(got, want):
    _close(a, b)


# B, T, H, D, K, segments: a slab budget of 24 rows (several query chunks, the last one ragged),
# chunk 16 (several key chunks per row), K > #allowed for early rows, K > T.
@pytest.mark.parametrize('B,T,H,D,K,seg,bits', [(2, 37, 3, 16, 8, True, 1),
                                                 (1, 20, 2, 16, 32, False, 1),
                                                 (1, 30, 2, 16, 8, True, 4)])
def test_gpu_topk_matches_reference(B, T, H, D, K, seg, bits):
  q, k, w = _inputs(B, T, T, H, D, seed=T)
  segs = _segments(B, T, seed=1) if seg else None
  f = lambda q, k, w, s: gpu.indexer_topk(q, k, w, K, s, return_scores=True, block_t=16,
                                          block_s=16, chunk=16, slab_bytes=4 * B * 48 * 24,
                                          radix_bits=bits, interpret=True)
  idx, val = _jit(f, q, k, w, segs)
  ref = reference.indexer_topk(q, k, w, K, segs)
  assert idx.dtype == jnp.int32 and idx.shape == (B, T, K)
  _same_sets(idx, ref)
  sel = _selected_scores(q, k, w, idx)
  np.testing.assert_array_equal(np.isfinite(val), np.asarray(idx) >= 0)
  fin = np.isfinite(sel)
  _close(np.where(fin, val, 0.0), np.where(fin, sel, 0.0))


# S = 70 keys (3 words, the last partial); a slab budget of 16 rows, so the first slabs' words
# end before the last key; K > #allowed for early rows; the second case K > T.
@pytest.mark.parametrize('B,T,H,D,K,seg', [(2, 70, 3, 16, 8, True), (1, 45, 2, 16, 64, False)])
def test_gpu_topk_bit_words_hold_the_selected_set(B, T, H, D, K, seg):
  q, k, w = _inputs(B, T, T, H, D, seed=T + 1)
  segs = _segments(B, T, seed=2) if seg else None
  f = lambda q, k, w, s: gpu.indexer_topk(q, k, w, K, s, return_scores=True, return_words=True,
                                          block_t=16, block_s=16, chunk=32,
                                          slab_bytes=4 * B * 96 * 16, interpret=True)
  idx, val, words = _jit(f, q, k, w, segs)
  _same_sets(idx, reference.indexer_topk(q, k, w, K, segs))
  assert words.dtype == jnp.uint32 and words.shape == (B, T, -(-T // 32))
  np.testing.assert_array_equal(words, packed_words(idx, T))
  idx_only, words_only = _jit(lambda *a: gpu.indexer_topk(
      *a[:3], K, a[3], return_words=True, chunk=32, interpret=True), q, k, w, segs)
  _same_sets(idx_only, idx)
  np.testing.assert_array_equal(words_only, words)
  with pytest.raises(ValueError, match='chunk=16 must be >= 32'):
    gpu.indexer_topk(q, k, w, K, return_words=True, chunk=16, interpret=True)


@pytest.mark.parametrize('impl', ['reference', 'pallas'])
def test_topk_seam_returns_bit_words(impl):
  """Both impls: (idx, scores, words) and (idx, words), the words holding idx's set."""
  q, k, w = _inputs(1, 40, 40, 2, 16, seed=3)
  idx, scores, words = indexer_topk(q, k, w, 6, return_scores=True, return_words=True, impl=impl)
  assert (scores is None) == (impl == 'reference')
  np.testing.assert_array_equal(words, packed_words(idx, 40))
  idx2, words2 = indexer_topk(q, k, w, 6, return_words=True, impl=impl)
  np.testing.assert_array_equal(idx2, idx)
  np.testing.assert_array_equal(words2, words)


def _topk_oracle(slab, K, t0):
  """Stable sort by (-score, position) over allowed (finite) keys; -0.0 counts as +0.0."""
  B, R, _ = slab.shape
  out = np.full((B, R, K), -1, np.int32)
  for b in range(B):
    for r in range(R):
      row = slab[b, r, :t0 + r + 1] + 0.0
      ok = np.flatnonzero(np.isfinite(row))
      order = ok[np.argsort(-row[ok], kind='stable')][:K]
      out[b, r, :len(order)] = np.sort(order)
  return out


@pytest.mark.parametrize('radix_bits', [1, 3, 4])
def test_gpu_topk_ties_toward_smaller_position(radix_bits):
  """Exact k-th key search with 1 bit per sweep or several (3 leaves a narrower last digit)."""
  rs = np.random.RandomState(4)
  B, R, S, K, t0 = 2, 9, 64, 12, 23
  slab = rs.randint(-3, 3, (B, R, S)).astype(np.float32)
  slab[slab == 0] = np.where(rs.rand(int((slab == 0).sum())) < 0.5, -0.0, 0.0)
  slab[0, 2, 5:20] = -np.inf                                    # another segment's keys
  pos = np.arange(S)[None, None, :]
  slab = np.where(pos <= t0 + np.arange(R)[None, :, None], slab, -np.inf)
  idx, val = _jit(lambda s: gpu._topk_slab(s, K, t0=t0, ch=16, interpret=True,
                                           radix_bits=radix_bits), jnp.asarray(slab))
  np.testing.assert_array_equal(idx, _topk_oracle(slab, K, t0))   # both position-ordered
  np.testing.assert_array_equal(np.asarray(val), np.where(
      np.asarray(idx) >= 0, np.take_along_axis(slab, np.maximum(np.asarray(idx), 0), -1), -np.inf))


@pytest.mark.parametrize('radix_bits', [1, 2, 3])
def test_gpu_topk_distinct_scores_stop_early(radix_bits):
  """Distinct scores (normal draws, some rows all of one sign, a row with fewer allowed keys than
  K and one with exactly K): the search stops once the keys above its threshold number exactly
  k, and the selection and scores still equal the stable-sort oracle's."""
  rs = np.random.RandomState(7 + radix_bits)
  B, R, S, K, t0 = 2, 11, 96, 10, 6
  slab = rs.randn(B, R, S).astype(np.float32) * rs.choice([1e-3, 1.0, 50.0], (B, R, 1))
  slab[1, 3] = np.abs(slab[1, 3])                               # one sign only
  slab[0, 4] = -np.abs(slab[0, 4])
  pos = np.arange(S)[None, None, :]
  slab = np.where(pos <= t0 + np.arange(R)[None, :, None], slab, -np.inf)
  slab[0, 5, 4:] = -np.inf                                      # 4 allowed keys < K
  slab[1, 6, 10:] = -np.inf                                     # exactly K allowed keys
  slab = slab.astype(np.float32)
  idx, val = _jit(lambda s: gpu._topk_slab(s, K, t0=t0, ch=16, interpret=True,
                                           radix_bits=radix_bits), jnp.asarray(slab))
  np.testing.assert_array_equal(idx, _topk_oracle(slab, K, t0))
  np.testing.assert_array_equal(np.asarray(val), np.where(
      np.asarray(idx) >= 0, np.take_along_axis(slab, np.maximum(np.asarray(idx), 0), -1), -np.inf))


def test_tpu_scores_and_topk_interpret():
  B, T, H, D, K = 1, 12, 2, 8, 16                               # K > T: -1 tails on every row
  q, k, w = _inputs(B, T, T, H, D, seed=2)
  segs = _segments(B, T, seed=2)
  s = _jit(lambda *a: tpu.indexer_scores(*a, block_t=8), q, k, w)
  _close(s, reference.indexer_scores(q, k, w))
  idx, val = _jit(lambda *a: tpu.indexer_topk(*a, K, segs, return_scores=True, block_t=8), q, k, w)
  _same_sets(idx, reference.indexer_topk(q, k, w, K, segs))
  np.testing.assert_array_equal(np.isfinite(val), np.asarray(idx) >= 0)


def test_dispatch_pallas_on_cpu_and_errors():
  q, k, w = _inputs(1, 10, 10, 2, 16, seed=3)
  _same_sets(_jit(lambda *a: indexer_topk(*a, 4, impl='pallas'), q, k, w),
             indexer_topk(q, k, w, 4, impl='reference'))
  _close(_jit(lambda *a: indexer_scores(*a, impl='pallas'), q, k, w),
         indexer_scores(q, k, w, impl='reference'))
  # Top-k passes no gradient, and autodiff around it must not reach into the kernels.
  g = _jit(jax.grad(lambda q: jnp.sum(jnp.take_along_axis(
      indexer_scores(q, k, w, impl='reference'),
      jnp.maximum(indexer_topk(q, k, w, 4, impl='pallas'), 0), -1))), q)
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
  with pytest.raises(ValueError, match='config.kernels.impl'):
    indexer_topk(q, k, w, 4, impl='cuda')
  idx, none = indexer_topk(q, k, w, 4, return_scores=True, impl='reference')   # oracle recomputes
  assert none is None
  with pytest.raises(ValueError, match='scores_BTK'):
    indexer_scores_at(q, k, w, idx, scores_BTK=jnp.zeros((1, 10, 3)), impl='pallas')
  with pytest.raises(ValueError, match='chunk=24'):
    gpu.indexer_topk(q, k, w, 4, chunk=24)
  with pytest.raises(ValueError, match='block_s=64'):
    tpu.indexer_topk(q, k, w, 4, block_s=64)
  with pytest.raises(ValueError, match="dq_form='tiles'"):
    gpu.indexer_scores_at(q, k, w, idx, dq_form='tiles')


def test_gpu_scores_at_selected_keys_values_and_grads():
  """The sparse-KL student I[t, idx] and its q, k, w gradients vs gathered jnp."""
  B, T, H, D, K = 2, 7, 3, 24, 16                               # D padded to 32, K > allowed
  q, k, w = _inputs(B, T, T, H, D, seed=5)
  idx = reference.indexer_topk(q, k, w, K)
  idx = idx.at[:, 4, 1].set(-1)                                 # a hole mid-row

  def oracle(q, k, w):
    kg = jax.vmap(lambda k, i: k[jnp.maximum(i, 0)])(k, idx)
    s = jnp.einsum('bthk,bth->btk', jax.nn.relu(jnp.einsum('bthd,btkd->bthk', q, kg)), w)
    return jnp.where(idx >= 0, s, -jnp.inf)

  r = jnp.asarray(np.random.RandomState(6).randn(B, T, K), jnp.float32)
  run = lambda f: _jit(lambda q, k, w: (f(q, k, w),) + jax.grad(
      lambda *a: jnp.sum(jnp.where(idx >= 0, f(*a), 0.0) * r), argnums=(0, 1, 2))(q, k, w), q, k, w)
  got = run(lambda *a: gpu.indexer_scores_at(*a, idx, interpret=True))
  want = run(oracle)
  np.testing.assert_array_equal(np.isfinite(got[0]), np.asarray(idx) >= 0)
  _close(np.where(np.isfinite(want[0]), got[0], 0.0), np.where(np.isfinite(want[0]), want[0], 0.0))
  for a, b in zip(got[1:], want[1:]):
    _close(a, b)


@pytest.mark.parametrize('impl,mesh_shape', [('reference', None), ('pallas', (2, 1, 1, 4))])
def test_scores_at_seam_values_and_grads(impl, mesh_shape):
  """indexer_scores_at seam vs a gathered numpy/jnp oracle: the reference in query blocks of 4
  (T=7 not a multiple), the GPU kernel (interpret) per device over a batch-sharded mesh; -1 slots
  (early rows, a hole, an empty row); values and q, k, w grads within 1e-5 x max|oracle|."""
  B, T, H, D, K = 2, 7, 3, 16, 8
  q, k, w = _inputs(B, T, T, H, D, seed=21)
  rs = np.random.RandomState(22)
  idx = np.full((B, T, K), -1, np.int32)
  for b in range(B):
    for t in range(T):
      n = min(K, t + 1)
      idx[b, t, :n] = rs.permutation(t + 1)[:n]
      idx[b, t] = rs.permutation(idx[b, t])
  idx[0, 5, 2], idx[1, 3] = -1, -1
  idx = jnp.asarray(idx)
  r = jnp.asarray(rs.randn(B, T, K), jnp.float32)

  def oracle(q, k, w):
    kg = jnp.take_along_axis(k[:, None], jnp.maximum(idx, 0)[..., None], axis=2)   # [B,T,K,D]
    return jnp.einsum('bthk,bth->btk', jax.nn.relu(jnp.einsum('bthd,btkd->bthk', q, kg)), w)

  def run(f):
    loss = lambda *a: jnp.sum(jnp.where(idx >= 0, f(*a), 0.0) * r)
    return _jit(lambda q, k, w: (f(q, k, w),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, w),
                q, k, w)
  seam = lambda q, k, w: indexer_scores_at(q, k, w, idx, query_block=4, impl=impl)
  if mesh_shape is None:
    got = run(seam)
  else:
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape),
                ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
    with rules.activate(mesh, 'fsdp_tp'), jax.set_mesh(mesh):
      got = run(seam)
  want = run(oracle)
  _check_scores_at(got, want, idx)


def _check_scores_at(got, want, idx):
  """(scores, dq, dk, dw) against the oracle's: -inf exactly at -1 slots, the rest within _close."""
  ok = np.asarray(idx) >= 0
  np.testing.assert_array_equal(np.isfinite(got[0]), ok)
  _close(np.where(ok, got[0], 0.0), np.where(ok, want[0], 0.0))
  for a, b in zip(got[1:], want[1:]):
    _close(a, b)


def _distinct_idx(B, T, S, K, rs, holes=()):
  """int32 [B,T,K]: distinct allowed keys (s <= t + S - T) per token in random order, -1 past
  the allowed count, plus -1 at the (b, t, slot) holes (slot None: the whole row)."""
  idx = np.full((B, T, K), -1, np.int32)
  for b in range(B):
    for t in range(T):
      n = min(K, t + S - T + 1)
      idx[b, t, :n] = rs.permutation(t + S - T + 1)[:n]
      idx[b, t] = rs.permutation(idx[b, t])
  for b, t, slot in holes:
    idx[b, t, slice(None) if slot is None else slot] = -1
  return jnp.asarray(idx)


@pytest.mark.parametrize('sort_slots', [False, True])
def test_reference_scores_at_custom_vjp(sort_slots):
  """The reference's custom VJP (dk by a scatter-add over slots, sorted by key row or not) vs
  autodiff of a gathered jnp oracle: B=2 (rows offset per batch), query blocks of 3 (T=7 not a
  multiple), -1 slots; values and q, k, w grads within 1e-5 x max|oracle| (fp32)."""
  B, T, S, H, D, K = 2, 7, 9, 3, 16, 8
  rs = np.random.RandomState(31)
  q, k, w = _inputs(B, T, S, H, D, seed=32)
  idx = _distinct_idx(B, T, S, K, rs, holes=[(1, 4, 2), (0, 0, None)])
  r = jnp.asarray(rs.randn(B, T, K), jnp.float32)

  def oracle(q, k, w):
    kg = jnp.take_along_axis(k[:, None], jnp.maximum(idx, 0)[..., None], axis=2)
    return jnp.einsum('bthk,bth->btk', jax.nn.relu(jnp.einsum('bthd,btkd->bthk', q, kg)), w)

  def run(f):
    loss = lambda *a: jnp.sum(jnp.where(idx >= 0, f(*a), 0.0) * r)
    return _jit(lambda q, k, w: (f(q, k, w),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, w),
                q, k, w)
  got = run(lambda q, k, w: reference.indexer_scores_at(q, k, w, idx, query_block=3,
                                                        sort_slots=sort_slots))
  want = run(oracle)
  _check_scores_at(got, want, idx)


def _scores_at_and_grads(f, idx, r, q, k, w):
  """(I at idx, dL/dq, dL/dk, dL/dw) of L = Σ r·I over the non-empty slots, jitted; f=None is the
  gathered jnp oracle."""
  if f is None:
    def f(q, k, w):
      kg = jnp.take_along_axis(k[:, None], jnp.maximum(idx, 0)[..., None], axis=2)   # [B,T,K,D]
      return jnp.einsum('bthk,bth->btk', jax.nn.relu(jnp.einsum('bthd,btkd->bthk', q, kg)), w)
  loss = lambda *a: jnp.sum(jnp.where(idx >= 0, f(*a), 0.0) * r)
  return _jit(lambda q, k, w: (f(q, k, w),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, w), q, k, w)


# B, T, S, H, D, K, block_k, dtype: K above the allowed count of early rows and not a multiple of
# block_k (two chunks, double-buffered DMAs), S > T, a hole mid-row and a token with no key.
@pytest.mark.parametrize('B,T,S,H,D,K,bk,dtype', [(1, 5, 9, 3, 16, 12, 8, jnp.float32),
                                                  (2, 3, 4, 2, 8, 6, None, jnp.bfloat16)])
def test_tpu_scores_at_selected_keys_interpret(B, T, S, H, D, K, bk, dtype):
  """The TPU sparse-KL student and its q, k, w gradients vs a gathered jnp oracle."""
  rs = np.random.RandomState(T * K)
  q, k, w = _inputs(B, T, S, H, D, seed=T + K)
  q, k = q.astype(dtype), k.astype(dtype)
  idx = _distinct_idx(B, T, S, K, rs, holes=[(0, 2, 1), (B - 1, 1, None)])
  r = jnp.asarray(rs.randn(B, T, K), jnp.float32)

  got = _scores_at_and_grads(lambda q, k, w: tpu.indexer_scores_at(q, k, w, idx, block_k=bk),
                             idx, r, q, k, w)
  want = _scores_at_and_grads(None, idx, r, q.astype(jnp.float32), k.astype(jnp.float32), w)
  ok = np.asarray(idx) >= 0
  np.testing.assert_array_equal(np.isfinite(got[0]), ok)
  assert [a.dtype for a in got[1:]] == [dtype, dtype, jnp.float32]
  rel = 1e-5 if dtype == jnp.float32 else 2e-2
  _close(np.where(ok, got[0], 0.0), np.where(ok, want[0], 0.0), rel)
  for a, b in zip(got[1:], want[1:]):
    _close(np.asarray(a, np.float32), b, rel)


# B, T, S, H, D, K, (block_t, block_s, block_h), dtype, causal: T and S not multiples of the
# blocks and S != T; causal keys with K above the allowed count of early rows (-1 tails); random
# keys anywhere in [0, S) (live G tiles above the diagonal, some tiles empty), 0..K per token;
# dk head groups of 2 over 3 heads (a padded head), the default grouping, one group (dk written
# by the kernel in bf16).
@pytest.mark.parametrize('B,T,S,H,D,K,blocks,dtype,causal', [
    (1, 37, 45, 3, 24, 48, (16, 16, 2), jnp.float32, True),
    (2, 20, 40, 4, 16, 12, (16, 32, None), jnp.float32, False),
    (1, 50, 96, 2, 32, 24, (32, 16, 2), jnp.bfloat16, False)])
@pytest.mark.parametrize('dq_form', ['dense', 'gather'])
def test_gpu_scores_at_backward(B, T, S, H, D, K, blocks, dtype, causal, dq_form):
  """The GPU backward (dL/dI scattered into G [B,T,S], dk from tile kernels skipping all-zero G
  tiles; dq/dw from tile kernels too, or per token from its gathered keys with
  dq_form='gather') vs autodiff of a gathered jnp oracle run in fp32 on the same values: fp32
  within 1e-5 x max|oracle|, bf16 within 1e-2 x max|oracle| (the kernels round dL/d(q.k) to
  bf16 before the dq / dk matmuls); dq, dk come back in the input dtype, dw in fp32."""
  rs = np.random.RandomState(T * S + K)
  q, k, w = _inputs(B, T, S, H, D, seed=T + S)
  q, k = q.astype(dtype), k.astype(dtype)
  if causal:
    idx = _distinct_idx(B, T, S, K, rs, holes=[(0, T // 2, 1), (B - 1, 3, None)])
  else:
    idx = np.full((B, T, K), -1, np.int32)
    for b in range(B):
      for t in range(T):
        n = rs.randint(K + 1)
        idx[b, t, :n] = rs.choice(S, n, replace=False)
        idx[b, t] = rs.permutation(idx[b, t])
    idx = jnp.asarray(idx)
  r = jnp.asarray(rs.randn(B, T, K), jnp.float32)

  bt, bs, bh = blocks
  got = _scores_at_and_grads(lambda q, k, w: gpu.indexer_scores_at(
      q, k, w, idx, block_t=bt, block_s=bs, block_h=bh, dq_form=dq_form, interpret=True),
      idx, r, q, k, w)
  want = _scores_at_and_grads(None, idx, r, q.astype(jnp.float32), k.astype(jnp.float32), w)
  assert [a.dtype for a in got[1:]] == [dtype, dtype, jnp.float32]
  rel = 1e-5 if dtype == jnp.float32 else 1e-2
  ok = np.asarray(idx) >= 0
  np.testing.assert_array_equal(np.isfinite(got[0]), ok)
  _close(np.where(ok, got[0], 0.0), np.where(ok, want[0], 0.0), rel)
  for a, b in zip(got[1:], want[1:]):
    _close(np.asarray(a, np.float32), b, rel)


def test_gpu_live_blocks_lists():
  """The backward's live-tile lists vs a numpy oracle on a G with empty tiles, a tile holding
  one tiny normal value, one holding a NaN, one of -0.0 and one of subnormals only (the last two
  empty): per query block its live key blocks ascending then the rest, and the counts; the same
  per key block."""
  rs = np.random.RandomState(7)
  B, nt, ns, bt, bs = 2, 3, 5, 4, 8
  G = np.where(rs.rand(B, nt * bt, ns * bs) < 0.02, rs.randn(B, nt * bt, ns * bs), 0.0)
  G = G.astype(np.float32)
  tile = lambda b, i, j: (b, slice(i * bt, (i + 1) * bt), slice(j * bs, (j + 1) * bs))
  for (b, i, j), v in (((0, 0, 1), np.finfo(np.float32).tiny), ((0, 2, 4), np.nan),
                       ((1, 1, 0), -0.0), ((1, 2, 2), np.finfo(np.float32).smallest_subnormal)):
    G[tile(b, i, j)] = 0.0
    G[tile(b, i, j)][1, 2] = v
  want = np.zeros((B, nt, ns), bool)
  for b, i, j in np.ndindex(B, nt, ns):
    t = G[tile(b, i, j)]
    want[b, i, j] = np.any(np.isnan(t) | (np.abs(t) >= np.finfo(np.float32).tiny))
  assert want[0, 0, 1] and want[0, 2, 4] and not want[1, 1, 0] and not want[1, 2, 2]
  assert 0 < want.sum() < want.size
  (kb, kn), (qb, qn) = gpu._live_blocks(jnp.asarray(G), bt, bs)
  for lists, n, live in ((kb, kn, want), (qb, qn, np.swapaxes(want, 1, 2))):
    np.testing.assert_array_equal(np.asarray(n)[..., 0], live.sum(-1))
    for idx in np.ndindex(live.shape[:2]):
      order = np.concatenate([np.flatnonzero(live[idx]), np.flatnonzero(~live[idx])])
      np.testing.assert_array_equal(np.asarray(lists)[idx], order)


def test_gpu_scores_at_auto_dq_form():
  """dq_form='auto' picks 'dense' at the shapes where the H200 timed it faster (T = S = 4K,
  K = 1K) and 'gather' where that was (16K and 32K tokens, K = 2K), and runs exactly the form it
  picks: the gradients are bit-identical to that form's."""
  assert gpu.resolve_dq_form(4096, 4096, 1024) == 'dense'
  assert gpu.resolve_dq_form(16384, 16384, 2048) == 'gather'
  assert gpu.resolve_dq_form(32768, 32768, 2048) == 'gather'
  assert gpu.resolve_dq_form(64, 8192, 2048) == 'gather'          # a late query chunk: S - T keys
  B, H, D = 1, 2, 16
  for T, K, form in ((40, 16, 'dense'), (40, 4, 'gather')):     # live/K = 20.5/16, 20.5/4
    assert gpu.resolve_dq_form(T, T, K) == form
    q, k, w = _inputs(B, T, T, H, D, seed=T + K)
    idx = _distinct_idx(B, T, T, K, np.random.RandomState(K), holes=[])
    r = jnp.asarray(np.random.RandomState(K + 1).randn(B, T, K), jnp.float32)
    run = lambda f: _scores_at_and_grads(lambda q, k, w: gpu.indexer_scores_at(
        q, k, w, idx, dq_form=f, interpret=True), idx, r, q, k, w)
    for a, b in zip(run('auto'), run(form)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _oracle64_at(q, k, w, idx):
  """float64 numpy I at idx, -inf at -1 slots."""
  q, k, w = (np.asarray(a, np.float64) for a in (q, k, w))
  i = np.asarray(idx)
  kg = np.take_along_axis(k[:, None], np.maximum(i, 0)[..., None], axis=2)        # [B,T,K,D]
  s = np.einsum('bthk,bth->btk', np.maximum(np.einsum('bthd,btkd->bthk', q, kg), 0.0), w)
  return np.where(i >= 0, s, -np.inf)


@pytest.mark.parametrize('backend,B,T,K', [('gpu', 2, 37, 12), ('tpu', 1, 13, 8)])
def test_student_value_from_topk_scores(backend, B, T, K):
  """The model's path: indexer_topk(return_scores=True) then indexer_scores_at(scores_BTK=...).
  The value (no forward kernel) equals the float64 oracle at idx within 1e-5 x max|oracle| with
  -inf exactly at the -1 slots (K above the allowed count of early rows, segments; T not a
  multiple of the 64 / 8 query blocks); the q, k, w gradients equal the recomputing path's (the
  same backward kernels) and the gathered fp32 oracle's. GPU through the seam on a batch-sharded
  mesh (interpret), TPU kernels directly (interpret)."""
  H, D = 3, 16
  q, k, w = _inputs(B, T, T, H, D, seed=41)
  segs = _segments(B, T, seed=42)
  r = jnp.asarray(np.random.RandomState(43).randn(B, T, K), jnp.float32)
  if backend == 'gpu':
    topk = lambda q, k, w: indexer_topk(q, k, w, K, segs, return_scores=True, impl='pallas')
    student = lambda q, k, w, idx, s: indexer_scores_at(q, k, w, idx, scores_BTK=s, impl='pallas')
  else:
    topk = lambda q, k, w: tpu.indexer_topk(q, k, w, K, segs, return_scores=True, block_t=8)
    student = lambda q, k, w, idx, s: tpu.indexer_scores_at(q, k, w, idx, scores_BTK=s)

  def run():
    idx, s = topk(q, k, w)
    got = _scores_at_and_grads(lambda *a: student(*a, idx, s), idx, r, q, k, w)
    return (idx,) + got + _scores_at_and_grads(lambda *a: student(*a, idx, None), idx, r, q, k, w)

  if backend == 'gpu':
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 1, 1, 4),
                ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
    with rules.activate(mesh, 'fsdp_tp'), jax.set_mesh(mesh):
      idx, *out = run()
  else:
    idx, *out = run()
  got, recomputed = out[:4], out[4:]
  ok = np.asarray(idx) >= 0
  assert (~ok).any() and ok.any()
  _same_sets(idx, reference.indexer_topk(q, k, w, K, segs))
  want = _oracle64_at(q, k, w, idx)
  np.testing.assert_array_equal(np.isfinite(got[0]), ok)
  _close(np.where(ok, got[0], 0.0), np.where(ok, want, 0.0))
  for a, b in zip(got[1:], recomputed[1:]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _check_scores_at(got, _scores_at_and_grads(None, idx, r, q, k, w), idx)
