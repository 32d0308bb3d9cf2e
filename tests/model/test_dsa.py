"""DSA (SPEC §3): indexer scores, top-k, sparse attention, KL losses, gradient isolation.

Oracles are in tests/model/attn_oracle.py (written from the SPEC, float64 numpy; fp32 jnp for
gradients). Tolerances: values rtol/atol 1e-5 (fp32 vs float64 at O(1) magnitudes); gradients
rtol 1e-4, atol 1e-5·max|g| (fp32 summation order); KL grads vs the closed form 1e-6.
Tiny dims: D=64, H=4, r_q=r_kv=32, d_n=16, d_r=8, d_v=16, H_I=2, d_I=16, K=4..8, T=32, B=2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_oracle as orc
from test_mla import B, D, DIMS, T, TAU, _assert_grads_close, inputs, j, make_cfg, randomize
from v4jax.kernels.indexer import indexer_scores, indexer_topk
from v4jax.kernels.sparse_attention import attention_probs_mean, sparse_mla
from v4jax.model.dsa import kl_rows, sparse_indexer_kl
from v4jax.model.mla import MLA, dense_attention

TOL = dict(rtol=1e-5, atol=1e-5)
FAST = {'xla_backend_optimization_level': 0}


def _model(stage, topk=6, block=8, min_seq_len=0, seed=0, sparse_attention='gather'):
  c = make_cfg(block, enabled=True, stage=stage, topk=topk, min_seq_len=min_seq_len,
               query_block=block, sparse_attention=sparse_attention)
  m = MLA(c, rngs=nnx.Rngs(seed))
  return m, randomize(m, seed)


@nnx.jit
def _call(m, x, pos, seg, valid):
  return m(x, pos, seg, valid)


def _oracle(P, x, pos, seg, valid, stage, topk):
  """(out, KL sum, indexer scores, selection mask) from the SPEC formulas."""
  allow = orc.allowed(x.shape[1], seg, B)
  _, _, c_q = orc.mla(np, P, x, pos, DIMS, TAU, allow)
  I, _ = orc.indexer_scores(np, P['indexer'], x, c_q, pos, DIMS)
  sel = orc.idx_to_mask(orc.topk(I, topk, allow), x.shape[1]) if stage == 'sparse' else allow
  out, A, _ = orc.mla(np, P, x, pos, DIMS, TAU, sel)
  kl = orc.kl_rows(np, A.mean(axis=2), I, sel)
  return out, np.sum(np.where(valid, kl, 0.0)), I, sel


def test_indexer_scores_and_topk_match_oracle():
  m, P = _model('sparse')
  x, pos, seg = inputs(segments=True)

  @nnx.jit
  def indexer_inputs(m, x, pos):
    return m.indexer(x, m.project(x, pos).c_q_BTR, pos)

  qi, ki, wi = indexer_inputs(m, j(x), j(pos))
  allow = orc.allowed(T, seg, B)
  _, _, c_q = orc.mla(np, P, x, pos, DIMS, TAU, allow)
  want, w = orc.indexer_scores(np, P['indexer'], x, c_q, pos, DIMS)
  assert (w < 0).any() and (w > 0).any()              # head weights take both signs
  np.testing.assert_allclose(np.asarray(indexer_scores(qi, ki, wi)), want, **TOL)
  idx = indexer_topk(qi, ki, wi, 6, j(seg), query_block=8)
  np.testing.assert_array_equal(np.asarray(idx), orc.topk(want, 6, allow))
  ind = m.indexer
  assert ind.wq_b.shape == (32, 2, 16) and ind.wq_b.logical_axes == ('q_lora', 'indexer_heads',
                                                                      'indexer_dim')
  assert ind.wk.shape == (D, 16) and ind.weights_proj.shape == (D, 2)
  assert ind.weights_proj[...].dtype == jnp.float32 and ind.k_norm.bias.shape == (16,)


def _tie_inputs(seed=3):
  """Duplicated keys (exact ties) and query rows whose dots are all < 0 (I = 0 everywhere)."""
  r = np.random.RandomState(seed)
  k = np.abs(r.randn(5, 16))[r.randint(0, 5, size=(B, T))]        # [B,T,16], 5 distinct rows
  q = r.randn(B, T, 2, 16)
  q[:, ::3] = -np.abs(q[:, ::3])                                     # every 3rd row: all dots < 0
  w = r.randn(B, T, 2)
  return j(q), j(k), j(w)


@pytest.mark.parametrize('topk,block', [(4, 0), (8, 8), (8, 12)])
def test_topk_ties_early_rows_and_one_set_per_token(topk, block):
  q, k, w = _tie_inputs()
  I = np.asarray(indexer_scores(q, k, w))
  idx = np.asarray(indexer_topk(q, k, w, topk, query_block=block))
  assert idx.shape == (B, T, topk) and idx.dtype == np.int32
  np.testing.assert_array_equal(idx, orc.topk(I, topk, orc.allowed(T, None, B)))
  assert (I[:, ::3] == 0).all()
  for t in range(topk - 1):                           # early rows: {0..t} then -1
    np.testing.assert_array_equal(np.sort(idx[:, t, :t + 1], axis=-1),
                                  np.tile(np.arange(t + 1), (B, 1)))
    assert (idx[:, t, t + 1:] == -1).all()
  np.testing.assert_array_equal(idx[:, 30], np.tile(np.arange(topk), (B, 1)))   # all-zero row


def test_topk_respects_segments():
  q, k, w = _tie_inputs(4)
  seg = np.sort(np.random.RandomState(0).randint(0, 4, size=(B, T)), axis=1)
  idx = np.asarray(indexer_topk(q, k, w, 5, j(seg), query_block=8))
  allow = orc.allowed(T, seg, B)
  np.testing.assert_array_equal(idx, orc.topk(np.asarray(indexer_scores(q, k, w)), 5, allow))
  for b in range(B):
    for t in range(T):
      sel = idx[b, t][idx[b, t] >= 0]
      assert len(sel) == min(5, allow[b, t].sum()) and allow[b, t, sel].all()


def test_sparse_mla_equals_masked_dense_values_and_grads():
  r = np.random.RandomState(7)
  C, V, K, scale = 40, 32, 6, 0.3
  q, kv = j(r.randn(B, T, 4, C)), j(r.randn(B, T, C))
  idx = orc.topk(r.randn(B, T, T), K, orc.allowed(T, None, B))
  sel = jnp.asarray(orc.idx_to_mask(idx, T))
  ro, rl = j(r.randn(B, T, 4, V)), j(r.randn(B, T, 4))

  def kernel_loss(q, kv):
    o, lse = sparse_mla(q, kv, jnp.asarray(idx, jnp.int32), V, scale, query_block=12)
    return jnp.sum(o * ro) + jnp.sum(lse * rl), (o, lse)

  def oracle_loss(q, kv):
    logits = scale * jnp.einsum('bthc,bsc->bths', q, kv)
    A = orc.masked_softmax(jnp, logits, sel[:, :, None])
    z = jnp.where(sel[:, :, None], logits, -jnp.inf)
    lse = jnp.log(jnp.sum(jnp.exp(z - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    o = jnp.einsum('bths,bsv->bthv', A, kv[..., :V])
    return jnp.sum(o * ro) + jnp.sum(lse * rl), (o, lse)

  (gq, gkv), (o, lse) = jax.jit(jax.grad(kernel_loss, argnums=(0, 1), has_aux=True))(q, kv)
  (wq, wkv), (wo, wl) = jax.jit(jax.grad(oracle_loss, argnums=(0, 1), has_aux=True))(q, kv)
  np.testing.assert_allclose(np.asarray(o), np.asarray(wo), **TOL)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(wl), **TOL)
  _assert_grads_close((gq, gkv), (wq, wkv))


def test_kl_value_and_gradient_is_softmax_minus_p():
  r = np.random.RandomState(8)
  I = r.randn(B, 5, 10) * 2
  support = r.rand(B, 5, 10) < 0.6
  support[..., 0] = True
  p = np.where(support & (r.rand(B, 5, 10) < 0.8), r.rand(B, 5, 10), 0.0)
  p[..., 0] += 0.1
  p = p / p.sum(-1, keepdims=True)
  g = r.randn(B, 5)
  kl = kl_rows(j(I), j(p), jnp.asarray(support))
  np.testing.assert_allclose(np.asarray(kl), orc.kl_rows(np, p, I, support), rtol=1e-5, atol=1e-6)
  dI, dp = jax.grad(lambda I, p: jnp.sum(kl_rows(I, p, jnp.asarray(support)) * g),
                    argnums=(0, 1))(j(I), j(p))
  soft = orc.masked_softmax(np, I, support)
  np.testing.assert_allclose(np.asarray(dI), g[..., None] * np.where(support, soft - p, 0.0),
                             atol=1e-6)
  assert not np.asarray(dp).any()


@pytest.fixture
def library_lse(request, monkeypatch):
  """'library': the attention seam's library branch (the cuDNN path's padding, selection mask and
  fp32 lse, run here by jax.nn's 'xla' implementation); 'reference': the blockwise reference."""
  if request.param == 'library':
    import v4jax.model.mla as mla_mod
    from v4jax.kernels.attention import library

    def via_library(q, k, v, scale, segment_ids_BT=None, *, select_BTK=None, **_):
      return library.causal_attention(q, k, v, scale, segment_ids_BT, select_BTK=select_BTK,
                                      implementation='xla', return_lse=True)
    monkeypatch.setattr(mla_mod, 'causal_attention', via_library)


