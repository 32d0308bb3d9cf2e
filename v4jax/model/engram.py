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

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.model.layers import const_param, constrain, dtype_of, matmul, param

__all__ = ['Engram']

_F32 = jnp.float32
_GATE_CLAMP = 1e-6      # signed sqrt clamps |g| here (derivative 0 inside)


class _Eps(NamedTuple):
  """gate_conv's static settings: the q/k norms' eps, the conv norm's eps, the conv dilation."""
  qk: float
  conv: float
  dilation: int


def _shift(x, lag: int):
  """x[:, t - lag] along T, zero where t < lag."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (lag, 0)
  return jnp.pad(x, pad)[:, :x.shape[1]] if lag else x


def _unshift(x, lag: int):
  """x[:, t + lag] along T, zero where t + lag >= T."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, lag)
  return jnp.pad(x, pad)[:, lag:] if lag else x


def _with_bias(x, p, name):
  x = x.astype(_F32)
  return x + p[name].astype(_F32) if name in p else x


def _gate_rows(X_BTND, k_BTND, v_BTD, p, eps: _Eps):
  """The gate's per-(token, stream) statistics, fp32 [B,T,N]: rq, rk (the q and k norms'
  1/rms), P (the scaled dot before normalising), g, alpha; with the conv also den and
  a = alpha/sqrt(den), since RMSNorm(alpha*v) = a*v (the conv's input is never formed)."""
  Xf, kb, vb = X_BTND.astype(_F32), _with_bias(k_BTND, p, 'bk'), _with_bias(v_BTD, p, 'bv')
  rq = jax.lax.rsqrt(jnp.mean(Xf * Xf, -1) + eps.qk)
  rk = jax.lax.rsqrt(jnp.mean(kb * kb, -1) + eps.qk)
  P = jnp.sum(Xf * kb * (p['sq'].astype(_F32) * p['sk'].astype(_F32)), -1)
  g = rq * rk * P / math.sqrt(X_BTND.shape[-1])
  alpha = jax.nn.sigmoid(jnp.sign(g) * jnp.sqrt(jnp.maximum(jnp.abs(g), _GATE_CLAMP)))
  rows = dict(rq=rq, rk=rk, P=P, g=g, alpha=alpha)
  if 'w' in p:
    rows['den'] = alpha * alpha * jnp.mean(vb * vb, -1)[..., None] + eps.conv
    rows['a'] = alpha * jax.lax.rsqrt(rows['den'])
  return rows


def _conv_taps(p, eps: _Eps, n: int):
  """[(lag_j, W[j] * conv scale [N,D])] per tap j, which reads position t - (w-1-j)*dilation."""
  w = p['w'].astype(_F32)
  w_WND = w.reshape(w.shape[0], n, -1) * p['sc'].astype(_F32)
  return [((w.shape[0] - 1 - j) * eps.dilation, w_WND[j]) for j in range(w.shape[0])]


