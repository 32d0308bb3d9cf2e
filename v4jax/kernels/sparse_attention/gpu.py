"""Sparse MLA on GPU: Pallas Triton-style kernels with in-kernel row gathers (SPEC §3).

Dims: B batch, T query positions, S key positions, H heads, C entry width (V + R), V value width
(the latent c_kv), R rope width, K selected keys per token, D per-head qk width (MHA form).

Forward: one program owns one query token and a block of its heads (the heads form the matmul M
dim, MQA style), loops over the token's K indices in chunks, gathers those entry rows straight
from the [S, C] table (`kv_ref[rows, :]`) and keeps an online softmax. -1 slots are masked; the
loop stops after the token's last valid chunk and has no conditionals, so Triton pipelines the
row gathers.

Backward, three kernels per chunk of tokens (p recomputed from the saved lse):
  dkv kernel  one program per (token, block of K slots, skipped when all are -1): gathers the
              slots' rows once, loops over head blocks, computes p and ds = scale·p·(dp - delta)
              for every head, writes ds ([B,T,H,K], the dq kernel's input) and dE = Σ_h ds·q_h +
              p·do_h, the slots' entry gradients summed over all heads in registers (as dE^T, so
              that both accumulating dots take shared-memory operands and share one layout:
              accumulating two register-operand dots into one tile made Triton shuttle the
              accumulator between layouts and spill);
  dq kernel   one program per (token, head block): dq = Σ_k ds·e_k, a plain gathered matmul;
  reduction   dkv[s] = Σ_{(t,k): idx=s} dE[t,k]. 'segment' (default): dE goes to HBM in the
              entry dtype, the slots are sorted by index (XLA sort) and a kernel sums each row's
              segment in fp32, no atomics; 'atomic': the dkv kernel adds dE into an fp32 table
              with one atomic per (slot, column) (all heads already summed).
Per token the reduction moves K·C values, whatever H; tokens are processed in chunks so the ds
and dE buffers stay within `_BWD_BYTES`. The indices of one token must be distinct (top-k
output) for the interpret-mode emulation of atomics.

Triton needs power-of-two tiles: the V and R parts are loaded separately (512 + 64 for V3), each
padded to a power of two when needed, and heads / K are padded up to their block sizes.

`masked_probs_mean`, the KL teacher of DSA's masked form (MHA form: per-head keys of width
D = d_n + d_r), is dense instead: one program per (batch, query block, key block) tile writes the
head-mean probabilities (1/H) Σ_h exp(scale·q_h·k_h^T - lse_h) of the tile into an fp32
[B, Tc, S] buffer, then XLA takes them at idx. Tiles past the last key block that the query
block's idx reaches are skipped (under causal top-k, every tile above the diagonal), so buffer
entries that no slot reads stay unwritten. Queries go in chunks of Tc rows whose buffer fits
`_PROBS_BUF_BYTES`. On Hopper, under causal top-k (`causal=True`), mgpu.py's WGMMA kernel
writes the same tiles (up to each query block's diagonal) in place of the Triton one.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from v4jax.kernels.blockwise import join_blocks, split_blocks
from v4jax.kernels.pallas_common import (NEG_INF, gpu_interpret, is_hopper, next_pow2,
                                         pad_axis, round_up, sparse_attention_op)
from v4jax.kernels.sparse_attention import mgpu

_NT = (((1,), (1,)), ((), ()))   # a [M,C] . b [N,C] -> [M,N]
_TN = (((0,), (0,)), ((), ()))   # a [C,M] . b [C,N] -> [M,N]
_BWD_BYTES = 4 << 30             # ds + dE bytes per backward token chunk
_SEG_ROWS, _SEG_WARPS = 32, 8    # segment-sum kernel: dE rows per step, warps
REDUCES = ('segment', 'atomic')
_PROBS_BUF_BYTES = 256 << 20     # masked_probs_mean: fp32 [B, Tc, S] buffer per query chunk


@dataclasses.dataclass(frozen=True)
class Blocks:
  """One kernel's tiling: block_h heads and block_k K slots per matmul tile (powers of two >=
  16, capped at the padded H and K), Triton warps and pipeline stages. None takes the kernel's
  default (sized for the H200's 227 KiB of shared memory at V3.2 shapes)."""
  block_h: int | None = None
  block_k: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None


# (block_h cap, block_k cap, warps, stages) per kernel: the fastest measured on the H200 at V3.2
# shapes (tools/bench_kernels.py sweep; docs/benchmarks.md). dkv with 64-head blocks needs one
# stage to fit shared memory and then spills; 32 heads x 2 stages fits in 148 KiB.
_DEFAULTS = {'fwd': (64, 64, 8, 2), 'dkv': (32, 64, 8, 2), 'dq': (64, 64, 8, 2),
             # the KL teacher: 64-head blocks need 258-295 KiB of shared memory at C = 576
             'probs': (16, 64, 4, 1)}


def _blocks(kind: str, b, H: int, K: int) -> Blocks:
  """Blocks (or a dict of its fields, or None) -> all fields set and checked."""
  b = Blocks(**b) if isinstance(b, dict) else (b or Blocks())
  hcap, kcap, warps, stages = _DEFAULTS[kind]
  for name, v in (('block_h', b.block_h), ('block_k', b.block_k)):
    if v is not None and (v < 16 or v != next_pow2(v)):
      raise ValueError(f'sparse_mla gpu {kind}: {name}={v} must be a power of two >= 16')
  # Blocks never exceed the (power-of-two) extent they tile.
  bh = min(b.block_h or hcap, max(16, next_pow2(H)))
  bk = min(b.block_k or kcap, max(16, next_pow2(K)))
  rows = bk if kind == 'dkv' else bh           # rows of the kernel's [rows, C] fp32 accumulator
  if b.num_warps is None and rows < 64:
    warps = 4
  return Blocks(bh, bk, b.num_warps or warps, b.num_stages or stages)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  v_dim: int
  scale: float
  fwd: Blocks
  dkv: Blocks
  dq: Blocks
  reduce: str
  token_chunk: int | None
  interpret: bool


def _dot(a, b, dims=None):
  if dims is None:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _split_pad(x, v, vp, rp):
  """[..., V+R] -> [..., vp+rp]: each part zero-padded to its power-of-two width."""
  if x.shape[-1] == vp + rp and v == vp:
    return x
  parts = [pad_axis(x[..., :v], -1, vp)]
  if rp:
    parts.append(pad_axis(x[..., v:], -1, rp))
  return jnp.concatenate(parts, axis=-1)


def _widths(v, c):
  return next_pow2(v), (next_pow2(c - v) if c > v else 0)


def _prep(q, kv, idx, v_dim, bh, bk):
  """Pads q [B,T,H,C], kv [B,S,C], idx [B,T,K] to kernel-friendly shapes."""
  vp, rp = _widths(v_dim, q.shape[-1])
  qp = pad_axis(_split_pad(q, v_dim, vp, rp), 2, round_up(q.shape[2], bh))
  kvp = _split_pad(kv, v_dim, vp, rp)
  idxp = pad_axis(idx.astype(jnp.int32), 2, round_up(idx.shape[2], bk), value=-1)
  return qp, kvp, idxp, vp, rp


def _params(b: Blocks):
  # Always Triton params: without them a GPU pallas_call may pick the Mosaic GPU backend.
  return pltriton.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages)


