"""mHC: manifold-constrained hyper-connections over N residual streams (SPEC §5).

Dims: B batch, T positions, N mHC streams (SPEC's n), D model dim, C = (2+N)N coefficient slots.

The residual is N streams X [B,T,N,D]. Each site (attention, FFN) reads one input
u = sum_m pre_m X_m, runs its sub-layer F, and writes X'_k = post_k y + sum_j comb[j,k] X_j, where
comb is doubly stochastic (Sinkhorn) so the residual gain stays near 1. The coefficients come from
one RMS-normalised matmul over all ND features of a token, in fp32. comb[j,k] has the source stream
j first; the paper's H^res is comb^T.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from v4jax.kernels.sinkhorn import sinkhorn   # the seam; re-exported for the model's users
from v4jax.model.layers import const_param, constrain, dot_f32, f32_mode, param

__all__ = ['sinkhorn', 'HCSite', 'HyperHead', 'expand_streams', 'read_in', 'write_back',
           'read_in_reference', 'write_back_reference']

_F32 = jnp.float32


def expand_streams(e_BTD: jax.Array, n: int) -> jax.Array:
  """N identical copies of the embedding: X0[m] = e (SPEC §5 'Streams in')."""
  B, T, D = e_BTD.shape
  return jnp.broadcast_to(e_BTD[:, :, None, :], (B, T, n, D))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mix_rows(x_MK: jax.Array, fn_KC: jax.Array, eps: float, mode: str) -> jax.Array:
  """mu = (x @ fn) * rsqrt(mean(x^2) + eps) per row, fp32 [M,C]."""
  return _mix_rows_fwd(x_MK, fn_KC, eps, mode)[0]


def _mix_rows_fwd(x_MK, fn_KC, eps, mode):
  a_MC = dot_f32(x_MK, fn_KC, ((1,), (0,)), mode)
  xf = x_MK.astype(_F32)
  r_M1 = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return a_MC * r_M1, (x_MK, fn_KC, a_MC, r_M1)


def _mix_rows_bwd(eps, mode, res, dmu_MC):
  """da = dmu r; dfn = x^T da; dx = da fn^T - (Σ_c dmu a) r^3 x / K (d r / d x = -r^3 x / K)."""
  x_MK, fn_KC, a_MC, r_M1 = res
  da_MC = dmu_MC * r_M1
  dfn_KC = dot_f32(x_MK, da_MC, ((0,), (0,)), mode)
  dx_MK = dot_f32(da_MC, fn_KC, ((1,), (1,)), 'tf32' if mode == 'tf32' else 'highest')
  coef_M1 = jnp.sum(dmu_MC * a_MC, axis=-1, keepdims=True) * r_M1 ** 3 / x_MK.shape[-1]
  dx_MK = dx_MK - coef_M1 * x_MK.astype(_F32)
  return dx_MK.astype(x_MK.dtype), dfn_KC.astype(fn_KC.dtype)


_mix_rows.defvjp(_mix_rows_fwd, _mix_rows_bwd)


def _normed_mix(X_BTND: jax.Array, fn: jax.Array, eps: float, tf32: bool) -> jax.Array:
  """mu = (x . fn) / sqrt(mean(x^2) + eps) over the flattened ND features, fp32.

  bf16 streams take the exact split-bf16 GEMMs (layers.dot_f32); fp32 streams fp32 GEMMs at
  HIGHEST precision; `tf32` (DeepSeek's speed mode) TF32 GEMMs for either.
  """
  B, T, N, D = X_BTND.shape
  mode = 'tf32' if tf32 else f32_mode(X_BTND.dtype)
  mu = _mix_rows(X_BTND.reshape(B * T, N * D), fn.astype(_F32), eps, mode)
  return mu.reshape(B, T, -1)


# ---- read-in and write-back -------------------------------------------------------------------
# The streams' mixing passes are memory-bound. Autodiff of their jnp forms materialised an fp32
# copy of the streams (kept for, or recomputed in, the backward) and reduced a broadcast
# [B,T,N,N,D] product over j; its cotangents were fp32 [B,T,N,D] sums. The custom VJPs below read
# the bf16 streams in every pass, unroll the short stream axis into elementwise sums, and return
# bf16 stream cotangents (each contribution rounded once, as a bf16 residual stream's cotangent
# is). `*_reference` are the plain forms: the tests' and tools/bench_mhc.py's oracle.

def _mix(W_BTMK: jax.Array, X_BTMD: jax.Array, acc_BTKD: jax.Array | None = None) -> jax.Array:
  """[B,T,K,D] = acc + sum_m W[..., m, k] X[:, :, m] in fp32, as M elementwise terms added in
  order of m (no fp32 copy of X, no [B,T,M,K,D] product)."""
  for m in range(X_BTMD.shape[2]):
    term = W_BTMK[..., m, :, None] * X_BTMD[:, :, m, None, :].astype(_F32)
    acc_BTKD = term if acc_BTKD is None else acc_BTKD + term
  return acc_BTKD


def _weighted_sum(c_BTM: jax.Array, X_BTMD: jax.Array) -> jax.Array:
  """sum_m c[..., m] X[:, :, m] in fp32: [B,T,D]."""
  return _mix(c_BTM[..., None], X_BTMD)[:, :, 0]


def _row_dots(A_BTJD: jax.Array, G_BTKD: jax.Array) -> jax.Array:
  """[B,T,J,K] = sum_d A[:, :, j, d] G[:, :, k, d] in fp32 (one reduction over d)."""
  return jnp.sum(A_BTJD.astype(_F32)[:, :, :, None, :] * G_BTKD.astype(_F32)[:, :, None, :, :],
                 axis=-1)


def read_in_reference(X_BTND: jax.Array, pre_BTN: jax.Array) -> jax.Array:
  """u = sum_m pre_m X_m in X's dtype (plain jnp; autodiff)."""
  return jnp.sum(pre_BTN[..., None] * X_BTND.astype(_F32), axis=2).astype(X_BTND.dtype)


@jax.custom_vjp
def read_in(X_BTND: jax.Array, pre_BTN: jax.Array) -> jax.Array:
  """u = sum_m pre_m X_m in X's dtype; pre is fp32."""
  return _weighted_sum(pre_BTN, X_BTND).astype(X_BTND.dtype)


def _read_in_fwd(X_BTND, pre_BTN):
  return read_in(X_BTND, pre_BTN), (X_BTND, pre_BTN)


def _read_in_bwd(res, du_BTD):
  """dX_m = pre_m du; dpre_m = <X_m, du>."""
  X_BTND, pre_BTN = res
  du = du_BTD.astype(_F32)[:, :, None, :]
  dX = (pre_BTN[..., None] * du).astype(X_BTND.dtype)
  return dX, _row_dots(X_BTND, du)[..., 0].astype(pre_BTN.dtype)


read_in.defvjp(_read_in_fwd, _read_in_bwd)


def write_back_reference(X_BTND, y_BTD, post_BTN, comb_BTNN):
  """X'_k = post_k y + sum_j comb[j,k] X_j in X's dtype (plain jnp; autodiff)."""
  Xf = X_BTND.astype(_F32)
  res = jnp.sum(comb_BTNN[..., None] * Xf[:, :, :, None, :], axis=2)
  return (post_BTN[..., None] * y_BTD.astype(_F32)[:, :, None, :] + res).astype(X_BTND.dtype)


@jax.custom_vjp
def write_back(X_BTND: jax.Array, y_BTD: jax.Array, post_BTN: jax.Array,
               comb_BTNN: jax.Array) -> jax.Array:
  """X'_k = post_k y + sum_j comb[j,k] X_j in X's dtype; post and comb are fp32."""
  out = _mix(comb_BTNN, X_BTND, post_BTN[..., None] * y_BTD.astype(_F32)[:, :, None, :])
  return out.astype(X_BTND.dtype)


def _write_back_fwd(X_BTND, y_BTD, post_BTN, comb_BTNN):
  return write_back(X_BTND, y_BTD, post_BTN, comb_BTNN), (X_BTND, y_BTD, post_BTN, comb_BTNN)


def _write_back_bwd(res, g_BTND):
  """dX_j = sum_k comb[j,k] g_k; dy = sum_k post_k g_k; dpost_k = <g_k, y>;
  dcomb[j,k] = <X_j, g_k>."""
  X_BTND, y_BTD, post_BTN, comb_BTNN = res
  dX = _mix(jnp.swapaxes(comb_BTNN, -1, -2), g_BTND).astype(X_BTND.dtype)
  dy = _weighted_sum(post_BTN, g_BTND).astype(y_BTD.dtype)
  dpost = _row_dots(y_BTD[:, :, None, :], g_BTND)[:, :, 0]
  dcomb = _row_dots(X_BTND, g_BTND)
  return dX, dy, dpost.astype(post_BTN.dtype), dcomb.astype(comb_BTNN.dtype)


write_back.defvjp(_write_back_fwd, _write_back_bwd)


def _check_streams(X_BTND: jax.Array, n: int, d: int, who: str):
  if X_BTND.ndim != 4 or X_BTND.shape[2:] != (n, d):
    raise ValueError(f'{who}: X_BTND has shape {X_BTND.shape}, expected [B, T, '
                     f'mhc.streams={n}, model.d_model={d}]')


def _diagnostics(comb_BTNN: jax.Array) -> dict[str, jax.Array]:
  """Token-averaged gains and Sinkhorn residuals of one site (no gradient)."""
  c = jax.lax.stop_gradient(jnp.abs(comb_BTNN))
  col, row = jnp.sum(c, axis=-2), jnp.sum(c, axis=-1)    # [B,T,N] over j / over k
  return {
      'mhc_fwd_gain': jnp.mean(jnp.max(col, axis=-1)),
      'mhc_bwd_gain': jnp.mean(jnp.max(row, axis=-1)),
      'mhc_col_residual': jnp.mean(jnp.max(jnp.abs(col - 1.0), axis=-1)),
      'mhc_row_residual': jnp.mean(jnp.max(jnp.abs(row - 1.0), axis=-1)),
  }


class HCSite(nnx.Module):
  """One hyper-connection site (`hc_attn` or `hc_ffn`): coefficients, read-in and write-back.

  fn columns are [pre 0..N-1 | post N..2N-1 | comb 2N..2N+N^2-1], comb[j,k] at 2N + jN + k.
  With N = 1 the site has no parameters and is the plain residual X + F(X).
  """

  def __init__(self, cfg, site_index: int, *, rngs: nnx.Rngs):
    h = cfg.mhc
    self.n, self.d = h.streams, cfg.model.d_model
    self.iters, self.eps, self.norm_eps, self.tf32 = (
        h.sinkhorn_iters, h.eps, cfg.model.norm_eps, h.tf32)
    self.sinkhorn_impl = cfg.kernels.sinkhorn
    if self.n == 1:
      return
    n = self.n
    c = (2 + n) * n
    self.fn = param(rngs, (n * self.d, c), (None, 'hc_coeff'), h.fn_init_std)
    self.base = const_param(0.0, (c,), ('hc_coeff',))
    if h.bias_init == 'identity':     # pre: +3 at the home stream, -3 elsewhere; comb ~ I
      b_pre = jnp.full((n,), -3.0, _F32).at[site_index % n].set(3.0)
      b_res = 6.0 * jnp.eye(n, dtype=_F32) - 3.0
      self.base[...] = jnp.concatenate([b_pre, jnp.zeros((n,), _F32), b_res.reshape(-1)])
    elif h.bias_init != 'zero':
      raise ValueError(f"config.mhc.bias_init={h.bias_init!r} is not one of ('zero', 'identity')")
    self.scale = const_param(h.alpha_init, (3,), (None,))

  def coeffs(self, X_BTND: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(pre [B,T,N], post [B,T,N], comb [B,T,N,N]) in fp32 (SPEC §5 steps 1-5)."""
    _check_streams(X_BTND, self.n, self.d, 'HCSite.coeffs')
    n = self.n
    mu = _normed_mix(X_BTND, self.fn[...], self.norm_eps, self.tf32)
    b, a = self.base[...].astype(_F32), self.scale[...].astype(_F32)
    pre = jax.nn.sigmoid(a[0] * mu[..., :n] + b[:n]) + self.eps
    post = 2.0 * jax.nn.sigmoid(a[1] * mu[..., n:2 * n] + b[n:2 * n])
    lam = a[2] * mu[..., 2 * n:] + b[2 * n:]
    comb = sinkhorn(lam.reshape(*lam.shape[:-1], n, n), self.iters, self.eps,
                    impl=self.sinkhorn_impl)
    return pre, post, comb

  def __call__(self, X_BTND: jax.Array,
               f: Callable[[jax.Array], tuple[jax.Array, Any]]) -> tuple[jax.Array, dict]:
    """X' = comb^T X + post (x) f(sum_m pre_m X_m).

    Returns (X', aux): f's aux dict plus this site's mhc_* diagnostics.
    """
    _check_streams(X_BTND, self.n, self.d, 'HCSite')
    dtype = X_BTND.dtype
    if self.n == 1:
      y, aux = f(X_BTND[:, :, 0])
      return X_BTND + y.astype(dtype)[:, :, None, :], _as_dict(aux)
    # model.remat_save=('mhc_coeffs',) keeps them ([B,T,(2+N)N] fp32): the backward then reruns
    # neither the streams' RMS nor the Sinkhorn iterations
    pre, post, comb = (checkpoint_name(c, 'mhc_coeffs') for c in self.coeffs(X_BTND))
    u = constrain(read_in(X_BTND, pre), ('batch', 'seq', 'act_embed'))
    y, aux = f(u)
    out = constrain(write_back(X_BTND, y, post, comb), ('batch', 'seq', 'streams', 'act_embed'))
    return out, {**_as_dict(aux), **_diagnostics(comb)}


def _as_dict(aux) -> dict:
  if aux is None:
    return {}
  if not isinstance(aux, dict):
    raise TypeError(f'HCSite: the sub-layer must return (y, aux) with aux a dict or None, '
                    f'got {type(aux).__name__}')
  return aux


class HyperHead(nnx.Module):
  """Stream reduction before the final norm (cfg.mhc.head): hyper = sum_m a_m X_m with learned
  a_m = sigmoid(alpha mu_m + b_m) + eps; sum = sum_m X_m; first = X_0. N = 1 is the identity."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    h = cfg.mhc
    self.n, self.d, self.mode = h.streams, cfg.model.d_model, h.head
    self.eps, self.norm_eps, self.tf32 = h.eps, cfg.model.norm_eps, h.tf32
    if self.mode not in ('hyper', 'sum', 'first'):
      raise ValueError(f"config.mhc.head={self.mode!r} is not one of ('hyper', 'sum', 'first')")
    if self.n > 1 and self.mode == 'hyper':
      self.fn = param(rngs, (self.n * self.d, self.n), (None, 'hc_coeff'), h.fn_init_std)
      self.base = const_param(0.0, (self.n,), ('hc_coeff',))
      self.scale = const_param(h.alpha_init, (1,), (None,))

  def __call__(self, X_BTND: jax.Array) -> jax.Array:
    _check_streams(X_BTND, self.n, self.d, 'HyperHead')
    if self.n == 1 or self.mode == 'first':
      return X_BTND[:, :, 0]
    if self.mode == 'sum':
      return jnp.sum(X_BTND.astype(_F32), axis=2).astype(X_BTND.dtype)
    mu = _normed_mix(X_BTND, self.fn[...], self.norm_eps, self.tf32)
    a = jax.nn.sigmoid(self.scale[...].astype(_F32)[0] * mu + self.base[...].astype(_F32))
    return read_in(X_BTND, a + self.eps)