@pytest.mark.parametrize('stage,mode,library_lse,impl,attn', [
    ('warmup', 'gather', 'reference', 'reference', 'auto'),
    ('warmup', 'gather', 'library', 'reference', 'auto'),
    ('sparse', 'gather', 'reference', 'reference', 'auto'),
    ('sparse', 'masked', 'reference', 'reference', 'auto'),
    ('sparse', 'masked', 'library', 'reference', 'auto'),
    ('sparse', 'masked', 'reference', 'pallas', 'auto'),
    ('sparse', 'masked', 'reference', 'pallas', 'pallas')],
    indirect=['library_lse'])
def test_mla_stage_matches_oracle_and_isolates_gradients(stage, mode, library_lse, impl, attn):
  """Output and KL vs the oracle; main-param grads of an LM-like loss and indexer grads of the
  KL vs jax.grad of the jnp oracle (selection mask and teacher as constants). Isolation: the KL
  gives exactly zero gradient to every main param (wq_a, q_norm, ...) and the LM loss exactly
  zero to every indexer param. Both sparse forms (dsa.sparse_attention: gathered selected
  entries, or all keys under the selection mask) meet the same oracle, and so do the indexer
  kernels (impl 'pallas', GPU kernels in interpret mode: the KL student's value is the top-k
  kernel's own selected scores, its gradient the student's backward kernels), also with the
  Pallas masked attention (attn 'pallas'), which then reads the top-k kernel's bit words."""
  K = 6
  m, P = _model(stage, topk=K, sparse_attention=mode)
  m.impl, m.attention_impl = impl, attn
  x, pos, seg = inputs(segments=True)
  valid = np.random.RandomState(9).rand(B, T) < 0.8
  r = jnp.asarray(np.random.RandomState(5).randn(B, T, D), jnp.float32)
  args = (j(x), j(pos), j(seg), jnp.asarray(valid))

  gdef, state = nnx.split(m)

  def losses(state):              # both losses in one jacrev: one compiled backward
    out, aux = nnx.merge(gdef, state)(*args)
    return (jnp.sum(out * r), aux['indexer_kl']), (out, aux)

  grads = jax.jit(jax.jacrev(losses, has_aux=True))
  (g_lm, g_kl), (out, aux) = grads.lower(state).compile(FAST)(state)
  g_lm, g_kl = nnx.to_pure_dict(g_lm), nnx.to_pure_dict(g_kl)
  want, kl, I, sel = _oracle(P, x, pos, seg, valid, stage, K)
  np.testing.assert_allclose(np.asarray(out), want, **TOL)
  np.testing.assert_allclose(float(aux['indexer_kl']), kl, rtol=1e-4)

  P32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), P)
  _, A, c_q = orc.mla(np, P, x, pos, DIMS, TAU, sel)
  pt, xf, posf = j(A.mean(axis=2)), j(x), jnp.asarray(pos, jnp.float32)

  main = lambda g: {k: v for k, v in g.items() if k != 'indexer'}
  dims = tuple(DIMS.items())
  want_lm, _ = orc.mla_grads(main(P32), xf, posf, sel, r, dims=dims, tau=TAU)
  want_kl = orc.indexer_kl_grads(P32['indexer'], xf, j(c_q), posf, pt, sel, valid, dims=dims)
  _assert_grads_close(main(g_lm), want_lm)
  _assert_grads_close(g_kl['indexer'], want_kl)
  amax = lambda g: [float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(g)]
  assert max(amax(main(g_kl))) == 0 and min(amax(main(g_lm))) > 0
  assert max(amax(g_lm['indexer'])) == 0 and min(amax(g_kl['indexer'])) > 0


