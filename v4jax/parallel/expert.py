"""Expert-parallel MoE dispatch (SPEC §4 dropless routing) in `shard_map` over the active mesh.

Per device: route (done by the caller) -> sort token-slots by expert -> exchange over the expert
mesh axes so each slot reaches the device that holds its expert -> group the received rows by
local expert -> grouped-matmul SwiGLU, each row scaled by its gate (the gates travel with the
rows) -> exchange back -> un-sort -> sum of each token's K slots.

The exchange is `jax.lax.ragged_all_to_all` where the backend has it (GPU, TPU) or a padded
`all_to_all` with the same semantics (XLA:CPU has no ragged-all-to-all). Buffers are static:
`config.moe.ep_capacity_factor` = 0 sizes them for the worst case (every slot of every peer to
one device: exactly dropless); f > 0 sizes the receive buffer to f x the balanced load (ragged)
or each peer-to-peer chunk to f x its balanced share (padded). Slots that do not fit are dropped
(output 0), the same way on every device, and counted in the `dropped` metric.

With no expert axis (experts replicated) but a per-device Pallas grouped matmul (mgpu, megablox:
they cannot be auto-partitioned), the same shard_map runs with no exchange.

Dims: A tokens on a device (B*T flattened), K experts per token, M = A*K slots, D model dim,
F expert FFN dim, E experts, P expert-parallel degree, L = E/P local experts, R receive rows.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec as P

from v4jax.kernels import gather_sum
from v4jax.kernels.grouped_matmul import PALLAS_IMPLS, resolve_impl
from v4jax.kernels.pallas_common import round_up, target_platform
from v4jax.parallel import rules as rules_lib

f32, i32 = jnp.float32, jnp.int32
EXCHANGES = ('auto', 'ragged', 'padded')


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the MoE FFN is laid out over the mesh (static)."""
  mesh: Mesh
  rules: dict
  ep_axes: tuple[str, ...]      # mesh axes holding the experts (the exchange axes)
  ff_axes: tuple[str, ...]      # mesh axes splitting F (partial sums over them)
  exchange: str                 # ragged | padded
  capacity_factor: float
  gather_sum: str = 'reference'  # the slot sums' impl (kernels/gather_sum; per device here)

  @property
  def ep(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.ep_axes)


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def plan(*, n_experts: int, d_expert: int, impl: str, dtype, exchange: str = 'auto',
         capacity_factor: float = 0.0, gather_sum_impl: str = 'reference') -> Plan | None:
  """A Plan when a mesh is active and either experts are sharded over it or the grouped matmul
  is a per-device Pallas kernel on more than one device; None -> the caller's local path."""
  cur = rules_lib.current()
  if cur is None:
    return None
  mesh, rules = cur
  ep_axes = _axes(rules_lib.logical_to_spec(('exp',), rules, mesh, (n_experts,))[0])
  if not ep_axes and not (mesh.size > 1 and resolve_impl(impl, dtype) in PALLAS_IMPLS):
    return None
  if exchange not in EXCHANGES:
    raise ValueError(f'config.moe.ep_exchange={exchange!r} is not one of {EXCHANGES}')
  if exchange == 'auto':
    exchange = 'padded' if target_platform() == 'cpu' else 'ragged'
  ff_axes = _axes(rules_lib.logical_to_spec(('mlp_moe',), rules, mesh, (d_expert,))[0])
  if set(ff_axes) & set(ep_axes):
    raise ValueError(f'expert parallelism: the rules put experts on {ep_axes} and the expert FFN '
                     f'dim on {ff_axes}; they must be different mesh axes')
  return Plan(mesh, dict(rules), ep_axes, ff_axes, exchange, float(capacity_factor),
              gather_sum_impl)


def _excl_cumsum(x, axis=0):
  return jnp.cumsum(x, axis=axis) - x


def padded_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                             recv_sizes, *, axis_name, cap: int):
  """`jax.lax.ragged_all_to_all` semantics from a padded `all_to_all` (one chunk of `cap` rows
  per peer; every send size must be <= cap)."""
  n = send_sizes.shape[0]
  r = jnp.arange(cap, dtype=i32)
  ok_NC = r[None, :] < send_sizes[:, None]
  rows_NC = jnp.clip(input_offsets[:, None] + r[None, :], 0, operand.shape[0] - 1)
  tail = (1,) * (operand.ndim - 1)
  buf = jnp.where(ok_NC.reshape(ok_NC.shape + tail), operand[rows_NC], 0)
  got = jax.lax.all_to_all(buf, axis_name, 0, 0, tiled=False)                # got[i]: from peer i
  off_N = jax.lax.all_to_all(output_offsets[:, None], axis_name, 0, 0, tiled=False)[:, 0]
  dst_NC = jnp.where(r[None, :] < recv_sizes[:, None], off_N[:, None] + r[None, :],
                     output.shape[0])                                        # out of range: dropped
  return output.at[dst_NC.reshape(-1)].set(got.reshape((n * cap,) + operand.shape[1:]),
                                           mode='drop')


