"""optim.moment_dtype: AdamW with its moments stored in bf16 (DeepSeek-V3's recipe) against a
NumPy oracle written from the update rule, and the fp32 default against optax.adamw.

Oracle: fp32 arithmetic on the stored (bf16) moments upcast, m = b1 m + (1-b1) g,
v = b2 v + (1-b2) g^2, direction (m / (1-b1^c)) / (sqrt(v / (1-b2^c)) + eps) from those fp32
moments, decoupled weight decay on the masked leaves, then the moments rounded to bf16 for
storage. Tolerance: updates rtol 1e-5 (fp32 operation order); stored moments equal to the bf16
rounding of the oracle's fp32 values except where the two fp32 values straddle a rounding
boundary (at most one bf16 step apart, on at most 1% of the elements).
"""
import ml_dtypes
import numpy as np
import jax
import jax.numpy as jnp
import optax

from helpers import small_tiny
from v4jax import optim

B1, B2, EPS, WD, LR = 0.9, 0.95, 1e-8, 0.1, 1e-2


def _cfg(moment_dtype):
  c = small_tiny()
  c.optim.update(b1=B1, b2=B2, eps=EPS, weight_decay=WD, moment_dtype=moment_dtype)
  return c


def _tree(rs):
  # 'w' (2-D) decays; 'scale' (1-D) does not (optim.decay_mask)
  return {'w': rs.randn(16, 24).astype(np.float32), 'scale': rs.randn(24).astype(np.float32)}


def test_bf16_moments_match_the_oracle_over_steps():
  rs = np.random.RandomState(0)
  params = _tree(rs)
  tx = optim.adamw(LR, _cfg('bfloat16'))
  state = tx.init(jax.tree.map(jnp.asarray, params))
  bf16 = ml_dtypes.bfloat16
  m = {k: np.zeros(v.shape, bf16) for k, v in params.items()}
  v_ = {k: np.zeros(v.shape, bf16) for k, v in params.items()}
  p = {k: x.copy() for k, x in params.items()}
  adam = state[0]
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((adam.mu, adam.nu)))
  for step in range(1, 6):
    g = _tree(rs)
    upd, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state,
                                    jax.tree.map(jnp.asarray, p))
    for k in p:
      m32 = B1 * m[k].astype(np.float32) + (1 - B1) * g[k]
      v32 = B2 * v_[k].astype(np.float32) + (1 - B2) * g[k] * g[k]
      d = (m32 / (1 - B1 ** step)) / (np.sqrt(v32 / (1 - B2 ** step)) + EPS)
      if k == 'w':
        d = d + WD * p[k]
      want = -LR * d
      np.testing.assert_allclose(np.asarray(upd[k]), want, rtol=1e-5, atol=1e-7)
      m[k], v_[k] = m32.astype(bf16), v32.astype(bf16)
      for got, ref in ((state[0].mu[k], m[k]), (state[0].nu[k], v_[k])):
        got, ref = np.asarray(got).astype(np.float32), ref.astype(np.float32)
        off = got != ref
        assert off.mean() <= 0.01, (k, step, off.mean())
        # where they differ, by one bf16 step (2^-7 relative) at most
        np.testing.assert_allclose(got[off], ref[off], rtol=2 ** -7)
      m[k], v_[k] = np.asarray(state[0].mu[k]), np.asarray(state[0].nu[k])   # follow the stored
      p[k] = p[k] + np.asarray(upd[k])


def test_fp32_moments_are_optax_adamw():
  rs = np.random.RandomState(1)
  params = jax.tree.map(jnp.asarray, _tree(rs))
  ours = optim.adamw(LR, _cfg('float32'))
  ref = optax.adamw(LR, B1, B2, EPS, weight_decay=WD, mask=optim.decay_mask)
  s1, s2 = ours.init(params), ref.init(params)
  for _ in range(3):
    g = jax.tree.map(jnp.asarray, _tree(rs))
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = ref.update(g, s2, params)
    for k in params:
      np.testing.assert_array_equal(np.asarray(u1[k]), np.asarray(u2[k]))
    params = optax.apply_updates(params, u1)
