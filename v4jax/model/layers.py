"""Shared building blocks: parameters with logical axis names, RMSNorm, LayerNorm, matmuls.

Model code never names a mesh axis. Every parameter carries `logical_axes` metadata (one logical
name or None per dim); `v4jax.parallel.rules` maps those names to mesh axes per preset. Weights are
stored in `model.param_dtype` (fp32 master) and cast to the compute dtype at the point of use;
matmuls accumulate in fp32 (SPEC §0 precision policy).
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from v4jax.parallel.rules import constrain  # re-exported for model modules

__all__ = ['param', 'batched_draws', 'flush_draws', 'const_param', 'RMSNorm', 'LayerNorm',
           'matmul', 'kept_matmuls_behind_barrier', 'barrier_active', 'KEPT_MATMUL', 'constrain',
           'dtype_of', 'dot_f32', 'f32_mode', 'linear_f32']

_F32 = jnp.float32


def dtype_of(name: str):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


# (param, key, shape, std, dtype) of the draws `batched_draws` defers; None = draw at once.
_pending: list | None = None


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float,
          dtype=jnp.float32) -> nnx.Param:
  """A N(0, std) parameter tagged with logical axis names."""
  assert len(shape) == len(axes), (shape, axes)
  key, shape = rngs.params(), tuple(shape)
  if _pending is None:
    value = std * jax.random.normal(key, shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))
  p = nnx.Param(jnp.zeros(shape, dtype), logical_axes=tuple(axes))   # set by flush_draws
  _pending.append((p, key, shape, std, dtype))
  return p


@contextlib.contextmanager
def batched_draws():
  """Within it, `param` takes its key as usual but defers the normal draw; `flush_draws` (called
  at exit, and by code that reads parameter values during construction, e.g. before stacking
  layers) makes all pending draws of one shape in one vmapped call.

  Why: each draw is a threefry + inverse-erf expansion in the jitted init program, and a deep
  model has hundreds; one call per shape cut XLA's compile of bench_h200's init (small dims, CPU)
  from 28-29 s to 21-25 s (docs/performance.md row 39). The keys are the same; the values equal
  the one-by-one draws up to the rounding of the fused transform (~1 ulp).
  """
  global _pending
  if _pending is not None:     # nested: the outer one flushes
    yield
    return
  _pending = []
  try:
    yield
    flush_draws()
  finally:
    _pending = None


def flush_draws() -> None:
  """Makes the pending draws of `batched_draws` (a no-op outside it)."""
  if not _pending:
    return
  groups = collections.defaultdict(list)
  for item in _pending:
    groups[item[2]].append(item)
  _pending.clear()
  for shape, items in groups.items():
    keys = jnp.stack([key for _, key, _, _, _ in items])
    vals = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
    for j, (p, _, _, std, dtype) in enumerate(items):
      p.set_value((std * vals[j]).astype(dtype))


def const_param(value: float, shape: Sequence[int], axes: Sequence[str | None],
                dtype=jnp.float32) -> nnx.Param:
  """A constant-initialised parameter (norm scales 1, biases 0)."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(jnp.full(tuple(shape), value, dtype), logical_axes=tuple(axes))


KEPT_MATMUL = 'kept_matmul'    # checkpoint name of matmul outputs under the barrier (below)
_BARRIER = contextvars.ContextVar('v4jax_kept_matmul_barrier', default=False)


@jax.custom_jvp
def _primal_barrier(y: jax.Array) -> jax.Array:
  """lax.optimization_barrier on the primal only: the barrier's own JVP bars the tangent too,
  which transposes to a barrier on each cotangent in the backward, between the backward's ops."""
  return jax.lax.optimization_barrier(y)


@_primal_barrier.defjvp
def _primal_barrier_jvp(primals, tangents):
  return jax.lax.optimization_barrier(primals[0]), tangents[0]


@contextlib.contextmanager
def kept_matmuls_behind_barrier():
  """While a block traces under it (block remat with model.remat_dot_barrier), `matmul`'s
  saveable products leave the dot through `lax.optimization_barrier` and carry the checkpoint
  name KEPT_MATMUL; the dot itself gets a unit batch dimension, so block remat keeps the named
  value, not the dot. Why: in a layer scan each kept output is also stacked for the backward by a
  dynamic-update-slice, and XLA:GPU's dynamic-slice fusion then writes the GEMM straight into the
  stack by running it a second time for its other users (performance.md row 89). The barrier
  leaves the stacking a copy. Products with batch dimensions, which the policy does not keep, are
  left as they are."""
  token = _BARRIER.set(True)
  try:
    yield
  finally:
    _BARRIER.reset(token)


def barrier_active() -> bool:
  """Whether the block being traced keeps its matmuls behind the barrier: ops whose custom-VJP
  forward rules jax traces later, outside the block's trace, read it when called and pass it on
  (mHC's coefficient GEMM: `dot_f32(..., keep=True)`)."""
  return _BARRIER.get()


