"""Engram module (SPEC §6.3) against oracles written from the SPEC text.

The NumPy oracle runs in float64 and the module in fp32: values agree to 1e-5 (outputs are O(1e-1));
gradients are compared with jax.grad of a plain jnp oracle at rtol 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import default_config
from v4jax.model.engram import Engram, _Eps, gate_conv

B, T, N, D, G, K_E, D_MEM, R, W, DELTA = 2, 16, 4, 64, 3, 2, 32, 101, 4, 3
J = (G - 1) * K_E
D_H = D_MEM // J


@pytest.fixture(autouse=True)
def _exact_matmuls():
  """fp32 matmuls at full precision on every backend: on a GPU the default runs them in TF32
  (~1e-3 relative), far outside the fp32 tolerances below (CPU runs fp32 either way)."""
  with jax.default_matmul_precision('highest'):
    yield


def _cfg(streams=N, conv=True, bias=True):
  c = default_config()
  c.model.d_model = D
  c.engram.proj_bias = bias
  c.mhc.streams = streams
  c.engram.update(dict(enabled=True, max_ngram=G, heads_per_ngram=K_E, d_mem=D_MEM,
                       conv_kernel=W, conv_dilation=DELTA, use_short_conv=conv))
  return c


def _module(seed=0, streams=N, conv=True, conv_zero=False, bias=True):
  """An Engram with every parameter randomised (incl. a non-zero conv unless conv_zero)."""
  mod = Engram(_cfg(streams, conv, bias), 1, R, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(100 + seed)
  for path, var in nnx.to_flat_state(nnx.state(mod, nnx.Param)):
    name = '.'.join(map(str, path))
    if name == 'conv.kernel' and conv_zero:
      continue
    if name.endswith('scale'):
      val = rng.uniform(0.5, 1.5, var.shape)
    elif name == 'table':
      val = rng.normal(0, 1.0, var.shape)
    else:
      val = rng.normal(0, 0.3 if name.endswith('bias') or name == 'conv.kernel' else 0.1, var.shape)
    var.set_value(jnp.asarray(val, jnp.float32))
  return mod


def _params(mod):
  return {'.'.join(map(str, p)): np.asarray(v.get_value(), np.float64)
          for p, v in nnx.to_flat_state(nnx.state(mod, nnx.Param))}


# ---- oracles (SPEC §6.3 text) -----------------------------------------------------------------

def np_rms(x, g, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * g


def np_mix(p, X, e, conv=True):
  X, e = X.astype(np.float64), e.astype(np.float64)
  b, t, n, d = X.shape
  v = e @ p['value_proj.kernel'] + p['value_proj.bias']
  gated = np.zeros_like(X)
  for m in range(n):
    k = e @ p['key_proj.kernel'][m] + p['key_proj.bias'][m]
    g = (np_rms(X[:, :, m], p['q_norm.scale'][m], 1e-6) *
         np_rms(k, p['k_norm.scale'][m], 1e-6)).sum(-1) / np.sqrt(d)
    s = np.sign(g) * np.sqrt(np.maximum(np.abs(g), 1e-6))
    gated[:, :, m] = (1 / (1 + np.exp(-s)))[..., None] * v
  if not conv:
    return gated
  z = np.concatenate([np_rms(gated[:, :, m], p['conv_norm.scale'][m], 1e-5) for m in range(n)],
                     axis=-1)                                            # channel m*D + d
  c = np.zeros_like(z)
  for tt in range(t):
    for j in range(W):
      src = tt - (W - 1 - j) * DELTA
      if src >= 0:
        c[:, tt] += p['conv.kernel'][j] * z[:, src]
  silu = c / (1 + np.exp(-c))
  return silu.reshape(b, t, n, d) + gated


def jnp_rms(x, g, eps):
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * g


def jnp_mix(p, X, e):
  """Without 'value_proj.bias' the projections have no bias; without 'conv.kernel' no conv."""
  v = jnp.dot(e, p['value_proj.kernel'], precision='highest')
  k = jnp.einsum('btm,nmd->btnd', e, p['key_proj.kernel'], precision='highest')
  return jnp_gate_conv(p, X, k, v)


def jnp_gate_conv(p, X, k, v):
  """SPEC §6.3 steps 3-5 from the projections' outputs (before their biases)."""
  v = v + p.get('value_proj.bias', 0.0)
  k = k + p.get('key_proj.bias', 0.0)
  g = jnp.sum(jnp_rms(X, p['q_norm.scale'], 1e-6) * jnp_rms(k, p['k_norm.scale'], 1e-6), -1)
  g = g / np.sqrt(D)
  big = jnp.abs(g) > 1e-6
  s = jnp.where(big, jnp.sign(g) * jnp.sqrt(jnp.where(big, jnp.abs(g), 1.0)), jnp.sign(g) * 1e-3)
  gated = jax.nn.sigmoid(s)[..., None] * v[:, :, None, :]
  if 'conv.kernel' not in p:
    return gated
  z = jnp_rms(gated, p['conv_norm.scale'], 1e-5).reshape(B, T, N * D)
  c = jnp.zeros_like(z)
  for j in range(W):
    lag = (W - 1 - j) * DELTA
    c = c + p['conv.kernel'][j] * jnp.pad(z, ((0, 0), (lag, 0), (0, 0)))[:, :T]
  return jax.nn.silu(c).reshape(B, T, N, D) + gated


