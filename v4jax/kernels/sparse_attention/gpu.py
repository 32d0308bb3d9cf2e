"""Sparse MLA on GPU: Pallas Triton-style kernels with in-kernel row gathers (SPEC §3).

Dims: B batch, T query positions, S key positions, H heads, C entry width (V + R), V value width
(the latent c_kv), R rope width, K selected keys per token.

One program owns one query token and a block of its heads (the heads form the matmul M dim, MQA
style), loops over the token's K indices in chunks, gathers those entry rows straight from the
[S, C] table (`kv_ref[rows, :]`), and keeps an online softmax. -1 slots are masked, and chunks
with no valid slot are skipped. Backward recomputes the probabilities from the saved lse, writes
dq per program and scatter-adds dkv rows with fp32 atomics (several programs share a row); the
indices of one token must be distinct (top-k output) for the interpret-mode emulation of atomics.

Triton needs power-of-two tiles: the V and R parts are loaded separately (512 + 64 for V3), each
padded to a power of two when needed, and heads / K are padded up to their block sizes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from v4jax.kernels.pallas_common import NEG_INF, gpu_interpret, next_pow2, pad_axis, round_up

_NT = (((1,), (1,)), ((), ()))   # a [M,C] . b [N,C] -> [M,N]
_TN = (((0,), (0,)), ((), ()))   # a [C,M] . b [C,N] -> [M,N]


@dataclasses.dataclass(frozen=True)
class _Cfg:
  v_dim: int
  scale: float
  block_h: int
  block_k: int
  num_warps: int | None
  num_stages: int | None
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


def _widths(cfg, c):
  v = cfg.v_dim
  r = c - v
  return next_pow2(v), (next_pow2(r) if r else 0)


def _prep(q, kv, idx, cfg):
  """Pads q [B,T,H,C], kv [B,S,C], idx [B,T,K] to kernel-friendly shapes."""
  vp, rp = _widths(cfg, q.shape[-1])
  hp = round_up(q.shape[2], cfg.block_h)
  kp = round_up(idx.shape[2], cfg.block_k)
  qp = pad_axis(_split_pad(q, cfg.v_dim, vp, rp), 2, hp)
  kvp = _split_pad(kv, cfg.v_dim, vp, rp)
  idxp = pad_axis(idx.astype(jnp.int32), 2, kp, value=-1)
  return qp, kvp, idxp, vp, rp


def _params(cfg):
  # Always Triton params: without them a GPU pallas_call may pick the Mosaic GPU backend.
  return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _scores(qn, qr, kv_ref, rows, vp, rp, scale):
  en = kv_ref[rows, pl.ds(0, vp)]
  s = _dot(qn, en, _NT)
  er = None
  if rp:
    er = kv_ref[rows, pl.ds(vp, rp)]
    s = s + _dot(qr, er, _NT)
  return s * scale, en, er


def _fwd_kernel(q_ref, idx_ref, kv_ref, o_ref, lse_ref, *, scale, vp, rp, bk, nk):
  qn = q_ref[:, pl.ds(0, vp)]
  qr = q_ref[:, pl.ds(vp, rp)] if rp else None
  bh = qn.shape[0]

  def chunk(j, carry):
    m, l, acc = carry
    ids = idx_ref[pl.ds(j * bk, bk)]

    def update(carry):
      m, l, acc = carry
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

    return jax.lax.cond(jnp.max(ids) >= 0, update, lambda c: c, carry)

  init = (jnp.full((bh,), NEG_INF, jnp.float32), jnp.zeros((bh,), jnp.float32),
          jnp.zeros((bh, vp), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, nk, chunk, init)
  ok = l > 0
  o_ref[...] = (acc / jnp.where(ok, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)


def _bwd_kernel(q_ref, do_ref, lse_ref, dl_ref, idx_ref, kv_ref, _, dq_ref, dkv_ref, *,
                scale, vp, rp, bk, nk, masked_atomics, trash_row):
  qn = q_ref[:, pl.ds(0, vp)]
  qr = q_ref[:, pl.ds(vp, rp)] if rp else None
  do = do_ref[...]
  lse = lse_ref[...]
  dl = dl_ref[...]
  bh = qn.shape[0]
  cols_n = jnp.arange(vp, dtype=jnp.int32)
  cols_r = vp + jnp.arange(rp, dtype=jnp.int32)

  def chunk(j, carry):
    ids = idx_ref[pl.ds(j * bk, bk)]

    def update(carry):
      dqn, dqr = carry
      valid = ids >= 0
      rows = jnp.maximum(ids, 0)
      s, en, er = _scores(qn, qr, kv_ref, rows, vp, rp, scale)
      # -1 slots add into a spare row S (masked out too where atomics take masks).
      dst = jnp.where(valid, ids, trash_row)[:, None]
      p = jnp.where(valid[None, :], jnp.exp(s - lse[:, None]), 0.0)
      ds = p * (_dot(do, en, _NT) - dl[:, None])            # dL/d(logit), [bh, bk]
      ds_c = ds.astype(qn.dtype)
      dqn = dqn + _dot(ds_c, en)
      de_n = scale * _dot(ds_c, qn, _TN) + _dot(p.astype(do.dtype), do, _TN)   # [bk, vp]
      mask = valid[:, None] if masked_atomics else None
      pltriton.atomic_add(dkv_ref, (dst, cols_n[None, :]), de_n,
                          mask=None if mask is None else jnp.broadcast_to(mask, de_n.shape))
      if rp:
        dqr = dqr + _dot(ds_c, er)
        de_r = scale * _dot(ds_c, qr, _TN)
        pltriton.atomic_add(dkv_ref, (dst, cols_r[None, :]), de_r,
                            mask=None if mask is None else jnp.broadcast_to(mask, de_r.shape))
      return dqn, dqr

    return jax.lax.cond(jnp.max(ids) >= 0, update, lambda c: c, carry)

  init = (jnp.zeros((bh, vp), jnp.float32), jnp.zeros((bh, max(rp, 1)), jnp.float32))
  dqn, dqr = jax.lax.fori_loop(0, nk, chunk, init)
  dq_ref[:, pl.ds(0, vp)] = (scale * dqn).astype(dq_ref.dtype)
  if rp:
    dq_ref[:, pl.ds(vp, rp)] = (scale * dqr).astype(dq_ref.dtype)


def _forward(q, kv, idx, cfg):
  B, T, H, C = q.shape
  S = kv.shape[1]
  qp, kvp, idxp, vp, rp = _prep(q, kv, idx, cfg)
  hp, kp, cp = qp.shape[2], idxp.shape[2], vp + rp
  bh, bk = cfg.block_h, cfg.block_k
  kernel = functools.partial(_fwd_kernel, scale=cfg.scale, vp=vp, rp=rp, bk=bk, nk=kp // bk)
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
      compiler_params=_params(cfg), interpret=cfg.interpret, name='sparse_mla_fwd',
  )(qp, idxp, kvp)
  return o[:, :, :H, :cfg.v_dim], lse[:, :, :H]


def _backward(q, kv, idx, o, lse, do, dlse, cfg):
  B, T, H, C = q.shape
  S = kv.shape[1]
  qp, kvp, idxp, vp, rp = _prep(q, kv, idx, cfg)
  hp, kp, cp = qp.shape[2], idxp.shape[2], vp + rp
  bh, bk = cfg.block_h, cfg.block_k
  # delta - dlse: softmax backward's row term, with the lse cotangent folded in.
  dl = jnp.einsum('bthv,bthv->bth', do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
  dop = pad_axis(pad_axis(do, 3, vp), 2, hp)
  lsep = pad_axis(lse, 2, hp, value=float('inf'))   # padded heads: p = 0
  dlp = pad_axis(dl, 2, hp)
  kernel = functools.partial(_bwd_kernel, scale=cfg.scale, vp=vp, rp=rp, bk=bk, nk=kp // bk,
                             masked_atomics=not cfg.interpret, trash_row=S)
  tok = lambda i, h: (i // T, i % T, h)
  dq, dkv = pl.pallas_call(
      kernel,
      grid=(B * T, hp // bh),
      in_specs=[pl.BlockSpec((None, None, bh, cp), lambda i, h: (i // T, i % T, h, 0)),
                pl.BlockSpec((None, None, bh, vp), lambda i, h: (i // T, i % T, h, 0)),
                pl.BlockSpec((None, None, bh), tok),
                pl.BlockSpec((None, None, bh), tok),
                pl.BlockSpec((None, None, kp), lambda i, h: (i // T, i % T, 0)),
                pl.BlockSpec((None, S, cp), lambda i, h: (i // T, 0, 0)),
                pl.BlockSpec((None, S + 1, cp), lambda i, h: (i // T, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, bh, cp), lambda i, h: (i // T, i % T, h, 0)),
                 pl.BlockSpec((None, S + 1, cp), lambda i, h: (i // T, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, T, hp, cp), q.dtype),
                 jax.ShapeDtypeStruct((B, S + 1, cp), jnp.float32)],
      input_output_aliases={6: 1},
      compiler_params=_params(cfg), interpret=cfg.interpret, name='sparse_mla_bwd',
  )(qp, dop, lsep, dlp, idxp, kvp, jnp.zeros((B, S + 1, cp), jnp.float32))
  v = cfg.v_dim
  unsplit = lambda x: jnp.concatenate([x[..., :v], x[..., vp:vp + C - v]], axis=-1)
  return unsplit(dq[:, :, :H]).astype(q.dtype), unsplit(dkv[:, :S]).astype(kv.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sparse_mla(q, kv, idx, cfg):
  return _forward(q, kv, idx, cfg)


def _sparse_mla_fwd(q, kv, idx, cfg):
  o, lse = _forward(q, kv, idx, cfg)
  return (o, lse), (q, kv, idx, o, lse)


def _sparse_mla_bwd(cfg, res, cts):
  q, kv, idx, o, lse = res
  do, dlse = cts
  dq, dkv = _backward(q, kv, idx, o, lse, do, dlse.astype(jnp.float32), cfg)
  return dq, dkv, np.zeros(idx.shape, jax.dtypes.float0)


_sparse_mla.defvjp(_sparse_mla_fwd, _sparse_mla_bwd)


def sparse_mla(q_BTHC: jax.Array, kv_BSC: jax.Array, idx_BTK: jax.Array, v_dim: int,
               scale: float, *, block_h: int | None = None, block_k: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None,
               interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """(o [B,T,H,V], lse [B,T,H] fp32): softmax over kv[idx] per token, -1 slots masked.

  Differentiable in q and kv (custom_vjp, kernels both ways). block_h (heads per program) and
  block_k (gathered rows per step) must be powers of two >= 16; defaults suit the H200.
  """
  H, K = q_BTHC.shape[2], idx_BTK.shape[2]
  bh = block_h or min(64, max(16, next_pow2(H)))
  bk = block_k or min(64, max(16, next_pow2(K)))
  for name, b in (('block_h', bh), ('block_k', bk)):
    if b < 16 or b != next_pow2(b):
      raise ValueError(f'sparse_mla gpu: {name}={b} must be a power of two >= 16')
  cfg = _Cfg(int(v_dim), float(scale), bh, bk, num_warps, num_stages, gpu_interpret(interpret))
  return _sparse_mla(q_BTHC, kv_BSC, idx_BTK, cfg)


def _probs_kernel(q_ref, lse_ref, idx_ref, kv_ref, p_ref, *, scale, vp, rp, bh, nh, bk, nk, h):
  def chunk(j, carry):
    ids = idx_ref[pl.ds(j * bk, bk)]
    valid = ids >= 0
    rows = jnp.maximum(ids, 0)
    acc = jnp.zeros((bk,), jnp.float32)
    for hb in range(nh):
      heads = pl.ds(hb * bh, bh)
      qr = q_ref[heads, pl.ds(vp, rp)] if rp else None
      s, _, _ = _scores(q_ref[heads, pl.ds(0, vp)], qr, kv_ref, rows, vp, rp, scale)
      acc = acc + jnp.sum(jnp.exp(s - lse_ref[heads][:, None]), axis=0)
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
  bh = block_h or min(64, max(16, next_pow2(H)))
  bk = block_k or min(64, max(16, next_pow2(K)))
  cfg = _Cfg(int(v_dim), float(scale), bh, bk, num_warps, None, gpu_interpret(interpret))
  q, kv, idx = (jax.lax.stop_gradient(x) for x in (q_BTHC, kv_BSC, idx_BTK))
  qp, kvp, idxp, vp, rp = _prep(q, kv, idx, cfg)
  hp, kp, cp = qp.shape[2], idxp.shape[2], vp + rp
  lsep = pad_axis(jax.lax.stop_gradient(lse_BTH), 2, hp, value=float('inf'))
  kernel = functools.partial(_probs_kernel, scale=cfg.scale, vp=vp, rp=rp, bh=bh, nh=hp // bh,
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
      compiler_params=_params(cfg), interpret=cfg.interpret, name='sparse_mla_probs',
  )(qp, lsep, idxp, kvp)
  return p[:, :, :K]
