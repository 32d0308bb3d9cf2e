"""DSA's masked-form KL teacher on Hopper: a Pallas Mosaic GPU kernel (WGMMA).

Dims: B batch, T query rows, S keys, H heads, K qk width (padded to a multiple of 64 and
streamed in 64-column chunks), M = 64 query rows of a compute warpgroup (the WGMMA height),
N keys of a tile (`block_kv`).

The same dense tiles as gpu.py's Triton `_dense_probs_chunk`: fp32 [B, T, S] of
p(t, s) = (1/H) Σ_h exp(scale·q_h(t)·k_h(s) - lse_h(t)), which gpu.masked_probs_mean then takes
at the top-k set. One CTA per (2 x M query rows, batch) runs three warpgroups. Its memory
warpgroup streams, for each key tile up to the CTA's diagonal, each head and each 64-column
chunk, the q chunk of each compute warpgroup's rows and the key tile's chunk through `stages`
shared-memory slots by TMA. Each compute warpgroup accumulates one head's s = q k^T over the
chunks by WGMMA, adds exp2(s·c - lse_h) (c = scale·log2 e, lse in base 2) to a register tile,
and after the last head writes the tile, zero above the diagonal, by TMA. A slot holds
(2M + N) x 64 bf16 (32 KB at N = 128), so 4 stages and the two fp32 output tiles fit shared
memory. Each loaded byte feeds 2·M·N / (2M + N) = 64 FLOPs of the CTA, and the operands come
from L2 per (key tile, head): in the bench_h200 step the kernel runs at ~270 TFLOP/s (the
Triton one at ~195), which is ~4.2 TB/s of L2 reads, the likely limit rather than the tensor
cores or the exp2s (docs/performance.md row 92 and open item 1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from v4jax.kernels.mgpu_common import (BLOCK, LOG2E, SMEM_BYTES, memory_warpgroup, modules,
                                       smem_tile)
from v4jax.kernels.pallas_common import pad_axis, round_up

CHUNK = 64          # qk columns per streamed step (one 128-byte swizzled tile of bf16)


def max_stages(H: int, block_kv: int, itemsize: int) -> int:
  """The most pipeline slots that fit shared memory beside the two fp32 output tiles and the
  CTA's lse rows (0 or 1: the kernel cannot run at this H)."""
  fixed = 2 * BLOCK * block_kv * 4 + 2 * H * BLOCK * 4
  return max(0, (SMEM_BYTES - fixed) // ((2 * BLOCK + block_kv) * CHUNK * itemsize))


def dense_probs(q_BTHK: jax.Array, k_BSHK: jax.Array, lse_BTH: jax.Array, scale: float, *,
                block_kv: int = 128, stages: int | None = None, row0: int = 0,
                key_group: int = 0) -> jax.Array:
  """fp32 [B, Tp, Sp] (T rounded up to 2 x 64, S to block_kv): the head-mean probabilities of
  every key tile up to each CTA's last query row, 0 for keys after the query; key tiles past
  that row are not written. q holds the query rows row0.. of the sequence whose keys k holds
  (a chunk of it), so query row t of q sees keys s <= row0 + t. bf16/fp16 q, k; lse fp32 in
  natural log, -inf or +inf for a row without keys (p = 0). stages: pipeline slots, default
  the most that fit up to 4. key_group: 0 (all of a CTA's key tiles), or at most this many key
  tiles per CTA, the CTA grid then also over groups of key tiles (the model's default, 3:
  config.kernels.kl_key_group). A CTA's work grows with its query block (1 to T/128 tiles),
  and one CTA fits an SM: bench_h200's query chunks of 2,048
  rows launch 128 CTAs each, one wave whose longest CTA sets the time (48 tile-times for the
  two chunks against a mean of 32 per SM). Groups of 3 or 4 tiles make 4.5-6x the CTAs; a
  list-scheduling simulation (a quarter tile of start-up per CTA, launch order as the grid)
  ends them after 37-40 tile-times against 48.5. Measured on the H200 at B=8, T=4096: 2.172
  ms without groups, 1.812 with groups of 3, 1.825 with 4; in the step's profile the teacher's
  op time in the layer scans fell 93.7 -> 69.9 ms."""
  pl, plgpu = modules()
  B, T, H, K = q_BTHK.shape
  S = k_BSHK.shape[1]
  dtype = q_BTHK.dtype
  m, n = BLOCK, block_kv
  most = max_stages(H, block_kv, dtype.itemsize)
  stages = min(4, most) if stages is None else stages
  if block_kv not in (64, 128) or not 2 <= stages <= most or key_group < 0:
    raise ValueError(f'masked_probs_mean mgpu: block_kv={block_kv} must be 64 or 128 (the s and '
                     f'p tiles in registers), stages={stages} in [2, {most}] (what fits '
                     f'shared memory at H={H}) and key_group={key_group} >= 0')
  tp, sp, kp = round_up(T, 2 * m), round_up(S, n), round_up(K, CHUNK)
  q = pad_axis(pad_axis(q_BTHK, 3, kp), 1, tp)
  k = pad_axis(pad_axis(k_BSHK.astype(dtype), 3, kp), 1, sp)
  lse2 = jnp.where(jnp.isfinite(lse_BTH), lse_BTH * LOG2E, jnp.inf)
  lse2 = pad_axis(jnp.swapaxes(lse2, 1, 2), 2, tp, value=jnp.inf)     # [B, H, Tp]
  nc, n_kv, n_q = kp // CHUNK, sp // n, tp // (2 * m)
  per_tile = H * nc
  c = scale * LOG2E
  row = plgpu.Layout.WGMMA.reduce(1)

  def kernel(q_ref, k_ref, lse_ref, o_ref, scoped):
    b, qt = lax.axis_index('batch'), lax.axis_index('q_seq')
    wg = lax.axis_index('wg')
    (q_smem, k_smem, lse_smem, o_smem), (q_ready, k_ready, own), consumed = scoped
    # this CTA's key tiles: j0 .. end - 1, up to its last query row
    end = jnp.minimum(pl.cdiv(row0 + (qt + 1) * (2 * m), jnp.int32(n)), n_kv)
    j0 = 0
    if key_group:
      j0 = lax.axis_index('k_group') * key_group
      end = jnp.maximum(jnp.minimum(end, j0 + key_group), j0)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action='increase')
      t0 = qt * (2 * m) + wg * m
      plgpu.copy_gmem_to_smem(lse_ref.at[b, :, pl.ds(t0, m)], lse_smem.at[wg], own.at[wg])
      plgpu.barrier_wait(own.at[wg])

      def head(h, acc, j):
        first = ((j - j0 if key_group else j) * H + h) * nc    # steps from the CTA's first

        def slot(i):
          return lax.rem(first + i, jnp.int32(stages))

        def dot(acc_ref):
          for i in range(nc):
            plgpu.barrier_wait(q_ready.at[2 * slot(i) + wg])
            plgpu.barrier_wait(k_ready.at[slot(i)])
            plgpu.wgmma(acc_ref, q_smem.at[slot(i), wg],
                        plgpu.transpose_ref(k_smem.at[slot(i)], (1, 0)))
            if i:                      # the previous chunk's WGMMA is done: release its slot
              plgpu.wgmma_wait(1)
              plgpu.barrier_arrive(consumed.at[slot(i - 1)])
          return acc_ref[...]
        s = pl.run_scoped(dot, plgpu.ACC((m, n), jnp.float32))
        plgpu.barrier_arrive(consumed.at[slot(nc - 1)])
        lse = lax.broadcast_in_dim(plgpu.load(lse_smem.at[wg, h], (), layout=row), (m, n), [0])
        return acc + jnp.exp2(s * c - lse)

      def tile(j, _):
        zero = plgpu.layout_cast(jnp.full((m, n), 0, jnp.float32), plgpu.Layout.WGMMA)
        acc = lax.fori_loop(0, H, functools.partial(head, j=j), zero)
        ahead = (plgpu.broadcasted_iota(jnp.int32, (m, n), 1, layout=plgpu.Layout.WGMMA)
                 - plgpu.broadcasted_iota(jnp.int32, (m, n), 0, layout=plgpu.Layout.WGMMA))
        p = jnp.where(ahead <= row0 + t0 - j * n, acc * (1.0 / H), 0.0)   # key <= query
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # the last tile's store has read it
        o_smem.at[wg][...] = p
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, pl.ds(t0, m), pl.ds(j * n, n)])

      lax.fori_loop(j0, end, tile, None)
      plgpu.wait_smem_to_gmem(0)

    def copies(step, slot):
      j, rest = lax.div(step, jnp.int32(per_tile)), lax.rem(step, jnp.int32(per_tile))
      h, i = lax.div(rest, jnp.int32(nc)), lax.rem(rest, jnp.int32(nc))
      cols = pl.ds(i * CHUNK, CHUNK)
      return tuple((q_ref.at[b, pl.ds(qt * (2 * m) + r * m, m), h, cols], q_smem.at[slot, r],
                    q_ready.at[2 * slot + r]) for r in range(2)) + (
          (k_ref.at[b, pl.ds(j * n, n), h, cols], k_smem.at[slot], k_ready.at[slot]),)
    pl.when(wg == 2)(lambda: memory_warpgroup(pl, plgpu, copies, j0 * per_tile,
                                              end * per_tile, stages, (consumed,)))

  def entry(q_ref, k_ref, lse_ref, o_ref):
    smem = (smem_tile(plgpu, (stages, 2, m, CHUNK), dtype),
            smem_tile(plgpu, (stages, n, CHUNK), dtype),
            plgpu.SMEM((2, H, m), jnp.float32),
            plgpu.SMEM((2, m, n), jnp.float32, transforms=(plgpu.TilingTransform((8, 32)),
                                                           plgpu.SwizzleTransform(128))))
    barriers = (plgpu.Barrier(num_barriers=2 * stages), plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=2))
    pl.run_scoped(lambda *a: kernel(q_ref, k_ref, lse_ref, o_ref, a), smem, barriers,
                  plgpu.Barrier(num_arrivals=2, num_barriers=stages), collective_axes='wg')

  return plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((B, tp, sp), jnp.float32),
      grid=(n_q, -(-n_kv // key_group), B) if key_group else (n_q, B),
      grid_names=('q_seq', 'k_group', 'batch') if key_group else ('q_seq', 'batch'),
      num_threads=3, thread_name='wg',
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, lse2)