def _inputs(seed):
  rng = np.random.default_rng(seed)
  X = rng.normal(size=(B, T, N, D)).astype(np.float32)
  e = rng.normal(size=(B, T, D_MEM)).astype(np.float32)
  return X, e


# ---- tests ------------------------------------------------------------------------------------

def test_param_shapes_and_names():
  mod = Engram(_cfg(), 1, R, rngs=nnx.Rngs(0))
  shapes = {k: v.shape for k, v in _params(mod).items()}
  assert shapes == {
      'table': (R, D_H), 'value_proj.kernel': (D_MEM, D), 'value_proj.bias': (D,),
      'key_proj.kernel': (N, D_MEM, D), 'key_proj.bias': (N, D), 'q_norm.scale': (N, D),
      'k_norm.scale': (N, D), 'conv_norm.scale': (N, D), 'conv.kernel': (W, N * D)}
  assert not np.any(np.asarray(mod.conv.kernel[...]))                 # conv is zero-initialised
  assert mod.table.get_metadata()['logical_axes'] == ('engram_rows', 'engram_dim')
  c = _cfg()
  c.engram.proj_bias = False
  assert 'value_proj.bias' not in _params(Engram(c, 1, R, rngs=nnx.Rngs(0)))


def test_mix_matches_oracle_with_nonzero_conv():
  mod = _module(1)
  X, e = _inputs(2)
  got = np.asarray(mod.mix(jnp.asarray(X), jnp.asarray(e)))
  want = np_mix(_params(mod), X, e)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Tap order matters: the reversed kernel (tap 0 = newest) gives a clearly different answer.
  p = _params(mod)
  p['conv.kernel'] = p['conv.kernel'][::-1]
  assert np.abs(np_mix(p, X, e) - got).max() > 1e-2


