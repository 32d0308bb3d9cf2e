"""RoPE / YaRN (SPEC §1) against numpy oracles written pair by pair from the spec.

Tolerances: frequencies are float32 outputs of a float64 formula (rtol 1e-6); rotations are fp32
against float64 (atol 1e-5 at |x| ~ 1, positions < 100 so fp32 angle rounding stays < 1e-5).
"""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from attn_oracle import rope_half as np_rope_half, rope_interleaved as np_rope_interleaved
from v4jax.config import default_config
from v4jax.model.rope import (apply_rope_half, apply_rope_interleaved, attention_mscale,
                              rope_cos_sin_scale, rope_inv_freq, yarn_active,
                              yarn_correction_range)


def _v3_cfg(mode='on', seq_len=4096):
  c = default_config()
  c.model.update(qk_rope_dim=64, qk_nope_dim=128)
  c.rope.update(yarn_mode=mode, yarn_factor=40.0, original_max_len=4096, beta_fast=32.0,
                beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
  c.data.seq_len = seq_len
  return c


def _np_yarn_theta(d_r, base, s, L0, bf, bs):
  """SPEC §1 written out: c(beta), [lo, hi], ramp, theta'."""
  c = lambda beta: d_r * math.log(L0 / (2 * math.pi * beta)) / (2 * math.log(base))
  lo, hi = max(math.floor(c(bf)), 0), min(math.ceil(c(bs)), d_r - 1)
  th = np.array([base ** (-2 * i / d_r) for i in range(d_r // 2)])
  ramp = np.array([min(max((i - lo) / (hi - lo), 0.0), 1.0) for i in range(d_r // 2)])
  return th * ramp / s + th * (1 - ramp), (lo, hi)


def test_yarn_v3_range_mscale_and_tau():
  assert yarn_correction_range(64, 10000.0, 4096, 32.0, 1.0) == (10, 23)
  cfg = _v3_cfg('on')
  m = attention_mscale(cfg)
  assert m == pytest.approx(1.36889, abs=1e-5)
  assert (128 + 64) ** -0.5 * m ** 2 == pytest.approx(0.135234, abs=1e-6)
  assert rope_cos_sin_scale(cfg) == pytest.approx(1.0)
  want, rng = _np_yarn_theta(64, 10000.0, 40.0, 4096, 32.0, 1.0)
  assert rng == (10, 23)
  np.testing.assert_allclose(rope_inv_freq(cfg), want, rtol=1e-6)
  # below the ramp: unchanged high frequencies; above it: divided by s
  th = 10000.0 ** (-np.arange(0, 64, 2) / 64)
  np.testing.assert_allclose(rope_inv_freq(cfg)[:10], th[:10], rtol=1e-6)
  np.testing.assert_allclose(rope_inv_freq(cfg)[23:], th[23:] / 40.0, rtol=1e-6)


def test_yarn_activation_modes():
  th = 10000.0 ** (-np.arange(0, 64, 2) / 64)
  off, on = _v3_cfg('off'), _v3_cfg('on')
  np.testing.assert_allclose(rope_inv_freq(off), th, rtol=1e-6)
  assert attention_mscale(off) == 1.0 and not yarn_active(off)
  assert yarn_active(on) and attention_mscale(on) > 1.3
  short, long = _v3_cfg('auto', 4096), _v3_cfg('auto', 8192)    # auto: only if seq_len > L0
  assert not yarn_active(short) and attention_mscale(short) == 1.0
  np.testing.assert_allclose(rope_inv_freq(short), th, rtol=1e-6)
  assert yarn_active(long)
  np.testing.assert_allclose(rope_inv_freq(long), rope_inv_freq(on))
  # cos/sin factor m(mscale)/m(mscale_all_dim) when they differ
  c = _v3_cfg('on')
  c.rope.mscale = 0.707
  want = (0.1 * 0.707 * math.log(40) + 1) / (0.1 * math.log(40) + 1)
  assert rope_cos_sin_scale(c) == pytest.approx(want, rel=1e-9)


def _inputs(shape, seed=0):
  r = np.random.RandomState(seed)
  x = r.randn(*shape)
  pos = r.randint(0, 100, size=shape[:2])    # not arange; fp32 angles stay exact to ~1e-5
  return x, pos


@pytest.mark.parametrize('shape', [(2, 5, 8), (2, 5, 3, 8)])
def test_interleaved_matches_oracle(shape):
  x, pos = _inputs(shape)
  th = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  got = apply_rope_interleaved(jnp.asarray(x, jnp.float32), jnp.asarray(pos), th)
  np.testing.assert_allclose(np.asarray(got), np_rope_interleaved(np, x, pos, th), atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 5, 8), (2, 5, 3, 8)])
def test_half_matches_oracle(shape):
  x, pos = _inputs(shape, 1)
  th = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  got = apply_rope_half(jnp.asarray(x, jnp.float32), jnp.asarray(pos), th)
  np.testing.assert_allclose(np.asarray(got), np_rope_half(np, x, pos, th), atol=1e-5)


def test_layouts_differ_by_a_permutation():
  """half(perm(x)) == perm(interleaved(x)) with perm = [evens | odds]; the layouts differ."""
  x, pos = _inputs((2, 6, 4, 8), 2)
  th = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  perm = np.r_[0:8:2, 1:8:2]
  xi, p = jnp.asarray(x, jnp.float32), jnp.asarray(pos)
  inter = np.asarray(apply_rope_interleaved(xi, p, th))
  half = np.asarray(apply_rope_half(xi[..., perm], p, th))
  np.testing.assert_allclose(half, inter[..., perm], atol=1e-5)
  assert np.abs(np.asarray(apply_rope_half(xi, p, th)) - inter).max() > 1e-2
  # rotations preserve pair norms; scale multiplies them
  np.testing.assert_allclose(np.linalg.norm(inter, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  scaled = np.asarray(apply_rope_interleaved(xi, p, th, 1.5))
  np.testing.assert_allclose(scaled, 1.5 * inter, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
  th = np.ones(4)
  with pytest.raises(ValueError, match='inv_freq'):
    apply_rope_interleaved(jnp.ones((1, 2, 6)), jnp.zeros((1, 2)), th)
  with pytest.raises(ValueError, match='positions_BT'):
    apply_rope_half(jnp.ones((1, 2, 8)), jnp.zeros((1, 3)), th)
  c = default_config()
  c.model.qk_rope_dim = 7
  with pytest.raises(ValueError, match='qk_rope_dim'):
    rope_inv_freq(c)
