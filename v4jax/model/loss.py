"""Token cross entropy of the LM head (SPEC §9), with a hand-written backward.

Dims: B batch, T positions, D model dim, V vocabulary.

With a 129K vocabulary the logits are the largest tensor of a small model's step (16K tokens:
4.2 GB in bf16, 8.5 GB in fp32), so the passes over them matter. Autodiff of
`logsumexp(logits.astype(f32))` builds the fp32 gradient and converts it to bf16 in separate
passes; the custom VJP here reads the saved compute-dtype logits once and writes the
compute-dtype gradient softmax - onehot in one fused pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.model.layers import matmul

F32 = jnp.float32


@jax.custom_vjp
def token_nll_sum(logits_BTV: jax.Array, targets_BT: jax.Array, weight_BT: jax.Array) -> jax.Array:
  """Σ_t weight_t·(logsumexp(logits_t) - logits_t[target_t]), fp32 math on any logits dtype.
  Differentiable in the logits only (targets are ids, weights a mask)."""
  return _nll_fwd(logits_BTV, targets_BT, weight_BT)[0]


def _nll_fwd(logits_BTV, targets_BT, weight_BT):
  lf = logits_BTV.astype(F32)
  lse_BT = jax.nn.logsumexp(lf, axis=-1)
  tgt_BT = jnp.take_along_axis(lf, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum((lse_BT - tgt_BT) * weight_BT), (logits_BTV, targets_BT, weight_BT, lse_BT)


def _nll_bwd(res, g):
  logits_BTV, targets_BT, weight_BT, lse_BT = res
  p_BTV = jnp.exp(logits_BTV.astype(F32) - lse_BT[..., None])
  onehot_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
  d_BTV = (g * weight_BT)[..., None] * (p_BTV - onehot_BTV)
  return d_BTV.astype(logits_BTV.dtype), None, None


token_nll_sum.defvjp(_nll_fwd, _nll_bwd)


def cross_entropy_sum(h_BTD, head_DV, targets_BT, weight_BT, dtype, chunk: int = 0):
  """Sum over tokens of weight * -log softmax(h @ head)[target], fp32 log-softmax (weight 0 on
  padding).

  With `chunk > 0` the sequence is processed in chunks of `chunk` positions under remat, so the
  full [B,T,V] logits are never held at once (needed for 129K vocabularies at long T).
  """
  def piece(h, t, w):
    return token_nll_sum(matmul('btd,dv->btv', h, head_DV, dtype), t, w)

  T = h_BTD.shape[1]
  if chunk <= 0 or chunk >= T or T % chunk:
    return piece(h_BTD, targets_BT, weight_BT)
  n = T // chunk
  split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], n, chunk, *a.shape[2:]), 1, 0)
  body = jax.checkpoint(lambda c, xs: (c + piece(*xs), None))
  total, _ = jax.lax.scan(body, jnp.zeros((), F32),
                          (split(h_BTD), split(targets_BT), split(weight_BT)))
  return total