def test_masked_form_kl_equals_gather_form():
  """Same params and inputs: the masked form's indexer KL (teacher by masked_probs_mean's dense
  kernel from the MHA-form q/k and the masked attention's lse) equals the gather form's
  (attention_probs_mean's kernel from the absorbed form and sparse MLA's lse), with the GPU
  kernels in Triton interpret mode (the references meet the oracle in the test above). rtol 1e-5
  (fp32, summation order only); outputs too (TOL)."""
  x, pos, seg = inputs(segments=True)
  valid = jnp.asarray(np.random.RandomState(9).rand(B, T) < 0.8)
  got = {}
  args = (j(x), j(pos), j(seg), valid)
  for mode in ('gather', 'masked'):
    m, _ = _model('sparse', sparse_attention=mode)
    m.impl = 'pallas'
    gdef, state = nnx.split(m)
    f = jax.jit(lambda state, *a: nnx.merge(gdef, state)(*a))
    got[mode] = f.lower(state, *args).compile(FAST)(state, *args)
  (o_g, a_g), (o_m, a_m) = got['gather'], got['masked']
  assert float(a_g['indexer_kl']) > 0
  np.testing.assert_allclose(float(a_m['indexer_kl']), float(a_g['indexer_kl']), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(o_m), np.asarray(o_g), **TOL)


