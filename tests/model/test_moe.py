"""DeepSeekMoE (SPEC §4) against an independent oracle written from the spec.

Routing oracle: numpy, one token at a time, float64 (stable argsort => ties to the lower index).
Output oracle: plain jnp, every expert on every token, combined with a dense [A,E] gate matrix
that is zero outside the (oracle) selection; gradients by jax.grad of that oracle.
Tiny dims: D=64, N_r=8, N_s=1, K_r=2, d_e=32, G_e=4, M_g=2, rho=2.5, B=2, T=16. All fp32.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import default_config
from v4jax.model.moe import DenseFFN, MoE, RouterBias, route, update_router_bias
from v4jax.parallel.expert import permuted_rows

B, T, D, E, K, F, G, MG, RHO = 2, 16, 64, 8, 2, 32, 4, 2, 2.5
HI = jax.lax.Precision.HIGHEST
TOL = dict(rtol=1e-5, atol=1e-5)   # fp32 end to end; outputs and grads are O(0.1..10)


def _cfg(**moe):
  c = default_config()
  c.model.d_model = D
  c.model.init_std = 0.1   # larger than sigma_0 so scores and outputs are well spread
  c.moe.update(num_experts=E, num_shared=1, top_k=K, d_expert=F, n_groups=G, topk_groups=MG,
               route_scale=RHO, bal_loss_alpha=1e-4)
  c.moe.update(**moe)
  return c


def _model(seed=0, bias_scale=0.1, **moe):
  m = MoE(_cfg(**moe), rngs=nnx.Rngs(seed))
  b = bias_scale * np.random.RandomState(seed + 100).randn(E)
  m.router.bias[...] = jnp.asarray(b, jnp.float32)
  return m


def _x(seed=1):
  return jnp.asarray(np.random.RandomState(seed).randn(B, T, D), jnp.float32)


def _valid():
  v = np.ones((B, T), bool)
  v[1, 11:] = False                    # padding at the end of row 1
  return jnp.asarray(v)


# ----------------------------------------------------------------------------- numpy oracle

def oracle_select(s, b, k=K, groups=G, keep=MG, group_limit=True):
  """Per token: s + b, group limit (sum of top-2 per contiguous group, keep `keep` groups),
  top-k; ties to the lower index via stable sort of the negated scores."""
  sel = []
  for row in np.asarray(s, np.float64):
    sb = row + np.asarray(b, np.float64)
    if group_limit and groups > 1:
      gs = np.sort(sb.reshape(groups, -1), axis=1)[:, ::-1][:, :2].sum(1)
      kept = np.argsort(-gs, kind='stable')[:keep]
      mask = np.repeat(np.isin(np.arange(groups), kept), len(row) // groups)
      sb = np.where(mask, sb, -np.inf)
    sel.append(np.argsort(-sb, kind='stable')[:k])
  return np.array(sel)


def oracle_gates(s, sel, rho=RHO):
  ss = np.take_along_axis(np.asarray(s, np.float64), sel, 1)
  return rho * ss / ss.sum(1, keepdims=True)


def _scores_np(p, x):
  logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(p['router']['kernel'], np.float64)
  return 1.0 / (1.0 + np.exp(-logits))


def oracle_capacity_keep(sel, valid_A, C):
  """Keep mask [A,K]: per expert, the first C valid slots in (token, slot) order."""
  used = np.zeros(E, int)
  keep = np.zeros(sel.shape, bool)
  for a in range(sel.shape[0]):
    for k in range(sel.shape[1]):
      if valid_A[a]:
        e = sel[a, k]
        keep[a, k] = used[e] < C
        used[e] += 1
  return keep


# ----------------------------------------------------------------------------- jnp oracle

def _swiglu(x, wg, wu, wd):
  return jnp.dot(jax.nn.silu(jnp.dot(x, wg, precision=HI)) * jnp.dot(x, wu, precision=HI), wd,
                 precision=HI)


def oracle_forward(p, x_BTD, mask_AE):
  """y = sum_i g_i FFN_i(x) + FFN_shared(x), g from the unbiased sigmoid scores over the fixed
  selection mask_AE (1 = selected); mask_AE may also zero dropped slots after normalising."""
  x = x_BTD.reshape(-1, D)
  s = jax.nn.sigmoid(jnp.dot(x, p['router']['kernel'], precision=HI))
  sel_AE, keep_AE = mask_AE
  g = RHO * s * sel_AE / jnp.sum(s * sel_AE, axis=1, keepdims=True) * keep_AE
  ex = p['experts']
  h = jax.nn.silu(jnp.einsum('ad,edf->aef', x, ex['w_gate'], precision=HI)) * \
      jnp.einsum('ad,edf->aef', x, ex['w_up'], precision=HI)
  y_AED = jnp.einsum('aef,efd->aed', h, ex['w_down'], precision=HI)   # every expert, every token
  y = jnp.einsum('ae,aed->ad', g, y_AED, precision=HI)
  sh = p['shared']
  y = y + _swiglu(x, sh['w_gate'], sh['w_up'], sh['w_down'])
  return y.reshape(x_BTD.shape)


def oracle_bal(s, sel, valid_BT, alpha=1e-4):
  s = np.asarray(s, np.float64).reshape(B, T, E)
  sel = sel.reshape(B, T, K)
  v = np.asarray(valid_BT)
  rows = []
  for b in range(B):
    Tb = v[b].sum()
    if Tb == 0:
      continue
    f = np.zeros(E)
    for t in np.nonzero(v[b])[0]:
      f[sel[b, t]] += 1
    f *= E / (K * Tb)
    P = (s[b][v[b]] / s[b][v[b]].sum(1, keepdims=True)).sum(0) / Tb
    rows.append((f * P).sum())
  return alpha * np.mean(rows)


def _sel_mask(sel):
  m = np.zeros((sel.shape[0], E), np.float32)
  np.put_along_axis(m, sel, 1.0, axis=1)
  return m


def _params(m):
  return nnx.to_pure_dict(nnx.state(m, nnx.Param))


def _apply(m):
  """(Param state, pure function (state, x, valid) -> (y, aux) of the module)."""
  gdef, params, rest = nnx.split(m, nnx.Param, ...)
  return params, lambda st, x, valid=None: nnx.merge(gdef, st, rest)(x, valid)


# ----------------------------------------------------------------------------- tests

def test_route_matches_oracle_with_bias_and_group_limit():
  rs = np.random.RandomState(0)
  logits = rs.randn(64, E).astype(np.float32)
  bias = (0.2 * rs.randn(E)).astype(np.float32)
  s, sel, g = route(jnp.asarray(logits), jnp.asarray(bias), top_k=K, n_groups=G, topk_groups=MG,
                    route_scale=RHO)
  s_np = 1 / (1 + np.exp(-logits.astype(np.float64)))
  want = oracle_select(s_np, bias)
  np.testing.assert_array_equal(np.asarray(sel), want)
  np.testing.assert_allclose(np.asarray(g), oracle_gates(s_np, want), **TOL)
  # gates: normalise then scale -> each token's gates sum to rho
  np.testing.assert_allclose(np.asarray(g).sum(1), RHO, rtol=1e-6)
  # the group limit matters for some tokens, and so does the bias
  assert (oracle_select(s_np, bias, group_limit=False) != want).any()
  assert (oracle_select(s_np, np.zeros(E)) != want).any()


def test_route_ties_go_to_lower_index():
  # Exact ties: experts 0/1 equal (same group), group 3 a copy of group 1 (group-score tie).
  rs = np.random.RandomState(1)
  logits = rs.randn(32, E).astype(np.float32)
  logits[:, 1] = logits[:, 0]
  logits[:, 6:8] = logits[:, 2:4]
  _, sel, _ = route(jnp.asarray(logits), jnp.zeros(E), top_k=K, n_groups=G, topk_groups=MG,
                    route_scale=RHO)
  sel = np.asarray(sel)
  np.testing.assert_array_equal(sel, oracle_select(1 / (1 + np.exp(-logits.astype(np.float64))),
                                                   np.zeros(E)))
  for orig, copy in [(0, 1), (2, 6), (3, 7)]:   # a tied copy is only ever picked after its original
    pos = lambda e: np.where((sel == e).any(1), np.argmax(sel == e, 1), K)
    assert ((pos(copy) == K) | (pos(orig) < pos(copy))).all()
  assert ((sel[:, 0] == 3) & (sel[:, 1] == 7)).any()   # both tied groups kept: 3 then its copy 7
  # all-equal logits: groups 0,1 kept, experts 0,1 chosen
  _, sel, g = route(jnp.zeros((3, E)), jnp.zeros(E), top_k=K, n_groups=G, topk_groups=MG,
                    route_scale=RHO)
  np.testing.assert_array_equal(np.asarray(sel), [[0, 1]] * 3)
  np.testing.assert_allclose(np.asarray(g), RHO / 2, rtol=1e-6)


def test_bias_changes_selection_not_gates():
  rs = np.random.RandomState(2)
  logits = jnp.asarray(rs.randn(128, E), jnp.float32)
  kw = dict(top_k=K, n_groups=G, topk_groups=MG, route_scale=RHO)
  s0, sel0, g0 = route(logits, jnp.zeros(E), **kw)
  bias = jnp.asarray(0.3 * rs.randn(E), jnp.float32)
  s1, sel1, g1 = route(logits, bias, **kw)
  np.testing.assert_array_equal(np.asarray(s0), np.asarray(s1))
  same = np.all(np.asarray(sel0) == np.asarray(sel1), axis=1)
  assert 0 < same.sum() < len(same)          # the bias moved some tokens, not all
  np.testing.assert_array_equal(np.asarray(g0)[same], np.asarray(g1)[same])
  # a huge bias forces expert 5 in, but its gate still comes from the unbiased score
  _, sel2, g2 = route(logits, jnp.zeros(E).at[5].set(10.0), **kw)
  assert (np.asarray(sel2)[:, 0] == 5).all()
  s_np = np.asarray(s0, np.float64)
  np.testing.assert_allclose(np.asarray(g2), oracle_gates(s_np, np.asarray(sel2)), **TOL)
  # and no gradient reaches the bias through the gates
  gb = jax.grad(lambda b: jnp.sum(route(logits, b, **kw)[2] ** 2))(bias)
  np.testing.assert_array_equal(np.asarray(gb), 0.0)


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_output_and_grads_match_dense_oracle(dispatch):
  # capacity_factor = E/K gives C = A: nothing can be dropped.
  m = _model(dispatch=dispatch, capacity_factor=E / K)
  x, valid = _x(), _valid()
  p = _params(m)
  s = _scores_np(p, x)
  sel = oracle_select(s, np.asarray(m.router.bias[...]))
  mask = (jnp.asarray(_sel_mask(sel)), jnp.ones((B * T, E), jnp.float32))
  r = jnp.asarray(np.random.RandomState(3).randn(B, T, D), jnp.float32)
  vmask = valid[:, :, None]   # capacity mode gives padding tokens the shared expert only
  st, f = _apply(m)
  mod = lambda st, x: jnp.sum(jnp.where(vmask, f(st, x, valid)[0], 0.0) * r)
  ora = lambda p, x: jnp.sum(jnp.where(vmask, oracle_forward(p, x, mask), 0.0) * r)

  y, aux = jax.jit(f)(st, x, valid)
  y_or = jax.jit(oracle_forward)(p, x, mask)
  np.testing.assert_allclose(np.asarray(y)[np.asarray(valid)], np.asarray(y_or)[np.asarray(valid)],
                             **TOL)
  if dispatch == 'dropless':
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_or), **TOL)
  assert float(aux['dropped']) == 0.0
  counts = np.bincount(sel[np.asarray(valid).reshape(-1)].reshape(-1), minlength=E)
  np.testing.assert_array_equal(np.asarray(aux['expert_counts']), counts)

  gm = jax.jit(jax.grad(mod, argnums=(0, 1)))(st, x)
  go = jax.jit(jax.grad(ora, argnums=(0, 1)))(p, x)
  np.testing.assert_allclose(np.asarray(gm[1]), np.asarray(go[1]), **TOL)
  for path, a in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(gm[0])):
    b = go[0]
    for k in path:
      b = b[k.key]
    assert np.abs(np.asarray(b)).max() > 0, path
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=str(path), **TOL)


def test_capacity_drops_overflow_slots():
  cf = 0.25
  m = _model(dispatch='capacity', capacity_factor=cf)
  x, valid = _x(4), _valid()
  p = _params(m)
  A = B * T
  C = int(np.ceil(cf * A * K / E))
  sel = oracle_select(_scores_np(p, x), np.asarray(m.router.bias[...]))
  keep = oracle_capacity_keep(sel, np.asarray(valid).reshape(-1), C)
  n_drop = int((np.asarray(valid).reshape(-1)[:, None] & ~keep).sum())
  assert n_drop > 0
  keep_AE = np.zeros((A, E), np.float32)
  np.put_along_axis(keep_AE, sel, keep.astype(np.float32), axis=1)
  mask = (jnp.asarray(_sel_mask(sel)), jnp.asarray(keep_AE))
  y, aux = m(x, valid)
  assert float(aux['dropped']) == n_drop
  v = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(y)[v], np.asarray(oracle_forward(p, x, mask))[v], **TOL)
  # dropless reports no drops and counts every valid slot
  y2, aux2 = _model(dispatch='dropless')(x, valid)
  assert float(aux2['dropped']) == 0.0
  assert float(aux2['expert_counts'].sum()) == K * v.sum()


def test_balance_loss_value_and_f_has_no_gradient():
  m = _model()
  x, valid = _x(5), _valid()
  p = _params(m)
  s = _scores_np(p, x)
  sel = oracle_select(s, np.asarray(m.router.bias[...]))
  st, f = _apply(m)
  bal = f(st, x, valid)[1]['bal_loss']
  np.testing.assert_allclose(float(bal), oracle_bal(s, sel, valid), rtol=1e-5)

  # gradient: f_i is a constant computed from the selection; P_i carries the gradient
  v = np.asarray(valid)
  fc = np.zeros((B, E))
  for b in range(B):
    for t in np.nonzero(v[b])[0]:
      fc[b, sel.reshape(B, T, K)[b, t]] += 1
    fc[b] *= E / (K * v[b].sum())
  fc = jnp.asarray(fc, jnp.float32)

  def ora(p, x):
    ss = jax.nn.sigmoid(jnp.dot(x.reshape(-1, D), p['router']['kernel'],
                                precision=HI)).reshape(B, T, E)
    pn = ss / ss.sum(-1, keepdims=True) * valid[:, :, None]
    P = pn.sum(1) / valid.sum(1)[:, None]
    return 1e-4 * jnp.mean(jnp.sum(fc * P, -1))

  gm = jax.grad(lambda st, x: f(st, x, valid)[1]['bal_loss'], argnums=(0, 1))(st, x)
  gm = (nnx.to_pure_dict(gm[0]), gm[1])
  go = jax.jit(jax.grad(ora, argnums=(0, 1)))(p, x)
  btol = dict(rtol=1e-5, atol=1e-11)   # grads are ~1e-6 (alpha = 1e-4)
  np.testing.assert_allclose(np.asarray(gm[0]['router']['kernel']),
                             np.asarray(go[0]['router']['kernel']), **btol)
  np.testing.assert_allclose(np.asarray(gm[1]), np.asarray(go[1]), **btol)
  assert not np.asarray(gm[0]['experts']['w_gate']).any()


def test_balance_loss_options():
  # a fully padded row is left out of the mean over rows
  m = _model()
  x = _x(6)
  p = _params(m)
  s = _scores_np(p, x)
  valid = np.ones((B, T), bool)
  valid[1] = False
  sel = oracle_select(s, np.asarray(m.router.bias[...]))
  bal = m(x, jnp.asarray(valid))[1]['bal_loss']
  np.testing.assert_allclose(float(bal), oracle_bal(s, sel, valid), rtol=1e-5)
  # bal_indicator='unbiased_topk': f from the plain top-K of the unbiased scores
  m2 = _model(bal_indicator='unbiased_topk')
  sel_u = oracle_select(s, np.zeros(E), group_limit=False)
  bal2 = m2(x)[1]['bal_loss']
  np.testing.assert_allclose(float(bal2), oracle_bal(s, sel_u, np.ones((B, T), bool)), rtol=1e-5)


def test_update_router_bias_rule():
  # K=2, N_tok=12, E=8: cbar = 3; counts equal to cbar leave b unchanged (sign(0) = 0)
  counts = jnp.asarray([3, 5, 1, 3, 0, 6, 2, 4], jnp.float32)
  bias = jnp.asarray(np.random.RandomState(7).randn(E), jnp.float32)
  new = update_router_bias(bias, counts, 2, 12, 1e-3)
  want = np.asarray(bias) + 1e-3 * np.array([0, -1, 1, 0, 1, -1, 1, -1])
  np.testing.assert_allclose(np.asarray(new), want, rtol=0, atol=1e-7)
  assert new.dtype == jnp.float32
  # gamma = 0 is a no-op; jit-able with traced n_tokens and gamma
  np.testing.assert_array_equal(np.asarray(update_router_bias(bias, counts, 2, 12, 0.0)), bias)
  jnew = jax.jit(update_router_bias, static_argnums=2)(bias, counts, 2, jnp.asarray(12.0),
                                                         jnp.asarray(1e-3))
  np.testing.assert_allclose(np.asarray(jnew), want, rtol=0, atol=1e-7)


def test_router_bias_is_not_a_param():
  m = _model()
  assert isinstance(m.router.bias, RouterBias) and not isinstance(m.router.bias, nnx.Param)
  names = {'/'.join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  assert names == {'router/kernel', 'experts/w_gate', 'experts/w_up', 'experts/w_down',
                   'shared/w_gate', 'shared/w_up', 'shared/w_down'}
  assert m.router.kernel[...].dtype == jnp.float32 and m.router.bias[...].dtype == jnp.float32
  assert m.experts.w_gate[...].shape == (E, D, F) and m.experts.w_down[...].shape == (E, F, D)
  assert m.shared.w_gate[...].shape == (D, F)   # N_s * d_e
  assert m.experts.w_gate.get_metadata()['logical_axes'] == ('exp', 'embed', 'mlp_moe')
  assert m.router.kernel.get_metadata()['logical_axes'] == ('embed', 'exp')
  assert _model(num_shared=0).shared is None


def test_dense_ffn_matches_oracle():
  c = _cfg()
  ffn = DenseFFN(c, 128, rngs=nnx.Rngs(3))
  x = _x(8)
  p = nnx.to_pure_dict(nnx.state(ffn, nnx.Param))
  xn = np.asarray(x, np.float64)
  g, u = xn @ np.asarray(p['w_gate']), xn @ np.asarray(p['w_up'])
  want = (g / (1 + np.exp(-g)) * u) @ np.asarray(p['w_down'])
  np.testing.assert_allclose(np.asarray(ffn(x)), want, **TOL)
  assert p['w_gate'].shape == (D, 128) and p['w_down'].shape == (128, D)


def test_bfloat16_compute_runs_close_to_fp32():
  m32 = _model()
  c = _cfg()
  c.model.dtype = 'bfloat16'
  m16 = MoE(c, rngs=nnx.Rngs(0))
  m16.router.bias[...] = m32.router.bias[...]
  x = _x(9)
  y32 = m32(x)[0]
  y16, aux = jax.jit(lambda x: m16(x))(x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16 and aux['bal_loss'].dtype == jnp.float32
  err = np.abs(np.asarray(y16, np.float32) - np.asarray(y32))
  assert np.median(err) < 0.05 * np.abs(np.asarray(y32)).mean()   # bf16 rounding, loose


def test_bad_inputs_raise():
  m = _model()
  with pytest.raises(ValueError, match='d_model'):
    m(jnp.ones((B, T, D + 1)))
  with pytest.raises(ValueError, match='valid_BT'):
    m(_x(), jnp.ones((B, T + 1), bool))


@pytest.mark.parametrize('k', [1, 3])
def test_permuted_rows_values_and_gradient(k):
  """The dispatch gather y[m] = x[src[m] // k] and its gather-only VJP against numpy (np.add.at
  of dy into dx), fresh random permutation and values; fp32, exact up to summation order."""
  r = np.random.RandomState(11 + k)
  N, D = 7, 5
  src = r.permutation(N * k).astype(np.int32)
  inv = np.argsort(src).astype(np.int32)
  x, dy = r.randn(N, D).astype(np.float32), r.randn(N * k, D).astype(np.float32)
  y, vjp = jax.vjp(lambda x: permuted_rows(x, jnp.asarray(src), jnp.asarray(inv), k),
                   jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), x[src // k])
  want = np.zeros_like(x)
  np.add.at(want, src // k, dy)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dy))[0]), want, rtol=1e-6, atol=1e-6)