def _gather_rows(kv_ref, rows, vp, rp):
  """The selected kv rows in their power-of-two parts: ([n, vp], [n, rp] or None)."""
  return kv_ref[rows, pl.ds(0, vp)], (kv_ref[rows, pl.ds(vp, rp)] if rp else None)


def _logits(qn, qr, en, er, scale):
  s = _dot(qn, en, _NT)
  if er is not None:
    s = s + _dot(qr, er, _NT)
  return s * scale


def _scores(qn, qr, kv_ref, rows, vp, rp, scale):
  en, er = _gather_rows(kv_ref, rows, vp, rp)
  return _logits(qn, qr, en, er, scale), en, er


# ------------------------------------------------------------------------------------- forward
def _n_chunks(idx_ref, bk):
  """Chunks of bk slots up to the token's last valid slot: later chunks are all -1."""
  ids = idx_ref[...]
  last = jnp.max(jnp.where(ids >= 0, jnp.arange(ids.shape[0], dtype=jnp.int32), -1))
  return (last + bk) // bk


def _fwd_kernel(q_ref, idx_ref, kv_ref, o_ref, lse_ref, *, scale, vp, rp, bk):
  qn = q_ref[:, pl.ds(0, vp)]
  qr = q_ref[:, pl.ds(vp, rp)] if rp else None
  bh = qn.shape[0]

  # A loop without conditionals (-1 slots masked) so that Triton pipelines the row gathers.
  def chunk(j, carry):
    m, l, acc = carry
    ids = idx_ref[pl.ds(j * bk, bk)]
    valid = ids >= 0
    s, en, _ = _scores(qn, qr, kv_ref, jnp.maximum(ids, 0), vp, rp, scale)
    s = jnp.where(valid[None, :], s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(en.dtype), en)
    return m_new, l, acc

  init = (jnp.full((bh,), NEG_INF, jnp.float32), jnp.zeros((bh,), jnp.float32),
          jnp.zeros((bh, vp), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, _n_chunks(idx_ref, bk), chunk, init)
  ok = l > 0
  o_ref[...] = (acc / jnp.where(ok, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)


def _forward(q, kv, idx, cfg):
  B, T, H, C = q.shape
  S = kv.shape[1]
  bh, bk = cfg.fwd.block_h, cfg.fwd.block_k
  qp, kvp, idxp, vp, rp = _prep(q, kv, idx, cfg.v_dim, bh, bk)
  hp, kp, cp = qp.shape[2], idxp.shape[2], vp + rp
  kernel = functools.partial(_fwd_kernel, scale=cfg.scale, vp=vp, rp=rp, bk=bk)
  o, lse = pl.pallas_call(
      kernel,
      grid=(B * T, hp // bh),
      in_specs=[pl.BlockSpec((None, None, bh, cp), lambda i, h: (i // T, i % T, h, 0)),
                pl.BlockSpec((None, None, kp), lambda i, h: (i // T, i % T, 0)),
                pl.BlockSpec((None, S, cp), lambda i, h: (i // T, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, bh, vp), lambda i, h: (i // T, i % T, h, 0)),
                 pl.BlockSpec((None, None, bh), lambda i, h: (i // T, i % T, h))],
      out_shape=[jax.ShapeDtypeStruct((B, T, hp, vp), q.dtype),
                 jax.ShapeDtypeStruct((B, T, hp), jnp.float32)],
      compiler_params=_params(cfg.fwd), interpret=cfg.interpret, name='sparse_mla_fwd',
  )(qp, idxp, kvp)
  return o[:, :, :H, :cfg.v_dim], lse[:, :, :H]


# ------------------------------------------------------------------------------------ backward
def _dkv_kernel(q_ref, do_ref, lse_ref, dl_ref, idx_ref, kv_ref, *refs, scale, vp, rp, bh, nh,
                reduce, masked_atomics, trash_row):
  """One (token, block of K slots): ds for all heads -> ds_ref, and the slots' dE rows."""
  if reduce == 'atomic':
    _, dkv_ref, ds_ref = refs        # dkv in (aliased), dkv out, ds out
  else:
    ds_ref, de_ref = refs
  ids = idx_ref[...]
  valid = ids >= 0

  @pl.when(jnp.max(ids) >= 0)
  def _():
    rows = jnp.maximum(ids, 0)
    en = kv_ref[rows, pl.ds(0, vp)]                               # [bk, vp]
    er = kv_ref[rows, pl.ds(vp, rp)] if rp else None

    # Heads are the matmul M dim of the logits (as in the forward) and the contraction dim of
    # dE^T = q^T·ds + do^T·p, so every accumulating dot has its operands in shared memory and
    # all of them share one register layout.
    def head_block(hb, carry):
      acc_n, acc_r = carry                                        # dE^T: [vp, bk], [rp, bk]
      heads = pl.ds(pl.multiple_of(hb * bh, bh), bh)
      qn = q_ref[heads, pl.ds(0, vp)]
      do = do_ref[heads, :]
      s = _dot(qn, en, _NT)                                       # logits [bh, bk]
      if rp:
        qr = q_ref[heads, pl.ds(vp, rp)]
        s = s + _dot(qr, er, _NT)
      p = jnp.where(valid[None, :], jnp.exp(s * scale - lse_ref[heads][:, None]), 0.0)
      ds = (scale * p) * (_dot(do, en, _NT) - dl_ref[heads][:, None])
      ds_c = ds.astype(ds_ref.dtype)
      ds_ref[heads, :] = ds_c
      acc_n = acc_n + _dot(qn, ds_c.astype(qn.dtype), _TN)
      acc_n = acc_n + _dot(do, p.astype(do.dtype), _TN)
      if rp:
        acc_r = acc_r + _dot(qr, ds_c.astype(qr.dtype), _TN)
      return acc_n, acc_r

    bk = ids.shape[0]
    init = (jnp.zeros((vp, bk), jnp.float32), jnp.zeros((max(rp, 1), bk), jnp.float32))
    acc_n, acc_r = jax.lax.fori_loop(0, nh, head_block, init)
    acc_n, acc_r = acc_n.T, acc_r.T
    if reduce == 'atomic':
      # -1 slots add into a spare row S (masked out too where atomics take masks).
      dst_rows = jnp.where(valid, ids, trash_row)[:, None]
      for cols, acc in ((pl.ds(0, vp), acc_n), (pl.ds(vp, rp), acc_r))[:2 if rp else 1]:
        col_ids = cols.start + jnp.arange(cols.size, dtype=jnp.int32)
        mask = jnp.broadcast_to(valid[:, None], acc.shape) if masked_atomics else None
        pltriton.atomic_add(dkv_ref, (dst_rows, col_ids[None, :]), acc, mask=mask)
    else:
      de_ref[:, pl.ds(0, vp)] = acc_n.astype(de_ref.dtype)
      if rp:
        de_ref[:, pl.ds(vp, rp)] = acc_r.astype(de_ref.dtype)


def _dq_kernel(idx_ref, ds_ref, kv_ref, dq_ref, *, vp, rp, bk):
  """One (token, head block): dq = Σ_k ds[k]·e_k over the gathered rows."""
  bh = ds_ref.shape[0]

  def chunk(j, carry):
    dqn, dqr = carry
    ids = idx_ref[pl.ds(j * bk, bk)]
    rows = jnp.maximum(ids, 0)
    ds = ds_ref[:, pl.ds(j * bk, bk)]
    ds = jnp.where((ids >= 0)[None, :], ds, jnp.zeros_like(ds))   # [bh, bk]
    en = kv_ref[rows, pl.ds(0, vp)]
    dqn = dqn + _dot(ds.astype(en.dtype), en)
    if rp:
      er = kv_ref[rows, pl.ds(vp, rp)]
      dqr = dqr + _dot(ds.astype(er.dtype), er)
    return dqn, dqr

  init = (jnp.zeros((bh, vp), jnp.float32), jnp.zeros((bh, max(rp, 1)), jnp.float32))
  dqn, dqr = jax.lax.fori_loop(0, _n_chunks(idx_ref, bk), chunk, init)
  dq_ref[:, pl.ds(0, vp)] = dqn.astype(dq_ref.dtype)
  if rp:
    dq_ref[:, pl.ds(vp, rp)] = dqr.astype(dq_ref.dtype)


def _segment_kernel(start_ref, count_ref, order_ref, de_ref, out_ref, *, vp, rp, r):
  """One dkv row: the fp32 sum of its segment of dE rows (sorted slot order), r rows a step."""
  i = pl.program_id(0)
  start, n = start_ref[i], count_ref[i]

  def step(j, carry):
    acc_n, acc_r = carry
    lane = j * r + jnp.arange(r, dtype=jnp.int32)
    valid = (lane < n)[:, None]
    rows = jnp.where(lane < n, order_ref[pl.ds(start + j * r, r)], 0)
    acc_n = acc_n + jnp.where(valid, de_ref[rows, pl.ds(0, vp)].astype(jnp.float32), 0.0)
    if rp:
      acc_r = acc_r + jnp.where(valid, de_ref[rows, pl.ds(vp, rp)].astype(jnp.float32), 0.0)
    return acc_n, acc_r

  init = (jnp.zeros((r, vp), jnp.float32), jnp.zeros((r, max(rp, 1)), jnp.float32))
  acc_n, acc_r = jax.lax.fori_loop(0, (n + r - 1) // r, step, init)
  out_ref[pl.ds(0, vp)] = jnp.sum(acc_n, axis=0)
  if rp:
    out_ref[pl.ds(vp, rp)] = jnp.sum(acc_r, axis=0)


def _segment_sum(de, idx, S, vp, rp, interpret):
  """dE [B,Tc,kp,cp], idx [B,Tc,kp] -> fp32 [B,S,cp]: Σ of the dE rows whose slot holds s."""
  B, Tc, kp, cp = de.shape
  n, r = B * Tc * kp, _SEG_ROWS
  key = jnp.arange(B, dtype=jnp.int32)[:, None, None] * (S + 1) + jnp.where(idx >= 0, idx, S)
  skey, order = jax.lax.sort_key_val(key.reshape(n), jnp.arange(n, dtype=jnp.int32))
  edges = jnp.searchsorted(skey, jnp.arange(B * (S + 1) + 1, dtype=jnp.int32)).astype(jnp.int32)
  keep = lambda x: x.reshape(B, S + 1)[:, :S].reshape(B * S)       # drop the -1 (row S) bins
  start, count = keep(edges[:-1]), keep(edges[1:] - edges[:-1])
  order = jnp.pad(order, (0, r))
  full = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  out = pl.pallas_call(
      functools.partial(_segment_kernel, vp=vp, rp=rp, r=r),
      grid=(B * S,),
      in_specs=[full(B * S), full(B * S), full(n + r), full(n, cp)],
      out_specs=pl.BlockSpec((None, cp), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((B * S, cp), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=_SEG_WARPS, num_stages=2),
      interpret=interpret, name='sparse_mla_dkv_segment_sum',
  )(start, count, order, de.reshape(n, cp))
  return out.reshape(B, S, cp)


def _backward_chunk(dkv, q, do, lse, dl, idx, kv, cfg, vp, rp):
  """One chunk of Tc tokens (padded operands): (dkv + this chunk's dkv, dq [B,Tc,hp,cp])."""
  B, Tc, hp, cp = q.shape
  S, kp = kv.shape[1], idx.shape[2]
  a, d = cfg.dkv, cfg.dq
  whole = lambda i, j: (i // Tc, 0, 0)
  atomic = cfg.reduce == 'atomic'
  dkv_kernel = functools.partial(
      _dkv_kernel, scale=cfg.scale, vp=vp, rp=rp, bh=a.block_h, nh=hp // a.block_h,
      reduce=cfg.reduce, masked_atomics=not cfg.interpret, trash_row=S)
  in_specs = [pl.BlockSpec((None, None, hp, cp), lambda i, j: (i // Tc, i % Tc, 0, 0)),
              pl.BlockSpec((None, None, hp, vp), lambda i, j: (i // Tc, i % Tc, 0, 0)),
              pl.BlockSpec((None, None, hp), lambda i, j: (i // Tc, i % Tc, 0)),
              pl.BlockSpec((None, None, hp), lambda i, j: (i // Tc, i % Tc, 0)),
              pl.BlockSpec((None, None, a.block_k), lambda i, j: (i // Tc, i % Tc, j)),
              pl.BlockSpec((None, S, cp), whole)]
  ds_spec = pl.BlockSpec((None, None, hp, a.block_k), lambda i, j: (i // Tc, i % Tc, 0, j))
  ds_shape = jax.ShapeDtypeStruct((B, Tc, hp, kp), q.dtype)
  args = [q, do, lse, dl, idx, kv]
  if atomic:
    in_specs.append(pl.BlockSpec((None, S + 1, cp), whole))
    out_specs = [pl.BlockSpec((None, S + 1, cp), whole), ds_spec]
    out_shape = [jax.ShapeDtypeStruct(dkv.shape, jnp.float32), ds_shape]
    args.append(dkv)
  else:
    out_specs = [ds_spec, pl.BlockSpec((None, None, a.block_k, cp),
                                       lambda i, j: (i // Tc, i % Tc, j, 0))]
    out_shape = [ds_shape, jax.ShapeDtypeStruct((B, Tc, kp, cp), kv.dtype)]
  outs = pl.pallas_call(
      dkv_kernel, grid=(B * Tc, kp // a.block_k), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, input_output_aliases={6: 0} if atomic else {},
      compiler_params=_params(a), interpret=cfg.interpret, name='sparse_mla_bwd_dkv',
  )(*args)
  if atomic:
    dkv, ds = outs
  else:
    ds, de = outs
    dkv = dkv + _segment_sum(de, idx, S, vp, rp, cfg.interpret)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, vp=vp, rp=rp, bk=d.block_k),
      grid=(B * Tc, hp // d.block_h),
      in_specs=[pl.BlockSpec((None, None, kp), lambda i, h: (i // Tc, i % Tc, 0)),
                pl.BlockSpec((None, None, d.block_h, kp), lambda i, h: (i // Tc, i % Tc, h, 0)),
                pl.BlockSpec((None, S, cp), lambda i, h: (i // Tc, 0, 0))],
      out_specs=pl.BlockSpec((None, None, d.block_h, cp), lambda i, h: (i // Tc, i % Tc, h, 0)),
      out_shape=jax.ShapeDtypeStruct((B, Tc, hp, cp), q.dtype),
      compiler_params=_params(d), interpret=cfg.interpret, name='sparse_mla_bwd_dq',
  )(idx, ds, kv)
  return dkv, dq


def _token_chunk(cfg, B, T, kp, hp, cp, item):
  per_token = B * kp * item * (hp + (cp if cfg.reduce == 'segment' else 0))
  tc = cfg.token_chunk or max(1, _BWD_BYTES // per_token)
  n = -(-T // min(tc, T))
  return -(-T // n), n


def _backward(q, kv, idx, o, lse, do, dlse, cfg):
  B, T, H, C = q.shape
  S = kv.shape[1]
  bh = max(cfg.dkv.block_h, cfg.dq.block_h)
  bk = max(cfg.dkv.block_k, cfg.dq.block_k)
  qp, kvp, idxp, vp, rp = _prep(q, kv, idx, cfg.v_dim, bh, bk)
  hp, kp, cp = qp.shape[2], idxp.shape[2], vp + rp
  # delta - dlse: softmax backward's row term, with the lse cotangent folded in.
  dl = jnp.einsum('bthv,bthv->bth', do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
  dop = pad_axis(pad_axis(do, 3, vp), 2, hp)
  lsep = pad_axis(lse, 2, hp, value=float('inf'))   # padded heads: p = 0
  dlp = pad_axis(dl, 2, hp)
  tc, n = _token_chunk(cfg, B, T, kp, hp, cp, q.dtype.itemsize)
  tp = tc * n                                        # padded tokens: all slots -1
  xs = [pad_axis(x, 1, tp) for x in (qp, dop, lsep, dlp)] + [pad_axis(idxp, 1, tp, value=-1)]
  dkv0 = jnp.zeros((B, S + 1 if cfg.reduce == 'atomic' else S, cp), jnp.float32)
  step = lambda dkv, x: _backward_chunk(dkv, *x[:5], kvp, cfg, vp, rp)
  if n == 1:
    dkv, dq = step(dkv0, xs)
  else:
    split = lambda x: jnp.moveaxis(x.reshape(B, n, tc, *x.shape[2:]), 1, 0)
    dkv, dq = jax.lax.scan(step, dkv0, [split(x) for x in xs])
    dq = jnp.moveaxis(dq, 0, 1).reshape(B, tp, hp, cp)
  v = cfg.v_dim
  unsplit = lambda x: jnp.concatenate([x[..., :v], x[..., vp:vp + C - v]], axis=-1)
  return unsplit(dq[:, :T, :H]).astype(q.dtype), unsplit(dkv[:, :S]).astype(kv.dtype)


_sparse_mla = sparse_attention_op(_forward, _backward)


def _config(v_dim, scale, H, K, fwd, dkv, dq, reduce, token_chunk, interpret) -> _Cfg:
  if reduce not in REDUCES:
    raise ValueError(f'sparse_mla gpu: reduce={reduce!r} is not one of {REDUCES}')
  return _Cfg(int(v_dim), float(scale), _blocks('fwd', fwd, H, K), _blocks('dkv', dkv, H, K),
              _blocks('dq', dq, H, K), reduce, token_chunk, gpu_interpret(interpret))


def sparse_mla(q_BTHC: jax.Array, kv_BSC: jax.Array, idx_BTK: jax.Array, v_dim: int,
               scale: float, *, fwd: Blocks | dict | None = None,
               dkv: Blocks | dict | None = None, dq: Blocks | dict | None = None,
               reduce: str = 'segment', token_chunk: int | None = None,
               interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """(o [B,T,H,V], lse [B,T,H] fp32): softmax over kv[idx] per token, -1 slots masked.

  Differentiable in q and kv (custom_vjp, kernels both ways). fwd / dkv / dq: each kernel's
  Blocks (defaults suit the H200); reduce: how dkv sums over tokens ('segment' or 'atomic');
  token_chunk: backward tokens per chunk (default: ds + dE buffers within 4 GiB).
  """
  cfg = _config(v_dim, scale, q_BTHC.shape[2], idx_BTK.shape[2], fwd, dkv, dq, reduce,
                token_chunk, interpret)
  return _sparse_mla(q_BTHC, kv_BSC, idx_BTK, cfg)


def sparse_mla_backward(q_BTHC, kv_BSC, idx_BTK, o_BTHV, lse_BTH, do_BTHV, dlse_BTH, v_dim,
                        scale, *, dkv=None, dq=None, reduce='segment', token_chunk=None,
                        interpret=None) -> tuple[jax.Array, jax.Array]:
  """(dq [B,T,H,C], dkv [B,S,C]): the backward kernels alone, from the forward's o and lse and
  the cotangents of o and lse (what sparse_mla's VJP runs; for benchmarks)."""
  cfg = _config(v_dim, scale, q_BTHC.shape[2], idx_BTK.shape[2], None, dkv, dq, reduce,
                token_chunk, interpret)
  return _backward(q_BTHC, kv_BSC, idx_BTK, o_BTHV, lse_BTH, do_BTHV,
                   dlse_BTH.astype(jnp.float32), cfg)


def _probs_kernel(q_ref, lse_ref, idx_ref, kv_ref, p_ref, *, scale, vp, rp, bh, nh, bk, nk, h):
  """One token: per chunk of bk slots, its kv rows gathered once and the heads summed in a loop
  over head blocks (a loop, not unrolled: unrolled, the 2 head blocks of H=128 asked for 443 of
  the H200's 227 KiB of shared memory)."""
  def chunk(j, carry):
    ids = idx_ref[pl.ds(j * bk, bk)]
    valid = ids >= 0
    rows = jnp.maximum(ids, 0)
    en, er = _gather_rows(kv_ref, rows, vp, rp)

    def head_block(hb, acc):
      heads = pl.ds(hb * bh, bh)
      qr = q_ref[heads, pl.ds(vp, rp)] if rp else None
      s = _logits(q_ref[heads, pl.ds(0, vp)], qr, en, er, scale)
      return acc + jnp.sum(jnp.exp(s - lse_ref[heads][:, None]), axis=0)
    acc = jax.lax.fori_loop(0, nh, head_block, jnp.zeros((bk,), jnp.float32))
    p_ref[pl.ds(j * bk, bk)] = jnp.where(valid, acc / h, 0.0)
    return carry
  jax.lax.fori_loop(0, nk, chunk, 0)


def attention_probs_mean(q_BTHC: jax.Array, kv_BSC: jax.Array, idx_BTK: jax.Array,
                         lse_BTH: jax.Array, v_dim: int, scale: float, *,
                         block_h: int | None = None, block_k: int | None = None,
                         num_warps: int | None = None, interpret: bool | None = None) -> jax.Array:
  """fp32 [B,T,K]: (1/H) Σ_h exp(scale·q_h·kv[idx] - lse_h), 0 at -1 slots; no gradient.

  The sparse-stage KL teacher p^S (SPEC §3) from the attention's own lse, without gathering
  [B,T,K,C] entries in HBM. v_dim only fixes how the C dims split into power-of-two parts.
  """
  B, T, H, C = q_BTHC.shape
  S, K = kv_BSC.shape[1], idx_BTK.shape[2]
  b = _blocks('probs', Blocks(block_h, block_k, num_warps, 1), H, K)
  bh, bk = b.block_h, b.block_k
  q, kv, idx = (jax.lax.stop_gradient(x) for x in (q_BTHC, kv_BSC, idx_BTK))
  qp, kvp, idxp, vp, rp = _prep(q, kv, idx, v_dim, bh, bk)
  hp, kp, cp = qp.shape[2], idxp.shape[2], vp + rp
  lsep = pad_axis(jax.lax.stop_gradient(lse_BTH), 2, hp, value=float('inf'))
  kernel = functools.partial(_probs_kernel, scale=float(scale), vp=vp, rp=rp, bh=bh, nh=hp // bh,
                             bk=bk, nk=kp // bk, h=H)
  tok = lambda i: (i // T, i % T, 0)
  p = pl.pallas_call(
      kernel,
      grid=(B * T,),
      in_specs=[pl.BlockSpec((None, None, hp, cp), lambda i: (i // T, i % T, 0, 0)),
                pl.BlockSpec((None, None, hp), tok),
                pl.BlockSpec((None, None, kp), tok),
                pl.BlockSpec((None, S, cp), lambda i: (i // T, 0, 0))],
      out_specs=pl.BlockSpec((None, None, kp), tok),
      out_shape=jax.ShapeDtypeStruct((B, T, kp), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=b.num_warps, num_stages=None),
      interpret=gpu_interpret(interpret), name='sparse_mla_probs',
  )(qp, lsep, idxp, kvp)
  return p[:, :, :K]


# --------------------------------------------------------------- masked-form teacher (dense)
def _dense_probs_kernel(lim_ref, q_ref, lse_ref, k_ref, p_ref, *, scale, vp, rp, nq):
  """One (batch, query block, key block) tile of (1/H) Σ_h exp(scale·q_h·k_h^T - lse_h), the
  heads in a loop (unrolled it ran 1.8x slower on the H200: docs/performance.md row 67)."""
  b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  h = q_ref.shape[1]

  @pl.when(j < lim_ref[b * nq + i])
  def _():
    def head(n, acc):
      s = _dot(q_ref[:, n, pl.ds(0, vp)], k_ref[:, n, pl.ds(0, vp)], _NT)
      if rp:
        s = s + _dot(q_ref[:, n, pl.ds(vp, rp)], k_ref[:, n, pl.ds(vp, rp)], _NT)
      return acc + jnp.exp(s * scale - lse_ref[n][:, None])
    acc = jax.lax.fori_loop(0, h, head, jnp.zeros(p_ref.shape, jnp.float32))
    p_ref[...] = acc * (1.0 / h)


def _dense_probs_chunk(q, lse, idx, k, *, scale, vp, rp, bq, bs, num_warps, num_stages,
                       interpret):
  """One query chunk: q [B,Tc,H,vp+rp], lse [B,Tc,H] (+inf: p = 0), idx [B,Tc,K], k [B,Sp,H,
  vp+rp] (Tc, Sp multiples of the blocks) -> fp32 p [B,Tc,K]."""
  B, Tc, H, cp = q.shape
  Sp = k.shape[1]
  nq, ns = Tc // bq, Sp // bs
  # Key blocks each query block needs: up to the block holding its largest index (0 if none).
  top = jnp.max(idx.reshape(B, nq, -1), axis=-1)
  lim = ((top + bs) // bs).reshape(B * nq).astype(jnp.int32)
  buf = pl.pallas_call(
      functools.partial(_dense_probs_kernel, scale=float(scale), vp=vp, rp=rp, nq=nq),
      grid=(B, nq, ns),
      in_specs=[pl.BlockSpec((B * nq,), lambda b, i, j: (0,)),
                pl.BlockSpec((None, bq, H, cp), lambda b, i, j: (b, i, 0, 0)),
                pl.BlockSpec((None, H, bq), lambda b, i, j: (b, 0, i)),
                pl.BlockSpec((None, bs, H, cp), lambda b, i, j: (b, j, 0, 0))],
      out_specs=pl.BlockSpec((None, bq, bs), lambda b, i, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct((B, Tc, Sp), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name='masked_probs_mean',
  )(lim, q, jnp.swapaxes(lse, 1, 2), k)
  return _at_selected(buf, idx)


def _mosaic_probs_chunk(q, lse, idx, k, *, scale, bs, stages, key_group, row0=0):
  """`_dense_probs_chunk` by the Mosaic GPU kernel (Hopper; mgpu.py) for the query rows
  row0.. of q [B,Tc,H,D] (D whole)."""
  buf = mgpu.dense_probs(q, k, lse, scale, block_kv=bs, stages=stages, row0=row0,
                         key_group=key_group)
  return _at_selected(buf, idx)


def _at_selected(buf, idx):
  """The dense [B, Tc, Sp] probabilities at the top-k slots idx [B, Tc, K]; 0 at -1 slots."""
  p = jnp.take_along_axis(buf, jnp.maximum(idx, 0), axis=2)
  return jnp.where(idx >= 0, p, 0.0)


def masked_probs_mean(q_BTHD: jax.Array, k_BSHD: jax.Array, idx_BTK: jax.Array,
                      lse_BTH: jax.Array, scale: float, *, block_q: int | None = None,
                      block_s: int | None = None, num_warps: int | None = None,
                      num_stages: int | None = None, buf_bytes: int = _PROBS_BUF_BYTES,
                      interpret: bool | None = None, causal: bool = False,
                      mosaic_teacher: bool = True, key_group: int = 0) -> jax.Array:
  """fp32 [B,T,K]: (1/H) Σ_h exp(scale·q_h·k_h[idx] - lse_h), 0 at -1 slots; no gradient.

  The KL teacher of DSA's masked form from dense tiles. On a Hopper GPU with 2-byte q/k, when
  `causal` (S == T and idx[t] <= t: the kernel computes tiles up to the diagonal only) and
  mosaic_teacher, the tiles come from mgpu.dense_probs (WGMMA; 128 query rows x block_s keys,
  64 or 128, default 128; num_stages its pipeline depth, default the most that fit shared
  memory up to 4; key_group its key tiles per CTA (0: all up to the diagonal); block_q and
  num_warps unused; with other key tiles, or more heads than its shared memory holds, the
  Triton kernel runs instead).
  Otherwise from the Triton kernel's block_q x block_s tiles (powers of two >= 16;
  default 128 x 128 with 8 warps for 2-byte q/k, 64 x 64 with 4 warps for fp32, capped at the
  padded T and S; 2 stages). D splits into its largest power of two and the rest, each part
  padded to a power of two >= 16 (192 = 128 + 64 unpadded). Chunk rule: Tc = the most query rows
  (a multiple of block_q) whose fp32 [B, Tc, S] buffer fits buf_bytes, then T splits evenly into
  ceil(T / Tc) chunks, run in sequence (lax.map) so one buffer is live at a time.
  """
  B, T, H, D = q_BTHD.shape
  S = k_BSHD.shape[1]
  two_byte = q_BTHD.dtype.itemsize <= 2
  interpret = gpu_interpret(interpret)
  bs = block_s or 128
  mosaic = (causal and S == T and mosaic_teacher and two_byte and not interpret and is_hopper()
            and bs in (64, 128) and mgpu.max_stages(H, bs, q_BTHD.dtype.itemsize) >= 2)
  if mosaic:
    bq = 2 * mgpu.BLOCK
  else:
    bq = block_q or min(128 if two_byte else 64, max(16, next_pow2(T)))
    bs = block_s or min(128 if two_byte else 64, max(16, next_pow2(S)))
    for name, v in (('block_q', bq), ('block_s', bs)):
      if v < 16 or v != next_pow2(v):
        raise ValueError(f'masked_probs_mean gpu: {name}={v} must be a power of two >= 16')
  q, k, lse = (jax.lax.stop_gradient(x) for x in (q_BTHD, k_BSHD, lse_BTH))
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)      # tokens without a key: p = 0
  if mosaic:
    k = pad_axis(k.astype(q.dtype), 1, round_up(S, bs))
    chunk = functools.partial(_mosaic_probs_chunk, k=k, scale=scale, bs=bs, stages=num_stages,
                              key_group=key_group)
  else:
    v = 1 << (D.bit_length() - 1)
    vp, rp = max(16, v), (max(16, next_pow2(D - v)) if D > v else 0)
    q = _split_pad(q, v, vp, rp)
    k = pad_axis(_split_pad(k.astype(q.dtype), v, vp, rp), 1, round_up(S, bs))
    chunk = functools.partial(
        _dense_probs_chunk, k=k, scale=scale, vp=vp, rp=rp, bq=bq, bs=bs,
        num_warps=num_warps or (8 if bq * bs >= 128 * 128 else 4), num_stages=num_stages or 2,
        interpret=interpret)
  rows = max(bq, min(round_up(T, bq), buf_bytes // (4 * B * k.shape[1]) // bq * bq))
  n = -(-T // rows)
  rows = round_up(-(-T // n), bq)
  ins = ((q, 0), (lse, jnp.inf), (idx_BTK.astype(jnp.int32), -1))
  if not mosaic:
    xs = tuple(split_blocks(x, rows, fill) for x, fill in ins)
    if n == 1:
      return chunk(*(x[0] for x in xs))[:, :T]
    return join_blocks(jax.lax.map(lambda x: chunk(*x), xs), T)
  # The Mosaic kernel stops at each CTA's diagonal, so it needs the chunk's first row as a
  # constant: the chunks unrolled, each one's inputs behind the last one's result, so that
  # again one buffer is live at a time. Each chunk's rows are sliced out of q, lse and idx
  # (the last one padded) and the outputs joined along T: one copy each way, where stacking
  # the chunks first (split_blocks) transposed the whole of q and idx before slicing them. The
  # barrier at the end materialises the gathered probabilities once; without it XLA fused the
  # gather into each consumer (the KL loss, the stack of saved residuals under remat) and read
  # the buffer again in each.
  outs = []
  for i in range(n):
    lo = i * rows
    args = tuple(pad_axis(jax.lax.slice_in_dim(x, lo, min(lo + rows, T), axis=1), 1, rows, fill)
                 for x, fill in ins)
    if outs:
      args = jax.lax.optimization_barrier((args, outs[-1]))[0]
    outs.append(chunk(*args, row0=lo))
  return jax.lax.optimization_barrier(jnp.concatenate(outs, axis=1)[:, :T])