def test_conv_tap_positions():
  """Only tap 0 (the oldest) non-zero: Y_t = SiLU(Z[t - (W-1)*delta]) + gated, and the first
  (W-1)*delta positions see only zero padding, SiLU(0) = 0."""
  mod = _module(3)
  k = np.zeros((W, N * D), np.float32)
  k[0] = 1.0
  mod.conv.kernel[...] = jnp.asarray(k)
  X, e = _inputs(4)
  got = np.asarray(mod.mix(jnp.asarray(X), jnp.asarray(e)))
  p = _params(mod)
  gated = np_mix(p, X, e, conv=False)
  z = np.stack([np_rms(gated[:, :, m], p['conv_norm.scale'][m], 1e-5) for m in range(N)], axis=2)
  lag = (W - 1) * DELTA
  want = gated.copy()
  want[:, lag:] += z[:, :T - lag] / (1 + np.exp(-z[:, :T - lag]))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_zero_conv_gives_gated_value():
  mod = _module(5, conv_zero=True)
  plain = Engram(_cfg(conv=False), 1, R, rngs=nnx.Rngs(0))
  same = _params(mod)
  for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
    var.set_value(jnp.asarray(same['.'.join(map(str, path))], jnp.float32))
  X, e = _inputs(6)
  y = mod.mix(jnp.asarray(X), jnp.asarray(e))
  np.testing.assert_allclose(y, plain.mix(jnp.asarray(X), jnp.asarray(e)), atol=0)
  np.testing.assert_allclose(y, np_mix(_params(plain), X, e, conv=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('conv,bias', [(True, True), (False, False)])
def test_gradients_match_jnp_oracle_incl_signed_sqrt(conv, bias):
  """The mix's custom VJP against autodiff of the oracle, every input and parameter."""
  mod = _module(7, conv=conv, bias=bias)
  X, e = _inputs(8)
  X[0, :, 2] = 0.0                       # g = 0 inside the clamp: no gradient through that gate
  Rw = jnp.asarray(np.random.default_rng(9).normal(size=(B, T, N, D)), jnp.float32)
  X, e = jnp.asarray(X), jnp.asarray(e)
  gm, gx, ge = nnx.jit(nnx.grad(lambda m, X, e: jnp.sum(Rw * m.mix(X, e)), argnums=(0, 1, 2)))(
      mod, X, e)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(mod).items() if k != 'table'}
  gp, gx_ref, ge_ref = jax.jit(jax.grad(lambda p, X, e: jnp.sum(Rw * jnp_mix(p, X, e)),
                                        argnums=(0, 1, 2)))(p, X, e)
  # atol 1e-4 of the largest entry: where |g| is small, 1/(2 sqrt|g|) amplifies fp32 rounding
  # (an f64 run of both agrees to 1e-15)
  for got, ref in ((gx, gx_ref), (ge, ge_ref)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(np.asarray(ref)).max())
  assert not np.any(np.asarray(gx)[0, :, 2])
  flat = {'.'.join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(gm)}
  assert set(flat) == set(gp) | {'table'}
  for name, ref in gp.items():               # the same scaled atol
    big = np.abs(np.asarray(ref)).max()
    assert big > 1e-2, name
    np.testing.assert_allclose(flat[name], ref, rtol=1e-4, atol=1e-4 * big, err_msg=name)


def test_bf16_gate_conv_near_fp32_oracle():
  """The model's form: bf16 streams and projections in, fp32 math inside, bf16 Y and input
  cotangents out. Values and gradients against the fp32 oracle on the same bf16 inputs, within
  2% of each tensor's largest entry (bf16 rounding of the outputs and of SiLU's cotangent)."""
  mod = _module(18)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(mod).items() if k != 'table'}
  rng = np.random.default_rng(19)
  X, k, v = (jnp.asarray(rng.normal(size=s), jnp.bfloat16)
             for s in ((B, T, N, D), (B, T, N, D), (B, T, D)))
  Rw = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.float32)
  names = {'sq': 'q_norm.scale', 'sk': 'k_norm.scale', 'bk': 'key_proj.bias',
           'bv': 'value_proj.bias', 'sc': 'conv_norm.scale', 'w': 'conv.kernel'}
  op = lambda q, X, k, v: gate_conv(X, k, v, q, _Eps(1e-6, 1e-5, DELTA))
  q = {a: p[b] for a, b in names.items()}
  y = op(q, X, k, v)
  assert y.dtype == jnp.bfloat16
  grads = jax.grad(lambda q, X, k, v: jnp.sum(Rw * op(q, X, k, v).astype(jnp.float32)),
                   argnums=(0, 1, 2, 3))(q, X, k, v)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  want_y = jnp_gate_conv(p, f32(X), f32(k), f32(v))
  refs = jax.grad(lambda p, X, k, v: jnp.sum(Rw * jnp_gate_conv(p, X, k, v)),
                  argnums=(0, 1, 2, 3))(p, f32(X), f32(k), f32(v))
  pairs = [('y', y, want_y), ('dX', grads[1], refs[1]), ('dk', grads[2], refs[2]),
           ('dv', grads[3], refs[3])] + [(a, grads[0][a], refs[0][b]) for a, b in names.items()]
  for name, got, want in pairs:
    assert got.dtype == (jnp.float32 if name in names else jnp.bfloat16), name
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0,
                               atol=0.02 * np.abs(want).max(), err_msg=name)


