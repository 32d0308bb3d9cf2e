"""Sparse MLA on TPU: Pallas Mosaic kernels with per-row DMA gathers (SPEC §3).

Dims: B batch, T query positions, S key positions, H heads, C entry width, V value width (the
first V dims of an entry), K selected keys per token.

Mosaic has no vector gather from a ref, so the K selected rows of a token are fetched by one DMA
each from the table left in HBM (`pl.ANY`), reading the indices as scalars from an SMEM block;
chunks of `block_k` rows are double-buffered (chunk j+1 is in flight while chunk j is used).
The table is viewed as [B,S,1,C] and the buffers as [bk,1,C] so that a one-row DMA indexes an
untiled dim (Mosaic rejects row offsets that are not multiples of the 8-row tile). -1 slots issue no DMA; their logits are masked and their buffer rows hold finite stale data
(the buffers are zeroed at each step) so they contribute exactly zero.

Grid: one step per (batch, token); all heads of the token are the matmul M dim. The forward keeps
an online softmax in VMEM scratch. The backward recomputes p from lse, accumulates dq in VMEM and
adds each chunk's dkv rows into an fp32 [B,S,1,C] HBM buffer by read-modify-write row DMAs; its grid
is sequential ("arbitrary") so two tokens never update a row at the same time, and the indices of
one token must be distinct (top-k output).

`attention_probs_mean` (the sparse KL teacher) reuses the forward's gather: one grid step per
token, p = exp(scale·q·e - lse) for all heads, averaged over heads, 0 at -1 slots. The row gather,
the dkv read-modify-write and the chunk size are shared with the indexer's `indexer_scores_at`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from v4jax.kernels.pallas_common import (NEG_INF, next_pow2, pad_axis, round_up,
                                         sparse_attention_op, tpu_interpret)

_NT = (((1,), (1,)), ((), ()))   # a [M,C] . b [N,C] -> [M,N]
_TN = (((0,), (0,)), ((), ()))   # a [C,M] . b [C,N] -> [M,N]


@dataclasses.dataclass(frozen=True)
class _Cfg:
  v_dim: int
  scale: float
  block_k: int
  interpret: object


def _dot(a, b, dims=None):
  if dims is None:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


class RowGather:
  """Double-buffered row gather of a token's chunks from kv_hbm [B,S,1,C] into buf [2,bk,1,C]."""

  def __init__(self, idx_smem, kv_hbm, buf, sem, b, bk):
    self.idx, self.kv, self.buf, self.sem, self.b, self.bk = idx_smem, kv_hbm, buf, sem, b, bk

  def _each(self, j, slot, op):
    def body(c, carry):
      row = self.idx[j * self.bk + c]

      @pl.when(row >= 0)
      def _():
        cp = pltpu.make_async_copy(self.kv.at[self.b, row], self.buf.at[slot, c],
                                   self.sem.at[slot])
        cp.start() if op == 'start' else cp.wait()
      return carry
    jax.lax.fori_loop(0, self.bk, body, 0)

  def start(self, j, slot):
    self._each(j, slot, 'start')

  def wait(self, j, slot):
    self._each(j, slot, 'wait')

  def run(self, nk, use):
    """Calls use(j, rows [bk,C]) for each chunk j, the next chunk's DMAs already in flight."""
    self.buf[...] = jnp.zeros(self.buf.shape, self.buf.dtype)
    self.start(0, 0)

    def body(j, carry):
      slot = j % 2

      @pl.when(j + 1 < nk)
      def _():
        self.start(j + 1, 1 - slot)
      self.wait(j, slot)
      rows = self.buf[slot]
      use(j, rows.reshape(rows.shape[0], rows.shape[2]))
      return carry
    jax.lax.fori_loop(0, nk, body, 0)


