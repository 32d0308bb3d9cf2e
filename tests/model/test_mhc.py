"""mHC (SPEC §5): Sinkhorn, HCSite and HyperHead against oracles written from the SPEC text.

NumPy oracles run in float64; the module runs in fp32, so values are compared at 1e-5 (Sinkhorn)
to 1e-4 (whole sites). Sinkhorn gradients are checked against jax.grad of a plain unrolled jnp
oracle, site gradients against central differences of the float64 oracle (rtol 1e-4).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import np_sinkhorn
from v4jax.config import default_config
from v4jax.model.mhc import HCSite, HyperHead, expand_streams, sinkhorn

B, T, N, D, ITERS, EPS = 2, 16, 4, 64, 20, 1e-6


def _cfg(**mhc):
  c = default_config()
  c.model.d_model = D
  c.mhc.streams = N
  c.mhc.sinkhorn_iters = ITERS
  for k, v in mhc.items():
    c.mhc[k] = v
  return c


# ---- oracles (SPEC §5 text) -------------------------------------------------------------------

def jnp_sinkhorn(lam, iters=ITERS, eps=EPS):
  m = jnp.exp(lam) / jnp.sum(jnp.exp(lam), -1, keepdims=True) + eps
  m = m / (jnp.sum(m, -2, keepdims=True) + eps)
  for _ in range(iters - 1):
    m = m / (jnp.sum(m, -1, keepdims=True) + eps)
    m = m / (jnp.sum(m, -2, keepdims=True) + eps)
  return m


def sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_coeffs(X, fn, base, scale, n=N, eps=EPS):
  x = X.reshape(*X.shape[:2], -1).astype(np.float64)
  mu = (x @ fn) / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
  pre = sig(scale[0] * mu[..., :n] + base[:n]) + eps
  post = 2 * sig(scale[1] * mu[..., n:2 * n] + base[n:2 * n])
  lam = (scale[2] * mu[..., 2 * n:] + base[2 * n:]).reshape(*mu.shape[:-1], n, n)
  return pre, post, np_sinkhorn(lam, ITERS, EPS)


def np_site(X, fn, base, scale, f, transpose=False):
  pre, post, comb = np_coeffs(X, fn, base, scale)
  if transpose:
    comb = np.swapaxes(comb, -1, -2)
  u = np.einsum('btm,btmd->btd', pre, X)
  y = f(u)
  out = post[..., None] * y[:, :, None, :]
  for k in range(N):
    for j in range(N):
      out[:, :, k] += comb[..., j, k, None] * X[:, :, j]     # comb[j,k]: source j -> stream k
  return out


def _randomise(site, rng, std=0.05):
  """Coefficients far from their init so every path matters."""
  site.fn[...] = jnp.asarray(rng.normal(0, std, site.fn.shape), jnp.float32)
  site.base[...] = jnp.asarray(rng.normal(0, 1.0, site.base.shape), jnp.float32)
  site.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, site.scale.shape), jnp.float32)


def _inputs(seed=0):
  return np.random.default_rng(seed).normal(size=(B, T, N, D)).astype(np.float32)


# ---- Sinkhorn ---------------------------------------------------------------------------------

def test_sinkhorn_matches_numpy_and_is_doubly_stochastic():
  lam = np.random.default_rng(1).normal(0, 2.0, (3, 5, N, N)).astype(np.float32)
  got = np.asarray(sinkhorn(jnp.asarray(lam), ITERS, EPS))
  np.testing.assert_allclose(got, np_sinkhorn(lam, ITERS, EPS), atol=1e-5)       # fp32 vs fp64
  np.testing.assert_allclose(got.sum(-2), 1.0, atol=1e-5)            # columns: last step
  assert np.abs(got.sum(-1) - 1.0).max() < 1e-2                      # rows only approach 1
  few = np.asarray(sinkhorn(jnp.asarray(lam), 3, EPS))
  assert np.abs(got.sum(-1) - 1).max() < np.abs(few.sum(-1) - 1).max()


def test_sinkhorn_gradient_through_all_iterations():
  rng = np.random.default_rng(2)
  lam = jnp.asarray(rng.normal(0, 2.0, (6, N, N)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, N, N)), jnp.float32)
  g = jax.jit(jax.grad(lambda l: jnp.sum(w * sinkhorn(l, ITERS, EPS))))(lam)
  g_ref = jax.grad(lambda l: jnp.sum(w * jnp_sinkhorn(l)))(lam)     # eager: compiling is slower
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
  # The backward keeps only the logits between passes (memory-light custom_vjp).
  _, vjp = jax.vjp(lambda l: sinkhorn(l, ITERS, EPS), lam)
  assert sum(x.size for x in jax.tree.leaves(vjp)) == lam.size


# ---- HCSite -----------------------------------------------------------------------------------

def test_hcsite_matches_oracle_and_orientation():
  site = HCSite(_cfg(), 0, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  _randomise(site, rng)
  W = rng.normal(0, 0.2, (D, D)).astype(np.float32)
  X = _inputs(4)
  out, aux = site(jnp.asarray(X), lambda u: (jnp.tanh(u @ W), {'inner': 1.0}))
  want = np_site(X, np.asarray(site.fn[...]), np.asarray(site.base[...]),
                 np.asarray(site.scale[...]), lambda u: np.tanh(u @ W))
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)        # fp32 vs fp64
  # Non-symmetric comb: applying comb^T (the pitfall) gives a clearly different answer.
  _, _, comb = site.coeffs(jnp.asarray(X))
  assert np.abs(comb - np.swapaxes(comb, -1, -2)).max() > 0.05
  wrong = np_site(X, np.asarray(site.fn[...]), np.asarray(site.base[...]),
                  np.asarray(site.scale[...]), lambda u: np.tanh(u @ W), transpose=True)
  assert np.abs(out - wrong).max() > 100 * 1e-4
  assert aux['inner'] == 1.0
  assert {'mhc_fwd_gain', 'mhc_bwd_gain', 'mhc_col_residual', 'mhc_row_residual'} <= set(aux)
  assert abs(float(aux['mhc_fwd_gain']) - 1.0) < 1e-4


def test_hcsite_gradients_match_finite_differences():
  """<grad, d> of the module vs central differences of the float64 oracle along random d, for X
  and every parameter (full autodiff incl. the coefficient path). rtol 1e-4: fp32 sums."""
  site = HCSite(_cfg(), 1, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(5)
  _randomise(site, rng)
  W = rng.normal(0, 0.2, (D, D))
  R = rng.normal(size=(B, T, N, D))
  X = _inputs(6)
  Wj, Rj = jnp.asarray(W, jnp.float32), jnp.asarray(R, jnp.float32)

  def loss_mod(m, X):
    return jnp.sum(Rj * m(X, lambda u: (jnp.tanh(jnp.dot(u, Wj, precision='highest')), None))[0])

  g_mod, g_x = nnx.jit(nnx.grad(loss_mod, argnums=(0, 1)))(site, jnp.asarray(X))
  args = dict(X=X.astype(np.float64), fn=np.asarray(site.fn[...], np.float64),
              base=np.asarray(site.base[...], np.float64),
              scale=np.asarray(site.scale[...], np.float64))
  grads = dict(X=g_x, fn=g_mod['fn'][...], base=g_mod['base'][...], scale=g_mod['scale'][...])

  def loss_np(a):
    return np.sum(R * np_site(a['X'], a['fn'], a['base'], a['scale'], lambda u: np.tanh(u @ W)))

  h = 1e-4
  for name in args:
    d = rng.normal(size=args[name].shape)
    plus, minus = dict(args), dict(args)
    plus[name], minus[name] = args[name] + h * d, args[name] - h * d
    fd = (loss_np(plus) - loss_np(minus)) / (2 * h)
    got = float(np.sum(np.asarray(grads[name], np.float64) * d))
    np.testing.assert_allclose(got, fd, rtol=1e-4, err_msg=name)


def test_zero_bias_init():
  site = HCSite(_cfg(bias_init='zero'), 0, rngs=nnx.Rngs(2))
  assert np.std(np.asarray(site.fn[...])) > 0.004                    # fn is not zero-initialised
  X = jnp.asarray(_inputs(7))
  pre, post, comb = site.coeffs(X)                                   # alpha = 0.01: near exact
  np.testing.assert_allclose(pre, 0.5, atol=5e-3)
  np.testing.assert_allclose(post, 1.0, atol=1e-2)
  np.testing.assert_allclose(comb, 1.0 / N, atol=5e-3)
  site.scale[...] = jnp.zeros(3)                                     # alpha = 0: exact values
  pre, post, comb = site.coeffs(X)
  np.testing.assert_allclose(pre, 0.5 + EPS, atol=1e-6)
  np.testing.assert_allclose(post, 1.0, atol=1e-6)
  np.testing.assert_allclose(comb, 1.0 / N, atol=1e-5)
  # Identical streams: the block equals the standard pre-norm residual x + F(RMSNorm(x)).
  x = jnp.asarray(np.random.default_rng(8).normal(size=(B, T, D)), jnp.float32)
  W = jnp.asarray(np.random.default_rng(9).normal(0, 0.2, (D, D)), jnp.float32)
  F = lambda u: jnp.tanh((u / jnp.sqrt(jnp.mean(u * u, -1, keepdims=True) + 1e-6)) @ W)
  out, _ = site(expand_streams(x, N), lambda u: (F(u), None))
  np.testing.assert_allclose(out, np.broadcast_to((x + F(x))[:, :, None], out.shape), atol=1e-5)


def test_identity_bias_init():
  for site_index in (0, 5):
    site = HCSite(_cfg(bias_init='identity'), site_index, rngs=nnx.Rngs(3))
    site.scale[...] = jnp.zeros(3)
    pre, post, comb = site.coeffs(jnp.asarray(_inputs(10)))
    home = site_index % N
    want_pre = np.full(N, sig(-3.0)) + EPS
    want_pre[home] = sig(3.0) + EPS
    np.testing.assert_allclose(pre, np.broadcast_to(want_pre, pre.shape), atol=1e-6)
    np.testing.assert_allclose(post, 1.0, atol=1e-6)
    np.testing.assert_allclose(comb, np.broadcast_to(np_sinkhorn(6 * np.eye(N) - 3, ITERS, EPS), comb.shape),
                               atol=1e-5)
    assert abs(float(comb[0, 0, 0, 0]) - 0.993) < 1e-3


def test_single_stream_is_plain_residual():
  site = HCSite(_single(), 0, rngs=nnx.Rngs(4))
  assert not nnx.state(site, nnx.Param)                               # no mHC params at n = 1
  X = jnp.asarray(np.random.default_rng(11).normal(size=(B, T, 1, D)), jnp.float32)
  out, _ = site(X, lambda u: (jnp.sin(u), None))
  np.testing.assert_allclose(out, X + jnp.sin(X), atol=0)


def _single():
  c = _cfg()
  c.mhc.streams = 1
  return c


def test_bad_stream_shape_is_refused():
  site = HCSite(_cfg(), 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='mhc.streams'):
    site.coeffs(jnp.zeros((B, T, N + 1, D)))


# ---- HyperHead --------------------------------------------------------------------------------

def test_hyperhead_matches_oracle():
  head = HyperHead(_cfg(), rngs=nnx.Rngs(5))
  rng = np.random.default_rng(12)
  head.fn[...] = jnp.asarray(rng.normal(0, 0.05, head.fn.shape), jnp.float32)
  head.base[...] = jnp.asarray(rng.normal(size=N), jnp.float32)
  head.scale[...] = jnp.asarray([0.7], jnp.float32)
  X = _inputs(13)
  x = X.reshape(B, T, -1).astype(np.float64)
  mu = (x @ np.asarray(head.fn[...], np.float64)) / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
  a = sig(0.7 * mu + np.asarray(head.base[...])) + EPS
  want = np.einsum('btm,btmd->btd', a, X)
  np.testing.assert_allclose(head(jnp.asarray(X)), want, rtol=1e-5, atol=1e-5)


def test_hyperhead_sum_first_and_single_stream():
  X = _inputs(14)
  assert not nnx.state(HyperHead(_cfg(head='sum'), rngs=nnx.Rngs(0)), nnx.Param)
  np.testing.assert_allclose(HyperHead(_cfg(head='sum'), rngs=nnx.Rngs(0))(jnp.asarray(X)),
                             X.sum(2), atol=1e-5)
  np.testing.assert_array_equal(HyperHead(_cfg(head='first'), rngs=nnx.Rngs(0))(jnp.asarray(X)),
                                X[:, :, 0])
  X1 = X[:, :, :1]
  np.testing.assert_array_equal(HyperHead(_single(), rngs=nnx.Rngs(0))(jnp.asarray(X1)),
                                X1[:, :, 0])


def test_expand_streams():
  e = np.random.default_rng(15).normal(size=(B, T, D)).astype(np.float32)
  X = expand_streams(jnp.asarray(e), N)
  assert X.shape == (B, T, N, D)
  for m in range(N):
    np.testing.assert_array_equal(X[:, :, m], e)


def test_coefficient_mix_of_bf16_streams_is_fp32_exact():
  """bf16 streams take three split-bf16 GEMMs (mhc._split3): mu and its gradients (dX, dfn) match
  a float64 oracle at fp32 accumulation error (1e-5 of the largest magnitude), i.e. as exact as
  the fp32 HIGHEST GEMM they replace; a plain bf16 cast of fn would miss by ~1e-3."""
  from v4jax.model.mhc import _normed_mix
  rng = np.random.default_rng(11)
  X = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.bfloat16)
  fn = jnp.asarray(rng.normal(0, 0.05, (N * D, (2 + N) * N)), jnp.float32)
  R = rng.normal(size=(B, T, (2 + N) * N))
  x64 = np.asarray(X, np.float64).reshape(B, T, -1)
  fn64 = np.asarray(fn, np.float64)

  def mu_np(x, f):
    return (x @ f) / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)

  mu = _normed_mix(X, fn, 1e-6, tf32=False)
  want = mu_np(x64, fn64)
  scale = np.abs(want).max()
  assert np.abs(np.asarray(mu, np.float64) - want).max() < 1e-5 * scale
  rough = mu_np(x64, np.asarray(fn.astype(jnp.bfloat16), np.float64))
  assert np.abs(rough - want).max() > 1e-4 * scale          # the split matters at this tolerance

  gx, gf = jax.grad(lambda X, f: jnp.sum(jnp.asarray(R, jnp.float32) * _normed_mix(X, f, 1e-6,
                                                                                     False)),
                    argnums=(0, 1))(X, fn)
  assert gx.dtype == jnp.bfloat16 and gf.dtype == jnp.float32
  # analytic float64 gradients of sum(R * mu): r = rsqrt(mean(x^2) + eps), a = x fn
  r = 1.0 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
  a = x64 @ fn64
  want_gf = np.einsum('btk,btc->kc', x64, R * r)
  want_gx = (R * r) @ fn64.T - (np.sum(R * a, -1, keepdims=True) * r ** 3 / (N * D)) * x64
  np.testing.assert_allclose(np.asarray(gf, np.float64), want_gf,
                             atol=1e-5 * np.abs(want_gf).max())
  # dX is stored in the streams' bf16: 2^-8 relative
  np.testing.assert_allclose(np.asarray(gx, np.float64).reshape(B, T, -1), want_gx,
                             atol=4e-3 * np.abs(want_gx).max())


def test_read_in_and_write_back_vjps():
  """The streams' mixing passes (custom VJPs) against float64 formulas from SPEC §5 (fp32 inputs,
  1e-5 of the largest magnitude) and against autodiff of the plain jnp forms with bf16 streams
  (each result rounded once to bf16 in both: within 1 bf16 ulp, 2^-7 of the largest magnitude)."""
  from v4jax.model.mhc import read_in, read_in_reference, write_back, write_back_reference
  rng = np.random.default_rng(7)
  X = rng.normal(size=(B, T, N, D))
  y = rng.normal(size=(B, T, D))
  pre = rng.uniform(0.0, 1.0, (B, T, N))
  post = rng.uniform(0.0, 2.0, (B, T, N))
  comb = rng.dirichlet(np.ones(N), size=(B, T, N))
  gu, gX = rng.normal(size=(B, T, D)), rng.normal(size=(B, T, N, D))
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  def close(got, want, tol):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                               atol=tol * np.abs(want).max())

  u, vjp = jax.vjp(read_in, f32(X), f32(pre))
  dX, dpre = vjp(f32(gu))
  close(u, np.einsum('btm,btmd->btd', pre, X), 1e-5)
  close(dX, pre[..., None] * gu[:, :, None, :], 1e-5)
  close(dpre, np.einsum('btmd,btd->btm', X, gu), 1e-5)

  out, vjp = jax.vjp(write_back, f32(X), f32(y), f32(post), f32(comb))
  dX, dy, dpost, dcomb = vjp(f32(gX))
  close(out, post[..., None] * y[:, :, None] + np.einsum('btjk,btjd->btkd', comb, X), 1e-5)
  close(dX, np.einsum('btjk,btkd->btjd', comb, gX), 1e-5)
  close(dy, np.einsum('btk,btkd->btd', post, gX), 1e-5)
  close(dpost, np.einsum('btkd,btd->btk', gX, y), 1e-5)
  close(dcomb, np.einsum('btjd,btkd->btjk', X, gX), 1e-5)

  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  for fn, ref, args, g in ((read_in, read_in_reference, (bf(X), f32(pre)), bf(gu)),
                           (write_back, write_back_reference,
                            (bf(X), bf(y), f32(post), f32(comb)), bf(gX))):
    got, got_vjp = jax.vjp(fn, *args)
    want, want_vjp = jax.vjp(ref, *args)
    assert got.dtype == jnp.bfloat16
    close(got, want, 2 ** -7)
    for a, b in zip(got_vjp(g), want_vjp(g)):
      assert a.dtype == b.dtype
      close(a, b, 2 ** -7 if a.dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32], ids=['bf16', 'f32'])
def test_hcsite_with_pallas_hc_mix_equals_reference(dtype):
  """config.kernels.hc_mix reaches HCSite and HyperHead: with 'pallas' (the Triton kernels in
  interpret mode; bf16 streams take all three, fp32 streams read-in and write-back) a site then
  the head give the reference's output and gradients wrt the streams and every parameter. fp32:
  1e-5 of the largest magnitude (the same math in another order). bf16: 2^-6 (bf16 roundings of
  u, y and the output chain through the site; one ulp is 2^-8 to 2^-7; observed <= 0.4%)."""
  Bs, Ts = 2, 5                                  # 10 tokens: a partial block of the defaults

  def grads(impl):
    c = _cfg()
    c.kernels.hc_mix = impl
    site, head = HCSite(c, 1, rngs=nnx.Rngs(0)), HyperHead(c, rngs=nnx.Rngs(1))
    _randomise(site, np.random.default_rng(21))
    gdef, params = nnx.split((site, head))
    X = jnp.asarray(np.random.default_rng(22).normal(size=(Bs, Ts, N, D)), dtype)

    def loss(params, X):
      site, head = nnx.merge(gdef, params)
      out, _ = site(X, lambda u: (jnp.tanh(u.astype(jnp.float32)).astype(u.dtype), {}))
      h = head(out).astype(jnp.float32)
      return jnp.sum(h * jnp.cos(h)), h
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, X)

  (gp, gx), h = grads('pallas')
  (gp_ref, gx_ref), h_ref = grads('reference')
  tol = 2.0 ** -6 if dtype == jnp.bfloat16 else 1e-5
  close = lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0,
      atol=tol * float(np.abs(np.asarray(b, np.float32)).max()))
  close(h, h_ref)
  assert gx.dtype == gx_ref.dtype == dtype
  close(gx, gx_ref)
  leaves, leaves_ref = jax.tree.leaves(gp), jax.tree.leaves(gp_ref)
  assert len(leaves) == len(leaves_ref) == 6      # site fn, base, scale; head fn, base, scale
  for a, b in zip(leaves, leaves_ref):
    close(a, b)
