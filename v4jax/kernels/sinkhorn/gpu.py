"""Sinkhorn on GPU (Pallas Triton): one forward and one backward kernel over blocks of tokens.

Dims: M tokens (all leading dims flattened), N mHC streams padded to P = next_pow2(N), bm tokens
per program.

The logits go in as tiles [P, P, bm] (row j, column k, token; tokens on the fast axis so every
load is coalesced and each thread owns whole matrices), in fp32. Both kernels keep every
iteration in registers, so a site's Sinkhorn is one launch forward and one backward instead of
several small XLA kernels per iteration.

Forward: row softmax + eps, column step, then (iters-1) x (row step, column step), as a loop.

Backward (recomputes; only the logits are saved between passes). For a step m' = m / d with
d = sum_axis(m) + eps the exact VJP is dm = (g - sum_axis(g * m')) / d, and the step's input is
m' * d. The iterations after the first are cut into segments of `segment` iterations (the
first `lead` = (iters-1) mod segment iterations form a leading partial segment, kept from the
start). Segments are processed last first: recompute up to the segment's start in a loop,
run its 2*segment steps unrolled keeping only each step's divisor d (a [P] vector per token),
then apply the step VJPs in reverse, rebuilding each step's input as m' * d (one rounding per
step, never more than 2*segment steps in a row). Then the leading segment, the first column
step and the softmax VJP dx = p (g - sum_k g p). This bounds the live registers by the segment,
not the iteration count, at ~(iters-1)^2 / (2 segment) extra iterations of recompute, and keeps
the kernel body (and its interpret-mode HLO, which XLA compiles slowly when long and unrolled)
small. Padded rows and columns (N not a power of two) are exact zeros from the first step on
and get no gradient.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from v4jax.kernels.pallas_common import gpu_interpret, next_pow2, pad_axis, round_up

_F32 = jnp.float32
_ROW, _COL = 1, 0            # tile axis summed by a row step (over k) / a column step (over j)


def _masks(n, p):
  """(k < n) [1,P,1] and (j < n) & (k < n) [P,P,1] for a padded tile, or None when P == N."""
  if n == p:
    return None, None
  idx = jnp.arange(p, dtype=jnp.int32)
  k_ok = (idx < n)[None, :, None]
  return k_ok, (idx < n)[:, None, None] & k_ok


def _softmax_k(x, n, p):
  k_ok, _ = _masks(n, p)
  if k_ok is not None:
    x = jnp.where(k_ok, x, -jnp.inf)
  e = jnp.exp(x - jnp.max(x, axis=_ROW, keepdims=True))
  return e / jnp.sum(e, axis=_ROW, keepdims=True)


def _start(x, n, p, eps):
  """(m after the softmax and the first column step, that step's divisor)."""
  m = _softmax_k(x, n, p) + eps
  _, ok = _masks(n, p)
  if ok is not None:
    m = jnp.where(ok, m, 0.0)
  d = jnp.sum(m, axis=_COL, keepdims=True) + eps
  return m / d, d


def _iteration(m, eps):
  """One Sinkhorn iteration after the first: row step, then column step."""
  m = m / (jnp.sum(m, axis=_ROW, keepdims=True) + eps)
  return m / (jnp.sum(m, axis=_COL, keepdims=True) + eps)


def _fwd_kernel(x_ref, o_ref, *, n, iters, eps, segment):
  del segment
  m, _ = _start(x_ref[...].astype(_F32), n, x_ref.shape[0], eps)
  o_ref[...] = jax.lax.fori_loop(0, iters - 1, lambda _, m: _iteration(m, eps), m)


def _segment_fwd(m, k, eps):
  """k iterations unrolled: (m after them, [(axis, divisor)] of their 2k steps in order)."""
  steps = []
  for _ in range(k):
    for axis in (_ROW, _COL):
      d = jnp.sum(m, axis=axis, keepdims=True) + eps
      m = m / d
      steps.append((axis, d))
  return m, steps


def _steps_vjp(g, m, steps):
  """g wrt the input of `steps` from g wrt their output m: each step's VJP in reverse, each
  step's input rebuilt from its output as m' * d."""
  for axis, d in reversed(steps):
    g = (g - jnp.sum(g * m, axis=axis, keepdims=True)) / d
    m = m * d
  return g


def _bwd_kernel(x_ref, g_ref, dx_ref, *, n, iters, eps, segment):
  p = x_ref.shape[0]
  n_seg, lead = divmod(iters - 1, segment)
  m_lead, lead_steps = _segment_fwd(_start(x_ref[...].astype(_F32), n, p, eps)[0], lead, eps)

  def seg_vjp(i, g):                     # segments of `segment` iterations, last one first
    s = n_seg - 1 - i
    m = jax.lax.fori_loop(0, s * segment, lambda _, m: _iteration(m, eps), m_lead)
    m_end, steps = _segment_fwd(m, segment, eps)
    return _steps_vjp(g, m_end, steps)

  g = jax.lax.fori_loop(0, n_seg, seg_vjp, g_ref[...].astype(_F32))
  g = _steps_vjp(g, m_lead, lead_steps)
  # The start again from the logits (re-read, not kept live through the segments).
  x = x_ref[...].astype(_F32)
  m0, d0 = _start(x, n, p, eps)
  g = _steps_vjp(g, m0, [(_COL, d0)])                  # g wrt softmax + eps
  _, ok = _masks(n, p)
  if ok is not None:
    g = jnp.where(ok, g, 0.0)
  sm = _softmax_k(x, n, p)
  dx_ref[...] = sm * (g - jnp.sum(g * sm, axis=_ROW, keepdims=True))


def _tiles(a, n, p, bm):
  """[.., N, N] -> fp32 [P, P, Mp] (tokens last, padded with zeros to a multiple of bm)."""
  m = math.prod(a.shape[:-2])
  t = jnp.transpose(a.astype(_F32).reshape(m, n, n), (1, 2, 0))
  t = pad_axis(pad_axis(t, 0, p), 1, p)
  return pad_axis(t, 2, round_up(m, bm))


def _untile(t, lead, n):
  m = math.prod(lead)
  return jnp.transpose(t[:n, :n, :m], (2, 0, 1)).reshape(*lead, n, n)


def _call(kernel, name, args, *, n, iters, eps, opts):
  bm, num_warps, segment, interpret = opts
  p, _, mp = args[0].shape
  spec = pl.BlockSpec((p, p, bm), lambda i: (0, 0, i))
  return pl.pallas_call(
      functools.partial(kernel, n=n, iters=iters, eps=eps, segment=segment),
      grid=(mp // bm,),
      in_specs=[spec] * len(args),
      out_specs=spec,
      out_shape=jax.ShapeDtypeStruct((p, p, mp), _F32),
      # Always Triton params: without them a GPU pallas_call may pick the Mosaic GPU backend.
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name=name,
  )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _sinkhorn(logits_NN, iters, eps, opts):
  n, lead = logits_NN.shape[-1], logits_NN.shape[:-2]
  p = next_pow2(n)
  out = _call(_fwd_kernel, 'sinkhorn_fwd', (_tiles(logits_NN, n, p, opts[0]),), n=n,
              iters=iters, eps=eps, opts=opts)
  return _untile(out, lead, n)


def _sinkhorn_fwd(logits_NN, iters, eps, opts):
  return _sinkhorn(logits_NN, iters, eps, opts), logits_NN


def _sinkhorn_bwd(iters, eps, opts, logits_NN, g_NN):
  n, lead = logits_NN.shape[-1], logits_NN.shape[:-2]
  p, bm = next_pow2(n), opts[0]
  dx = _call(_bwd_kernel, 'sinkhorn_bwd', (_tiles(logits_NN, n, p, bm), _tiles(g_NN, n, p, bm)),
             n=n, iters=iters, eps=eps, opts=opts)
  return (_untile(dx, lead, n).astype(logits_NN.dtype),)


_sinkhorn.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def sinkhorn(logits_NN: jax.Array, iters: int, eps: float, *, block_m: int = 32,
             num_warps: int = 1, segment: int = 4, interpret: bool | None = None) -> jax.Array:
  """fp32 comb [.., N, N] by the Triton kernels (interpret mode on CPU); custom VJP that saves
  only the logits. block_m: tokens per program (a power of two); segment: iterations per
  backward segment (their 2*segment divisors live in registers). The defaults (32 tokens on one
  warp: a lane per token, every reduction within a thread, if Triton lays the tile out along
  the tokens as it does for a contiguous fast axis) are a guess until tools/bench_mhc.py's
  sweep has run on a GPU."""
  if block_m < 1 or block_m != next_pow2(block_m):
    raise ValueError(f'sinkhorn gpu: block_m={block_m} must be a power of two')
  if segment < 1:
    raise ValueError(f'sinkhorn gpu: segment={segment} must be a positive integer')
  if math.prod(logits_NN.shape[:-2]) == 0:
    return jnp.zeros(logits_NN.shape, _F32)
  return _sinkhorn(logits_NN, int(iters), float(eps),
                   (block_m, num_warps, segment, gpu_interpret(interpret)))
