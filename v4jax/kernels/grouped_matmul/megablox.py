"""TPU grouped matmul: the megablox `gmm` / `tgmm` Pallas kernels that ship inside jax.

Forward y = x @ w[g] and dx = dy @ w[g]^T are `gmm` (the second with transpose_rhs); the weight
gradient dw[g] = x_g^T dy_g is `tgmm`; a custom VJP ties them together. Dims: M rows sorted by
group, K contraction, N output, G groups.

megablox needs M to be a multiple of the row tile, so rows are zero-padded up to it; rows past
sum(group_sizes), which `gmm` leaves unwritten, are zeroed here. On a CPU backend the kernels run
in TPU interpret mode (tests); on TPU they compile through Mosaic (inside shard_map or on one
device: Mosaic kernels are not auto-partitioned).
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from v4jax.kernels.pallas_common import pad_axis, round_up, tpu_interpret

TILE = 512   # upper bound of each tile dim; smaller dims use the full dim


def kernel_module():
  """jax's megablox gmm module."""
  # the package re-exports a function named `gmm`, which shadows the module of the same name
  return importlib.import_module('jax.experimental.pallas.ops.tpu.megablox.gmm')


def _tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  return min(TILE, round_up(m, 8)), min(TILE, k), min(TILE, n)


def _valid_rows(y_MN, sizes_G):
  rows_M1 = jnp.arange(y_MN.shape[0], dtype=jnp.int32)[:, None]
  return jnp.where(rows_M1 < jnp.sum(sizes_G), y_MN, jnp.zeros((), y_MN.dtype))


def _gmm_call(x_MK, w, sizes_G, out_dtype, transpose_rhs, interpret, mask_rows=True):
  M, K = x_MK.shape
  N = w.shape[1] if transpose_rhs else w.shape[2]
  tiling = _tiling(M, K, N)
  x = pad_axis(x_MK, 0, round_up(M, tiling[0]))
  y = kernel_module().gmm(x, w, sizes_G.astype(jnp.int32), preferred_element_type=out_dtype,
                          tiling=tiling, transpose_rhs=transpose_rhs,
                          interpret=tpu_interpret(interpret))
  return _valid_rows(y[:M], sizes_G) if mask_rows else y[:M]


def _tgmm_call(x_MK, dy_MN, sizes_G, out_dtype, interpret):
  M, K = x_MK.shape
  N = dy_MN.shape[1]
  tiling = _tiling(M, K, N)
  mp = round_up(M, tiling[0])
  return kernel_module().tgmm(pad_axis(x_MK, 0, mp).swapaxes(0, 1), pad_axis(dy_MN, 0, mp),
                              sizes_G.astype(jnp.int32), preferred_element_type=out_dtype,
                              tiling=tiling, interpret=tpu_interpret(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(x_MK, w_GKN, sizes_G, out_dtype, interpret, mask_rows):
  return _gmm_call(x_MK, w_GKN, sizes_G, out_dtype, False, interpret, mask_rows)


def _fwd(x_MK, w_GKN, sizes_G, out_dtype, interpret, mask_rows):
  return _gmm(x_MK, w_GKN, sizes_G, out_dtype, interpret, mask_rows), (x_MK, w_GKN, sizes_G)


def _bwd(out_dtype, interpret, mask_rows, res, dy_MN):
  del out_dtype
  x_MK, w_GKN, sizes_G = res
  if mask_rows:   # rows past the groups are constant 0
    dy_MN = _valid_rows(dy_MN, sizes_G)
  dy_MN = dy_MN.astype(x_MK.dtype)
  dx_MK = _gmm_call(dy_MN, w_GKN, sizes_G, jnp.float32, True, interpret, mask_rows)
  dw_GKN = _tgmm_call(x_MK, dy_MN, sizes_G, jnp.float32, interpret)
  return dx_MK.astype(x_MK.dtype), dw_GKN.astype(w_GKN.dtype), None


_gmm.defvjp(_fwd, _bwd)


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, *,
                   preferred_element_type=jnp.float32, interpret=None,
                   all_rows_grouped: bool = False) -> jax.Array:
  """[M,K] x [G,K,N] -> [M,N]; x and w of one dtype. `interpret`: None = TPU interpret mode
  when compiling for CPU, Mosaic otherwise. all_rows_grouped: see the seam."""
  if x_MK.dtype != w_GKN.dtype:
    raise ValueError(f'grouped_matmul impl=megablox: x_MK {x_MK.dtype} and w_GKN {w_GKN.dtype} '
                     'must have the same dtype')
  return _gmm(x_MK, w_GKN, group_sizes_G, jnp.dtype(preferred_element_type),
              tpu_interpret(interpret), not all_rows_grouped)
