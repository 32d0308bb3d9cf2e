"""What the Pallas Mosaic-GPU kernels share (Hopper: TMA copies, WGMMA, warp specialization):
the module imports, WGMMA's operand tile form in shared memory, the memory warpgroup's
pipeline of TMA copies and the compute warpgroups' stores. Used by the masked attention
(attention/mgpu.py) and the masked-form KL teacher (sparse_attention/mgpu.py)."""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax

BLOCK = 64                  # rows per compute warpgroup (WGMMA M)
LOG2E = math.log2(math.e)
SMEM_BYTES = 227 * 1024     # shared memory one Hopper CTA may claim


def modules():
  """(pallas, pallas.mosaic_gpu), imported when a kernel is built (not at v4jax's import)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return pl, plgpu


def smem_tile(plgpu, shape, dtype):
  """A shared-memory tile in WGMMA's operand form (64-column tiles, 128-byte swizzle)."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def store(plgpu, *pairs):
  """A compute warpgroup's results: its shared-memory tiles (src, gmem dst) to HBM by TMA."""
  plgpu.commit_smem()
  for src, dst in pairs:
    plgpu.copy_smem_to_gmem(src, dst)
  plgpu.wait_smem_to_gmem(0)


def memory_warpgroup(pl, plgpu, copies, first, end, stages: int, consumed):
  """The memory warpgroup: for steps first..end-1 the TMA copies (src, dst, barrier) of
  copies(j, slot), into slot (j - first) % stages once the compute warpgroups have released
  that slot's last use (every barrier in `consumed`)."""
  plgpu.set_max_registers(40, action='decrease')

  def load(j, slot):
    for src, dst, ready in copies(j, slot):
      plgpu.copy_gmem_to_smem(src, dst, ready)

  for i in range(stages):
    pl.when(first + i < end)(functools.partial(load, first + i, i))

  @pl.loop(0, jnp.maximum(end - first - stages, 0))
  def _(j):
    slot = lax.rem(j, jnp.int32(stages))
    for used in consumed:
      plgpu.barrier_wait(used.at[slot])
    load(first + j + stages, slot)
