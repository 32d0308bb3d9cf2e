"""DeepSeekMoE (SPEC §4): shared + fine-grained routed SwiGLU experts.

Sigmoid router scores; a non-trainable per-expert bias shifts *selection only* (aux-loss-free
balancing, updated by `update_router_bias` after the optimizer step); group-limited top-k; gates
from the unbiased scores, normalised then scaled by rho; a sequence-wise balance loss.

Dims: B batch, T positions, D model dim, E routed experts (N_r), K routed experts per token (K_r),
F FFN inner dim (d_e or d_ff), A = B*T flattened tokens, M = A*K token-slots,
G expert groups (G_e; *not* the n-gram order here), C per-expert capacity (capacity dispatch).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from v4jax.kernels.grouped_matmul import grouped_matmul
from v4jax.kernels.pallas_common import whole_arrays
from v4jax.model.layers import constrain, dtype_of, f32_mode, linear_f32, matmul, param
from v4jax.parallel import expert

f32 = jnp.float32


class DenseFFN(nnx.Module):
  """SwiGLU FFN: (SiLU(x W_g) * x W_u) W_d. Dense layers (d_ff) and the fused shared experts."""

  def __init__(self, cfg, d_ff: int, *, rngs: nnx.Rngs):
    m = cfg.model
    pd, std = dtype_of(m.param_dtype), m.init_std
    self.w_gate = param(rngs, (m.d_model, d_ff), ('embed', 'mlp'), std, pd)
    self.w_up = param(rngs, (m.d_model, d_ff), ('embed', 'mlp'), std, pd)
    self.w_down = param(rngs, (d_ff, m.d_model), ('mlp', 'embed'), std, pd)
    self.dtype = dtype_of(m.dtype)
    self.keep_in = 'ffn_in' not in m.remat_recompute   # block remat keeps the gate and up

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dt = self.dtype
    g_BTF = matmul('btd,df->btf', x_BTD, self.w_gate[...], dt, saveable=self.keep_in)
    u_BTF = matmul('btd,df->btf', x_BTD, self.w_up[...], dt, saveable=self.keep_in)
    h_BTF = constrain(jax.nn.silu(g_BTF) * u_BTF, ('batch', 'seq', 'act_mlp'))
    return matmul('btf,fd->btd', h_BTF, self.w_down[...], dt)


class RouterBias(nnx.Variable):
  """Aux-loss-free selection bias b [E], fp32. Not an nnx.Param: no gradient, no optimizer state,
  no weight decay; changed only by `update_router_bias`. Saved in checkpoints."""


class Router(nnx.Module):
  """`kernel` [D,E] (fp32 storage and compute) and the selection bias `bias` [E]."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    D, E = cfg.model.d_model, cfg.moe.num_experts
    self.kernel = param(rngs, (D, E), ('embed', 'exp'), cfg.model.init_std, f32)
    self.bias = RouterBias(jnp.zeros((E,), f32), logical_axes=('exp',))

  def logits(self, x_AD: jax.Array) -> jax.Array:
    """fp32 router logits [A,E] (fp32 products: exact split-bf16 GEMMs for bf16 x)."""
    return linear_f32(x_AD, self.kernel[...].astype(f32), f32_mode(x_AD.dtype))


