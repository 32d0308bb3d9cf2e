"""mHC: manifold-constrained hyper-connections over N residual streams (SPEC §5).

Dims: B batch, T positions, N mHC streams (SPEC's n), D model dim, C = (2+N)N coefficient slots.

The residual is N streams X [B,T,N,D]. Each site (attention, FFN) reads one input
u = sum_m pre_m X_m, runs its sub-layer F, and writes X'_k = post_k y + sum_j comb[j,k] X_j, where
comb is doubly stochastic (Sinkhorn) so the residual gain stays near 1. The coefficients come from
one RMS-normalised matmul over all ND features of a token, in fp32. comb[j,k] has the source stream
j first; the paper's H^res is comb^T.

The coefficients' normed matmul with the read-in (one op, hc_mix.mix_read_in) and the write-back
go through the hc_mix seam (`config.kernels.hc_mix`: jnp custom VJPs, or Triton kernels that read
and write the streams once per pass on GPU; v4jax/kernels/hc_mix), the Sinkhorn through its own
(`config.kernels.sinkhorn`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from v4jax.kernels import hc_mix
# The seams; re-exported for the model's users (read_in / write_back take impl=, default 'auto').
from v4jax.kernels.hc_mix import read_in, read_in_reference, write_back, write_back_reference
from v4jax.kernels.sinkhorn import sinkhorn
from v4jax.model.layers import const_param, constrain, f32_mode, param

__all__ = ['sinkhorn', 'HCSite', 'HyperHead', 'expand_streams', 'read_in', 'write_back',
           'read_in_reference', 'write_back_reference']

_F32 = jnp.float32


def expand_streams(e_BTD: jax.Array, n: int) -> jax.Array:
  """N identical copies of the embedding: X0[m] = e (SPEC §5 'Streams in')."""
  B, T, D = e_BTD.shape
  return jnp.broadcast_to(e_BTD[:, :, None, :], (B, T, n, D))


def _mix_mode(X_BTND: jax.Array, tf32: bool) -> str:
  """The reference's GEMM mode for the normed mix: bf16 streams take the exact split-bf16 GEMMs
  (layers.dot_f32), fp32 streams fp32 GEMMs at HIGHEST precision, `tf32` (DeepSeek's speed mode)
  TF32 GEMMs for either. The Triton kernels are exact for bf16 streams."""
  return 'tf32' if tf32 else f32_mode(X_BTND.dtype)


def _normed_mix(X_BTND: jax.Array, fn: jax.Array, eps: float, tf32: bool,
                impl: str = 'auto') -> jax.Array:
  """mu = (x . fn) / sqrt(mean(x^2) + eps) over the flattened ND features, fp32 [B,T,C], through
  the hc_mix seam (`impl`: config.kernels.hc_mix)."""
  return hc_mix.normed_mix(X_BTND, fn.astype(_F32), eps, _mix_mode(X_BTND, tf32), impl=impl)


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
    self.sinkhorn_impl, self.hc_mix_impl = cfg.kernels.sinkhorn, cfg.kernels.hc_mix
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
    """(pre [B,T,N], post [B,T,N], comb [B,T,N,N]) in fp32 (SPEC §5 steps 1-5), for inspection
    and tests: __call__ gets the same values through hc_mix.mix_read_in and _post_comb."""
    _check_streams(X_BTND, self.n, self.d, 'HCSite.coeffs')
    mu = _normed_mix(X_BTND, self.fn[...], self.norm_eps, self.tf32, self.hc_mix_impl)
    b, a = self.base[...], self.scale[...]
    return (hc_mix.pre_gate(mu, a[0], b[:self.n], self.eps), *self._post_comb(mu))

  def _post_comb(self, mu_BTC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """post [B,T,N] and the Sinkhorn-projected comb [B,T,N,N] from the normed mix (steps 3-5)."""
    n = self.n
    b, a = self.base[...].astype(_F32), self.scale[...].astype(_F32)
    post = 2.0 * jax.nn.sigmoid(a[1] * mu_BTC[..., n:2 * n] + b[n:2 * n])
    lam = a[2] * mu_BTC[..., 2 * n:] + b[2 * n:]
    comb = sinkhorn(lam.reshape(*lam.shape[:-1], n, n), self.iters, self.eps,
                    impl=self.sinkhorn_impl)
    return post, comb

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
    # The normed mix and the read-in in one op; the write-back takes the streams it hands on
    # (Xw is X), so the op's backward adds the write-back's stream cotangent in its dX pass.
    mu, u, Xw = hc_mix.mix_read_in(X_BTND, self.fn[...], self.scale[0], self.base[:self.n],
                                   self.norm_eps, self.eps, _mix_mode(X_BTND, self.tf32),
                                   pass_streams=True, impl=self.hc_mix_impl)
    # model.remat_save=('mhc_coeffs',) keeps post and comb ([B,T,N+N^2] fp32): the backward
    # then reruns no Sinkhorn iterations
    post, comb = (checkpoint_name(c, 'mhc_coeffs') for c in self._post_comb(mu))
    y, aux = f(constrain(u, ('batch', 'seq', 'act_embed')))
    out = constrain(write_back(Xw, y, post, comb, impl=self.hc_mix_impl),
                    ('batch', 'seq', 'streams', 'act_embed'))
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
    self.hc_mix_impl = cfg.kernels.hc_mix
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
    _, u = hc_mix.mix_read_in(X_BTND, self.fn[...], self.scale[0], self.base[...],
                              self.norm_eps, self.eps, _mix_mode(X_BTND, self.tf32),
                              impl=self.hc_mix_impl)
    return u