@pytest.mark.parametrize('topk,t_len,min_seq_len', [(8, 8, 0), (4, 32, 32)])
def test_short_sequences_stay_dense(topk, t_len, min_seq_len):
  """T <= max(K, min_seq_len): the sparse stage runs dense attention and the dense KL."""
  sparse, _ = _model('sparse', topk=topk, min_seq_len=min_seq_len)
  warm, _ = _model('warmup', topk=topk)
  assert not sparse.uses_sparse(t_len)
  x, pos, _ = inputs()
  x, pos = j(x[:, :t_len]), j(pos[:, :t_len])
  (o1, a1), (o2, a2) = nnx.jit(lambda s, w: (s(x, pos), w(x, pos)))(sparse, warm)
  np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
  np.testing.assert_array_equal(np.asarray(a1['indexer_kl']), np.asarray(a2['indexer_kl']))


def test_sparse_kernel_with_all_keys_selected_equals_dense():
  """With K >= T the top-k selects every allowed key, and sparse == dense (MQA form)."""
  r = np.random.RandomState(11)
  q, kv = j(r.randn(B, 8, 4, 40)), j(r.randn(B, 8, 40))
  qi, ki, wi = j(r.randn(B, 8, 2, 16)), j(r.randn(B, 8, 16)), j(r.randn(B, 8, 2))

  @jax.jit
  def both(q, kv, qi, ki, wi):
    idx = indexer_topk(qi, ki, wi, 8)
    return sparse_mla(q, kv, idx, 32, 0.2), dense_attention(q, kv, kv[..., :32], 0.2)

  (o1, l1), (o2, l2) = both(q, kv, qi, ki, wi)
  np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), **TOL)
  np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), **TOL)


def test_dispatch_rejects_unknown_impl_and_auto_is_reference_on_cpu():
  q, k, w = _tie_inputs()
  with pytest.raises(ValueError, match='kernels.impl'):
    indexer_scores(q, k, w, impl='triton')
  with pytest.raises(ValueError, match='kernels.impl'):
    sparse_mla(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 8)), jnp.zeros((1, 4, 2), jnp.int32), 4,
               1.0, impl='triton')
  np.testing.assert_array_equal(np.asarray(indexer_topk(q, k, w, 4, impl='reference')),
                                np.asarray(indexer_topk(q, k, w, 4, impl='auto')))