class Experts(nnx.Module):
  """The E routed SwiGLU experts, stacked: w_gate/w_up [E,D,F], w_down [E,F,D]."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    m, e = cfg.model, cfg.moe
    pd, std = dtype_of(m.param_dtype), m.init_std
    E, D, F = e.num_experts, m.d_model, e.d_expert
    self.w_gate = param(rngs, (E, D, F), ('exp', 'embed', 'mlp_moe'), std, pd)
    self.w_up = param(rngs, (E, D, F), ('exp', 'embed', 'mlp_moe'), std, pd)
    self.w_down = param(rngs, (E, F, D), ('exp', 'mlp_moe', 'embed'), std, pd)
    self.dtype = dtype_of(m.dtype)
    self.impl = cfg.kernels.grouped_matmul

  def sorted_rows(self, x_MD: jax.Array, sizes_E: jax.Array, gate_M: jax.Array) -> jax.Array:
    """Rows sorted by expert (sizes_E rows each) through their expert, times their gates."""
    return self.ffn(x_MD, *self.weights(), sizes_E, gate_M, all_rows_grouped=True)

  def weights(self):
    """(w_gate, w_up, w_down) in the compute dtype."""
    return tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))

  def ffn(self, x_MD, w_gate, w_up, w_down, sizes_E, gate_M, all_rows_grouped=False):
    """gate_m * SwiGLU_e(x_m) for rows sorted by expert, through grouped matmuls.

    The gate scales the hidden row before the down projection, (g_m h_m) W_d, so the gradient
    needs no down-projection output (dgate_m = <h_m, dy_m W_d^T>): block remat reruns the gate
    and up GEMMs only. all_rows_grouped: sum(sizes_E) == M always (the kernels then skip zeroing
    rows past it)."""
    dt = self.dtype   # results in the compute dtype, accumulated in fp32 inside the kernels
    gmm = functools.partial(grouped_matmul, impl=self.impl, preferred_element_type=dt,
                            all_rows_grouped=all_rows_grouped)
    # model.remat_save can keep these under block remat: the backward then neither gathers the
    # rows again nor reruns the grouped GEMMs (their outputs are not dots the policy saves)
    x_MD = checkpoint_name(x_MD.astype(dt), 'moe_dispatch')
    g_MF = checkpoint_name(gmm(x_MD, w_gate, sizes_E), 'moe_gemms')
    u_MF = checkpoint_name(gmm(x_MD, w_up, sizes_E), 'moe_gemms')
    return gmm(_gated_swiglu(g_MF, u_MF, gate_M[:, None], dt), w_down, sizes_E)

  def padded(self, x_ECD: jax.Array, gate_EC: jax.Array) -> jax.Array:
    """Fixed-capacity buffers [E,C,D] through their expert, times their gates [E,C]."""
    dt = self.dtype
    g_ECF = matmul('ecd,edf->ecf', x_ECD, self.w_gate[...], dt)
    u_ECF = matmul('ecd,edf->ecf', x_ECD, self.w_up[...], dt)
    h_ECF = _gated_swiglu(g_ECF, u_ECF, gate_EC[..., None], dt)
    return matmul('ecf,efd->ecd', h_ECF, self.w_down[...], dt)


def _gated_swiglu(g, u, gate, dt):
  """gate * SiLU(g) * u in fp32, rounded once to dt."""
  return (jax.nn.silu(g.astype(f32)) * u.astype(f32) * gate.astype(f32)).astype(dt)


def route(logits_AE: jax.Array, bias_E: jax.Array, *, top_k: int, n_groups: int,
          topk_groups: int, route_scale: float):
  """SPEC §4 routing in fp32 -> (scores s_AE, selected experts sel_AK int32, gates g_AK).

  Selection uses s + b, limited to the top `topk_groups` groups (group score = sum of its top-2
  biased scores); top_k ties go to the lower index. Gates use the unbiased s, normalised over the
  selection, then scaled. Gradients reach the router through s in the gates only.
  """
  s_AE = jax.nn.sigmoid(logits_AE.astype(f32))
  biased_AE = jax.lax.stop_gradient(s_AE) + bias_E.astype(f32)
  if n_groups > 1:
    A, E = biased_AE.shape
    per_group = E // n_groups
    top2_AG = jax.lax.top_k(biased_AE.reshape(A, n_groups, per_group), 2)[0]
    _, kept_AK = jax.lax.top_k(jnp.sum(top2_AG, axis=-1), topk_groups)
    keep_AG = jnp.any(kept_AK[:, :, None] == jnp.arange(n_groups), axis=1)
    biased_AE = jnp.where(jnp.repeat(keep_AG, per_group, axis=1), biased_AE, -jnp.inf)
  _, sel_AK = jax.lax.top_k(biased_AE, top_k)
  sel_AK = checkpoint_name(sel_AK.astype(jnp.int32), 'moe_route')   # block remat keeps it
  s_sel_AK = jnp.take_along_axis(s_AE, sel_AK, axis=-1)
  g_AK = route_scale * s_sel_AK / jnp.sum(s_sel_AK, axis=-1, keepdims=True)
  return s_AE, sel_AK, g_AK


def hits_per_row(sel_BTK: jax.Array, valid_BT: jax.Array, n_experts: int) -> jax.Array:
  """[B,E] number of valid (token, slot) assignments of row b to expert e (no gradient)."""
  B = sel_BTK.shape[0]
  w_BTK = jnp.broadcast_to(valid_BT[:, :, None], sel_BTK.shape).astype(f32)
  rows_BTK = jnp.broadcast_to(jnp.arange(B)[:, None, None], sel_BTK.shape)
  return jnp.zeros((B, n_experts), f32).at[rows_BTK, sel_BTK].add(w_BTK)


def balance_loss(s_BTE: jax.Array, sel_BTK: jax.Array, valid_BT: jax.Array, alpha: float):
  """Sequence-wise balance loss alpha * mean_b sum_i f_i P_i (SPEC §4); f is a constant.

  T_b = valid tokens of row b; rows without valid tokens are left out of the mean.
  """
  E, K = s_BTE.shape[-1], sel_BTK.shape[-1]
  v_BT = valid_BT.astype(f32)
  T_B = jnp.sum(v_BT, axis=1)
  inv_B = 1.0 / jnp.maximum(T_B, 1.0)
  f_BE = jax.lax.stop_gradient(hits_per_row(sel_BTK, valid_BT, E) * (E / K) * inv_B[:, None])
  f_BE = checkpoint_name(f_BE, 'moe_route')
  p_BTE = s_BTE / jnp.sum(s_BTE, axis=-1, keepdims=True)
  P_BE = jnp.einsum('bte,bt->be', p_BTE, v_BT) * inv_B[:, None]
  has_B = T_B > 0
  per_row_B = jnp.where(has_B, jnp.sum(f_BE * P_BE, axis=-1), 0.0)
  return alpha * jnp.sum(per_row_B) / jnp.maximum(jnp.sum(has_B.astype(f32)), 1.0)


def update_router_bias(bias_E: jax.Array, counts_E: jax.Array, top_k: int, n_tokens,
                       gamma) -> jax.Array:
  """b_i += gamma * sign(cbar - c_i), cbar = top_k * n_tokens / E, sign(0) = 0 (SPEC §4).

  Call once per optimizer step with *global* counts of that step (all micro-batches and
  replicas) and the matching number of valid tokens (= counts_E.sum() / top_k).
  """
  E = bias_E.shape[0]
  cbar = jnp.asarray(top_k * n_tokens, f32) / E
  step_E = jnp.asarray(gamma, f32) * jnp.sign(cbar - counts_E.astype(f32))
  return (bias_E.astype(f32) + step_E).astype(bias_E.dtype)


class MoE(nnx.Module):
  """Routed experts (+ fused shared experts when N_s > 0). Returns (y_BTD, aux)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    e = cfg.moe
    if e.num_experts % e.n_groups:
      raise ValueError(f'config.moe.n_groups={e.n_groups} must divide '
                       f'moe.num_experts={e.num_experts}')
    self.router = Router(cfg, rngs=rngs)
    self.experts = Experts(cfg, rngs=rngs)
    self.shared = DenseFFN(cfg, e.num_shared * e.d_expert, rngs=rngs) if e.num_shared > 0 else None
    self.d_model = cfg.model.d_model
    self.dtype = dtype_of(cfg.model.dtype)
    self.n_experts, self.top_k = e.num_experts, e.top_k
    self.n_groups, self.topk_groups, self.route_scale = e.n_groups, e.topk_groups, e.route_scale
    self.alpha, self.bal_indicator = e.bal_loss_alpha, e.bal_indicator
    self.dispatch, self.capacity_factor = e.dispatch, e.capacity_factor
    self.ep_args = dict(n_experts=e.num_experts, d_expert=e.d_expert, dtype=self.dtype,
                        impl=cfg.kernels.grouped_matmul, exchange=e.ep_exchange,
                        capacity_factor=e.ep_capacity_factor,
                        gather_sum_impl=cfg.kernels.gather_sum)

  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None):
    """aux: bal_loss (fp32 scalar, includes alpha), expert_counts (fp32 [E], valid
    token-slots per expert, no gradient), dropped (fp32 scalar, valid slots over capacity)."""
    B, T, D = x_BTD.shape
    if D != self.d_model:
      raise ValueError(f'MoE: x_BTD last dim {D} must equal config.model.d_model={self.d_model}')
    if valid_BT is None:
      valid_BT = jnp.ones((B, T), bool)
    if valid_BT.shape != (B, T):
      raise ValueError(f'MoE: valid_BT shape {valid_BT.shape} must be [B,T]={(B, T)}')
    valid_BT = valid_BT.astype(bool)
    E, K, A = self.n_experts, self.top_k, B * T

    x_AD = x_BTD.reshape(A, D)
    s_AE, sel_AK, g_AK = route(self.router.logits(x_AD), self.router.bias[...], top_k=K,
                               n_groups=self.n_groups, topk_groups=self.topk_groups,
                               route_scale=self.route_scale)
    valid_A = valid_BT.reshape(A)
    ep = expert.plan(**self.ep_args) if self.dispatch == 'dropless' else None
    if ep is not None:  # the active mesh shards experts (or needs per-device kernels)
      y_AD, dropped = expert.moe_ep(ep, x_AD, sel_AK, g_AK, valid_A, *self.experts.weights(),
                                    self.experts.ffn)
    elif self.dispatch == 'capacity':
      y_AD, dropped = self._capacity(x_AD, sel_AK, g_AK, valid_A)
    else:
      y_AD, dropped = self._dropless(x_AD, sel_AK, g_AK), jnp.zeros((), f32)
    y_BTD = y_AD.reshape(B, T, D).astype(self.dtype)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    # block remat keeps the output ([B,T,D], the compute dtype): mHC's write-back differentiates
    # its post coefficients against it, which would otherwise rerun the down GEMM and the unsort
    y_BTD = checkpoint_name(y_BTD, 'moe_out')

    sel_BTK = sel_AK.reshape(B, T, K)
    s_BTE = s_AE.reshape(B, T, E)
    # f's indicator: the actual selection, or (SPEC §13 #19 option) plain top-K of unbiased s
    ind_BTK = sel_BTK if self.bal_indicator == 'selected' else \
        jax.lax.top_k(jax.lax.stop_gradient(s_BTE), K)[1]
    aux = {
        'bal_loss': balance_loss(s_BTE, ind_BTK, valid_BT, self.alpha),
        'expert_counts': jax.lax.stop_gradient(jnp.sum(hits_per_row(sel_BTK, valid_BT, E), 0)),
        'dropped': dropped,
    }
    return constrain(y_BTD, ('batch', 'seq', 'act_embed')), aux

  def _dropless(self, x_AD, sel_AK, g_AK):
    """Sort token-slots by expert, grouped matmuls (gates applied inside), unsort and sum the
    K slots of each token -> [A,D] fp32."""
    A, K = sel_AK.shape
    M = A * K
    order_M, inv_M, sizes_E = expert.sort_slots(sel_AK.reshape(M), self.n_experts)
    # the slot sums' kernel needs whole arrays: here only without a multi-device mesh (on one,
    # the Pallas grouped matmuls route through expert.moe_ep, which runs it per device)
    gs = self.ep_args['gather_sum_impl'] if whole_arrays() else 'reference'
    ys_MD = self.experts.sorted_rows(expert.permuted_rows(x_AD, order_M, inv_M, K, gs), sizes_E,
                                     expert.sorted_gates(g_AK, order_M, inv_M))
    return expert.slot_sum(ys_MD, inv_M, order_M, K, gs)

  def _capacity(self, x_AD, sel_AK, g_AK, valid_A):
    """Fixed capacity C = ceil(cf*A*K/E) per expert, first come (token order) first served;
    padding tokens take no capacity; overflow slots output 0 -> ([A,D] fp32, dropped count)."""
    A, K = sel_AK.shape
    E, M, D = self.n_experts, A * K, x_AD.shape[-1]
    C = math.ceil(self.capacity_factor * A * K / E)
    e_M = sel_AK.reshape(M)
    valid_M = jnp.repeat(valid_A, K)
    key_M = jnp.where(valid_M, e_M, E)                    # padding slots sort last
    order_M = jnp.argsort(key_M, stable=True)
    counts = jnp.bincount(key_M, length=E + 1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted_M = jnp.arange(M) - starts[key_M[order_M]]
    rank_M = jnp.zeros((M,), rank_sorted_M.dtype).at[order_M].set(rank_sorted_M)
    keep_M = valid_M & (rank_M < C)
    slot_M = jnp.where(keep_M, e_M * C + rank_M, E * C)   # E*C is out of range: dropped
    x_MD = jnp.repeat(x_AD, K, axis=0).astype(self.dtype)
    x_ECD = jnp.zeros((E * C, D), self.dtype).at[slot_M].set(x_MD, mode='drop')
    gate_EC = jnp.zeros((E * C,), f32).at[slot_M].set(g_AK.reshape(M), mode='drop')
    y_ECD = self.experts.padded(x_ECD.reshape(E, C, D), gate_EC.reshape(E, C))
    y_MD = y_ECD.reshape(E * C, D).at[slot_M].get(mode='fill', fill_value=0)
    dropped = jnp.sum((valid_M & ~keep_M).astype(f32))
    return jnp.sum(y_MD.reshape(A, K, D).astype(f32), axis=1), dropped
