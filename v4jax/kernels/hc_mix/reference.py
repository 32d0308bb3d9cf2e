"""mHC's stream mixing in jnp (SPEC §5): the coefficients' normed mix, read-in and write-back.

Dims: B batch, T positions, N mHC streams, D model dim, M = B*T tokens, K = N*D features of a
token, C = (2+N)N coefficient slots (N at the HyperHead).

These are the custom VJPs the model ran before the Triton kernels (gpu.py), kept as the seam's
`reference` impl, and the plain autodiff forms `read_in_reference` / `write_back_reference`
(the tests' and tools/bench_mhc.py's oracles).

The streams' mixing passes are memory-bound. Autodiff of their jnp forms materialised an fp32
copy of the streams (kept for, or recomputed in, the backward) and reduced a broadcast
[B,T,N,N,D] product over j; its cotangents were fp32 [B,T,N,D] sums. The custom VJPs read the
bf16 streams in every pass, unroll the short stream axis into elementwise sums, and return bf16
stream cotangents (each contribution rounded once, as a bf16 residual stream's cotangent is).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from v4jax.model.layers import barrier_active, dot_f32

_F32 = jnp.float32


# ---- the coefficients' normed mix -------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mix_rows(x_MK: jax.Array, fn_KC: jax.Array, eps: float, mode: str, keep: bool) -> jax.Array:
  """mu = (x @ fn) * rsqrt(mean(x^2) + eps) per row, fp32 [M,C]. keep: the GEMM's output behind
  the remat barrier (layers.barrier_active, read when the op is called: jax traces this forward
  rule later, outside the block's trace)."""
  return _mix_rows_fwd(x_MK, fn_KC, eps, mode, keep)[0]


def _mix_rows_fwd(x_MK, fn_KC, eps, mode, keep=False):
  a_MC = dot_f32(x_MK, fn_KC, ((1,), (0,)), mode, keep=keep)
  xf = x_MK.astype(_F32)
  r_M1 = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return a_MC * r_M1, (x_MK, fn_KC, a_MC, r_M1)


def _mix_rows_bwd(eps, mode, keep, res, dmu_MC):
  """da = dmu r; dfn = x^T da; dx = da fn^T - (Σ_c dmu a) r^3 x / K (d r / d x = -r^3 x / K)."""
  x_MK, fn_KC, a_MC, r_M1 = res
  da_MC = dmu_MC * r_M1
  dfn_KC = dot_f32(x_MK, da_MC, ((0,), (0,)), mode)
  dx_MK = dot_f32(da_MC, fn_KC, ((1,), (1,)), 'tf32' if mode == 'tf32' else 'highest')
  coef_M1 = jnp.sum(dmu_MC * a_MC, axis=-1, keepdims=True) * r_M1 ** 3 / x_MK.shape[-1]
  dx_MK = dx_MK - coef_M1 * x_MK.astype(_F32)
  return dx_MK.astype(x_MK.dtype), dfn_KC.astype(fn_KC.dtype)


_mix_rows.defvjp(_mix_rows_fwd, _mix_rows_bwd)


def normed_mix_and_rsqrt(X_BTND: jax.Array, fn_KC: jax.Array, eps: float, mode: str,
                         keep: bool = False) -> tuple[jax.Array, jax.Array]:
  """(mu [B,T,C], r [B,T]) by the GEMMs of _mix_rows' forward (no VJP): the forward of a custom
  VJP that keeps r for its own backward (gpu.py's mix_read_in)."""
  B, T, N, D = X_BTND.shape
  mu_MC, (_, _, _, r_M1) = _mix_rows_fwd(X_BTND.reshape(B * T, N * D), fn_KC.astype(_F32), eps,
                                         mode, keep)
  return mu_MC.reshape(B, T, -1), r_M1.reshape(B, T)


def normed_mix(X_BTND: jax.Array, fn_KC: jax.Array, eps: float, mode: str) -> jax.Array:
  """mu [B,T,C] = (x . fn) / sqrt(mean(x^2) + eps) over each token's flattened ND features,
  fp32; the GEMMs in layers.dot_f32's `mode`."""
  B, T, N, D = X_BTND.shape
  return _mix_rows(X_BTND.reshape(B * T, N * D), fn_KC.astype(_F32), eps, mode,
                   barrier_active()).reshape(B, T, -1)


def gate(mu_BTC: jax.Array, scale: jax.Array, base_N: jax.Array) -> jax.Array:
  """sigmoid(scale mu[..., :N] + base) [B,T,N]: the read-in's weights less their eps (SPEC §5
  step 2; the HyperHead's too), from the first N columns of the normed mix."""
  n = base_N.shape[-1]
  return jax.nn.sigmoid(scale.astype(_F32) * mu_BTC[..., :n] + base_N.astype(_F32))


def pre_gate(mu_BTC: jax.Array, scale: jax.Array, base_N: jax.Array, eps: float) -> jax.Array:
  """pre [B,T,N] = gate(mu, scale, base) + eps: the read-in's weights."""
  return gate(mu_BTC, scale, base_N) + eps


# ---- read-in and write-back -------------------------------------------------------------------

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


def mix_read_in(X_BTND: jax.Array, fn_KC: jax.Array, scale: jax.Array, base_N: jax.Array,
                eps: float, pre_eps: float, mode: str) -> tuple[jax.Array, jax.Array]:
  """(mu, u): the normed mix, then the read-in with pre_gate's weights (the composition that
  gpu.mix_read_in fuses)."""
  mu_BTC = normed_mix(X_BTND, fn_KC, eps, mode)
  return mu_BTC, read_in(X_BTND, pre_gate(mu_BTC, scale, base_N, pre_eps))
