"""Hopper grouped matmul: Pallas Mosaic-GPU ragged kernels (jax's, and v4jax's `mgpu_ws`).

Forward y = x @ w[g] and input gradient dx = dy @ w[g]^T use `ragged_dot_mgpu.ragged_dot`, or
v4jax's warp-specialized `mgpu_ws.ragged_dot_ws` where the GEMM's tiling says `consumers=2`
(`TUNED`); the weight gradient dw[g] = x_g^T dy_g uses
`transposed_ragged_dot_mgpu.transposed_ragged_dot`; a custom VJP ties them together.
Dims: M rows sorted by group, K contraction, N output, G groups.

The kernels accumulate in fp32 but store in the input dtype (bf16/fp16), so the result is the
fp32 accumulation rounded once to bf16, then cast to `preferred_element_type`. They need K and N
(and, for the transposed kernel, K and N again as its row/column tiles) to be multiples of the
tiles: inputs are zero-padded where they are not, and rows past sum(group_sizes), which the
kernels never write, are zeroed here.
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp

from v4jax.kernels.pallas_common import pad_axis, round_up

DTYPES = (jnp.bfloat16, jnp.float16)


class Tiles(NamedTuple):
  """One kernel call's tiling: output tile block_m x block_n, contraction step block_k, pipeline
  depth `stages`, and `grid_block_n` output tiles per snake band of the persistent grid.
  consumers (y = x w[g] and dx only): 1 = jax's ragged_dot_mgpu (one warpgroup loads and
  multiplies), 2 = v4jax's warp-specialized kernel (`mgpu_ws`: a memory warpgroup and two
  compute warpgroups, CTA tile block_m x 2*block_n). With consumers=2 only: in_flight WGMMA
  groups left running across K steps (0 or 1), cluster CTAs along N sharing the x tile by TMA
  multicast (1 or 2)."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  stages: int = 4
  grid_block_n: int = 4
  consumers: int = 1
  in_flight: int = 0
  cluster: int = 1


DEFAULT_TILES = Tiles()   # FACTS.md: 480-650 TFLOP/s for bf16 at DeepSeek-V3 expert shapes
# (kernel, K, N) -> tiles, where kernel is 'fwd' (y = x w[g]), 'fwd_t' (dx = dy w[g]^T, K and N of
# that product) or 'dw' (dw[g] = x_g^T dy_g, K and N of dw). Measured on the H200 with
# `tools/bench_moe.py --sweep` (docs/benchmarks.md); other shapes use DEFAULT_TILES.
TUNED: dict[tuple[str, int, int], Tiles] = {
    # tenth session, balanced routing, one run: ms of this tiling vs jax's kernel at DEFAULT_TILES
    ('fwd', 7168, 2048): Tiles(128, 128, 64, 3, 2, 2),   # DeepSeek-V3 up: 1.752 vs 1.914 ms
    ('fwd', 2048, 7168): Tiles(128, 128, 64, 3, 8, 2),   # DeepSeek-V3 down: 1.812 vs 2.053 ms
    # eleventh session (`--sweep --sweep-kernels fwd_t --sweep-consumers 2`), same reading
    ('fwd_t', 7168, 2048): Tiles(128, 128, 64, 4, 8, 2),  # DeepSeek-V3 down's dx: 1.794 vs 1.945 ms
    # twelfth session, bench-1B (`--sweep --shapes bench1b --reps 10`): ms vs DEFAULT_TILES
    ('fwd', 1536, 1024): Tiles(128, 128, 64, 3, 4, 2),    # up: 0.570 vs 0.686 ms
    ('fwd_t', 1024, 1536): Tiles(128, 128, 64, 3, 2, 2),  # up's dx: 0.587 vs 0.746 ms
    ('dw', 1536, 1024): Tiles(128, 128, 64, 5, 1, 1),     # up's dw: 0.560 vs 0.589 ms
    ('fwd', 1024, 1536): Tiles(128, 128, 64, 4, 2, 2),    # down: 0.594 vs 0.734 ms
    ('fwd_t', 1536, 1024): Tiles(128, 128, 64, 4, 4, 2),  # down's dx: 0.573 vs 0.681 ms
    ('dw', 1024, 1536): Tiles(128, 128, 64, 4, 1, 1),     # down's dw: 0.537 vs 0.572 ms
}


