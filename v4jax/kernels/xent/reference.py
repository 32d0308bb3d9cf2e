"""Token cross entropy over compute-dtype logits in plain jnp (SPEC §9), the oracle of gpu.py.

Dims: B batch, C positions of a chunk, V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def lse_and_target(logits_BCV: jax.Array, targets_BC: jax.Array):
  """(logsumexp(logits), logits[target]) per token, fp32 math on any logits dtype."""
  lf = logits_BCV.astype(F32)
  lse_BC = jax.nn.logsumexp(lf, axis=-1)
  tgt_BC = jnp.take_along_axis(lf, targets_BC[..., None], axis=-1)[..., 0]
  return lse_BC, tgt_BC


def grad(logits_BCV: jax.Array, targets_BC: jax.Array, scale_BC: jax.Array,
         lse_BC: jax.Array) -> jax.Array:
  """d/dlogits of sum_t scale_t * nll_t = scale * (softmax - onehot), in the logits' dtype."""
  p_BCV = jnp.exp(logits_BCV.astype(F32) - lse_BC[..., None])
  onehot_BCV = jnp.arange(logits_BCV.shape[-1]) == targets_BC[..., None]
  return (scale_BC[..., None] * (p_BCV - onehot_BCV)).astype(logits_BCV.dtype)


def nll_and_grad(logits_BCV: jax.Array, targets_BC: jax.Array, weight_BC: jax.Array):
  """(sum_t weight_t * nll_t fp32, its gradient in the logits)."""
  lse_BC, tgt_BC = lse_and_target(logits_BCV, targets_BC)
  return jnp.sum((lse_BC - tgt_BC) * weight_BC), grad(logits_BCV, targets_BC, weight_BC, lse_BC)
