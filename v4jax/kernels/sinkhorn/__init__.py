"""Sinkhorn seam (SPEC §5 step 5): the doubly-stochastic mHC comb from its logits, fp32.

Dims: N mHC streams; the matrix is the last two axes [.., j, k] (j the source stream), any
leading dims ([B,T,N,N] at an HCSite).

`impl` takes `config.kernels.sinkhorn`:
  reference -> plain jnp, a `fori_loop` over the iterations with a recomputing custom VJP
               (reference.py; every backend; on GPU several small kernels per iteration);
  pallas    -> gpu.py: one Triton kernel forward and one backward over blocks of tokens, every
               iteration in registers (interpret mode on CPU; no TPU kernel);
  auto      -> pallas on GPU, reference elsewhere. On the H200 the kernel runs the Sinkhorn 4.9x
               faster than the loop, and takes the full peer step's host-side launch work of
               20 iterations x several kernels per site away (docs/benchmarks.md).
Both save only the logits for the backward and differentiate exactly through all iterations.
"""
from __future__ import annotations

import jax

from v4jax.kernels import pallas_common
from v4jax.kernels.sinkhorn import reference

IMPLS = pallas_common.GPU_IMPLS


def resolve_impl(impl: str) -> str:
  """The concrete impl `auto` stands for on this platform (pallas on GPU, else reference)."""
  return pallas_common.resolve_gpu_impl(impl, 'kernels.sinkhorn')


def _axes(ndim: int) -> tuple:
  """Logical names of [B, T, .., N, N]: batch and seq shard, everything else whole."""
  lead = ndim - 2
  return ('batch', 'seq')[:lead] + (None,) * (max(lead - 2, 0) + 2)


def sinkhorn(logits_NN: jax.Array, iters: int, eps: float, *, impl: str = 'auto') -> jax.Array:
  """fp32 comb [.., N, N] = Sinkhorn(logits) with `iters` iterations (SPEC §5), exact gradient."""
  if logits_NN.ndim < 2 or logits_NN.shape[-1] != logits_NN.shape[-2]:
    raise ValueError(f'sinkhorn: logits_NN has shape {logits_NN.shape}, expected [.., N, N]')
  if not isinstance(iters, int) or iters < 1:
    raise ValueError(f'sinkhorn: iters={iters!r} must be a positive integer '
                     '(config.mhc.sinkhorn_iters)')
  if resolve_impl(impl) == 'reference':
    return reference.sinkhorn(logits_NN, iters, eps)
  if pallas_common.target_platform() == 'tpu':
    raise NotImplementedError("sinkhorn: no TPU Pallas kernel; use config.kernels.sinkhorn="
                              "'reference' (or 'auto')")
  from v4jax.kernels.sinkhorn import gpu
  axes = _axes(logits_NN.ndim)
  fn = lambda l: gpu.sinkhorn(l, iters, eps)
  return pallas_common.per_device(fn, (axes,), (axes,))(logits_NN)