def tiles_for(kernel: str, k: int, n: int) -> Tiles:
  """The tiling of one kernel call: TUNED's entry for (kernel, K, N), else DEFAULT_TILES."""
  t = TUNED.get((kernel, k, n), DEFAULT_TILES)
  if t.consumers not in (1, 2) or (t.consumers == 2 and kernel == 'dw'):
    raise ValueError(f'grouped_matmul mgpu tiling for {(kernel, k, n)}: consumers={t.consumers}; '
                     "expected 1 (jax's kernels) or 2 (v4jax's warp-specialized kernel, 'fwd' and "
                     "'fwd_t' only)")
  if (t.in_flight, t.cluster) != (0, 1) and (t.consumers != 2 or t.in_flight not in (0, 1)
                                             or t.in_flight >= t.stages or t.cluster not in (1, 2)):
    raise ValueError(f'grouped_matmul mgpu tiling for {(kernel, k, n)}: in_flight={t.in_flight}, '
                     f'cluster={t.cluster}; expected consumers=2 with in_flight 0 or 1 (below '
                     f'stages={t.stages}) and cluster 1 or 2')
  return t


def kernel_modules():
  """(ragged_dot_mgpu, transposed_ragged_dot_mgpu or None): jax's Mosaic-GPU kernel modules."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  try:
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as tmod
  except ImportError:  # older jax: the weight gradient falls back to lax.ragged_dot_general
    tmod = None
  return ragged_dot_mgpu, tmod


def _grid_block_n(want: int, n_tiles: int) -> int:
  return next(g for g in (want, 4, 2, 1) if g <= want and n_tiles % g == 0)


def _tile_kw(t: Tiles, n_tiles: int) -> dict:
  return dict(block_m=t.block_m, block_n=t.block_n, block_k=t.block_k,
              max_concurrent_steps=t.stages, grid_block_n=_grid_block_n(t.grid_block_n, n_tiles))


def _call(fn, *args, **kw):
  """fn with the tile keywords its jax version takes (the kernels' signatures move)."""
  params = inspect.signature(fn).parameters
  return fn(*args, **{k: v for k, v in kw.items() if k in params})


def _valid_rows(y_MN, sizes_G):
  rows_M1 = jnp.arange(y_MN.shape[0], dtype=jnp.int32)[:, None]
  return jnp.where(rows_M1 < jnp.sum(sizes_G), y_MN, jnp.zeros((), y_MN.dtype))


def _ragged(x_MK, w_GKN, sizes_G, transpose_rhs=False, tiles: Tiles | None = None,
            mask_rows: bool = True):
  """x [M,K] @ w[g] (or w[g]^T with transpose_rhs: w [G,N,K]) -> [M,N] in x.dtype; rows past
  the groups (never written by the kernel) zeroed unless mask_rows=False."""
  M, K = x_MK.shape
  N = w_GKN.shape[1] if transpose_rhs else w_GKN.shape[2]
  t = tiles or tiles_for('fwd_t' if transpose_rhs else 'fwd', K, N)
  kp, mp = round_up(K, t.block_k), round_up(M, t.block_m)
  np_ = round_up(N, t.consumers * t.cluster * t.block_n)
  x = pad_axis(pad_axis(x_MK, 1, kp), 0, mp)
  k_ax, n_ax = (2, 1) if transpose_rhs else (1, 2)
  w = pad_axis(pad_axis(w_GKN, k_ax, kp), n_ax, np_)
  if t.consumers == 2:
    from v4jax.kernels.grouped_matmul.mgpu_ws import ragged_dot_ws
    y = ragged_dot_ws(x, w, sizes_G, block_m=t.block_m, block_n=t.block_n, block_k=t.block_k,
                      stages=t.stages, transpose_rhs=transpose_rhs, in_flight=t.in_flight,
                      cluster=t.cluster,
                      grid_block_n=_grid_block_n(t.grid_block_n,
                                                 np_ // (2 * t.cluster * t.block_n)))
  else:
    mod, _ = kernel_modules()
    kw = dict(group_sizes=sizes_G.astype(jnp.int32), **_tile_kw(t, np_ // t.block_n))
    if transpose_rhs:
      if 'transpose_rhs' in inspect.signature(mod.ragged_dot).parameters:
        kw['transpose_rhs'] = True
      else:
        w = jnp.swapaxes(w, 1, 2)
    y = _call(mod.ragged_dot, x, w, **kw)
  y = y[:M, :N]
  return _valid_rows(y, sizes_G) if mask_rows else y


def _transposed(x_MK, dy_MN, sizes_G, tiles: Tiles | None = None):
  """dw[g] = x_g^T dy_g -> [G,K,N] in x.dtype (zero for empty groups)."""
  _, tmod = kernel_modules()
  M, K = x_MK.shape
  N = dy_MN.shape[1]
  if tmod is None:
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(x_MK, dy_MN, sizes_G.astype(jnp.int32), dims,
                                      preferred_element_type=jnp.float32).astype(x_MK.dtype)
  t = tiles or tiles_for('dw', K, N)
  kp, np_ = round_up(K, t.block_m), round_up(N, t.block_n)
  x = pad_axis(x_MK, 1, kp)
  dy = pad_axis(dy_MN, 1, np_)
  dw = _call(tmod.transposed_ragged_dot, x, dy, group_sizes=sizes_G.astype(jnp.int32),
             **_tile_kw(t, np_ // t.block_n))
  return dw[:, :K, :N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x_MK, w_GKN, sizes_G, out_dtype, mask_rows):
  return _ragged(x_MK, w_GKN, sizes_G, mask_rows=mask_rows).astype(out_dtype)


def _fwd(x_MK, w_GKN, sizes_G, out_dtype, mask_rows):
  return _gmm(x_MK, w_GKN, sizes_G, out_dtype, mask_rows), (x_MK, w_GKN, sizes_G)


def _bwd(out_dtype, mask_rows, res, dy_MN):
  del out_dtype
  x_MK, w_GKN, sizes_G = res
  if mask_rows:   # rows past the groups are constant 0
    dy_MN = _valid_rows(dy_MN, sizes_G)
  dy_MN = dy_MN.astype(x_MK.dtype)
  dx_MK = _ragged(dy_MN, w_GKN, sizes_G, transpose_rhs=True, mask_rows=mask_rows)
  dw_GKN = _transposed(x_MK, dy_MN, sizes_G)
  return dx_MK.astype(x_MK.dtype), dw_GKN.astype(w_GKN.dtype), None


_gmm.defvjp(_fwd, _bwd)


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, *,
                   preferred_element_type=jnp.float32, all_rows_grouped: bool = False) -> jax.Array:
  """[M,K] x [G,K,N] -> [M,N]; bf16/fp16 inputs of one dtype; Hopper GPUs only."""
  if x_MK.dtype != w_GKN.dtype or x_MK.dtype not in DTYPES:
    raise ValueError(f'grouped_matmul impl=mgpu: x_MK {x_MK.dtype} and w_GKN {w_GKN.dtype} must '
                     'both be bfloat16 or float16 (use impl=ragged_dot for float32)')
  return _gmm(x_MK, w_GKN, group_sizes_G, jnp.dtype(preferred_element_type), not all_rows_grouped)