def test_signed_sqrt_gate_derivative():
  """d/dg sigmoid(sign(g) sqrt|g|) = sigmoid' / (2 sqrt|g|): the module's VJP through X, paired
  with a random direction, vs central differences of the float64 oracle along that direction
  (the op is a custom VJP, so no forward-mode JVP: <R, J dX> = <J^T R, dX> for random R)."""
  mod = _module(10, conv_zero=True)
  X, e = _inputs(11)
  Xd, ed = X.astype(np.float64), e.astype(np.float64)
  p = _params(mod)
  rng = np.random.default_rng(12)
  dX = rng.normal(size=X.shape)
  h = 1e-5
  fd = (np_mix(p, Xd + h * dX, ed, conv=False) - np_mix(p, Xd - h * dX, ed, conv=False)) / (2 * h)
  vjp = nnx.jit(lambda m, X, R: jax.vjp(lambda X: m.mix(X, jnp.asarray(e)), X)[1](R)[0])
  for _ in range(3):
    R = rng.normal(size=X.shape)
    got = float(np.sum(np.asarray(vjp(mod, jnp.asarray(X), jnp.asarray(R, jnp.float32))) * dX))
    np.testing.assert_allclose(got, np.sum(R * fd), rtol=1e-3)


def test_retrieve_and_table_gradient_with_duplicates():
  mod = _module(13)
  rng = np.random.default_rng(14)
  rows = rng.integers(0, R, (B, T, J)).astype(np.int32)
  rows[0, 0] = rows[1, 3]                # repeated rows across positions ...
  rows[1, 5, 1] = rows[1, 5, 0]          # ... and within one position
  table = np.asarray(mod.table[...])
  e = np.asarray(mod.retrieve(jnp.asarray(rows)))
  np.testing.assert_array_equal(e, table[rows].reshape(B, T, J * D_H))   # concat in j order
  X = jnp.asarray(_inputs(15)[0])
  Rw = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.float32)
  gm = nnx.jit(nnx.grad(lambda m: jnp.sum(Rw * m(X, jnp.asarray(rows)))))(mod)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in _params(mod).items() if k != 'table'}
  ge = jax.jit(jax.grad(lambda e: jnp.sum(Rw * jnp_mix(p, X, e))))(jnp.asarray(e))
  want = np.zeros_like(table, np.float64)
  np.add.at(want, rows.reshape(-1), np.asarray(ge, np.float64).reshape(-1, D_H))
  np.testing.assert_allclose(gm['table'][...], want, rtol=1e-4, atol=1e-5)   # fp32 sums
  assert np.abs(want[rows[0, 0, 0]]).max() > 0


def test_single_stream_and_bad_shapes():
  mod = _module(16, streams=1)
  X, e = _inputs(17)
  y = mod.mix(jnp.asarray(X[:, :, :1]), jnp.asarray(e))
  np.testing.assert_allclose(y, np_mix(_params(mod), X[:, :, :1], e), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='mhc.streams'):
    mod.mix(jnp.asarray(X), jnp.asarray(e))
  with pytest.raises(ValueError, match='heads'):
    mod.retrieve(jnp.zeros((B, T, J + 1), jnp.int32))