def _kept(y: jax.Array) -> jax.Array:
  return checkpoint_name(_primal_barrier(y), KEPT_MATMUL)


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype, *, saveable: bool = True) -> jax.Array:
  """einsum with inputs and output in the compute dtype (GPU/TPU accumulate bf16 dots in fp32).

  The output dtype is the compute dtype itself rather than an fp32 result cast down: a cast after
  the dot would give the backward an fp32 cotangent, and the transposed dots would then run as
  mixed fp32 x bf16 matmuls (fp32 speed). This way forward and backward are all bf16 GEMMs.

  saveable=False: the same product as a dot with a unit batch dimension, which block remat's
  policy (dots without batch dimensions) does not keep, so the backward recomputes it from its
  input (`model.remat_recompute`); XLA drops the unit dimension. The casts come first, so that a
  weight's one use is still its cast (cast_once.py). Under kept_matmuls_behind_barrier a saveable
  product is kept by name instead (see there).
  """
  x, w = x.astype(dtype), w.astype(dtype)
  ins, out = spec.split('->')
  lhs, rhs = ins.split(',')
  batched = set(lhs) & set(rhs) & set(out)      # block remat's policy keeps dots without these
  if saveable and (batched or not barrier_active()):
    return jnp.einsum(spec, x, w, preferred_element_type=dtype)
  u = next(c for c in 'ZYXWVU' if c not in spec)          # the unit batch dimension's letter
  y = jnp.einsum(f'{u}{lhs},{u}{rhs}->{u}{out}', x[None], w[None],
                 preferred_element_type=dtype)[0]
  return _kept(y) if saveable else y


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """gamma * x / sqrt(mean(x^2) + eps), in fp32, cast to x's dtype (SPEC §1)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last dim with a learned scale (init 1)."""

  def __init__(self, dim: int, eps: float = 1e-6, axis_name: str | None = 'norm'):
    self.scale = const_param(1.0, (dim,), (axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
  """LayerNorm over the last dim with scale (1) and bias (0), computed in fp32."""

  def __init__(self, dim: int, eps: float = 1e-6, axis_name: str | None = 'norm'):
    self.scale = const_param(1.0, (dim,), (axis_name,))
    self.bias = const_param(0.0, (dim,), (axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + self.eps)
    return y * self.scale[...] + self.bias[...]


# ---- fp32 products of bf16 activations with fp32 weights (routers, mHC coefficients) ---------

def _bf16_part(x: jax.Array) -> jax.Array:
  """x rounded to bf16's 8 significant bits, kept in fp32. reduce_precision, not a round trip
  through bf16: XLA:GPU drops convert(convert(x, bf16), f32) pairs when it may keep excess
  precision (its default), which made every split below hi = b, mid = lo = 0 on the H200."""
  return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)


def _split3(b: jax.Array) -> jax.Array:
  """fp32 [..., C] -> bf16 [..., 3C]: parts hi | mid | lo whose sum is b exactly (3 x 8 bits of
  mantissa), so bf16 products with fp32 accumulation reproduce an fp32 product."""
  hi = _bf16_part(b)
  r = b - hi
  mid = _bf16_part(r)
  return jnp.concatenate([hi, mid, r - mid], axis=-1).astype(jnp.bfloat16)


def f32_mode(dtype) -> str:
  """dot_f32's mode for activations of this dtype: 'split' for bf16, else 'highest'."""
  return 'split' if jnp.dtype(dtype) == jnp.bfloat16 else 'highest'


def dot_f32(a: jax.Array, b_f32: jax.Array, contract, mode: str, *,
            keep: bool = False) -> jax.Array:
  """fp32 dot_general of `a` with fp32 `b` over `contract` (no batch dims; in mode 'split' b's
  last dim must be free). keep: the GEMM's output as `matmul`'s under kept_matmuls_behind_barrier
  (a unit-batch dot, then the barrier and the name KEPT_MATMUL).

  mode 'split' (a in bf16, so exact in bf16): b as three bf16 parts on tensor cores, exact
  products, fp32 accumulation: the fp32 result without an fp32 GEMM. The fp32 GEMMs of the mHC
  coefficients ([8192, 6144] x [6144, 24]) and the router ([8192, 1536] x [1536, 64]) have a few
  dozen output columns and ran on the H200 at several times their memory time
  (docs/performance.md). 'highest' / 'tf32': one fp32 GEMM at that precision.
  """
  def dot(x, y, **kw):
    if not keep:
      return jax.lax.dot_general(x, y, (contract, ((), ())), preferred_element_type=_F32, **kw)
    shifted = tuple(tuple(d + 1 for d in c) for c in contract)
    return _kept(jax.lax.dot_general(x[None], y[None], (shifted, ((0,), (0,))),
                                     preferred_element_type=_F32, **kw)[0])

  if mode == 'split':
    C = b_f32.shape[-1]
    out = dot(a, _split3(b_f32))
    return out[..., :C] + (out[..., C:2 * C] + out[..., 2 * C:])
  prec = jax.lax.Precision.DEFAULT if mode == 'tf32' else jax.lax.Precision.HIGHEST
  return dot(a.astype(_F32), b_f32, precision=prec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear_f32(x_MK: jax.Array, w_KN: jax.Array, mode: str) -> jax.Array:
  """fp32 x @ w through dot_f32, with the weight gradient x^T g in the same mode."""
  return dot_f32(x_MK, w_KN, ((1,), (0,)), mode)


def _linear_f32_fwd(x_MK, w_KN, mode):
  return linear_f32(x_MK, w_KN, mode), (x_MK, w_KN)


def _linear_f32_bwd(mode, res, g_MN):
  x_MK, w_KN = res
  dx_MK = dot_f32(g_MN, w_KN, ((1,), (1,)), 'tf32' if mode == 'tf32' else 'highest')
  return dx_MK.astype(x_MK.dtype), dot_f32(x_MK, g_MN, ((0,), (0,)), mode).astype(w_KN.dtype)


linear_f32.defvjp(_linear_f32_fwd, _linear_f32_bwd)
