"""A chunk's token cross entropy on GPU (Pallas Triton): logsumexp, target logit and gradient of
each logits row in one kernel.

Dims: R = B*C rows (tokens) of a device, V vocabulary, bm rows per program, bv columns per chunk.

Each program owns bm whole rows and walks them twice in chunks of bv columns: first an online
max and sum of exponentials (the logsumexp), then the gradient scale * (exp(x - lse) - onehot),
stored in the logits' dtype, with the target's logit picked up on the way. That is two reads and
one write of the logits, where XLA's passes (max, sum of exponentials, gradient) make three
reads and a write. A program re-reads its rows right after their first walk, so the second read
can come from L2 while they are still there; at bench_h200's chunk (8K rows of 129,280) most of
it does not (the kernel runs at 71% of a copy's rate), and bounding the rows in flight with
`programs` cost more bandwidth than the L2 gave back (docs/performance.md row 79). fp32
arithmetic throughout; columns past V load as -inf (no exponential) and are not stored; rows
past R are neither read nor stored.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from v4jax.kernels.pallas_common import gpu_interpret

_F32 = jnp.float32
_FLOOR = -1e30      # the running max starts here: finite, so empty (masked) rows give no NaN


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tiling: bm rows per block, bv columns per chunk, Triton warps and pipeline stages, and
  `programs` (0: one program per row block; else that many programs, each walking every
  programs-th block, which bounds the rows in flight and so the L2 footprint of the re-read)."""
  block_m: int = 1
  block_v: int = 4096
  num_warps: int = 8
  num_stages: int = 1
  programs: int = 0


DEFAULT = Blocks()


def _kernel(x_ref, t_ref, w_ref, lse_ref, tgt_ref, d_ref, *, bm: int, bv: int, grid: int):
  r, v = x_ref.shape
  n_blocks = pl.cdiv(r, bm)
  cols = jax.lax.broadcasted_iota(jnp.int32, (1, bv), 1)
  n = pl.cdiv(v, bv)

  def block(b, carry):
    r0 = pl.multiple_of(b * bm, bm)
    rows = None if r % bm == 0 else r0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0) < r
    at_rows = pl.ds(r0, bm)

    def tile(c0):
      """Chunk [bm, bv] at column c0 as fp32, -inf past V; and its mask (None: all in range)."""
      ok = None if v % bv == 0 else c0 + cols < v
      if rows is not None:
        ok = rows[:, None] if ok is None else rows[:, None] & ok
      ref = x_ref.at[at_rows, pl.ds(c0, bv)]
      x = pltriton.load(ref) if ok is None else pltriton.load(ref, mask=ok, other=float('-inf'))
      return x.astype(_F32), ok

    def stats(c, carry):
      m, s = carry
      x, _ = tile(pl.multiple_of(c * bv, bv))
      m_new = jnp.maximum(m, jnp.max(x, axis=1))
      return m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)

    m, s = jax.lax.fori_loop(0, n, stats, (jnp.full((bm,), _FLOOR, _F32),
                                           jnp.zeros((bm,), _F32)))
    lse = m + jnp.log(s)
    load = lambda ref: pltriton.load(ref.at[at_rows]) if rows is None else \
        pltriton.load(ref.at[at_rows], mask=rows, other=0)
    t, w = load(t_ref), load(w_ref).astype(_F32)

    def grad(c, tgt):
      c0 = pl.multiple_of(c * bv, bv)
      x, ok = tile(c0)
      hit = c0 + cols == t[:, None]
      d = w[:, None] * (jnp.exp(x - lse[:, None]) - hit.astype(_F32))
      pltriton.store(d_ref.at[at_rows, pl.ds(c0, bv)], d.astype(d_ref.dtype), mask=ok)
      return tgt + jnp.sum(jnp.where(hit, x, 0.0), axis=1)

    tgt = jax.lax.fori_loop(0, n, grad, jnp.zeros((bm,), _F32))
    pltriton.store(lse_ref.at[at_rows], lse, mask=rows)
    pltriton.store(tgt_ref.at[at_rows], tgt, mask=rows)
    return carry

  p = pl.program_id(0)
  jax.lax.fori_loop(0, pl.cdiv(n_blocks - p, grid), lambda i, c: block(p + i * grid, c), 0)


def lse_target_grad(logits_BCV, targets_BC, weight_BC, blocks: Blocks = DEFAULT,
                    interpret=None):
  """(lse [B,C] fp32, logits[target] [B,C] fp32, weight * (softmax - onehot) [B,C,V] in the
  logits' dtype)."""
  B, C, V = logits_BCV.shape
  r, bm = B * C, blocks.block_m
  grid = pl.cdiv(r, bm) if blocks.programs <= 0 else min(blocks.programs, pl.cdiv(r, bm))
  lse, tgt, d = pl.pallas_call(
      functools.partial(_kernel, bm=bm, bv=blocks.block_v, grid=grid),
      grid=(grid,),
      out_shape=[jax.ShapeDtypeStruct((r,), _F32), jax.ShapeDtypeStruct((r,), _F32),
                 jax.ShapeDtypeStruct((r, V), logits_BCV.dtype)],
      # Always Triton params: without them a GPU pallas_call may pick the Mosaic GPU backend.
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                              num_stages=blocks.num_stages),
      interpret=gpu_interpret(interpret), name='xent_lse_grad',
  )(logits_BCV.reshape(r, V), targets_BC.reshape(r), weight_BC.reshape(r))
  return lse.reshape(B, C), tgt.reshape(B, C), d.reshape(B, C, V)
