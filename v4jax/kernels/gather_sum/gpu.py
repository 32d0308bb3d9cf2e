"""Row gather-sum as one Pallas Triton kernel: out[n] = sum_j x[idx[n, j]] in fp32.

Dims: M source rows, D row width, N output rows, K rows summed per output row.

Each program takes `block_n` output rows and one `block_d`-wide column block, loads its K
indices per row, gathers the K source rows' columns (one coalesced load per index column) and
sums them in fp32 registers, then stores once. XLA's form gathers the N*K rows to memory, widens
them to fp32 and reduces in further passes; here each source element is read once and the
[N,K,D] gather never exists.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from v4jax.kernels.pallas_common import gpu_interpret


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tiling: output rows and columns per program, Triton warps."""
  block_n: int = 16
  block_d: int = 512
  num_warps: int = 4


DEFAULT = Blocks()


def _kernel(idx_ref, x_ref, o_ref, *, k: int, bn: int, bd: int):
  """idx_ref [K,N], x_ref [M,D], o_ref [N,D]: whole arrays; this program's block by offsets
  (bd divides D, so only the rows need a mask)."""
  n = o_ref.shape[0]
  r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
  cols = pl.ds(pl.multiple_of(pl.program_id(1) * bd, bd), bd)
  rows_ok = r0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0) < n
  acc = jnp.zeros((bn, bd), jnp.float32)
  for j in range(k):
    src = pltriton.load(idx_ref.at[pl.ds(j, 1), pl.ds(r0, bn)], mask=rows_ok[None, :], other=0)
    acc += x_ref[src[0], cols].astype(jnp.float32)
  pltriton.store(o_ref.at[pl.ds(r0, bn), cols], acc.astype(o_ref.dtype), mask=rows_ok[:, None])


def _col_block(d: int, cap: int) -> int:
  """The largest power of two <= cap that divides d."""
  b = 1
  while b * 2 <= cap and d % (b * 2) == 0:
    b *= 2
  return b


def gather_sum(x_MD: jax.Array, idx_NK: jax.Array, out_dtype, blocks: Blocks = DEFAULT,
               interpret=None) -> jax.Array:
  """[N,D] in out_dtype; idx in [0, M)."""
  (N, K), D = idx_NK.shape, x_MD.shape[1]
  bn, bd = blocks.block_n, _col_block(D, blocks.block_d)
  return pl.pallas_call(
      functools.partial(_kernel, k=K, bn=bn, bd=bd),
      grid=(pl.cdiv(N, bn), pl.cdiv(D, bd)),
      out_shape=jax.ShapeDtypeStruct((N, D), out_dtype),
      # Always Triton params: without them a GPU pallas_call may pick the Mosaic GPU backend.
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
      interpret=gpu_interpret(interpret), name='gather_sum',
  )(idx_NK.astype(jnp.int32).T, x_MD)   # [K,N]: each index column contiguous