def _conv_pre(vb_BTD, a_BTN, taps):
  """C [B,T,N,D] = sum_j W[j] * Z[t - lag_j], Z = sc * v * a formed per tap from its factors."""
  return sum(ws * _shift(vb_BTD, lag)[:, :, None] * _shift(a_BTN, lag)[..., None]
             for lag, ws in taps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gate_conv(X_BTND, k_BTND, v_BTD, p, eps: _Eps):
  """SPEC §6.3 steps 3-5 from the projections: Y [B,T,N,D] in X's dtype. k_BTND and v_BTD are
  the key and value GEMMs' outputs before their biases; p holds sq, sk (the q and k norm scales),
  optionally bk, bv (the biases) and sc, w (the conv norm's scale and the conv kernel [w, N*D];
  without them Y is the gated value alone).

  The math is fp32 inside fused passes. The custom VJP keeps no stream-sized fp32 tensor: it
  recomputes from the bf16 inputs and [B,T,N], [B,T,D] factors what autodiff stored in fp32 (the
  normed q and k, the gated value, the conv's input and output: ~5 GB per Engram layer at
  bench_h200's micro-batch)."""
  return _gate_conv_fwd(X_BTND, k_BTND, v_BTD, p, eps)[0]


def _gate_conv_fwd(X_BTND, k_BTND, v_BTD, p, eps):
  rows = _gate_rows(X_BTND, k_BTND, v_BTD, p, eps)
  vb = _with_bias(v_BTD, p, 'bv')
  y = rows['alpha'][..., None] * vb[:, :, None]
  if 'w' in p:
    y = y + jax.nn.silu(_conv_pre(vb, rows['a'], _conv_taps(p, eps, X_BTND.shape[2])))
  return y.astype(X_BTND.dtype), (X_BTND, k_BTND, v_BTD, p, rows)


def _gate_conv_bwd(eps, res, dy_BTND):
  X_BTND, k_BTND, v_BTD, p, r = res
  N, D = X_BTND.shape[2:]
  Xf, kb, vb = X_BTND.astype(_F32), _with_bias(k_BTND, p, 'bk'), _with_bias(v_BTD, p, 'bv')
  dy, alpha = dy_BTND.astype(_F32), r['alpha']
  dalpha = jnp.sum(dy * vb[:, :, None], -1)
  dvb = jnp.sum(dy * alpha[..., None], 2)
  grads = {}
  if 'w' in p:
    a, taps = r['a'], _conv_taps(p, eps, N)
    C = _conv_pre(vb, a, taps)
    sig = jax.nn.sigmoid(C)
    dC = (dy * sig * (1 + C * (1 - sig))).astype(dy_BTND.dtype).astype(_F32)   # through SiLU
    w, sc = p['w'].astype(_F32).reshape(len(taps), N, D), p['sc'].astype(_F32)
    dz = sum(w[j] * _unshift(dC, lag) for j, (lag, _) in enumerate(taps))      # dL/dZ
    grads['sc'] = jnp.sum(dz * vb[:, :, None] * a[..., None], (0, 1))
    grads['w'] = jnp.stack([
        jnp.sum(dC * sc * _shift(vb, lag)[:, :, None] * _shift(a, lag)[..., None], (0, 1))
        for lag, _ in taps]).reshape(p['w'].shape)
    da = jnp.sum(dz * sc * vb[:, :, None], -1)
    dvb = dvb + jnp.sum(dz * sc * a[..., None], 2)
    inv3 = jax.lax.rsqrt(r['den']) ** 3               # a = alpha (alpha^2 mean(v^2) + eps)^-1/2
    dalpha = dalpha + da * eps.conv * inv3
    dvb = dvb + jnp.sum(da * alpha ** 3 * inv3, -1)[..., None] * (-1.0 / D) * vb
  g = r['g']
  big = jnp.abs(g) > _GATE_CLAMP                      # inside the clamp: no gradient
  dg = jnp.where(big, dalpha * alpha * (1 - alpha) * 0.5 * jax.lax.rsqrt(
      jnp.where(big, jnp.abs(g), 1.0)), 0.0)
  c = dg / math.sqrt(D)
  dP, drq, drk = c * r['rq'] * r['rk'], c * r['rk'] * r['P'], c * r['rq'] * r['P']
  sq, sk = p['sq'].astype(_F32), p['sk'].astype(_F32)
  dX = dP[..., None] * kb * (sq * sk) - (drq * r['rq'] ** 3 / D)[..., None] * Xf
  dkb = dP[..., None] * Xf * (sq * sk) - (drk * r['rk'] ** 3 / D)[..., None] * kb
  grads['sq'] = jnp.sum(dP[..., None] * Xf * kb * sk, (0, 1))
  grads['sk'] = jnp.sum(dP[..., None] * Xf * kb * sq, (0, 1))
  if 'bk' in p:
    grads['bk'] = jnp.sum(dkb, (0, 1))
    grads['bv'] = jnp.sum(dvb, (0, 1))
  return (dX.astype(X_BTND.dtype), dkb.astype(k_BTND.dtype), dvb.astype(v_BTD.dtype),
          {name: grads[name].astype(x.dtype) for name, x in p.items()})


gate_conv.defvjp(_gate_conv_fwd, _gate_conv_bwd)


class _Proj(nnx.Module):
  """kernel [..., d_in, D] and (optional) bias [..., D]."""

  def __init__(self, rngs, shape, axes, std, bias: bool):
    self.kernel = param(rngs, shape, axes, std)
    self.bias = const_param(0.0, shape[:-2] + shape[-1:], axes[:-2] + ('norm',)) if bias else None


class _Scale(nnx.Module):
  """Per-stream RMSNorm scales [N, D] (init 1) and the norm's eps."""

  def __init__(self, n: int, d: int, eps: float):
    self.scale = const_param(1.0, (n, d), ('streams', 'norm'))
    self.eps = eps


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

  def projections(self, e_BTM: jax.Array):
    """gate_conv's inputs besides the streams: (k [B,T,N,D], v [B,T,D] in the compute dtype,
    before their biases; the parameters p; the static eps)."""
    v_BTD = matmul('btm,md->btd', e_BTM, self.value_proj.kernel[...], self.dtype)
    k_BTND = matmul('btm,nmd->btnd', e_BTM, self.key_proj.kernel[...], self.dtype)
    p = {'sq': self.q_norm.scale[...], 'sk': self.k_norm.scale[...]}
    if self.value_proj.bias is not None:
      p.update(bv=self.value_proj.bias[...], bk=self.key_proj.bias[...])
    if self.conv is not None:
      p.update(sc=self.conv_norm.scale[...], w=self.conv.kernel[...])
    eps = _Eps(self.q_norm.eps, self.conv_norm.eps if self.conv is not None else 0.0,
               self.dilation)
    return k_BTND, v_BTD, p, eps

  def mix(self, X_BTND: jax.Array, e_BTM: jax.Array) -> jax.Array:
    """Y [B,T,N,D] to add to the streams: gated value plus SiLU of the short conv."""
    if X_BTND.ndim != 4 or X_BTND.shape[2:] != (self.n, self.d):
      raise ValueError(f'Engram layer {self.layer_id}: X_BTND has shape {X_BTND.shape}, expected '
                       f'[B, T, mhc.streams={self.n}, model.d_model={self.d}]')
    if e_BTM.shape != X_BTND.shape[:2] + (self.d_mem,):
      raise ValueError(f'Engram layer {self.layer_id}: e_BTM has shape {e_BTM.shape}, expected '
                       f'{X_BTND.shape[:2] + (self.d_mem,)} (engram.d_mem)')
    y = gate_conv(X_BTND, *self.projections(e_BTM))
    return constrain(y, ('batch', 'seq', 'streams', 'act_embed'))

  def __call__(self, X_BTND: jax.Array, rows_BTJ: jax.Array) -> jax.Array:
    return self.mix(X_BTND, self.retrieve(rows_BTJ))
