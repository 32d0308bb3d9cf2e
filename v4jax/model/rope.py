"""Rotary position embeddings with YaRN context extension (SPEC §1).

Dims: B batch, T positions, R rotary dim (SPEC's d_r); leading dims of `x` before R are free.

MLA rotates its rope sub-vectors in the interleaved layout (pairs (a_2i, a_2i+1)); the DSA
indexer uses the half-split NeoX layout (pairs (a_i, a_i+R/2)). Both use the same frequencies.
YaRN rescales low frequencies by 1/s over a linear ramp and multiplies MLA's softmax scale by m².
Everything here is a deterministic function of the config: no parameters.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['yarn_active', 'yarn_correction_range', 'yarn_mscale', 'rope_inv_freq',
           'attention_mscale', 'rope_cos_sin_scale', 'apply_rope_interleaved', 'apply_rope_half']


def yarn_active(cfg) -> bool:
  """Whether YaRN frequencies and m² apply: `on`, or `auto` with data.seq_len > L₀."""
  mode = cfg.rope.yarn_mode
  if mode == 'on':
    return True
  if mode == 'off':
    return False
  if mode == 'auto':
    return cfg.data.seq_len > cfg.rope.original_max_len
  raise ValueError(f"config.rope.yarn_mode={mode!r} is not one of ('off', 'on', 'auto')")


def yarn_correction_range(dim: int, base: float, original_max_len: int, beta_fast: float,
                          beta_slow: float) -> tuple[int, int]:
  """[lo, hi] dimension range of the YaRN ramp: c(β) = dim·ln(L₀/(2πβ)) / (2 ln base)."""
  def c(beta):
    return dim * math.log(original_max_len / (beta * 2 * math.pi)) / (2 * math.log(base))
  lo = max(math.floor(c(beta_fast)), 0)
  hi = min(math.ceil(c(beta_slow)), dim - 1)
  return lo, hi


def yarn_mscale(factor: float, mscale: float) -> float:
  """m = 0.1·mscale·ln s + 1 (1 when s <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(cfg) -> np.ndarray:
  """θ_i (or YaRN's θ'_i when active) for i in [0, R/2), float32 [R/2]."""
  dim, r = cfg.model.qk_rope_dim, cfg.rope
  if dim % 2:
    raise ValueError(f'config.model.qk_rope_dim={dim} must be even (RoPE rotates pairs)')
  theta = 1.0 / (r.base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if yarn_active(cfg):
    lo, hi = yarn_correction_range(dim, r.base, r.original_max_len, r.beta_fast, r.beta_slow)
    if hi == lo:
      hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    theta = theta * ramp / r.yarn_factor + theta * (1.0 - ramp)
  return theta.astype(np.float32)


def attention_mscale(cfg) -> float:
  """m for MLA's softmax scale τ = d_qk^-1/2·m² (1 without YaRN); the indexer never uses it."""
  if not yarn_active(cfg):
    return 1.0
  return yarn_mscale(cfg.rope.yarn_factor, cfg.rope.mscale_all_dim)


def rope_cos_sin_scale(cfg) -> float:
  """m(mscale)/m(mscale_all_dim) multiplying cos/sin under YaRN (1 for V3)."""
  if not yarn_active(cfg):
    return 1.0
  r = cfg.rope
  return yarn_mscale(r.yarn_factor, r.mscale) / yarn_mscale(r.yarn_factor, r.mscale_all_dim)


def _cos_sin(x: jax.Array, positions_BT: jax.Array, inv_freq, scale: float):
  """cos/sin [B,T,1...,R/2] in fp32, broadcastable against x[..., R/2]."""
  half = x.shape[-1] // 2
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  if x.shape[-1] % 2 or inv_freq.shape != (half,):
    raise ValueError(f'rope: x last dim {x.shape[-1]} must be even and inv_freq {inv_freq.shape} '
                     f'must be [{half}]')
  if positions_BT.shape != x.shape[:2]:
    raise ValueError(f'rope: positions_BT {positions_BT.shape} must equal x.shape[:2] '
                     f'{x.shape[:2]}')
  ang = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + (half,))
  return jnp.cos(ang) * scale, jnp.sin(ang) * scale


def apply_rope_interleaved(x: jax.Array, positions_BT: jax.Array, inv_freq,
                           scale: float = 1.0) -> jax.Array:
  """Rotates pairs (x_2i, x_2i+1) of x[B,T,...,R] by angle p·θ_i (MLA layout), fp32 inside."""
  cos, sin = _cos_sin(x, positions_BT, inv_freq, scale)
  xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  a, b = xf[..., 0], xf[..., 1]
  out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def apply_rope_half(x: jax.Array, positions_BT: jax.Array, inv_freq,
                    scale: float = 1.0) -> jax.Array:
  """Rotates pairs (x_i, x_i+R/2) of x[B,T,...,R] (NeoX layout, indexer only), fp32 inside."""
  cos, sin = _cos_sin(x, positions_BT, inv_freq, scale)
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  a, b = xf[..., :half], xf[..., half:]
  return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).astype(x.dtype)
