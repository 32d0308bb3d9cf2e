"""Engram: hashed N-gram conditional memory gated into the mHC streams (SPEC §6.3).

Dims: B batch, T positions, N mHC streams (SPEC's n), D model dim, J = (N_gram-1)*K_e table heads,
H table row width d_h, M = J*H memory width d_mem, W conv taps.

The host hashes each position's n-grams into J rows of this layer's table (v4jax.data.engram_hash).
`retrieve` gathers and concatenates them into a memory vector e; `mix` projects e to a value shared
by all streams, gates it per stream by the similarity of the stream with a per-stream key (signed
square root, then sigmoid), and adds a causal dilated depthwise short conv. The caller injects
X + Y into every stream directly (not through the mHC pre/post maps). The two steps are separate so
the table can live in host memory, with only the gathered rows moving to the device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.model.layers import const_param, constrain, dtype_of, matmul, param, rms_norm

__all__ = ['Engram']

_F32 = jnp.float32
_GATE_CLAMP = 1e-6      # signed sqrt clamps |g| here (derivative 0 inside)


class _Proj(nnx.Module):
  """kernel [..., d_in, D] and (optional) bias [..., D]."""

  def __init__(self, rngs, shape, axes, std, bias: bool):
    self.kernel = param(rngs, shape, axes, std)
    self.bias = const_param(0.0, shape[:-2] + shape[-1:], axes[:-2] + ('norm',)) if bias else None


class _Scale(nnx.Module):
  """Per-stream RMSNorm scales [N, D] (init 1)."""

  def __init__(self, n: int, d: int, eps: float):
    self.scale = const_param(1.0, (n, d), ('streams', 'norm'))
    self.eps = eps

  def __call__(self, x_BTND: jax.Array) -> jax.Array:
    return rms_norm(x_BTND.astype(_F32), self.scale[...], self.eps)


class _Conv(nnx.Module):
  """Depthwise conv kernel [W, N*D], zero init (the conv branch starts as SiLU(0) = 0)."""

  def __init__(self, w: int, channels: int):
    self.kernel = const_param(0.0, (w, channels), (None, 'conv'))


class Engram(nnx.Module):
  """Engram at block `layer_id`; `table_rows` = R_l from the frozen hash spec."""

  def __init__(self, cfg, layer_id: int, table_rows: int, *, rngs: nnx.Rngs):
    g, m = cfg.engram, cfg.model
    self.layer_id = layer_id
    self.n, self.d, self.dtype = cfg.mhc.streams, m.d_model, dtype_of(m.dtype)
    self.heads = (g.max_ngram - 1) * g.heads_per_ngram
    if g.d_mem % self.heads:
      raise ValueError(f'config.engram.d_mem={g.d_mem} must be divisible by '
                       f'(max_ngram-1)*heads_per_ngram={self.heads}')
    self.d_mem, self.d_h = g.d_mem, g.d_mem // self.heads
    self.dilation = g.conv_dilation or g.max_ngram
    if g.table_memory == 'host':   # rows arrive gathered (v4jax.memory.host_tables)
      rngs.params()                 # same draw as the device table: other params init alike
      self.table = None
    else:
      self.table = param(rngs, (table_rows, self.d_h), ('engram_rows', 'engram_dim'),
                         g.table_init_std)
    self.value_proj = _Proj(rngs, (self.d_mem, self.d), ('engram_mem', 'embed'), m.init_std,
                            g.proj_bias)
    self.key_proj = _Proj(rngs, (self.n, self.d_mem, self.d), ('streams', 'engram_mem', 'embed'),
                          m.init_std, g.proj_bias)
    self.q_norm = _Scale(self.n, self.d, g.norm_eps)
    self.k_norm = _Scale(self.n, self.d, g.norm_eps)
    if g.use_short_conv:
      self.conv_norm = _Scale(self.n, self.d, g.conv_norm_eps)
      self.conv = _Conv(g.conv_kernel, self.n * self.d)
    else:
      self.conv_norm = self.conv = None

  def retrieve(self, rows_BTJ: jax.Array) -> jax.Array:
    """e [B,T,M]: the J gathered table rows concatenated in j order, in the compute dtype."""
    B, T, J = rows_BTJ.shape
    if J != self.heads:
      raise ValueError(f'Engram layer {self.layer_id}: rows_BTJ has {J} heads, expected '
                       f'(max_ngram-1)*heads_per_ngram={self.heads}')
    if self.table is None:
      raise ValueError(f'Engram layer {self.layer_id}: engram.table_memory=host keeps the table '
                       'out of the model; pass the gathered rows (mix with engram_emb)')
    e = self.table[...].at[rows_BTJ].get(mode='promise_in_bounds')      # [B,T,J,H]
    return e.reshape(B, T, J * self.d_h).astype(self.dtype)

  def mix(self, X_BTND: jax.Array, e_BTM: jax.Array) -> jax.Array:
    """Y [B,T,N,D] to add to the streams: gated value plus SiLU of the short conv."""
    if X_BTND.ndim != 4 or X_BTND.shape[2:] != (self.n, self.d):
      raise ValueError(f'Engram layer {self.layer_id}: X_BTND has shape {X_BTND.shape}, expected '
                       f'[B, T, mhc.streams={self.n}, model.d_model={self.d}]')
    if e_BTM.shape != X_BTND.shape[:2] + (self.d_mem,):
      raise ValueError(f'Engram layer {self.layer_id}: e_BTM has shape {e_BTM.shape}, expected '
                       f'{X_BTND.shape[:2] + (self.d_mem,)} (engram.d_mem)')
    B, T, N, D = X_BTND.shape
    v_BTD = matmul('btm,md->btd', e_BTM, self.value_proj.kernel[...], self.dtype).astype(_F32)
    k_BTND = matmul('btm,nmd->btnd', e_BTM, self.key_proj.kernel[...], self.dtype).astype(_F32)
    if self.value_proj.bias is not None:
      v_BTD = v_BTD + self.value_proj.bias[...].astype(_F32)
      k_BTND = k_BTND + self.key_proj.bias[...].astype(_F32)
    gate = jnp.sum(self.q_norm(X_BTND) * self.k_norm(k_BTND), axis=-1) / jnp.sqrt(float(D))
    gate = jnp.sign(gate) * jnp.sqrt(jnp.maximum(jnp.abs(gate), _GATE_CLAMP))
    val_BTND = jax.nn.sigmoid(gate)[..., None] * v_BTD[:, :, None, :]
    y = val_BTND if self.conv is None else self._short_conv(val_BTND) + val_BTND
    return constrain(y.astype(X_BTND.dtype), ('batch', 'seq', 'streams', 'act_embed'))

  def _short_conv(self, val_BTND: jax.Array) -> jax.Array:
    """SiLU(sum_j W[j] * Z[t - (W-1-j)*dilation]) over Z = per-stream RMSNorm(val), zero-padded."""
    B, T, N, D = val_BTND.shape
    z = self.conv_norm(val_BTND).reshape(B, T, N * D)             # channel m*D + d
    w = self.conv.kernel[...].astype(_F32)
    taps, step = w.shape[0], self.dilation
    z = jnp.pad(z, ((0, 0), ((taps - 1) * step, 0), (0, 0)))
    conv = sum(w[j] * z[:, j * step:j * step + T] for j in range(taps))
    return jax.nn.silu(conv).reshape(B, T, N, D)

  def __call__(self, X_BTND: jax.Array, rows_BTJ: jax.Array) -> jax.Array:
    return self.mix(X_BTND, self.retrieve(rows_BTJ))
