"""Grouped matmul seam: y[m] = x[m] @ w[group(m)] with rows sorted by group (SPEC §4 dispatch).

Dims: M rows (token-slots sorted by expert), K contraction, N output, G groups (experts).

`impl` takes the values of `config.kernels.grouped_matmul`:
  ragged_dot | reference -> `jax.lax.ragged_dot` (reference.py; every backend, slow on GPU);
  mgpu -> the Pallas Mosaic-GPU ragged_dot kernels in jax (mgpu.py; Hopper, bf16/fp16);
  megablox -> the Pallas TPU gmm/tgmm kernels in jax (megablox.py; TPU, interpret mode on CPU);
  auto -> mgpu on a Hopper GPU (bf16/fp16 inputs), megablox on TPU, ragged_dot otherwise.
Rows past sum(group_sizes) come out zero with every impl; a caller whose group sizes always sum
to M (the dropless dispatch on one expert shard) passes `all_rows_grouped=True`, and the Pallas
impls skip the pass that zeroes them (on the output, and on dy and dx in the backward).

The platform is `pallas_common.target_platform()`: the backend, or V4JAX_TARGET_PLATFORM
(tools/aot_compile.py sets 'tpu' when it compiles for a TPU topology on a CPU machine).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels.grouped_matmul import reference
from v4jax.kernels.pallas_common import is_hopper, target_platform

IMPLS = ('auto', 'ragged_dot', 'reference', 'mgpu', 'megablox')
PALLAS_IMPLS = ('mgpu', 'megablox')   # kernels that must run per device (inside shard_map)


def resolve_impl(impl: str, dtype) -> str:
  """The concrete impl `auto` stands for on this platform and input dtype."""
  if impl not in IMPLS:
    raise ValueError(f'config.kernels.grouped_matmul={impl!r} is not one of {IMPLS}')
  if impl != 'auto':
    return impl
  platform = target_platform()
  if platform == 'tpu':
    return 'megablox'
  if is_hopper() and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'mgpu'
  return 'ragged_dot'


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, *,
                   impl: str = 'auto', preferred_element_type=jnp.float32,
                   all_rows_grouped: bool = False) -> jax.Array:
  """[M,K] x [G,K,N] with int [G] group sizes -> [M,N] in `preferred_element_type`.
  all_rows_grouped: the caller guarantees sum(group_sizes_G) == M (otherwise rows past the groups
  are undefined with the Pallas impls)."""
  if x_MK.ndim != 2 or w_GKN.ndim != 3 or x_MK.shape[1] != w_GKN.shape[1]:
    raise ValueError(f'grouped_matmul: x_MK {x_MK.shape} and w_GKN {w_GKN.shape} must be [M,K] '
                     'and [G,K,N] with equal K')
  if group_sizes_G.shape != (w_GKN.shape[0],):
    raise ValueError(f'grouped_matmul: group_sizes_G {group_sizes_G.shape} must be '
                     f'[G={w_GKN.shape[0]}]')
  impl = resolve_impl(impl, x_MK.dtype)
  if impl == 'mgpu':
    if target_platform() != 'gpu':
      raise ValueError(f'grouped_matmul impl=mgpu needs a Hopper GPU; this is {target_platform()!r} '
                       "(use config.kernels.grouped_matmul='auto')")
    from v4jax.kernels.grouped_matmul import mgpu
    return mgpu.grouped_matmul(x_MK, w_GKN, group_sizes_G,
                               preferred_element_type=preferred_element_type,
                               all_rows_grouped=all_rows_grouped)
  if impl == 'megablox':
    from v4jax.kernels.grouped_matmul import megablox
    return megablox.grouped_matmul(x_MK, w_GKN, group_sizes_G,
                                   preferred_element_type=preferred_element_type,
                                   all_rows_grouped=all_rows_grouped)
  return reference.grouped_matmul(x_MK, w_GKN, group_sizes_G,
                                  preferred_element_type=preferred_element_type)
