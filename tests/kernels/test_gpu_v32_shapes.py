"""Every DSA GPU kernel at DeepSeek-V3.2's widths on a real GPU (skipped elsewhere), against the
XLA references on the same bf16 values.

Interpret mode (the rest of tests/kernels) checks the math at small shapes but knows no shared
memory limit and no Triton compile: the KL teacher passed there for weeks while it could not
compile at 128 heads (docs/benchmarks.md, eleventh measurement). Here each kernel runs at the
head counts and widths that size its blocks (indexer 64 heads x 128, MLA 128 heads x 576 with
512-wide values), with T and K small enough that the references stay cheap, but with several
blocks of each. `JAX_PLATFORMS=cuda python -m pytest -q tests/kernels/test_gpu_v32_shapes.py`.

Tolerances: bf16 inputs (the sparse MLA oracle runs in fp32 on the same values), fp32
accumulation on both sides; values within 1e-2 x max|reference|
(2e-2 for gradients: the kernels round dL/dlogits to bf16 before their second matmul). Top-k is
checked as a property (every selected key scores at least every unselected allowed key, up to
1e-3 x the row's largest score) because the kernels' scores and XLA's differ in rounding.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from helpers import packed_words, random_topk_indices
from v4jax.kernels.indexer import gpu as ix_gpu
from v4jax.kernels.indexer import reference as ix_ref
from v4jax.kernels.sparse_attention import gpu as sa_gpu
from v4jax.kernels.sparse_attention import reference as sa_ref

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu',
                                reason='compiles the Triton kernels for a real GPU')

HI, DI = 64, 128                    # indexer heads x width
H, C, V = 128, 576, 512             # MLA heads, latent width (512 + 64 rope), value width
bf16 = jnp.bfloat16


def _close(got, want, rel):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
  assert err <= rel * scale, (err, scale)


def _indexer_inputs(T, seed):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (1, T, HI, DI), bf16)
  k = jax.random.normal(ks[1], (1, T, DI), bf16)
  w = jax.random.normal(ks[2], (1, T, HI), jnp.float32) * HI ** -0.5
  return q, k, w


@pytest.mark.parametrize('radix_bits', [1, 2])
def test_indexer_topk_selects_the_largest_scores(radix_bits):
  T, K = 2560, 2048                 # rows past K: the early stop; rows before it: all keys
  q, k, w = _indexer_inputs(T, 0)
  idx, val, words = jax.jit(lambda q, k, w: ix_gpu.indexer_topk(
      q, k, w, K, return_scores=True, return_words=True, radix_bits=radix_bits))(q, k, w)
  full = np.asarray(ix_ref.indexer_scores(q, k, w))[0]                      # [T, S], -inf masked
  idx, val = np.asarray(idx)[0], np.asarray(val)[0]
  # the set as bit words (the masked attention's input)
  np.testing.assert_array_equal(np.asarray(words)[0], packed_words(idx[None], T)[0])
  for t in (0, 1, 700, K - 1, K, K + 1, 2300, T - 1):
    allowed = t + 1
    sel = idx[t][idx[t] >= 0]
    assert len(sel) == min(K, allowed) and len(set(sel)) == len(sel) and sel.max() <= t
    rest = np.setdiff1d(np.arange(allowed), sel)
    tol = 1e-3 * np.max(np.abs(full[t, :allowed]))
    if len(rest):
      assert full[t, sel].min() >= full[t, rest].max() - tol, t
    np.testing.assert_allclose(val[t][idx[t] >= 0], full[t, sel], rtol=0, atol=tol)


@pytest.mark.parametrize('dq_form', ['dense', 'gather'])
def test_indexer_student_backward(dq_form):
  T, K = 1024, 512
  q, k, w = _indexer_inputs(T, 1)
  idx = jnp.asarray(random_topk_indices(np.random.RandomState(2), 1, T, T, K))
  r = jax.random.normal(jax.random.key(3), (1, T, K), jnp.float32)

  def grads(f):
    loss = lambda q, k, w: jnp.sum(jnp.where(idx >= 0, f(q, k, w, idx), 0.0) * r)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, w)
  got = grads(lambda *a: ix_gpu.indexer_scores_at(*a, dq_form=dq_form))
  want = grads(lambda *a: ix_ref.indexer_scores_at(*a))
  for g, h in zip(got, want):
    _close(g, h, 2e-2)


def _mla_inputs(T, K, seed):
  ks = jax.random.split(jax.random.key(seed), 2)
  q = jax.random.normal(ks[0], (1, T, H, C), bf16)
  kv = jax.random.normal(ks[1], (1, T, C), bf16)
  idx = jnp.asarray(random_topk_indices(np.random.RandomState(seed), 1, T, T, K))
  return q, kv, idx


def test_sparse_mla_forward_backward_and_teacher():
  T, K = 768, 512
  q, kv, idx = _mla_inputs(T, K, 4)
  scale = C ** -0.5
  do = jax.random.normal(jax.random.key(5), (1, T, H, V), bf16)

  def run(f, q, kv):
    (o, lse), vjp = jax.vjp(lambda q, kv: f(q, kv, idx, V, scale), q, kv)
    dq, dkv = vjp((do.astype(q.dtype), jnp.zeros_like(lse)))
    return o, lse, dq, dkv
  got = jax.jit(lambda q, kv: run(sa_gpu.sparse_mla, q, kv))(q, kv)
  # the oracle in fp32 on the same bf16 values: a bf16 reference's dkv is itself a bf16
  # scatter-add over up to 128 heads x T tokens per row and drifts far past 2e-2
  f32 = jnp.float32
  with jax.default_matmul_precision('highest'):
    want = jax.jit(lambda q, kv: run(sa_ref.sparse_mla, q, kv))(q.astype(f32), kv.astype(f32))
  _close(got[0], want[0], 1e-2)
  ok = np.isfinite(np.asarray(want[1]))
  np.testing.assert_array_equal(np.isfinite(np.asarray(got[1])), ok)
  _close(np.where(ok, got[1], 0.0), np.where(ok, want[1], 0.0), 1e-3)
  _close(got[2], want[2], 2e-2)
  _close(got[3], want[3], 2e-2)
  # the sparse KL teacher from the kernel's own lse, at its default blocks
  p = jax.jit(lambda *a: sa_gpu.attention_probs_mean(*a, V, scale))(q, kv, idx, got[1])
  p_ref = sa_ref.attention_probs_mean(q, kv, idx, got[1], scale)
  _close(p, p_ref, 1e-3)


def test_masked_teacher():
  """The masked form's KL teacher (MHA q/k of width 128 + 64 per head, dense tiles) at 128
  heads, from a softmax lse over each token's selected keys."""
  T, K, D = 768, 512, 192
  ks = jax.random.split(jax.random.key(6), 2)
  q = jax.random.normal(ks[0], (1, T, H, D), bf16)
  k = jax.random.normal(ks[1], (1, T, H, D), bf16)
  idx = jnp.asarray(random_topk_indices(np.random.RandomState(7), 1, T, T, K))
  scale = D ** -0.5
  logits = scale * jnp.einsum('bthd,bshd->bths', q, k, preferred_element_type=jnp.float32)
  sel = jnp.zeros((1, T, T), bool).at[0, jnp.arange(T)[:, None], jnp.maximum(idx[0], 0)].max(
      idx[0] >= 0)
  lse = jax.nn.logsumexp(jnp.where(sel[:, :, None, :], logits, -jnp.inf), axis=-1)
  p = jax.jit(lambda *a: sa_gpu.masked_probs_mean(*a, scale))(q, k, idx, lse)
  _close(p, sa_ref.masked_probs_mean(q, k, idx, lse, scale), 1e-3)
