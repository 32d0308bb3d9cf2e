"""Sinkhorn in plain jnp (SPEC §5 step 5): a `fori_loop` over the iterations, custom VJP.

Dims: N mHC streams; the matrix is the last two axes [.., j, k], any leading dims.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def iterations(logits_NN: jax.Array, iters: int, eps: float) -> jax.Array:
  """Row softmax + eps, column step, then (iters-1) x (row step, column step); last two axes.
  Plain autodiff (tools/bench_mhc.py times it so); `sinkhorn` wraps it in the recomputing VJP."""
  m = jax.nn.softmax(logits_NN.astype(_F32), axis=-1) + eps
  m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

  def body(_, m):
    m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
    return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

  return jax.lax.fori_loop(0, iters - 1, body, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def sinkhorn(logits_NN: jax.Array, iters: int, eps: float) -> jax.Array:
  """fp32 doubly-stochastic comb [.., N, N] from logits [.., N, N].

  The backward is the exact derivative through all `iters` iterations; it saves only the logits
  and recomputes the iterations, so no per-iteration [N,N] tensors live between passes.
  """
  return iterations(logits_NN, iters, eps)


def _fwd(logits_NN, iters, eps):
  return iterations(logits_NN, iters, eps), logits_NN


def _bwd(iters, eps, logits_NN, g_NN):
  _, vjp = jax.vjp(lambda l: iterations(l, iters, eps), logits_NN)
  return vjp(g_NN)


sinkhorn.defvjp(_fwd, _bwd)