def rmw_rows(idx_smem, acc_hbm, rows, rsem, b, bk, j, op):
  """One phase of the read-modify-write of chunk j's rows of acc_hbm [B,S,1,C] through
  rows [bk,1,C]: op = 'read' | 'wait_read' | 'write' | 'wait_write' (-1 slots are skipped)."""
  def body(c, carry):
    row = idx_smem[j * bk + c]

    @pl.when(row >= 0)
    def _():
      hbm, vmem = acc_hbm.at[b, row], rows.at[c]
      if op == 'read':
        pltpu.make_async_copy(hbm, vmem, rsem.at[0]).start()
      elif op == 'wait_read':
        pltpu.make_async_copy(hbm, vmem, rsem.at[0]).wait()
      elif op == 'write':
        pltpu.make_async_copy(vmem, hbm, rsem.at[1]).start()
      else:
        pltpu.make_async_copy(vmem, hbm, rsem.at[1]).wait()
    return carry
  jax.lax.fori_loop(0, bk, body, 0)


def chunk_valid(idx_v, j, bk, nk):
  """[1, bk] bool: which slots of chunk j hold an index."""
  start = 0 if nk == 1 else pl.multiple_of(j * bk, bk)
  return idx_v[:, pl.ds(start, bk)] >= 0


def _fwd_kernel(idx_smem, idx_v, q_ref, kv_hbm, o_ref, lse_ref, buf, sem, m_ref, l_ref, acc_ref,
                *, scale, v_dim, bk, nk):
  b = pl.program_id(0)
  m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  q = q_ref[...]

  def use(j, e):
    s = jnp.where(chunk_valid(idx_v, j, bk, nk), scale * _dot(q, e, _NT), NEG_INF)   # [H, bk]
    m = m_ref[...]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(e.dtype), e[:, :v_dim])
    m_ref[...] = m_new

  RowGather(idx_smem, kv_hbm, buf, sem, b, bk).run(nk, use)
  l = l_ref[...]
  ok = l > 0
  safe_l = jnp.where(ok, l, 1.0)
  o_ref[...] = (acc_ref[...] / safe_l).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m_ref[...] + jnp.log(safe_l), NEG_INF)


def _bwd_kernel(idx_smem, idx_v, q_ref, do_ref, lse_ref, dl_ref, kv_hbm, _, dq_ref, dkv_hbm,
                buf, sem, rows, rsem, dq_acc, *, scale, v_dim, bk, nk):
  b = pl.program_id(0)
  dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
  q, do, lse, dl = q_ref[...], do_ref[...], lse_ref[...], dl_ref[...]

  rmw = functools.partial(rmw_rows, idx_smem, dkv_hbm, rows, rsem, b, bk)

  def use(j, e):
    rmw(j, 'read')
    valid = chunk_valid(idx_v, j, bk, nk)
    s = scale * _dot(q, e, _NT)
    p = jnp.where(valid, jnp.exp(s - lse), 0.0)                       # [H, bk]
    ds = p * (_dot(do, e[:, :v_dim], _NT) - dl)
    ds_c = ds.astype(q.dtype)
    dq_acc[...] += _dot(ds_c, e)
    de = scale * _dot(ds_c, q, _TN)                                   # [bk, C]
    de_v = _dot(p.astype(do.dtype), do, _TN)                          # [bk, V]
    rmw(j, 'wait_read')
    rows[:, 0, :] += de
    rows[:, 0, :v_dim] += de_v
    rmw(j, 'write')
    rmw(j, 'wait_write')

  RowGather(idx_smem, kv_hbm, buf, sem, b, bk).run(nk, use)
  dq_ref[...] = (scale * dq_acc[...]).astype(dq_ref.dtype)


def prep_indices(idx, bk):
  """(flat SMEM copy [B*T*ks], VMEM copy [B,T,1,kp], kp, smem spec) of the padded indices.

  The SMEM copy is 1-D with a power-of-two block (>= 128) per token (Mosaic's rank-1 block rule).
  """
  B, T, K = idx.shape
  kp = round_up(K, bk)
  ks = next_pow2(max(kp, 128))
  idxp = pad_axis(idx.astype(jnp.int32), 2, kp, value=-1)
  idx_s = pad_axis(idxp, 2, ks, value=-1).reshape(B * T * ks)
  spec = pl.BlockSpec((ks,), lambda b, t: (b * T + t,), memory_space=pltpu.SMEM)
  return idx_s, idxp.reshape(B, T, 1, kp), kp, spec


