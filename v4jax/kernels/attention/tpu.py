"""Dense causal attention on TPU: jax's bundled Pallas TPU flash attention kernels
(jax.experimental.pallas.ops.tpu.flash_attention), with the fp32 log-sum-exp.

Dims: B batch, T query positions, S key positions, H heads, K qk width, V value width, D the
kernel's head width; Tp, Sp the padded lengths.

The bundled kernels take [B,H,*,D] with one width D for q, k and v, sequence lengths that their
blocks divide (key blocks a multiple of 128), and the reference's start-aligned causality (key
s <= query t). So q/k and v are zero-padded to D = round_up(max(K, V), 128) (zero qk columns add
nothing to the logits; the zero value columns are sliced off the output), and T and S to
multiples of 128: padded query rows are sliced off; padded keys come after every real key, so
causality hides them from real queries, except when T > S, where a segment id of their own masks
them.

The module's public `flash_attention` returns o only, and its save_residuals form refuses to be
differentiated, so this drives the module's own forward (`_flash_attention_impl` with
save_residuals: o, the row max m and the row sum l; lse = m + log l) and backward kernels
(`_flash_attention_bwd_dkv`, `_flash_attention_bwd_dq`) under a custom VJP of its own. The lse
cotangent g enters exactly through the kernels' di = rowsum(o·do) term: d lse / d s = p, so
ds = p·(dp - di) + g·p = p·(dp - (di - g)).
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as fa

from v4jax.kernels.pallas_common import pad_axis, round_up, tpu_interpret

F32 = jnp.float32
LANES = 128                          # the kernels' key-block and head-width granule
FWD_KERNEL = '_flash_attention_kernel'   # the bundled forward kernel's function name
# The bundled pallas_calls carry no name into the compiled HLO (their custom calls read
# `_lambda_`); these scopes put one into the op_name metadata.
FWD_SCOPE, BWD_SCOPE = 'tpu_flash_attention_fwd', 'tpu_flash_attention_bwd'


def _block(n: int) -> int:
  """The largest of 512 / 256 / 128 rows dividing n (a multiple of 128)."""
  return next(b for b in (512, 256, 128) if n % b == 0)


def _private_api_error(e: Exception) -> RuntimeError:
  return RuntimeError(
      f"tpu_flash drives jax's bundled TPU flash attention through its private functions, "
      f'which jax {jax.__version__} does not offer as expected ({type(e).__name__}: {e}); set '
      f'config.kernels.attention=reference')


def _interpret_scope():
  """The bundled kernels take no `interpret` argument: on a CPU target their pallas_calls are
  built under TPU interpret mode instead."""
  params = tpu_interpret(None)
  return pltpu.force_tpu_interpret_mode(params) if params else contextlib.nullcontext()


def _forward(q_BHTD, k_BHSD, v_BHSD, seg, opts):
  scale, bq, bk = opts
  with _interpret_scope(), jax.named_scope(FWD_SCOPE):
    o_BHTD, l_BHT, m_BHT = fa._flash_attention_impl(
        q_BHTD, k_BHSD, v_BHSD, None, seg, save_residuals=True, causal=True, sm_scale=scale,
        block_b=1, block_q=bq, block_k_major=bk, block_k=bk, debug=False)
  return o_BHTD, m_BHT + jnp.log(l_BHT), l_BHT, m_BHT


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BHTD, k_BHSD, v_BHSD, seg, opts):
  """(o [B,H,Tp,D], lse [B,H,Tp] fp32); opts = (scale, query block, key block)."""
  return _forward(q_BHTD, k_BHSD, v_BHSD, seg, opts)[:2]


def _flash_fwd(q_BHTD, k_BHSD, v_BHSD, seg, opts):
  o_BHTD, lse_BHT, l_BHT, m_BHT = _forward(q_BHTD, k_BHSD, v_BHSD, seg, opts)
  return (o_BHTD, lse_BHT), (q_BHTD, k_BHSD, v_BHSD, seg, o_BHTD, l_BHT, m_BHT)


def _flash_bwd(opts, res, cts):
  q_BHTD, k_BHSD, v_BHSD, seg, o_BHTD, l_BHT, m_BHT = res
  do_BHTD, dlse_BHT = cts
  scale, bq, bk = opts
  di_BHT = jnp.sum(o_BHTD.astype(F32) * do_BHTD.astype(F32), axis=-1) - dlse_BHT.astype(F32)
  args = (q_BHTD, k_BHSD, v_BHSD, None, seg, l_BHT, m_BHT, do_BHTD, di_BHT)
  try:
    common = dict(sm_scale=scale, causal=True, mask_value=fa.DEFAULT_MASK_VALUE, debug=False)
    with _interpret_scope(), jax.named_scope(BWD_SCOPE):
      dk_BHSD, dv_BHSD = fa._flash_attention_bwd_dkv(
          *args, block_q_major=bq, block_q=bq, block_k_major=bk, block_k=bk, **common)
      dq_BHTD, _ = fa._flash_attention_bwd_dq(
          *args, block_q_major=bq, block_k_major=bk, block_k=bk, **common)
  except (AttributeError, TypeError) as e:
    raise _private_api_error(e) from e
  return dq_BHTD, dk_BHSD, dv_BHSD, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _segment_ids(segment_ids_BT, B: int, T: int, S: int, Tp: int, Sp: int):
  """The kernels' SegmentIds, or None when causality alone hides every padded key."""
  if segment_ids_BT is not None:
    if S != T:
      raise ValueError(f'segment_ids_BT {segment_ids_BT.shape} needs S == T (k has S={S})')
    seg_BT = segment_ids_BT.astype(jnp.int32)
    return fa.SegmentIds(q=pad_axis(seg_BT, 1, Tp), kv=pad_axis(seg_BT, 1, Sp))
  if T <= S or Sp == S:
    return None
  pad_S = (jnp.arange(Sp) >= S).astype(jnp.int32)         # padded keys: segment 1, never a query's
  return fa.SegmentIds(q=jnp.zeros((B, Tp), jnp.int32), kv=jnp.broadcast_to(pad_S, (B, Sp)))


def causal_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHV: jax.Array, scale: float,
                     segment_ids_BT: jax.Array | None = None):
  """(o [B,T,H,V], lse [B,T,H] fp32), both differentiable; k/v per head."""
  B, T, H, K = q_BTHK.shape
  S, V = k_BSHK.shape[1], v_BSHV.shape[-1]
  if k_BSHK.shape != (B, S, H, K) or v_BSHV.shape != (B, S, H, V):
    raise ValueError(f'tpu_flash: k {k_BSHK.shape} / v {v_BSHV.shape} must be [B,S,H,K] / '
                     f'[B,S,H,V] for q {q_BTHK.shape}')
  D, Tp, Sp = round_up(max(K, V), LANES), round_up(T, LANES), round_up(S, LANES)
  heads_first = lambda x, n: pad_axis(pad_axis(jnp.swapaxes(x, 1, 2), 2, n), 3, D)
  try:   # a private API: say what broke (the backward's calls are guarded in _flash_bwd)
    seg = _segment_ids(segment_ids_BT, B, T, S, Tp, Sp)
    o_BHTD, lse_BHT = _flash(heads_first(q_BTHK, Tp), heads_first(k_BSHK, Sp),
                             heads_first(v_BSHV, Sp), seg, (float(scale), _block(Tp), _block(Sp)))
  except (AttributeError, TypeError) as e:   # a private API: say what broke
    raise _private_api_error(e) from e
  return jnp.swapaxes(o_BHTD[:, :, :T, :V], 1, 2), jnp.swapaxes(lse_BHT[:, :, :T], 1, 2)
