"""Lightning-indexer seam (SPEC §3): scores, causal top-k, and scores at the selected keys.

Dims: B batch, T query positions, S key positions, H indexer heads, D indexer head dim, K top-k.

`impl` takes `config.kernels.impl`: reference -> plain jnp (reference.py); pallas -> gpu.py
(Triton; interpret mode on CPU) or tpu.py (Mosaic); auto -> pallas when compiling for GPU/TPU,
reference on CPU. The model calls only these dispatch functions.
"""
from __future__ import annotations

import jax

from v4jax.kernels import pallas_common
from v4jax.kernels.blockwise import pack_mask
from v4jax.kernels.indexer import reference

IMPLS = ('auto', 'reference', 'pallas')


def _check(q_BTHD, k_BSD, w_BTH, impl):
  if q_BTHD.ndim != 4 or k_BSD.ndim != 3 or w_BTH.shape != q_BTHD.shape[:3]:
    raise ValueError(f'indexer: q_BTHD {q_BTHD.shape}, k_BSD {k_BSD.shape}, w_BTH {w_BTH.shape} '
                     'must be [B,T,H,D], [B,S,D], [B,T,H]')
  if k_BSD.shape[0] != q_BTHD.shape[0] or k_BSD.shape[2] != q_BTHD.shape[3]:
    raise ValueError(f'indexer: k_BSD {k_BSD.shape} must match q_BTHD {q_BTHD.shape} in B and D')
  if impl not in IMPLS:
    raise ValueError(f'config.kernels.impl={impl!r} is not one of {IMPLS}')


def _kernels():
  """gpu.py (Triton; interpret mode on CPU) or tpu.py (Mosaic) for the target platform."""
  from v4jax.kernels.indexer import gpu, tpu
  return tpu if pallas_common.target_platform() == 'tpu' else gpu


_Q, _KW = ('batch', None, None, None), ('batch', None, None)


def indexer_scores(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, *,
                   impl: str = 'auto') -> jax.Array:
  """Unmasked fp32 I [B,T,S] = Σ_h w·ReLU(q_h·k_s) (scales already folded into w)."""
  _check(q_BTHD, k_BSD, w_BTH, impl)
  if pallas_common.use_pallas(impl):
    return pallas_common.per_device(_kernels().indexer_scores, (_Q, _KW, _KW), (_KW,))(
        q_BTHD, k_BSD, w_BTH)
  return reference.indexer_scores(q_BTHD, k_BSD, w_BTH)


def indexer_topk(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, topk: int,
                 segment_ids_BT: jax.Array | None = None, *, return_scores: bool = False,
                 return_words: bool = False, query_block: int = 0, impl: str = 'auto'):
  """int32 idx [B,T,K] of the top-K allowed keys per token (ties to the lower s; -1 = empty).

  return_scores: (idx, scores_BTK), the kernels' fp32 I at idx (-inf at -1 slots), which they
  read from the score slab they select from anyway (for indexer_scores_at), or None from the
  reference, whose student recomputes the scores and so stays an independent oracle.
  return_words: the set as packed bits too (uint32 [B,T,ceil(S/32)], blockwise.pack_mask's
  layout: the masked attention kernel's input), last in the tuple: written by the GPU top-k
  kernel while it selects, built from idx by pack_mask elsewhere.
  """
  _check(q_BTHD, k_BSD, w_BTH, impl)
  if topk <= 0:
    raise ValueError(f'indexer_topk: topk={topk} must be a positive integer (config.dsa.topk)')
  extra = (return_scores, return_words)
  if pallas_common.use_pallas(impl):
    gpu_words = return_words and pallas_common.target_platform() != 'tpu'
    kw = {'return_scores': return_scores}
    if gpu_words:                    # the TPU kernel has no words output: pack_mask below
      kw['return_words'] = True
    fn = lambda q, k, w, seg: _kernels().indexer_topk(q, k, w, topk, seg, **kw)
    n_out = 1 + return_scores + gpu_words
    out = pallas_common.per_device(fn, (_Q, _KW, _KW, ('batch', None)), (_KW,) * n_out)(
        q_BTHD, k_BSD, w_BTH, segment_ids_BT)
    out = out if n_out > 1 else (out,)
    if return_words and not gpu_words:
      out += (pack_mask(out[0], k_BSD.shape[1]),)
  else:
    idx_BTK = reference.indexer_topk(q_BTHD, k_BSD, w_BTH, topk, segment_ids_BT,
                                     query_block=query_block)
    out = (idx_BTK,) + ((None,) if return_scores else ())
    if return_words:
      out += (pack_mask(idx_BTK, k_BSD.shape[1]),)
  return out if any(extra) else out[0]


def indexer_scores_at(q_BTHD: jax.Array, k_BSD: jax.Array, w_BTH: jax.Array, idx_BTK: jax.Array,
                      *, scores_BTK: jax.Array | None = None, query_block: int = 0,
                      impl: str = 'auto', dq_form: str = 'auto') -> jax.Array:
  """fp32 I [B,T,K] = Σ_h w·ReLU(q_h·k[idx]) at the selected keys, -inf at -1 slots; the sparse
  KL student, differentiable in q, k and w (the GPU kernel gathers rows in-kernel, its backward
  runs dense [T,S] tiles over a scattered cotangent without atomics; the TPU kernel DMA-gathers
  rows and adds dk rows by read-modify-write DMAs; the reference gathers [B,Tq,K,D] per query
  block).

  scores_BTK: indexer_topk's return_scores for this idx. The kernels then return them as the
  value and run only the backward kernels (same gradient); the reference ignores them (None
  from its top-k anyway) and recomputes. dq_form: the GPU backward's dq/dw ('dense' tiles,
  'gather'ed keys, or 'auto' by shape; config.kernels.student_dq); the TPU kernel gathers in any
  case.
  """
  _check(q_BTHD, k_BSD, w_BTH, impl)
  if idx_BTK.ndim != 3 or idx_BTK.shape[:2] != q_BTHD.shape[:2]:
    raise ValueError(f'indexer_scores_at: idx_BTK {idx_BTK.shape} must be [B,T,K] with [B,T] of '
                     f'q_BTHD {q_BTHD.shape}')
  if scores_BTK is not None and scores_BTK.shape != idx_BTK.shape:
    raise ValueError(f'indexer_scores_at: scores_BTK {scores_BTK.shape} must match idx_BTK '
                     f'{idx_BTK.shape}')
  if pallas_common.use_pallas(impl):
    kw = {'dq_form': dq_form} if pallas_common.target_platform() != 'tpu' else {}
    fn = lambda q, k, w, idx, s: _kernels().indexer_scores_at(q, k, w, idx, scores_BTK=s, **kw)
    return pallas_common.per_device(fn, (_Q, _KW, _KW, _KW, _KW), (_KW,))(
        q_BTHD, k_BSD, w_BTH, idx_BTK, scores_BTK)
  return reference.indexer_scores_at(q_BTHD, k_BSD, w_BTH, idx_BTK, query_block=query_block)
