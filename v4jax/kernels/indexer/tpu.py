"""Lightning indexer on TPU: fused Pallas Mosaic score kernel, then XLA top-k per query chunk.

Dims: B batch, T query positions, S key positions, H indexer heads, D indexer head dim, K top-k.

The score kernel tiles (query block bt, key block bs): for each head (unrolled; H is static) a
[bt,D]x[D,bs] MXU dot, ReLU, times the head weight column, summed in fp32; the causal / segment
mask is applied in the epilogue and tiles above the diagonal only write -inf. -0.0 is written as
+0.0 so ties at zero go to the smaller s. Queries run in chunks whose [B, Tc, S_c] fp32 slab fits
`slab_bytes` (S_c ends at the chunk's last row), so no T x T matrix exists for long T.

Selection uses `lax.top_k` on each slab (Mosaic has no sort or scatter to compact a radix
select) and re-masks non-allowed picks to -1, like the reference. The gradient of
`indexer_scores` reuses the jnp reference's VJP.

`indexer_scores_at` (the sparse KL student) runs one grid step per token and fetches its K key
rows by per-row DMA from HBM in double-buffered chunks (the sparse MLA kernel's gather); all
heads form one [H,D]x[D,bk] dot; each step waits for its own DMAs, so the forward grid is
all "parallel". Its backward recomputes the dots, accumulates dq and dw in VMEM
and adds each chunk's dk rows into an fp32 HBM buffer by read-modify-write row DMAs on a
sequential grid (the indices of one token must be distinct, as top-k output is). Given the
top-k's own selected scores, the student's forward is those (no kernel).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from v4jax.kernels.indexer import reference
from v4jax.kernels.pallas_common import (NEG_INF, given_value_vjp, live_tile, pad_axis, round_up,
                                         tpu_interpret, with_reference_vjp)
from v4jax.kernels.sparse_attention.tpu import (RowGather, chunk_rows, chunk_valid, prep_indices,
                                                rmw_rows)

_NT = (((1,), (1,)), ((), ()))   # a [M,D] . b [N,D] -> [M,N]
_TN = (((0,), (0,)), ((), ()))   # a [D,M] . b [D,N] -> [M,N]


def _score_kernel(q_ref, k_ref, w_ref, sq_ref, sk_ref, o_ref, *, bt, bs, t0, n_keys, masked):
  qi, si = pl.program_id(1), pl.program_id(2)

  def compute():
    k = k_ref[...]
    w = w_ref[...]                                                   # [bt, H]
    acc = jnp.zeros((bt, bs), jnp.float32)
    for h in range(q_ref.shape[0]):
      d = jax.lax.dot_general(q_ref[h], k, _NT, preferred_element_type=jnp.float32)
      acc = acc + w[:, h:h + 1] * jnp.maximum(d, 0.0)
    if masked:
      t_idx = t0 + qi * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, bs), 0)
      s_idx = si * bs + jax.lax.broadcasted_iota(jnp.int32, (bt, bs), 1)
      ok = (s_idx <= t_idx) & (s_idx < n_keys) & (sq_ref[...] == sk_ref[...])
      acc = jnp.where(ok, jnp.where(acc == 0.0, 0.0, acc), NEG_INF)
    o_ref[...] = acc

  live_tile(compute, o_ref, si * bs <= t0 + qi * bt + bt - 1 if masked else None)


def _score_slab(qT, k, w, seg_q, seg_k, *, t0, rows, n_cols, n_keys, masked, bt, bs, interpret):
  """fp32 scores [B, rows, n_cols] of query rows [t0, t0+rows) against keys [0, n_cols).

  qT [B,H,Tp,D], w [B,Tp,H], seg_q [B,Tp,1], k [B,Sp,D], seg_k [B,1,Sp], padded to the blocks.
  """
  B, H, _, D = qT.shape
  kernel = functools.partial(_score_kernel, bt=bt, bs=bs, t0=t0, n_keys=n_keys, masked=masked)
  r0 = t0 // bt
  return pl.pallas_call(
      kernel,
      grid=(B, rows // bt, n_cols // bs),
      in_specs=[pl.BlockSpec((None, H, bt, D), lambda b, i, j: (b, 0, r0 + i, 0)),
                pl.BlockSpec((None, bs, D), lambda b, i, j: (b, j, 0)),
                pl.BlockSpec((None, bt, H), lambda b, i, j: (b, r0 + i, 0)),
                pl.BlockSpec((None, bt, 1), lambda b, i, j: (b, r0 + i, 0)),
                pl.BlockSpec((None, 1, bs), lambda b, i, j: (b, 0, j))],
      out_specs=pl.BlockSpec((None, bt, bs), lambda b, i, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct((B, rows, n_cols), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel')),
      interpret=interpret, name='indexer_scores_tpu',
  )(qT, k, w, seg_q, seg_k)


def _layout(q, k, w, seg, bt, bs):
  B, T, H, D = q.shape
  S = k.shape[1]
  Tp, Sp = round_up(T, bt), round_up(S, bs)
  qT = pad_axis(jnp.transpose(q, (0, 2, 1, 3)), 2, Tp)
  wp = pad_axis(w.astype(jnp.float32), 1, Tp)
  kp = pad_axis(k.astype(q.dtype), 1, Sp)
  if seg is None:
    seg_q, seg_k = jnp.zeros((B, Tp, 1), jnp.int32), jnp.zeros((B, 1, Sp), jnp.int32)
  else:
    seg_q = pad_axis(seg.astype(jnp.int32), 1, Tp, value=-1)[:, :, None]
    seg_k = pad_axis(seg.astype(jnp.int32), 1, Sp, value=-2)[:, None, :]
  return qT, kp, wp, seg_q, seg_k


def _check_blocks(bt, bs):
  if bt % 8 or bs % 128:
    raise ValueError(f'indexer tpu: block_t={bt} must be a multiple of 8 and block_s={bs} of 128')


def _scores_kernel(q, k, w, opts):
  bt, bs, interpret = opts
  T, S = q.shape[1], k.shape[1]
  qT, kp, wp, sq, sk = _layout(q, k, w, None, bt, bs)
  out = _score_slab(qT, kp, wp, sq, sk, t0=0, rows=qT.shape[2], n_cols=kp.shape[1], n_keys=S,
                    masked=False, bt=bt, bs=bs, interpret=interpret)
  return out[:, :T, :S]


_scores = with_reference_vjp(_scores_kernel, reference.indexer_scores)


def indexer_scores(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, *, block_t: int = 128,
                   block_s: int = 128, interpret=None) -> jax.Array:
  """Unmasked fp32 I [B,T,S] by the score kernel; the VJP is the jnp reference's."""
  _check_blocks(block_t, block_s)
  return _scores(q_BTHD, k_BSD, w_BTH, (block_t, block_s, tpu_interpret(interpret)))


