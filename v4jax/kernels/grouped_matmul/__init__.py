"""Grouped matmul seam: y[m] = x[m] @ w[group(m)] with rows sorted by group (SPEC §4 dispatch).

Dims: M rows (token-slots sorted by expert), K contraction, N output, G groups (experts).

`impl` takes the values of `config.kernels.grouped_matmul`:
  auto | ragged_dot | reference -> `jax.lax.ragged_dot` (reference.py);
  mgpu (Hopper Pallas Mosaic-GPU ragged_dot) | megablox (TPU gmm) -> not yet here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels.grouped_matmul import reference

IMPLS = ('auto', 'ragged_dot', 'reference', 'mgpu', 'megablox')


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, *,
                   impl: str = 'auto', preferred_element_type=jnp.float32) -> jax.Array:
  """[M,K] x [G,K,N] with int [G] group sizes -> [M,N] in `preferred_element_type`."""
  if x_MK.ndim != 2 or w_GKN.ndim != 3 or x_MK.shape[1] != w_GKN.shape[1]:
    raise ValueError(f'grouped_matmul: x_MK {x_MK.shape} and w_GKN {w_GKN.shape} must be [M,K] '
                     'and [G,K,N] with equal K')
  if group_sizes_G.shape != (w_GKN.shape[0],):
    raise ValueError(f'grouped_matmul: group_sizes_G {group_sizes_G.shape} must be '
                     f'[G={w_GKN.shape[0]}]')
  if impl in ('auto', 'ragged_dot', 'reference'):
    return reference.grouped_matmul(x_MK, w_GKN, group_sizes_G,
                                    preferred_element_type=preferred_element_type)
  if impl in ('mgpu', 'megablox'):
    raise NotImplementedError(
        f'grouped_matmul impl={impl!r} lands with issue 4 (pod-scale parallelism); '
        "use config.kernels.grouped_matmul='auto' (jax.lax.ragged_dot) for now")
  raise ValueError(f'config.kernels.grouped_matmul={impl!r} is not one of {IMPLS}')
