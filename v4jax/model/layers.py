"""Shared building blocks: parameters with logical axis names, RMSNorm, LayerNorm, matmuls.

Model code never names a mesh axis. Every parameter carries `logical_axes` metadata (one logical
name or None per dim); `v4jax.parallel.rules` maps those names to mesh axes per preset. Weights are
stored in `model.param_dtype` (fp32 master) and cast to the compute dtype at the point of use;
matmuls accumulate in fp32 (SPEC §0 precision policy).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.parallel.rules import constrain  # re-exported for model modules

__all__ = ['param', 'const_param', 'RMSNorm', 'LayerNorm', 'matmul', 'constrain', 'dtype_of']


def dtype_of(name: str):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float,
          dtype=jnp.float32) -> nnx.Param:
  """A N(0, std) parameter tagged with logical axis names."""
  assert len(shape) == len(axes), (shape, axes)
  value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


def const_param(value: float, shape: Sequence[int], axes: Sequence[str | None],
                dtype=jnp.float32) -> nnx.Param:
  """A constant-initialised parameter (norm scales 1, biases 0)."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(jnp.full(tuple(shape), value, dtype), logical_axes=tuple(axes))


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """einsum with inputs and output in the compute dtype (GPU/TPU accumulate bf16 dots in fp32).

  The output dtype is the compute dtype itself rather than an fp32 result cast down: a cast after
  the dot would give the backward an fp32 cotangent, and the transposed dots would then run as
  mixed fp32 x bf16 matmuls (fp32 speed). This way forward and backward are all bf16 GEMMs.
  """
  return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=dtype)


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