def indexer_topk(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, topk: int,
                 segment_ids_BT: jax.Array | None = None, *, return_scores: bool = False,
                 block_t: int = 128, block_s: int = 128, slab_bytes: int = 1 << 30,
                 interpret=None):
  """int32 idx [B,T,K] of the top-K allowed keys per token (ties to the smaller s, -1 empty).

  With return_scores, also the fp32 scores [B,T,K] of the selected keys (-inf at -1 slots).
  """
  _check_blocks(block_t, block_s)
  interpret = tpu_interpret(interpret)
  B, T, H, D = q_BTHD.shape
  S = k_BSD.shape[1]
  if segment_ids_BT is not None and S != T:
    raise ValueError(f'indexer_topk: segment_ids_BT needs S == T, got k_BSD {k_BSD.shape}')
  # Selection carries no gradient (SPEC §3): keep autodiff away from the kernels.
  q_BTHD, k_BSD, w_BTH = (jax.lax.stop_gradient(x) for x in (q_BTHD, k_BSD, w_BTH))
  qT, kp, wp, sq, sk = _layout(q_BTHD, k_BSD, w_BTH, segment_ids_BT, block_t, block_s)
  Tp, Sp = qT.shape[2], kp.shape[1]
  rows = max(block_t, min(Tp, (slab_bytes // (4 * B * Sp)) // block_t * block_t))
  idx_parts, val_parts = [], []
  for t0 in range(0, Tp, rows):
    n = min(rows, Tp - t0)
    n_cols = min(Sp, round_up(t0 + n, block_s))
    slab = _score_slab(qT, kp, wp, sq, sk, t0=t0, rows=n, n_cols=n_cols, n_keys=S, masked=True,
                       bt=block_t, bs=block_s, interpret=interpret)
    kk = min(topk, n_cols)
    val, idx = jax.lax.top_k(slab, kk)
    ok = val > NEG_INF
    idx_parts.append(pad_axis(jnp.where(ok, idx, -1), 2, topk, value=-1))
    val_parts.append(pad_axis(val, 2, topk, value=NEG_INF))
  idx = jnp.concatenate(idx_parts, axis=1)[:, :T].astype(jnp.int32)
  if not return_scores:
    return idx
  return idx, jnp.concatenate(val_parts, axis=1)[:, :T]


# ----------------------------------------------------------------------------- scores at idx


def _dot(a, b, dims):
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _at_fwd_kernel(idx_smem, idx_v, q_ref, w_ref, k_hbm, o_ref, buf, sem, *, bk, nk):
  b = pl.program_id(0)
  q, w = q_ref[...], w_ref[...]                                      # [H, D], [H, 1]

  def use(j, k):
    s = jnp.sum(w * jnp.maximum(_dot(q, k, _NT), 0.0), axis=0, keepdims=True)   # [1, bk]
    start = 0 if nk == 1 else pl.multiple_of(j * bk, bk)
    o_ref[:, pl.ds(start, bk)] = jnp.where(chunk_valid(idx_v, j, bk, nk), s, NEG_INF)

  RowGather(idx_smem, k_hbm, buf, sem, b, bk).run(nk, use)


def _at_bwd_kernel(idx_smem, g_ref, q_ref, w_ref, k_hbm, _, dq_ref, dw_ref, dk_hbm, buf, sem,
                   rows, rsem, dq_acc, dw_acc, *, bk, nk):
  b = pl.program_id(0)
  dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
  dw_acc[...] = jnp.zeros(dw_acc.shape, jnp.float32)
  q, w = q_ref[...], w_ref[...]
  rmw = functools.partial(rmw_rows, idx_smem, dk_hbm, rows, rsem, b, bk)

  def use(j, k):
    rmw(j, 'read')
    start = 0 if nk == 1 else pl.multiple_of(j * bk, bk)
    g = g_ref[:, pl.ds(start, bk)]                                   # dL/dI [1, bk], 0 at -1
    d = _dot(q, k, _NT)                                              # [H, bk]
    dd = jnp.where(d > 0.0, w * g, 0.0).astype(q.dtype)              # dL/d(q.k)
    dq_acc[...] += _dot(dd, k, (((1,), (0,)), ((), ())))
    dw_acc[...] += jnp.sum(jnp.maximum(d, 0.0) * g, axis=1, keepdims=True)
    dk = _dot(dd, q, _TN)                                            # [bk, D]
    rmw(j, 'wait_read')
    rows[:, 0, :] += dk
    rmw(j, 'write')
    rmw(j, 'wait_write')

  RowGather(idx_smem, k_hbm, buf, sem, b, bk).run(nk, use)
  dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)
  dw_ref[...] = dw_acc[...]


def _at_call(kernel, idx, bk, interpret, name, ins, any_ins, outs, out_shapes, scratch, **kw):
  """pallas_call over (B, T) with idx in SMEM chunks, per-token `ins` blocks (full trailing
  dims), `any_ins` left in HBM, per-token `outs` (block shapes) or HBM (None) outputs."""
  idx_s, idx_v, kp, smem_spec = prep_indices(idx, bk)
  tok = lambda b, t: (b, t, 0, 0)
  blk = lambda x: pl.BlockSpec((None, None) + x.shape[2:], tok)
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
      functools.partial(kernel, bk=bk, nk=kp // bk),
      grid=idx.shape[:2],
      in_specs=[smem_spec] + [blk(x) for x in ins] + [hbm] * len(any_ins),
      out_specs=[hbm if o is None else pl.BlockSpec((None, None) + o, tok) for o in outs],
      out_shape=out_shapes, scratch_shapes=scratch,
      interpret=interpret, name=name, **kw,
  )(idx_s, *ins, *any_ins)


def _at_forward(q, k, w, idx, opts):
  bk, interpret = opts
  B, T, H, D = q.shape
  K = idx.shape[2]
  kp = round_up(K, bk)
  idx_v = pad_axis(idx.astype(jnp.int32), 2, kp, value=-1)[:, :, None]
  out = _at_call(
      _at_fwd_kernel, idx, bk, interpret, 'indexer_scores_at_tpu',
      [idx_v, q, w.astype(jnp.float32)[..., None]], [k.astype(q.dtype)[:, :, None]],
      [(1, kp)], [jax.ShapeDtypeStruct((B, T, 1, kp), jnp.float32)],
      [pltpu.VMEM((2, bk, 1, D), q.dtype), pltpu.SemaphoreType.DMA((2,))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel')))
  return out[0][:, :, 0, :K]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _scores_at(q, k, w, idx, opts):
  return _at_forward(q, k, w, idx, opts)


def _scores_at_bwd(opts, res, g):
  bk, interpret = opts
  q, k, w, idx = res
  B, T, H, D = q.shape
  S, K = k.shape[1], idx.shape[2]
  kp = round_up(K, bk)
  gp = pad_axis(jnp.where(idx >= 0, g, 0.0).astype(jnp.float32), 2, kp)[:, :, None]
  dq, dw, dk = _at_call(
      _at_bwd_kernel, idx, bk, interpret, 'indexer_scores_at_bwd_tpu',
      [gp, q, w.astype(jnp.float32)[..., None]],
      [k.astype(q.dtype)[:, :, None], jnp.zeros((B, S, 1, D), jnp.float32)],
      [(H, D), (H, 1), None],
      [jax.ShapeDtypeStruct((B, T, H, D), q.dtype), jax.ShapeDtypeStruct((B, T, H, 1), jnp.float32),
       jax.ShapeDtypeStruct((B, S, 1, D), jnp.float32)],
      [pltpu.VMEM((2, bk, 1, D), q.dtype), pltpu.SemaphoreType.DMA((2,)),
       pltpu.VMEM((bk, 1, D), jnp.float32), pltpu.SemaphoreType.DMA((2,)),
       pltpu.VMEM((H, D), jnp.float32), pltpu.VMEM((H, 1), jnp.float32)],
      input_output_aliases={5: 2},
      compiler_params=pltpu.CompilerParams(dimension_semantics=('arbitrary', 'arbitrary')))
  return (dq, dk[:, :, 0].astype(k.dtype), dw[..., 0].astype(w.dtype),
          np.zeros(idx.shape, jax.dtypes.float0))


_scores_at.defvjp(lambda q, k, w, idx, opts: (_at_forward(q, k, w, idx, opts), (q, k, w, idx)),
                  _scores_at_bwd)


_scores_at_given = given_value_vjp(_scores_at_bwd)   # the student given top-k's scores


def indexer_scores_at(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, idx_BTK: jax.Array,
                      *, block_k: int | None = None, scores_BTK: jax.Array | None = None,
                      interpret=None) -> jax.Array:
  """fp32 I [B,T,K] = Σ_h w·ReLU(q_h·k[idx]) at the selected keys (-inf at -1 slots).

  The sparse-stage KL student (SPEC §3), differentiable in q, k and w, without a [B,T,K,D]
  gather in HBM. With scores_BTK (indexer_topk's return_scores for this idx) the forward returns
  them and runs no kernel. block_k rows per chunk: all of K (rounded to 8) when K <= 128, else
  128 (a multiple of 128 when compiled). The indices of one token must be distinct (top-k
  output).
  """
  interpret = tpu_interpret(interpret)
  bk = chunk_rows(idx_BTK.shape[2], block_k, interpret, 'indexer_scores_at')
  if scores_BTK is not None:
    return _scores_at_given(q_BTHD, k_BSD, w_BTH, idx_BTK, scores_BTK, (bk, interpret))
  return _scores_at(q_BTHD, k_BSD, w_BTH, idx_BTK, (bk, interpret))
