"""Token cross entropy of the LM head (SPEC §9), with a hand-written backward.

Dims: B batch, T positions, D model dim, V vocabulary.

With a 129K vocabulary the logits are the largest tensor of a small model's step (16K tokens:
4.2 GB in bf16, 8.5 GB in fp32), so the passes over them matter. Autodiff of
`logsumexp(logits.astype(f32))` builds the fp32 gradient and converts it to bf16 in separate
passes; the custom VJP here reads the saved compute-dtype logits once and writes the
compute-dtype gradient softmax - onehot in one fused pass. The chunked form (the presets') takes
each chunk's loss and gradient from the xent kernel seam (v4jax/kernels/xent: on GPU one Triton
kernel per chunk instead of XLA's three reads of the logits).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from v4jax.kernels import xent
from v4jax.model.layers import matmul

F32 = jnp.float32


@jax.custom_vjp
def token_nll_sum(logits_BTV: jax.Array, targets_BT: jax.Array, weight_BT: jax.Array) -> jax.Array:
  """Σ_t weight_t·(logsumexp(logits_t) - logits_t[target_t]), fp32 math on any logits dtype.
  Differentiable in the logits only (targets are ids, weights a mask)."""
  return _nll_fwd(logits_BTV, targets_BT, weight_BT)[0]


def _nll_fwd(logits_BTV, targets_BT, weight_BT):
  lse_BT, tgt_BT = xent.reference.lse_and_target(logits_BTV, targets_BT)
  return jnp.sum((lse_BT - tgt_BT) * weight_BT), (logits_BTV, targets_BT, weight_BT, lse_BT)


def _nll_bwd(res, g):
  logits_BTV, targets_BT, weight_BT, lse_BT = res
  return xent.reference.grad(logits_BTV, targets_BT, g * weight_BT, lse_BT), None, None


token_nll_sum.defvjp(_nll_fwd, _nll_bwd)


def cross_entropy_sum(h_BTD, head_DV, targets_BT, weight_BT, dtype, chunk: int = 0,
                      xent_impl: str = 'auto'):
  """Sum over tokens of weight * -log softmax(h @ head)[target], fp32 log-softmax (weight 0 on
  padding).

  With `chunk > 0` (dividing T) the sequence is processed `chunk` positions at a time, so the
  full [B,T,V] logits are never held at once (needed for 129K vocabularies at long T); each
  chunk's loss and logits gradient then come from the xent seam (`xent_impl`:
  config.kernels.xent).
  """
  T = h_BTD.shape[1]
  if chunk <= 0 or chunk >= T or T % chunk:
    return token_nll_sum(matmul('btd,dv->btv', h_BTD, head_DV, dtype), targets_BT, weight_BT)
  return _chunked_nll_sum(h_BTD, head_DV, targets_BT, weight_BT, jnp.dtype(dtype), chunk,
                          xent_impl)


def _chunks(a, chunk):
  """[B,T,...] -> [T/chunk, B, chunk, ...], the scan's leading axis."""
  B, T = a.shape[:2]
  return jnp.moveaxis(a.reshape(B, T // chunk, chunk, *a.shape[2:]), 1, 0)


def _unchunk(a):
  n, B, C = a.shape[:3]
  return jnp.moveaxis(a, 0, 1).reshape(B, n * C, *a.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_nll_sum(h_BTD, head_DV, targets_BT, weight_BT, dtype, chunk, impl):
  """cross_entropy_sum in T-chunks. Differentiated, one pass over the chunks also forms the
  gradients for a unit cotangent (as fused linear cross-entropy kernels do), so the backward
  only scales them: 3 logits-sized GEMMs per chunk instead of the 4 of a recomputing backward.
  The head is cast to the compute dtype once and its fp32 gradient accumulates across chunks
  (autodiff of a remat'd scan cast it and transposed the [D,V] gradient in every chunk)."""
  return _chunk_scan(h_BTD, head_DV, targets_BT, weight_BT, dtype, chunk, impl, grads=False)[0]


def _chunk_scan(h_BTD, head_DV, targets_BT, weight_BT, dtype, chunk, impl, grads: bool):
  """(loss sum, dL/dhead fp32 or None, dL/dh [n,B,C,D] or None) for a unit cotangent."""
  w_DV = head_DV.astype(dtype)

  def body(carry, xs):             # token_nll_sum's forward and backward on each chunk's logits
    total, dw_DV = carry
    h_BCD, t_BC, wt_BC = xs
    x_BCD = h_BCD.astype(dtype)
    logits_BCV = matmul('bcd,dv->bcv', x_BCD, w_DV, dtype)
    if not grads:
      return (total + _nll_fwd(logits_BCV, t_BC, wt_BC)[0], dw_DV), None
    nll, d_BCV = xent.nll_and_grad(logits_BCV, t_BC, wt_BC, impl=impl)
    dh_BCD = matmul('bcv,dv->bcd', d_BCV, w_DV, dtype)
    dw_DV = dw_DV + jnp.einsum('bcd,bcv->dv', x_BCD, d_BCV, preferred_element_type=F32)
    return (total + nll, dw_DV), dh_BCD

  init = (jnp.zeros((), F32), jnp.zeros(head_DV.shape, F32) if grads else None)
  (total, dw_DV), dh_nBCD = jax.lax.scan(
      body, init, tuple(_chunks(a, chunk) for a in (h_BTD, targets_BT, weight_BT)))
  return total, dw_DV, dh_nBCD


def _chunked_fwd(h_BTD, head_DV, targets_BT, weight_BT, dtype, chunk, impl):
  total, dw_DV, dh_nBCD = _chunk_scan(h_BTD, head_DV, targets_BT, weight_BT, dtype, chunk, impl,
                                      grads=True)
  return total, (_unchunk(dh_nBCD).astype(h_BTD.dtype), dw_DV.astype(head_DV.dtype))


def _chunked_bwd(dtype, chunk, impl, res, g):
  dh_BTD, dw_DV = res
  return (g * dh_BTD).astype(dh_BTD.dtype), (g * dw_DV).astype(dw_DV.dtype), None, None


_chunked_nll_sum.defvjp(_chunked_fwd, _chunked_bwd)