def _sparse_kl_inputs(Bn, Tn, J, I, H, C, K, seed):
  """Random indexer/attention inputs and distinct allowed indices per token (s <= t), fewer than K
  on early rows, random -1 holes, and one token with no key at all."""
  r = np.random.RandomState(seed)
  idx = np.full((Bn, Tn, K), -1, np.int32)
  for b in range(Bn):
    for t in range(Tn):
      n = min(K, t + 1)
      idx[b, t, :n] = r.permutation(t + 1)[:n]
      if t % 4 == 2:
        idx[b, t, r.randint(0, n)] = -1
      idx[b, t] = r.permutation(idx[b, t])
  idx[0, Tn // 2] = -1
  qi, ki, wi = r.randn(Bn, Tn, J, I), r.randn(Bn, Tn, I), r.randn(Bn, Tn, J)
  q, kv = r.randn(Bn, Tn, H, C) * 0.5, r.randn(Bn, Tn, C) * 0.5
  valid = r.rand(Bn, Tn) < 0.8
  return qi, ki, wi, q, kv, idx, valid


def _sparse_kl_oracle(qi, ki, wi, q, kv, idx, valid, scale):
  """SPEC §3 sparse KL on dense [B,T,S] tensors with the selection as a mask (plain jnp, fp32):
  (KL sum, grads wrt qi, ki, wi with the teacher held constant), and the sparse lse."""
  S = ki.shape[1]
  sel = jnp.asarray(orc.idx_to_mask(idx, S))
  logits = scale * jnp.einsum('bthc,bsc->bths', q, kv)
  z = jnp.where(sel[:, :, None], logits, -jnp.inf)
  m = jnp.max(jnp.where(sel[:, :, None], logits, -1e30), -1, keepdims=True)
  lse = jnp.log(jnp.sum(jnp.exp(z - m), -1)) + m[..., 0]
  p = jnp.mean(jnp.where(sel[:, :, None], jnp.exp(z - m) / jnp.exp(lse - m[..., 0])[..., None],
                         0.0), axis=2)

  def loss(qi, ki, wi):
    I = jnp.einsum('btjs,btj->bts', jax.nn.relu(jnp.einsum('btji,bsi->btjs', qi, ki)), wi)
    logq = I - jax.nn.logsumexp(jnp.where(sel, I, -jnp.inf), -1, keepdims=True)
    terms = jnp.where(sel & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0)
    kl = jnp.sum(terms, -1)
    return jnp.sum(jnp.where(valid & sel.any(-1), kl, 0.0))
  val, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(qi, ki, wi)
  return val, grads, jnp.where(sel.any(-1)[:, :, None], lse, -jnp.inf)


# impl, B, T, J, I, H, C, K, query_block: the Pallas path (GPU kernels in interpret mode: H below
# the 16-head block, I padded to 32, the peer's C = 128 + 16 split without padding, K not a
# multiple of the slot block) and the reference path with T not a multiple of the query block;
# the student's dq/dw from dense tiles (default) or from each token's gathered keys.
@pytest.mark.parametrize('impl,student_dq,Bn,Tn,J,I,H,C,K,qb', [
    ('pallas', 'dense', 1, 8, 3, 24, 5, 144, 10, 0),
    ('pallas', 'gather', 1, 8, 3, 24, 5, 144, 10, 0),
    ('reference', 'dense', 2, 13, 3, 24, 5, 40, 10, 5),
])
def test_sparse_indexer_kl_values_and_grads_vs_dense_oracle(impl, student_dq, Bn, Tn, J, I, H, C,
                                                            K, qb):
  """sparse_indexer_kl through the kernel seams vs the masked dense oracle; tolerances: value
  rtol 1e-5, grads rtol 1e-4 / atol 1e-5·max|g| (fp32, summation order only)."""
  qi, ki, wi, q, kv, idx, valid = (jnp.asarray(a) if a.dtype == bool or a.dtype == np.int32
                                   else j(a) for a in _sparse_kl_inputs(Bn, Tn, J, I, H, C, K, 0))
  scale = 0.3
  want, want_g, lse = _sparse_kl_oracle(qi, ki, wi, q, kv, idx, valid, scale)
  teacher = lambda: attention_probs_mean(q, kv, idx, lse, scale, query_block=qb, impl=impl)
  f = lambda qi, ki, wi: sparse_indexer_kl(qi, ki, wi, idx, teacher, valid, query_block=qb,
                                           impl=impl, student_dq=student_dq)
  got, got_g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(qi, ki, wi).compile(
      {'xla_backend_optimization_level': 0})(qi, ki, wi)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  _assert_grads_close(tuple(got_g), tuple(want_g))