def _forward(q, kv, idx, cfg):
  B, T, H, C = q.shape
  V, bk = cfg.v_dim, cfg.block_k
  idx_s, idx_v, kp, smem_spec = prep_indices(idx, bk)
  tok = lambda b, t: (b, t, 0, 0)
  kernel = functools.partial(_fwd_kernel, scale=cfg.scale, v_dim=V, bk=bk, nk=kp // bk)
  o, lse = pl.pallas_call(
      kernel,
      grid=(B, T),
      in_specs=[smem_spec,
                pl.BlockSpec((None, None, 1, kp), tok),
                pl.BlockSpec((None, None, H, C), tok),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=[pl.BlockSpec((None, None, H, V), tok), pl.BlockSpec((None, None, H, 1), tok)],
      out_shape=[jax.ShapeDtypeStruct((B, T, H, V), q.dtype),
                 jax.ShapeDtypeStruct((B, T, H, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((2, bk, 1, C), kv.dtype), pltpu.SemaphoreType.DMA((2,)),
                      pltpu.VMEM((H, 1), jnp.float32), pltpu.VMEM((H, 1), jnp.float32),
                      pltpu.VMEM((H, V), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary')),
      interpret=cfg.interpret, name='sparse_mla_fwd_tpu',
  )(idx_s, idx_v, q, kv[:, :, None])
  return o, lse[..., 0]


def _backward(q, kv, idx, o, lse, do, dlse, cfg):
  B, T, H, C = q.shape
  S = kv.shape[1]
  V, bk = cfg.v_dim, cfg.block_k
  idx_s, idx_v, kp, smem_spec = prep_indices(idx, bk)
  dl = jnp.einsum('bthv,bthv->bth', do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
  tok = lambda b, t: (b, t, 0, 0)
  kernel = functools.partial(_bwd_kernel, scale=cfg.scale, v_dim=V, bk=bk, nk=kp // bk)
  dq, dkv = pl.pallas_call(
      kernel,
      grid=(B, T),
      in_specs=[smem_spec,
                pl.BlockSpec((None, None, 1, kp), tok),
                pl.BlockSpec((None, None, H, C), tok),
                pl.BlockSpec((None, None, H, V), tok),
                pl.BlockSpec((None, None, H, 1), tok),
                pl.BlockSpec((None, None, H, 1), tok),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=[pl.BlockSpec((None, None, H, C), tok), pl.BlockSpec(memory_space=pl.ANY)],
      out_shape=[jax.ShapeDtypeStruct((B, T, H, C), q.dtype),
                 jax.ShapeDtypeStruct((B, S, 1, C), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((2, bk, 1, C), kv.dtype), pltpu.SemaphoreType.DMA((2,)),
                      pltpu.VMEM((bk, 1, C), jnp.float32), pltpu.SemaphoreType.DMA((2,)),
                      pltpu.VMEM((H, C), jnp.float32)],
      input_output_aliases={7: 1},
      compiler_params=pltpu.CompilerParams(dimension_semantics=('arbitrary', 'arbitrary')),
      interpret=cfg.interpret, name='sparse_mla_bwd_tpu',
  )(idx_s, idx_v, q, do, lse[..., None], dl[..., None], kv[:, :, None],
    jnp.zeros((B, S, 1, C), jnp.float32))
  return dq, dkv[:, :, 0].astype(kv.dtype)


_sparse_mla = sparse_attention_op(_forward, _backward)


def sparse_mla(q_BTHC: jax.Array, kv_BSC: jax.Array, idx_BTK: jax.Array, v_dim: int,
               scale: float, *, block_k: int | None = None,
               interpret=None) -> tuple[jax.Array, jax.Array]:
  """(o [B,T,H,V], lse [B,T,H] fp32) over kv[idx] per token; differentiable in q and kv.

  block_k rows are gathered per chunk: all of K when K <= 128, else a multiple of 128 (any size
  in interpret mode).
  interpret: None = TPU interpret mode on a CPU backend, compiled on TPU.
  """
  interpret = tpu_interpret(interpret)
  bk = chunk_rows(idx_BTK.shape[2], block_k, interpret, 'sparse_mla')
  cfg = _Cfg(int(v_dim), float(scale), bk, interpret)
  return _sparse_mla(q_BTHC, kv_BSC, idx_BTK, cfg)


def chunk_rows(K: int, block_k: int | None, interpret, name: str) -> int:
  """Rows gathered per chunk: all of K (rounded to 8) when K <= 128, else 128 by default; a
  block_k below the padded K must be a multiple of 128 (lane-dim slices), except in interpret."""
  bk = block_k or (round_up(K, 8) if K <= 128 else 128)
  if not interpret and round_up(K, bk) > bk and bk % 128:
    raise ValueError(f'{name} tpu: block_k={bk} must be a multiple of 128 when K={K} > block_k')
  return bk


def _probs_kernel(idx_smem, idx_v, q_ref, lse_ref, kv_hbm, p_ref, buf, sem, *, scale, bk, nk):
  b = pl.program_id(0)
  q, lse = q_ref[...], lse_ref[...]
  inv_h = 1.0 / q.shape[0]

  def use(j, e):
    p = jnp.exp(scale * _dot(q, e, _NT) - lse)                        # [H, bk]
    mean = jnp.sum(p, axis=0, keepdims=True) * inv_h                   # [1, bk]
    start = 0 if nk == 1 else pl.multiple_of(j * bk, bk)
    p_ref[:, pl.ds(start, bk)] = jnp.where(chunk_valid(idx_v, j, bk, nk), mean, 0.0)

  RowGather(idx_smem, kv_hbm, buf, sem, b, bk).run(nk, use)


def attention_probs_mean(q_BTHC: jax.Array, kv_BSC: jax.Array, idx_BTK: jax.Array,
                         lse_BTH: jax.Array, scale: float, *, block_k: int | None = None,
                         interpret=None) -> jax.Array:
  """fp32 [B,T,K]: (1/H) Σ_h exp(scale·q_h·kv[idx] - lse_h), 0 at -1 slots; no gradient.

  The sparse-stage KL teacher (SPEC §3) from the attention's lse: one grid step per token, its
  K rows DMA-gathered in chunks of block_k (as in the forward), all heads one [H,C]x[C,bk] dot.
  Each step starts and waits for all its own DMAs, so both grid dims are "parallel" (split over
  the TensorCores of a megacore chip).
  """
  B, T, H, C = q_BTHC.shape
  K = idx_BTK.shape[2]
  interpret = tpu_interpret(interpret)
  bk = chunk_rows(K, block_k, interpret, 'attention_probs_mean')
  q, kv, lse = (jax.lax.stop_gradient(x) for x in (q_BTHC, kv_BSC.astype(q_BTHC.dtype), lse_BTH))
  idx_s, idx_v, kp, smem_spec = prep_indices(idx_BTK, bk)
  tok = lambda b, t: (b, t, 0, 0)
  p = pl.pallas_call(
      functools.partial(_probs_kernel, scale=float(scale), bk=bk, nk=kp // bk),
      grid=(B, T),
      in_specs=[smem_spec,
                pl.BlockSpec((None, None, 1, kp), tok),
                pl.BlockSpec((None, None, H, C), tok),
                pl.BlockSpec((None, None, H, 1), tok),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((None, None, 1, kp), tok),
      out_shape=jax.ShapeDtypeStruct((B, T, 1, kp), jnp.float32),
      scratch_shapes=[pltpu.VMEM((2, bk, 1, C), kv.dtype), pltpu.SemaphoreType.DMA((2,))],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel')),
      interpret=interpret, name='sparse_mla_probs_tpu',
  )(idx_s, idx_v, q, lse.astype(jnp.float32)[..., None], kv[:, :, None])
  return p[:, :, 0, :K]
