"""Causal flash attention under DSA's top-k bit words: Pallas Mosaic GPU kernels (Hopper WGMMA).

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width (K and V
padded to multiples of 64), W mask words per query (S/32), M query rows and N keys of a compute
warpgroup's tile (64 each: the WGMMA height; N = block_kv in the forward).

The same functions as gpu.py's Triton kernels (o, and lse in natural log, -inf for a row without
an allowed key; FA2's dq and dk/dv from the saved lse and delta = rowsum(do·o)), laid out as
jax's `attention_mgpu`: each CTA runs three warpgroups, a memory warpgroup that streams the
operands of each step through `stages` shared-memory slots by TMA, and two compute warpgroups
that issue the WGMMAs (in the forward and dq each owns 64 query rows).
  forward  one CTA per (head, 2 x M query rows, batch); per key block s = q k^T, the mask, an
           online softmax in base 2, o += p v. The two compute warpgroups take turns on the
           tensor cores (one computes its softmax while the other's WGMMAs run).
  dq       one CTA per (head, 2 x M query rows, batch), key blocks streamed: s = q k^T,
           p = exp(s - lse), dp = do v^T, ds = p (dp - delta), dq += ds k.
  dk, dv   one CTA per (head, N keys, batch), query blocks streamed from the diagonal down;
           one compute warpgroup s^T = k q^T, p^T, dv += p^T do, handing p^T to the other
           through shared memory: dp^T = v do^T, ds^T, dk += ds^T q (`_dkv`).

The mask in registers: WGMMA's accumulator layout gives each thread fragments of whole rows, so
the words of one (query block, key block) tile go in as vectors of one int32 per query (loaded
in the layout of a row statistic, like the softmax max; in dk/dv, where queries are columns, of
a column statistic), are broadcast across the tile, selected by key // 32 and shifted by
key % 32. For that the words are transposed outside the kernel to [B, W, T] (T minor), so each
tile's words are one TMA box. Tiles wholly below the diagonal skip the causal compare; the
others make it. Segment ids are not read: the caller uses gpu.py's Triton kernels when they are
given (the top-k kernels already keep each query's words inside its document).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from v4jax.kernels.mgpu_common import (BLOCK, LOG2E, memory_warpgroup, modules, smem_tile,
                                       store)
from v4jax.kernels.pallas_common import pad_axis, round_up

FWD_NAME = 'masked_attention_fwd_mgpu'   # checkpoint name of the outputs (remat keeps them)
_LN2 = math.log(2.0)


def _padded(q, k, v, words, tile_t: int, tile_s: int):
  """q, k, v padded to T % tile_t == S % tile_s == 0 and K, V % 64 == 0; the words as int32
  [B, W, T] (padded rows and keys have no bit)."""
  tp, sp = round_up(q.shape[1], tile_t), round_up(k.shape[1], tile_s)
  kp, vp = round_up(q.shape[-1], 64), round_up(v.shape[-1], 64)
  q = pad_axis(pad_axis(q, 3, kp), 1, tp)
  k = pad_axis(pad_axis(k, 3, kp), 1, sp)
  v = pad_axis(pad_axis(v, 3, vp), 1, sp)
  w = pad_axis(pad_axis(lax.bitcast_convert_type(words, jnp.int32), 2, sp // 32), 1, tp)
  return q, k, v, jnp.swapaxes(w, 1, 2)


def _allowed(plgpu, word_at, nw: int, shape, keys_dim: int, t0, s0, causal: bool):
  """Bool [rows, cols] in WGMMA layout: key s0 + (its index along keys_dim) is in the set of
  query t0 + (its index along the other dim), and not after it when causal. word_at(i): query
  vector of word i of the keys (the layout of a statistic along the queries' dim)."""
  key = plgpu.broadcasted_iota(jnp.int32, shape, keys_dim, layout=plgpu.Layout.WGMMA)
  q_dim = 1 - keys_dim
  word = None
  for i in range(nw):
    wi = lax.broadcast_in_dim(word_at(i), shape, [q_dim])
    word = wi if word is None else jnp.where(key >= 32 * i, wi, word)
  ok = (lax.shift_right_logical(word, key & 31) & 1) != 0
  if causal:
    qry = plgpu.broadcasted_iota(jnp.int32, shape, q_dim, layout=plgpu.Layout.WGMMA)
    ok = ok & (key + s0 <= qry + t0)
  return ok


def forward(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, words_BTW: jax.Array,
            scale: float, *, block_kv: int = 64, stages: int = 2):
  """(o [B,T,H,V] in q's dtype, lse [B,T,H] fp32) of causal attention of query t over the keys
  s <= t whose bit is set in words_BTW (uint32 [B,T,ceil(S/32)], blockwise.pack_mask's layout).
  bf16/fp16 q, k, v; T, S, K, V are padded here to the kernel's multiples."""
  pl, plgpu = modules()
  B, T, H, _ = q_BTHK.shape
  V = v_BSHV.shape[-1]
  dtype = q_BTHK.dtype
  if block_kv % 64 or stages < 2:
    raise ValueError(f'masked attention mgpu: block_kv={block_kv} must be a multiple of 64 and '
                     f'stages={stages} at least 2')
  bq, bkv, nw = BLOCK, block_kv, block_kv // 32
  q, k, v, words = _padded(q_BTHK, k_BSHK, v_BSHV, words_BTW, 2 * bq, bkv)
  tp, sp, kp, vp = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
  words = words.reshape(B, sp // 32, tp // bq, bq)     # one box [nw, 2, M] per (key block, CTA)
  n_kv = sp // bkv
  stages = min(stages, n_kv)
  row = plgpu.Layout.WGMMA.reduce(1)

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
        ok = _allowed(plgpu, lambda i: plgpu.load(w_smem.at[slot, i, wg], (), layout=row), nw,
                      (bq, bkv), 1, t0, j * bkv, causal)
        plgpu.barrier_arrive(w_used.at[slot])
        s = jnp.where(ok, s * (scale * LOG2E), -jnp.inf)

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
        for used in consumed:
          plgpu.barrier_arrive(used.at[slot])
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
      store(plgpu, (o_smem, o_ref.at[b, pl.ds(t0, bq), h]),
             (lse_smem, lse_ref.at[b, h, pl.ds(t0, bq)]))

    def copies(j, slot):
      keys = (b, pl.ds(j * bkv, bkv), h)
      return ((k_ref.at[keys], k_smem.at[slot], k_ready.at[slot]),
              (w_ref.at[b, pl.ds(j * nw, nw), pl.ds(qt * 2, 2)], w_smem.at[slot],
               w_ready.at[slot]),
              (v_ref.at[keys], v_smem.at[slot], v_ready.at[slot]))
    pl.when(wg == 2)(lambda: memory_warpgroup(pl, plgpu, copies, 0, cta_steps, stages, consumed))

  def entry(q_ref, k_ref, v_ref, w_ref, o_ref, lse_ref):
    smem = (smem_tile(plgpu, (2, bq, kp), dtype), smem_tile(plgpu, (2, bq, vp), dtype),
            plgpu.SMEM((2, bq), jnp.float32),
            smem_tile(plgpu, (stages, bkv, kp), dtype), smem_tile(plgpu, (stages, bkv, vp), dtype),
            plgpu.SMEM((stages, nw, 2, bq), jnp.int32))
    loaded = (plgpu.Barrier(num_barriers=stages),) * 3 + (plgpu.Barrier(num_barriers=2),)
    consumed = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 3
    pl.run_scoped(lambda *a: kernel(q_ref, k_ref, v_ref, w_ref, o_ref, lse_ref, a),
                  smem, loaded, consumed, plgpu.Barrier(num_arrivals=2), collective_axes='wg')

  o, lse = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((B, tp, H, vp), dtype),
                jax.ShapeDtypeStruct((B, H, tp), jnp.float32)),
      grid=(H, tp // (2 * bq), B), grid_names=('heads', 'q_seq', 'batch'),
      num_threads=3, thread_name='wg',
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, words)
  # Inside a layer scan the saved o and lse are stacked by dynamic-update-slices; XLA's
  # dynamic-slice fusion writes a custom call's output into such a stack in place, and where the
  # output has other users it clones the call: the kernel ran twice per layer (performance.md
  # row 88). The barrier leaves the stacking a plain copy.
  o, lse = lax.optimization_barrier((o, lse))
  return o[:, :T, :, :V], jnp.swapaxes(lse, 1, 2)[:, :T]


def _dot_t(pl, plgpu, a_smem, b_smem, shape):
  """a b^T of two shared-memory tiles by WGMMA, as a new fp32 array of `shape`."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def backward(q_BTHK, k_BSHK, v_BSHV, words_BTW, o_BTHV, lse_BTH, do_BTHV, scale: float, *,
             kernels=('dq', 'dkv'), stages: int = 2):
  """(dq, dk, dv) of `forward`'s o for the cotangent do (lse has no gradient of its own), or
  for the kernels not named in `kernels` None (the caller runs those elsewhere)."""
  pl, plgpu = modules()
  B, T, H, K = q_BTHK.shape
  S, V = k_BSHK.shape[1], v_BSHV.shape[-1]
  dtype = q_BTHK.dtype
  n = BLOCK
  nw = n // 32
  q, k, v, words = _padded(q_BTHK, k_BSHK, v_BSHV, words_BTW, 2 * n, 2 * n)
  tp, sp, kp, vp = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
  do = pad_axis(pad_axis(do_BTHV, 3, vp), 1, tp)
  # per query row: lse in base 2 (+inf for rows without a key and padded rows: p = 0) and
  # delta = rowsum(do·o), stacked [B, H, 2, T] so that one TMA box carries both. delta is
  # reduced in do's layout and materialised behind a barrier before the transpose: fused into
  # the stack, XLA:GPU reduced each [B, H, T] element alone, reading do and o 4 KB apart
  # between neighbouring threads (0.6 ms per call at the bench shape, ~10x its memory time)
  delta = lax.optimization_barrier(
      jnp.sum(do_BTHV.astype(jnp.float32) * o_BTHV.astype(jnp.float32), axis=-1))
  delta = jnp.swapaxes(delta, 1, 2)
  lse2 = jnp.where(lse_BTH == -jnp.inf, jnp.inf, lse_BTH * LOG2E)
  stats = jnp.stack([pad_axis(jnp.swapaxes(lse2, 1, 2), 2, tp, value=jnp.inf),
                     pad_axis(delta, 2, tp)], axis=2)
  c = scale * LOG2E
  row = plgpu.Layout.WGMMA.reduce(1)
  params = plgpu.CompilerParams(approx_math=True)
  out = {}

  if 'dq' in kernels:
    n_kv = sp // n
    st = min(stages, n_kv)
    w4 = words.reshape(B, sp // 32, tp // n, n)

    def dq_kernel(q_ref, k_ref, v_ref, do_ref, st_ref, w_ref, dq_ref, scoped):
      b, h, qt = lax.axis_index('batch'), lax.axis_index('heads'), lax.axis_index('q_seq')
      wg = lax.axis_index('wg')
      (q_smem2, do_smem2, st_smem2, k_smem, v_smem, w_smem), loaded, own, consumed = scoped
      k_ready, v_ready, w_ready = loaded
      cta_steps = jnp.minimum(pl.cdiv((qt + 1) * (2 * n), jnp.int32(n)), n_kv)

      @pl.when(wg < 2)
      def _compute():
        plgpu.set_max_registers(232, action='increase')
        q_smem, do_smem, st_smem = q_smem2.at[wg], do_smem2.at[wg], st_smem2.at[wg]
        t0 = qt * (2 * n) + wg * n
        steps = jnp.minimum(pl.cdiv(t0 + n, jnp.int32(n)), n_kv)
        rows = (b, pl.ds(t0, n), h)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, own.at[3 * wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, own.at[3 * wg + 1])
        plgpu.copy_gmem_to_smem(st_ref.at[b, h, :, pl.ds(t0, n)], st_smem, own.at[3 * wg + 2])
        for i in range(3):
          plgpu.barrier_wait(own.at[3 * wg + i])
        lse = lax.broadcast_in_dim(plgpu.load(st_smem.at[0], (), layout=row), (n, n), [0])
        dl = lax.broadcast_in_dim(plgpu.load(st_smem.at[1], (), layout=row), (n, n), [0])

        def step(j, dq, causal: bool):
          slot = lax.rem(j, jnp.int32(st))
          plgpu.barrier_wait(k_ready.at[slot])

          s = _dot_t(pl, plgpu, q_smem, k_smem.at[slot], (n, n))
          plgpu.barrier_wait(v_ready.at[slot])
          dp = _dot_t(pl, plgpu, do_smem, v_smem.at[slot], (n, n))
          plgpu.barrier_arrive(consumed[1].at[slot])
          plgpu.barrier_wait(w_ready.at[slot])
          ok = _allowed(plgpu, lambda i: plgpu.load(w_smem.at[slot, i, wg], (), layout=row),
                        nw, (n, n), 1, t0, j * n, causal)
          plgpu.barrier_arrive(consumed[2].at[slot])
          p = jnp.where(ok, jnp.exp2(s * c - lse), 0.0)
          ds = (p * (dp - dl)).astype(dtype)

          def dq_ref(acc_ref):
            plgpu.wgmma(acc_ref, ds, k_smem.at[slot])
          dq = pl.run_state(dq_ref)(plgpu.ACC.init(dq))
          plgpu.barrier_arrive(consumed[0].at[slot])
          return dq

        def drain(j, _):
          slot = lax.rem(j, jnp.int32(st))
          for used in consumed:
            plgpu.barrier_arrive(used.at[slot])

        dq = plgpu.layout_cast(jnp.full((n, kp), 0, jnp.float32), plgpu.Layout.WGMMA)
        full = jnp.minimum(lax.div(t0 + 1, jnp.int32(n)), steps)
        dq = lax.fori_loop(0, full, functools.partial(step, causal=False), dq)
        dq = lax.fori_loop(full, steps, functools.partial(step, causal=True), dq)
        lax.fori_loop(steps, cta_steps, drain, None)
        q_smem[...] = (dq * scale).astype(dtype)
        store(plgpu, (q_smem, dq_ref.at[rows]))

      def copies(j, slot):
        keys = (b, pl.ds(j * n, n), h)
        return ((k_ref.at[keys], k_smem.at[slot], k_ready.at[slot]),
                (v_ref.at[keys], v_smem.at[slot], v_ready.at[slot]),
                (w_ref.at[b, pl.ds(j * nw, nw), pl.ds(qt * 2, 2)], w_smem.at[slot],
                 w_ready.at[slot]))
      pl.when(wg == 2)(lambda: memory_warpgroup(pl, plgpu, copies, 0, cta_steps, st, consumed))

    def dq_entry(*refs):
      smem = (smem_tile(plgpu, (2, n, kp), dtype), smem_tile(plgpu, (2, n, vp), dtype),
              plgpu.SMEM((2, 2, n), jnp.float32),
              smem_tile(plgpu, (st, n, kp), dtype), smem_tile(plgpu, (st, n, vp), dtype),
              plgpu.SMEM((st, nw, 2, n), jnp.int32))
      pl.run_scoped(lambda *a: dq_kernel(*refs, a), smem,
                    (plgpu.Barrier(num_barriers=st),) * 3, plgpu.Barrier(num_barriers=6),
                    (plgpu.Barrier(num_arrivals=2, num_barriers=st),) * 3, collective_axes='wg')

    dq = plgpu.kernel(
        dq_entry, out_type=jax.ShapeDtypeStruct((B, tp, H, kp), dtype),
        grid=(H, tp // (2 * n), B), grid_names=('heads', 'q_seq', 'batch'),
        num_threads=3, thread_name='wg', compiler_params=params,
    )(q, k, v, do, stats, w4)
    out['dq'] = dq[:, :T, :, :K]

  if 'dkv' in kernels:
    dk, dv = _dkv(pl, plgpu, q, k, v, do, stats, words, scale, stages, params)
    out['dk'], out['dv'] = dk[:, :S, :, :K], dv[:, :S, :, :V]
  return out.get('dq'), out.get('dk'), out.get('dv')


def _dkv(pl, plgpu, q, k, v, do, stats, words, scale: float, stages: int, params):
  """dk, dv ([B, Sp, H, K] and [B, Sp, H, V]) with the two compute warpgroups of a CTA on the
  same 64 keys, one accumulator each (FA3-style producer/consumer hand-off of p^T):
    warpgroup 0  s^T = k q^T, p^T = mask·exp2(s^T·c - lse), hands p^T (fp32) to warpgroup 1
                 through a 2-slot shared-memory ring, dv += p^T do;
    warpgroup 1  dp^T = v do^T, ds^T = p^T (dp^T - delta), dk += ds^T q.
  Each holds one fp32 accumulator (64 x V or 64 x K) beside two 64 x 64 tiles. With a
  warpgroup per 64 keys holding both (64 x (K + V): 160 registers per thread at K=192, V=128)
  ptxas spilled ~1 KB per thread and the kernel ran at 278 TFLOP/s, against 425 so
  (docs/performance.md row 91); the FLOPs and roundings are the same, and q and do are
  streamed once per 64 keys instead of per 128."""
  B, tp, H, kp = q.shape
  sp, vp = k.shape[1], v.shape[-1]
  dtype = q.dtype
  n = BLOCK
  nw = n // 32
  n_q = tp // n
  st = min(stages, n_q)
  c = scale * LOG2E
  col = plgpu.Layout.WGMMA.reduce(0)

  def kernel(q_ref, k_ref, v_ref, do_ref, st_ref, w_ref, dk_ref, dv_ref, scoped):
    b, h, kt = lax.axis_index('batch'), lax.axis_index('heads'), lax.axis_index('kv_seq')
    wg = lax.axis_index('wg')
    (k_smem, v_smem, dv_smem, p_smem, q_smem, do_smem, st_smem, w_smem), loaded, own, \
        consumed, p_ready, p_free = scoped
    q_ready, do_ready, st_ready, w_ready = loaded
    q_used, do_used, st_used, w_used = consumed
    s0 = kt * n
    keys = (b, pl.ds(s0, n), h)
    first = kt                       # the query block on the diagonal: no earlier one sees s0..

    def loop(step, init):
      # the diagonal block with the causal compare, then those wholly past it
      diag = jnp.minimum(first + 1, n_q)
      carry = lax.fori_loop(first, diag, functools.partial(step, causal=True), init)
      return lax.fori_loop(diag, n_q, functools.partial(step, causal=False), carry)

    def stat(slot, r):
      return lax.broadcast_in_dim(plgpu.load(st_smem.at[slot, r], (), layout=col), (n, n), [1])

    def start(ref, smem, k):
      # a compute warpgroup: its registers, then its own tile of the CTA's keys (k or v)
      plgpu.set_max_registers(232, action='increase')
      plgpu.copy_gmem_to_smem(ref.at[keys], smem, own.at[k])
      plgpu.barrier_wait(own.at[k])

    def slots(i):
      # query block i: its step, its operands' slot and its p^T slot
      j = i - first
      return j, lax.rem(j, jnp.int32(st)), lax.rem(j, jnp.int32(2))

    def run(step, width, out_smem, out_ref, mult=None):
      acc = loop(step, plgpu.layout_cast(jnp.full((n, width), 0, jnp.float32),
                                         plgpu.Layout.WGMMA))
      out_smem[...] = (acc if mult is None else acc * mult).astype(dtype)
      store(plgpu, (out_smem, out_ref.at[keys]))

    @pl.when(wg == 0)
    def _p_and_dv():
      start(k_ref, k_smem, 0)

      def step(i, dv, causal: bool):
        j, slot, ps = slots(i)
        plgpu.barrier_wait(q_ready.at[slot])
        sT = _dot_t(pl, plgpu, k_smem, q_smem.at[slot], (n, n))
        plgpu.barrier_wait(st_ready.at[slot])
        lse = stat(slot, 0)
        plgpu.barrier_wait(w_ready.at[slot])
        ok = _allowed(plgpu, lambda w: plgpu.load(w_smem.at[slot, w], (), layout=col),
                      nw, (n, n), 0, i * n, s0, causal)
        plgpu.barrier_arrive(w_used.at[slot])
        plgpu.barrier_arrive(st_used.at[slot])
        pT = jnp.where(ok, jnp.exp2(sT * c - lse), 0.0)

        @pl.when(j >= 2)
        def _():
          plgpu.barrier_wait(p_free.at[ps])       # warpgroup 1 has read this slot's last p^T
        p_smem.at[ps][...] = pT
        plgpu.barrier_arrive(p_ready.at[ps])
        plgpu.barrier_wait(do_ready.at[slot])

        def dv_ref(acc_ref):
          plgpu.wgmma(acc_ref, pT.astype(dtype), do_smem.at[slot])
        dv = pl.run_state(dv_ref)(plgpu.ACC.init(dv))
        plgpu.barrier_arrive(q_used.at[slot])
        plgpu.barrier_arrive(do_used.at[slot])
        return dv

      run(step, vp, dv_smem, dv_ref)

    @pl.when(wg == 1)
    def _ds_and_dk():
      start(v_ref, v_smem, 1)

      def step(i, dk, causal: bool):
        del causal                                 # the mask is in p^T
        _, slot, ps = slots(i)
        plgpu.barrier_wait(do_ready.at[slot])
        dpT = _dot_t(pl, plgpu, v_smem, do_smem.at[slot], (n, n))
        plgpu.barrier_wait(st_ready.at[slot])
        dl = stat(slot, 1)
        plgpu.barrier_wait(w_ready.at[slot])      # unread here; waited to keep the phases
        plgpu.barrier_arrive(w_used.at[slot])
        plgpu.barrier_arrive(st_used.at[slot])
        plgpu.barrier_arrive(do_used.at[slot])
        plgpu.barrier_wait(p_ready.at[ps])
        pT = plgpu.load(p_smem.at[ps], (), layout=plgpu.Layout.WGMMA)
        plgpu.barrier_arrive(p_free.at[ps])
        dsT = (pT * (dpT - dl)).astype(dtype)
        plgpu.barrier_wait(q_ready.at[slot])

        def dk_ref(acc_ref):
          plgpu.wgmma(acc_ref, dsT, q_smem.at[slot])
        dk = pl.run_state(dk_ref)(plgpu.ACC.init(dk))
        plgpu.barrier_arrive(q_used.at[slot])
        return dk

      # warpgroup 0's last read of k_smem came before its last p^T: the tile is free for dk
      run(step, kp, k_smem, dk_ref, scale)

    def copies(i, slot):
      rows = (b, pl.ds(i * n, n), h)
      return ((q_ref.at[rows], q_smem.at[slot], q_ready.at[slot]),
              (do_ref.at[rows], do_smem.at[slot], do_ready.at[slot]),
              (st_ref.at[b, h, :, pl.ds(i * n, n)], st_smem.at[slot], st_ready.at[slot]),
              (w_ref.at[b, pl.ds(kt * nw, nw), pl.ds(i * n, n)], w_smem.at[slot],
               w_ready.at[slot]))
    pl.when(wg == 2)(lambda: memory_warpgroup(pl, plgpu, copies, first, n_q, st, consumed))

  def dkv_entry(*refs):
    smem = (smem_tile(plgpu, (n, kp), dtype), smem_tile(plgpu, (n, vp), dtype),
            smem_tile(plgpu, (n, vp), dtype),
            plgpu.SMEM((2, n, n), jnp.float32, transforms=(plgpu.TilingTransform((8, 32)),
                                                           plgpu.SwizzleTransform(128))),
            smem_tile(plgpu, (st, n, kp), dtype), smem_tile(plgpu, (st, n, vp), dtype),
            plgpu.SMEM((st, 2, n), jnp.float32), plgpu.SMEM((st, nw, n), jnp.int32))
    pl.run_scoped(lambda *a: kernel(*refs, a), smem,
                  (plgpu.Barrier(num_barriers=st),) * 4, plgpu.Barrier(num_barriers=2),
                  (plgpu.Barrier(num_arrivals=2, num_barriers=st),) * 4,
                  plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
                  collective_axes='wg')

  return plgpu.kernel(
      dkv_entry,
      out_type=(jax.ShapeDtypeStruct((B, sp, H, kp), dtype),
                jax.ShapeDtypeStruct((B, sp, H, vp), dtype)),
      grid=(H, sp // n, B), grid_names=('heads', 'kv_seq', 'batch'),
      num_threads=3, thread_name='wg', compiler_params=params,
  )(q, k, v, do, stats, words)
