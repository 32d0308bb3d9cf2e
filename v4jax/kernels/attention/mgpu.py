"""Causal flash attention forward under DSA's top-k bit words: Pallas Mosaic GPU (Hopper WGMMA).

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width (K and V
multiples of 64 after padding), W mask words per query (S/32), M query rows of a compute
warpgroup (block_q = 64, the WGMMA height), N keys per step (block_kv).

The same function as gpu.py's Triton forward (o, and lse in natural log, -inf for a row without
an allowed key), laid out as jax's `attention_mgpu` forward: one CTA per (head, 2 x M query rows,
batch) runs three warpgroups, a memory warpgroup that streams k, v and the mask words of each
key block through `stages` shared-memory slots by TMA, and two compute warpgroups of M query rows
each that take turns on the tensor cores (one computes its softmax while the other's WGMMAs run;
a shared barrier orders them). Per key block a compute warpgroup runs s = q k^T (WGMMA, fp32),
the mask, an online softmax in base 2 and o += p v (WGMMA).

The mask in registers: WGMMA's accumulator layout gives each thread whole-row fragments, so the
words of one key block go in as row vectors (one int32 per query row and word, loaded in the
layout of a row statistic like the softmax max), are broadcast over the block's columns,
selected by column // 32 and shifted by column % 32. For that the words are transposed outside
the kernel to [B, W, T] (T minor), so each key block's words for 2 x M query rows are one TMA
box. Key blocks wholly below the diagonal skip the causal compare; the others make it. Segment
ids are not read here: the caller uses gpu.py's Triton forward when they are given (the top-k
kernels already restrict each query's words to its own document).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from v4jax.kernels.pallas_common import pad_axis, round_up

FWD_NAME = 'masked_attention_fwd_mgpu'   # checkpoint name of the outputs (remat keeps them)
BLOCK_Q = 64                             # query rows per compute warpgroup (WGMMA M)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def forward(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, words_BTW: jax.Array,
            scale: float, *, block_kv: int = 64, stages: int = 2):
  """(o [B,T,H,V] in q's dtype, lse [B,T,H] fp32) of causal attention of query t over the keys
  s <= t whose bit is set in words_BTW (uint32 [B,T,ceil(S/32)], blockwise.pack_mask's layout).
  bf16/fp16 q, k, v; T, S, K, V are padded here to the kernel's multiples."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  B, T, H, K = q_BTHK.shape
  S, V = k_BSHK.shape[1], v_BSHV.shape[-1]
  dtype = q_BTHK.dtype
  if block_kv % 64 or stages < 2:
    raise ValueError(f'masked attention mgpu: block_kv={block_kv} must be a multiple of 64 and '
                     f'stages={stages} at least 2')
  bq, bkv = BLOCK_Q, block_kv
  tp, sp = round_up(T, 2 * bq), round_up(S, bkv)
  kp, vp = round_up(K, 64), round_up(V, 64)
  q = pad_axis(pad_axis(q_BTHK, 3, kp), 1, tp)
  k = pad_axis(pad_axis(k_BSHK, 3, kp), 1, sp)
  v = pad_axis(pad_axis(v_BSHV, 3, vp), 1, sp)
  nw = bkv // 32                       # words per key block
  W = sp // 32
  # [B, W, T/M, M] int32: one TMA box [nw, 2, M] per (key block, CTA); padded rows/keys have no bit
  words = pad_axis(pad_axis(lax.bitcast_convert_type(words_BTW, jnp.int32), 2, W), 1, tp)
  words = jnp.swapaxes(words, 1, 2).reshape(B, W, tp // bq, bq)
  n_q_tiles, n_kv = tp // (2 * bq), sp // bkv
  stages = min(stages, n_kv)
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)

  def kernel(q_ref, k_ref, v_ref, w_ref, o_ref, lse_ref, scoped):
    b, h, qt = lax.axis_index('batch'), lax.axis_index('heads'), lax.axis_index('q_seq')
    wg = lax.axis_index('wg')
    (q_smem2, o_smem2, lse_smem2, k_smem, v_smem, w_smem), loaded, consumed, turn = scoped
    k_ready, v_ready, w_ready, q_ready = loaded
    k_used, v_used, w_used = consumed
    # key blocks this CTA needs: up to its last query row's diagonal
    cta_steps = jnp.minimum(pl.cdiv((qt + 1) * (2 * bq), jnp.int32(bkv)), n_kv)

    def take_turn():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action='increase')
      q_smem, o_smem, lse_smem = q_smem2.at[wg], o_smem2.at[wg], lse_smem2.at[wg]
      t0 = qt * (2 * bq) + wg * bq
      steps = jnp.minimum(pl.cdiv(t0 + bq, jnp.int32(bkv)), n_kv)
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(t0, bq), h], q_smem, q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg])
      row = plgpu.Layout.WGMMA.reduce(1)
      m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row)
      l_i = plgpu.layout_cast(jnp.full((bq,), 0, jnp.float32), row)
      acc = plgpu.layout_cast(jnp.full((bq, vp), 0, jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(steps > 0)
      def _():
        plgpu.barrier_wait(k_ready.at[0])

      pl.when(wg == 1)(take_turn)

      def step(j, carry, causal: bool):
        acc, m_i, l_i = carry
        slot = lax.rem(j, jnp.int32(stages))

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
          take_turn()
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(k_used.at[slot])

        plgpu.barrier_wait(w_ready.at[slot])
        col = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
        word = None
        for i in range(nw):
          wi = plgpu.load(w_smem.at[slot, i, wg], (), layout=row)
          wi = lax.broadcast_in_dim(wi, (bq, bkv), [0])
          word = wi if word is None else jnp.where(col >= 32 * i, wi, word)
        plgpu.barrier_arrive(w_used.at[slot])
        ok = (lax.shift_right_logical(word, col & 31) & 1) != 0
        if causal:
          r = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
          ok = ok & (col + j * bkv <= r + t0)
        s = jnp.where(ok, s * (scale * _LOG2E), -jnp.inf)

        m_new = jnp.maximum(m_i, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)       # rows with no key yet stay finite
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
        acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        plgpu.barrier_arrive(turn)                   # softmax done
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(turn)                     # the tensor cores are ours

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          nxt = j + 1

          @pl.when(nxt < steps)
          def _():
            plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.int32(stages))])
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_used.at[slot])
        return acc, m_new, l_i

      def drain(j, _):
        # key blocks the other warpgroup still needs: release their slots, keep the turns
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_arrive(k_used.at[slot])
        plgpu.barrier_arrive(w_used.at[slot])
        plgpu.barrier_arrive(v_used.at[slot])
        take_turn()
        take_turn()

      full = jnp.minimum(lax.div(t0 + 1, jnp.int32(bkv)), steps)   # blocks with every s <= t0
      carry = lax.fori_loop(0, full, functools.partial(step, causal=False), (acc, m_i, l_i))
      acc, m_i, l_i = lax.fori_loop(full, steps, functools.partial(step, causal=True), carry)
      lax.fori_loop(steps, cta_steps, drain, None)
      pl.when(wg == 0)(take_turn)

      has_key = l_i > 0
      l_safe = jnp.where(has_key, l_i, 1.0)
      o_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
      lse_smem[...] = jnp.where(has_key, (m_i + jnp.log2(l_safe)) * _LN2, -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(t0, bq), h])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(t0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action='decrease')

      def load(j, slot):
        keys = (b, pl.ds(j * bkv, bkv), h)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(w_ref.at[b, pl.ds(j * nw, nw), pl.ds(qt * 2, 2)],
                                w_smem.at[slot], w_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

      for i in range(stages):
        pl.when(i < cta_steps)(functools.partial(load, i, i))

      @pl.loop(0, jnp.maximum(cta_steps - stages, 0))
      def _(j):
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_wait(k_used.at[slot])
        plgpu.barrier_wait(w_used.at[slot])
        plgpu.barrier_wait(v_used.at[slot])
        load(j + stages, slot)

  def entry(q_ref, k_ref, v_ref, w_ref, o_ref, lse_ref):
    smem = (plgpu.SMEM((2, bq, kp), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((2, bq, vp), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((2, bq), jnp.float32),
            plgpu.SMEM((stages, bkv, kp), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bkv, vp), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, nw, 2, bq), jnp.int32))
    loaded = (plgpu.Barrier(num_barriers=stages),) * 3 + (plgpu.Barrier(num_barriers=2),)
    consumed = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 3
    pl.run_scoped(lambda *a: kernel(q_ref, k_ref, v_ref, w_ref, o_ref, lse_ref, a),
                  smem, loaded, consumed, plgpu.Barrier(num_arrivals=2), collective_axes='wg')

  o, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((B, tp, H, vp), dtype),
                jax.ShapeDtypeStruct((B, H, tp), jnp.float32)),
      grid=(H, n_q_tiles, B), grid_names=('heads', 'q_seq', 'batch'),
      num_threads=3, thread_name='wg',
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, words)
  return o[:, :T, :, :V], jnp.swapaxes(lse, 1, 2)[:, :T]
