"""Warp-specialized grouped matmul for Hopper (Pallas Mosaic GPU): y[rows of g] = x[rows] @ w[g].

Why not only jax's `ragged_dot_mgpu`: that kernel runs one warpgroup per CTA that both issues the
loads and the WGMMAs, refills its pipeline at every output tile and stores the tile before the
next one starts; it also computes G - 1 tiles past the last group in full. It reached 80-88% of
a dense cuBLAS GEMM of the same FLOPs on the H200 (docs/benchmarks.md). This kernel is the
layout of jax's `hopper_matmul_mgpu` applied to ragged rows:
  - a memory warpgroup streams x and w[g] tiles through `stages` shared-memory slots while two
    compute warpgroups each own half of the CTA's output tile (block_m x 2*block_n) and issue the
    WGMMAs: the loads of tile i+1 overlap the epilogue of tile i;
  - the M tiles come from a tile table built outside the kernel (`tile_table`): tile t covers the
    rows of one group inside one block_m-row block of x (a block that two groups share gives two
    tiles); tiles past the last group are skipped, not computed;
  - the epilogue stores only the tile's rows of its group, by TMA copies of 2^i rows (any count
    from 1 to block_m), as `ragged_dot_mgpu` does;
  - `in_flight=1` keeps one WGMMA group running while the next is issued (the pipeline releases a
    stage's slots one step late, as jax's `hopper_matmul_mgpu` with `delay_release`), instead of
    waiting for each K step's WGMMA before the next;
  - `cluster=2` runs the persistent grid as clusters of two CTAs on neighbouring N tiles of one
    M tile: they share the x tile, which TMA multicasts to both (each CTA issues half of it),
    so x is read from L2 once per pair of output tiles.

Dims: M rows of x (sorted by group, padded to block_m), K contraction (multiple of block_k), N
output columns (multiple of 2 * cluster * block_n), G groups, T tiles along M (at most
M/block_m + G - 1). Rows past sum(group sizes) are not written (the caller masks them).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ['ragged_dot_ws', 'tile_table']

_NUM_SMS_FALLBACK = 132   # H100 / H200 SXM


def tile_table(sizes_G: jax.Array, M: int, block_m: int) -> jax.Array:
  """int32 [4, T]: per M tile (group order, then block order) its group, its block of x, the
  offset of the group's first row in that block and the tile's row count (0: no tile).
  T = M / block_m + G - 1, the most tiles G groups can split M rows into."""
  G = sizes_G.shape[0]
  T = M // block_m + G - 1
  sizes = sizes_G.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first = starts // block_m
  n_tiles = jnp.where(sizes > 0, (ends - 1) // block_m - first + 1, 0)
  tiles_end = jnp.cumsum(n_tiles)
  t = jnp.arange(T, dtype=jnp.int32)
  g = jnp.minimum(jnp.searchsorted(tiles_end, t, side='right'), G - 1).astype(jnp.int32)
  block = first[g] + t - (tiles_end[g] - n_tiles[g])
  lo = jnp.maximum(starts[g], block * block_m)
  hi = jnp.minimum(ends[g], (block + 1) * block_m)
  count = jnp.where(t < tiles_end[-1], hi - lo, 0)
  block = jnp.where(count > 0, block, 0)
  return jnp.stack([g, block, jnp.where(count > 0, lo - block * block_m, 0), count])


def _num_sms() -> int:
  """Persistent CTAs: the GPU's SM count; 2 on a CPU, where the kernel only runs in jax's GPU
  interpret mode (each simulated SM is a set of Python threads)."""
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    return 2
  return getattr(dev, 'core_count', None) or _NUM_SMS_FALLBACK


def ragged_dot_ws(x_MK: jax.Array, w_GKN: jax.Array, sizes_G: jax.Array, *, block_m: int = 128,
                  block_n: int = 128, block_k: int = 64, stages: int = 3, grid_block_n: int = 4,
                  transpose_rhs: bool = False, in_flight: int = 0, cluster: int = 1,
                  num_sms: int | None = None) -> jax.Array:
  """x [M,K] @ w[g] ([G,K,N]; with transpose_rhs w is [G,N,K] and w[g]^T is used) -> [M,N] in
  x.dtype, fp32 accumulation. M % block_m == 0, K % block_k == 0, N % (2 * cluster * block_n)
  == 0. in_flight: WGMMA groups left running across K steps (0 or 1, < stages); cluster: CTAs
  per cluster along N sharing the x tile (1 or 2). num_sms: persistent CTAs (default
  `_num_sms()`)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  M, K = x_MK.shape
  N = w_GKN.shape[1] if transpose_rhs else w_GKN.shape[2]
  cta_n = 2 * block_n
  if in_flight not in (0, 1) or in_flight >= stages or cluster not in (1, 2):
    raise ValueError(f'ragged_dot_ws: in_flight={in_flight} must be 0 or 1 and below '
                     f'stages={stages}; cluster={cluster} must be 1 or 2')
  if M % block_m or K % block_k or N % (cluster * cta_n):
    raise ValueError(f'ragged_dot_ws: M={M}, K={K}, N={N} must be multiples of block_m={block_m}, '
                     f'block_k={block_k} and {cluster}*2*block_n={cluster * cta_n}')
  if x_MK.dtype != w_GKN.dtype:
    raise ValueError(f'ragged_dot_ws: x {x_MK.dtype} and w {w_GKN.dtype} must have one dtype')
  dtype = x_MK.dtype
  tab = tile_table(sizes_G, M, block_m)
  m_tiles, n_tiles, k_steps = tab.shape[1], N // (cluster * cta_n), K // block_k
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(block_k * itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
  rhs_block = (cta_n, block_k) if transpose_rhs else (block_k, cta_n)
  epi_n = min(block_n, 64)   # the epilogue's staging columns: up to 4 stages + staging fit 227 KiB

  def pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_steps,), memory_registers=40, max_concurrent_steps=stages,
        in_specs=[
            plgpu.BlockSpec((block_m, block_k), lambda k: (0, k), transforms=transforms,
                            memory_space=plgpu.SMEM, delay_release=in_flight,
                            collective_axes=('cluster',) if cluster > 1 else ()),
            plgpu.BlockSpec(rhs_block, (lambda k: (0, k)) if transpose_rhs else (lambda k: (k, 0)),
                            transforms=transforms, memory_space=plgpu.SMEM,
                            delay_release=in_flight),
        ],
        wg_axis='wg', num_compute_wgs=2, compute_context=compute_context)

  def kernel(tab_gmem, x_gmem, w_gmem, o_gmem):
    ignore = lambda *_, **__: None
    rhs0 = w_gmem.at[0]

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_gmem, rhs0),
        out_smem=plgpu.SMEM((2, block_m, epi_n), dtype),
        collective_axes='wg')
    def _scope(allocs, out_smem):
      wg = lax.axis_index('wg')

      @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes='sm')
      def _tiles(loop_info):
        mi, ni = plgpu.planar_snake(loop_info.index[0], (m_tiles, n_tiles), 1, grid_block_n)
        if cluster > 1:   # the cluster's CTAs: neighbouring N tiles of one M tile
          ni = ni * cluster + lax.axis_index('cluster')
        group, block = tab_gmem[0, mi], tab_gmem[1, mi]
        offset, count = tab_gmem[2, mi], tab_gmem[3, mi]
        wg_cols = pl.ds(wg * block_n, block_n)

        def compute_context(run):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((block_m, block_n), jnp.float32))
          def _acc(acc_ref):
            run(acc_ref)
            acc = acc_ref[...].astype(dtype)
            for c in range(block_n // epi_n):   # column chunks through one staging buffer
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # earlier stores read it
              out_smem[wg] = acc[:, c * epi_n:(c + 1) * epi_n]
              plgpu.commit_smem()
              cols = pl.ds(ni * cta_n + wg * block_n + c * epi_n, epi_n)
              first = offset
              rows = block_m
              while rows:   # TMA stores of 2^i rows, largest first, summing to `count`
                @pl.when(count & rows != 0)
                def _store(first=first, rows=rows):
                  plgpu.copy_smem_to_gmem(out_smem.at[wg].at[pl.ds(first, rows)],
                                          o_gmem.at[pl.ds(block * block_m + first, rows), cols])
                first = first + (count & rows)
                rows //= 2

        def mma(_, x_smem, w_smem, acc_ref):
          rhs = (plgpu.transpose_ref(w_smem.at[wg_cols, :], (1, 0)) if transpose_rhs
                 else w_smem.at[:, wg_cols])
          plgpu.wgmma(acc_ref, x_smem, rhs)
          plgpu.wgmma_wait(in_flight)
          return acc_ref

        rhs = w_gmem.at[group]
        rhs = rhs.at[pl.ds(ni * cta_n, cta_n), :] if transpose_rhs else rhs.at[:, pl.ds(ni * cta_n,
                                                                                         cta_n)]

        @pl.when(count > 0)
        def _run():
          pipeline(mma, compute_context)(x_gmem.at[pl.ds(block * block_m, block_m), :], rhs,
                                         allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  clusters = dict(cluster=(cluster,), cluster_names=('cluster',)) if cluster > 1 else {}
  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((M, N), dtype),
      grid=(max(1, (num_sms or _num_sms()) // cluster),), grid_names=('sm',), **clusters,
      num_threads=3, thread_name='wg',
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return call(tab, x_MK, w_GKN)