def inverse_permutation(perm):
  """The inverse permutation (a scatter of indices; rows then move by gather)."""
  n = perm.shape[0]
  return jnp.zeros((n,), i32).at[perm].set(jnp.arange(n, dtype=i32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def permuted_rows(x_ND: jax.Array, src_M: jax.Array, inv_M: jax.Array, k: int,
                  impl: str = 'reference') -> jax.Array:
  """y[m] = x[src[m] // k] for a permutation src of range(N*k) (each row of x repeated k
  times, then permuted) with inverse inv: the sort and unsort of token-slots by expert. The VJP
  gathers too, dx[n] = Σ_j dy[inv[n*k + j]] (`slot_sum`'s form, through the gather_sum seam's
  `impl` for k > 1), where autodiff of the gather would scatter-add rows into dx (atomics on
  GPU)."""
  return x_ND[src_M // k]


def _permuted_rows_fwd(x_ND, src_M, inv_M, k, impl):
  return x_ND[src_M // k], inv_M


def _permuted_rows_bwd(k, impl, inv_M, dy_MD):
  dx_ND = dy_MD[inv_M] if k == 1 else \
      gather_sum.gather_sum(dy_MD, inv_M.reshape(-1, k), dy_MD.dtype, impl=impl)
  return dx_ND, None, None


permuted_rows.defvjp(_permuted_rows_fwd, _permuted_rows_bwd)


def slot_sum(ys_MD: jax.Array, inv_M: jax.Array, order_M: jax.Array, k: int,
             impl: str = 'reference') -> jax.Array:
  """Unsort gated slot outputs and sum each token's k slots: y[n] = Σ_j ys[inv[n*k + j]] in
  fp32 (the gather_sum seam's `impl`). Its VJP is `permuted_rows`' forward, dys[m] =
  dy[order[m] // k]: one gather."""
  return _slot_sum(ys_MD, inv_M, order_M, k, impl, ys_MD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _slot_sum(ys_MD, inv_M, order_M, k, impl, dtype):
  return gather_sum.gather_sum(ys_MD, inv_M.reshape(-1, k), f32, impl=impl)


def _slot_sum_fwd(ys_MD, inv_M, order_M, k, impl, dtype):
  return _slot_sum(ys_MD, inv_M, order_M, k, impl, dtype), order_M


def _slot_sum_bwd(k, impl, dtype, order_M, dy_ND):
  return dy_ND[order_M // k].astype(dtype), None, None


_slot_sum.defvjp(_slot_sum_fwd, _slot_sum_bwd)


def sort_slots(e_M: jax.Array, n_experts: int):
  """Token-slots by expert: (order_M, its inverse inv_M, sizes_E), int32. Named 'moe_route',
  which block remat keeps (~4 bytes per slot): the backward sorts nothing again."""
  order_M = jnp.argsort(e_M, stable=True).astype(i32)
  out = (order_M, inverse_permutation(order_M), jnp.bincount(e_M, length=n_experts).astype(i32))
  return tuple(checkpoint_name(a, 'moe_route') for a in out)


def sorted_gates(g_AK: jax.Array, order_M: jax.Array, inv_M: jax.Array) -> jax.Array:
  """The token-slots' gates [A,K] in the slots' expert-sorted order -> [M] fp32."""
  M = g_AK.size
  return permuted_rows(g_AK.reshape(M, 1).astype(f32), order_M, inv_M, 1)[:, 0]


def _accept(S_PP, cap_peer: int, R: int):
  """Rows accepted per (src, dst): at most cap_peer per pair, at most R per receiver (first
  sources first). Every device computes the same matrix from the gathered counts."""
  a = jnp.minimum(S_PP, cap_peer)
  return jnp.clip(R - _excl_cumsum(a, 0), 0, a)


def _buffers(plan: Plan, M: int) -> tuple[int, int]:
  """(per-peer chunk cap, receive rows R) for M local slots."""
  p, f = plan.ep, plan.capacity_factor
  if plan.exchange == 'padded':
    cap = M if f <= 0 else min(M, round_up(math.ceil(f * M / p), 8))
    return cap, p * cap
  R = p * M if f <= 0 else min(p * M, round_up(math.ceil(f * M), 8))
  return M, R


def moe_ep(plan: Plan, x_AD: jax.Array, sel_AK: jax.Array, g_AK: jax.Array, valid_A: jax.Array,
           w_gate_EDF: jax.Array, w_up_EDF: jax.Array, w_down_EFD: jax.Array,
           ffn: Callable) -> tuple[jax.Array, jax.Array]:
  """Routed-expert output y [A,D] fp32 = sum_k g[a,k] * FFN_{sel[a,k]}(x[a]), and the number
  of valid slots dropped (fp32 scalar, global). `ffn(x_MD, w_gate, w_up, w_down, sizes_L,
  gate_M, all_rows_grouped=False)` runs rows sorted by local expert through their experts and
  scales each by its gate (rows past sum(sizes_L) give 0; all_rows_grouped=True promises there
  are none). The gates travel with their rows, so the rows come back gated and each token sums
  its K slots."""
  mesh, ep, L = plan.mesh, plan.ep, w_gate_EDF.shape[0] // plan.ep
  A, D = x_AD.shape
  K = sel_AK.shape[1]
  tok_axes = _axes(rules_lib.logical_to_spec(('batch', None), plan.rules, mesh, (A, D))[0])
  if set(tok_axes) & set(plan.ff_axes):
    raise ValueError(f'expert parallelism: tokens on {tok_axes} and the expert FFN dim on '
                     f'{plan.ff_axes} must use different mesh axes')
  M = (A // math.prod(mesh.shape[a] for a in tok_axes)) * K
  cap_peer, R = _buffers(plan, M)
  ep_axes = _entry(plan.ep_axes)

  def exchange(*args):
    if plan.exchange == 'ragged':
      return jax.lax.ragged_all_to_all(*args, axis_name=ep_axes)
    return padded_ragged_all_to_all(*args, axis_name=ep_axes, cap=cap_peer)

  def local(x_AD, sel_AK, g_AK, valid_A, wg, wu, wd):
    A = x_AD.shape[0]
    e_M = sel_AK.reshape(A * K)
    order_M, inv_M, sizes_E = sort_slots(e_M, ep * L)
    xs_MD = permuted_rows(x_AD, order_M, inv_M, K, plan.gather_sum)
    gs_M = sorted_gates(g_AK, order_M, inv_M)
    if ep == 1:
      ys_MD = ffn(xs_MD, wg, wu, wd, sizes_E, gs_M, all_rows_grouped=True)   # sums to A*K
      dropped = jnp.zeros((), f32)
    else:
      me = jax.lax.axis_index(ep_axes)
      cnt_PPL = jax.lax.all_gather(sizes_E, ep_axes)
      cnt_PPL = cnt_PPL.reshape(ep, ep, L)                          # [src, dst, local expert]
      S_PP = jnp.sum(cnt_PPL, axis=-1)
      acc_PP = _accept(S_PP, cap_peer, R)
      send_P, recv_P = acc_PP[me], acc_PP[:, me]
      off_P = _excl_cumsum(S_PP[me])                                 # my chunk starts (sorted)
      sent = (off_P, send_P, _excl_cumsum(acc_PP, 0)[me], recv_P)
      buf_RD = exchange(xs_MD, jnp.zeros((R, D), xs_MD.dtype), *sent)
      gbuf_R1 = exchange(gs_M[:, None], jnp.zeros((R, 1), f32), *sent)
      # received rows come as (src, local expert) runs; regroup them by local expert
      mine_PL = cnt_PPL[:, me]
      acc_PL = jnp.clip(recv_P[:, None] - _excl_cumsum(mine_PL, 1), 0, mine_PL)
      run_R = jnp.searchsorted(jnp.cumsum(acc_PL.reshape(-1)), jnp.arange(R), side='right')
      order_R = jnp.argsort(jnp.where(run_R < ep * L, run_R % L, L), stable=True).astype(i32)
      inv_R = inverse_permutation(order_R)
      y_RD = ffn(permuted_rows(buf_RD, order_R, inv_R, 1), wg, wu, wd, jnp.sum(acc_PL, axis=0),
                 permuted_rows(gbuf_R1, order_R, inv_R, 1)[:, 0])
      y_RD = permuted_rows(y_RD, inv_R, order_R, 1)                   # back to (src, expert) runs
      ys_MD = exchange(y_RD, jnp.zeros((A * K, D), y_RD.dtype), _excl_cumsum(recv_P), recv_P,
                       _excl_cumsum(S_PP, 1)[:, me], send_P)
      dst_M = e_M[order_M] // L
      kept_M = jnp.arange(A * K) - off_P[dst_M] < send_P[dst_M]
      valid_M = jnp.repeat(valid_A, K)[order_M]
      dropped = jnp.sum((valid_M & ~kept_M).astype(f32))
    y_AD = slot_sum(ys_MD, inv_M, order_M, K, plan.gather_sum)
    if plan.ff_axes:
      y_AD = jax.lax.psum(y_AD, _entry(plan.ff_axes))
    if tok_axes:
      dropped = jax.lax.psum(dropped, _entry(tok_axes))
    return y_AD, dropped

  t, e, f = _entry(tok_axes), ep_axes, _entry(plan.ff_axes)
  w_in, w_out = P(e, None, f), P(e, f, None)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(t, None), P(t, None), P(t, None), P(t),
                                                 w_in, w_in, w_out),
                     out_specs=(P(t, None), P()), check_vma=False)
  return fn(x_AD, sel_AK, g_AK, valid_A, w_gate_EDF, w_up_EDF, w_down_EFD)
