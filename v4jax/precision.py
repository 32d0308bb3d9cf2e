"""Which parameters the loss reads only as one cast to the compute dtype (found in its jaxpr).

For such a leaf the gradient with respect to the fp32 master is the compute-dtype cotangent of
that one cast, converted up: differentiating with respect to a bf16 copy of the leaf gives the
same values, bit for bit, but the backward keeps the gradient in bf16. Under gradient
accumulation that halves the micro-batch gradient buffer, which sits beside the fp32
accumulator (bench-1B: 10.5 GiB of its 131.7 GiB step).

A leaf qualifies when its single use in the loss is `convert_element_type` to the compute dtype,
possibly after layout-only ops (reshape, slices, transposes, sharding constraints) and through
the bodies of `pjit`, `remat`, `shard_map` and `scan` (as a constant or a scanned input, not a
carry). Two
uses (e.g. a shared embedding) would sum their cotangents in bf16, and custom-VJP calls define
their own gradient, so both keep the fp32 path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Var

__all__ = ['cast_only_mask', 'lower_params']

_LAYOUT = frozenset({'reshape', 'squeeze', 'expand_dims', 'transpose', 'slice', 'dynamic_slice',
                     'sharding_constraint', 'copy', 'copy_p'})


def _jaxpr(j):
  return getattr(j, 'jaxpr', j)


class _Uses:
  """Per jaxpr (by id), var -> [(eqn, operand position)]; built once per jaxpr."""

  def __init__(self):
    self._index: dict[int, tuple] = {}

  def of(self, jaxpr, v):
    key = id(jaxpr)
    if key not in self._index:
      idx: dict = {}
      for e in jaxpr.eqns:
        for i, x in enumerate(e.invars):
          if isinstance(x, Var):
            idx.setdefault(x, []).append((e, i))
      outs = {x for x in jaxpr.outvars if isinstance(x, Var)}
      self._index[key] = (jaxpr, idx, outs)   # keeps jaxpr alive so its id stays unique
    _, idx, outs = self._index[key]
    return idx.get(v, []), v in outs


def _inner(e, i):
  """(inner jaxpr, its invar) that operand i of a higher-order eqn binds to, or None."""
  name, p = e.primitive.name, e.params
  if name in ('pjit', 'jit', 'closed_call', 'core_call', 'remat', 'checkpoint', 'shard_map'):
    j = _jaxpr(p.get('jaxpr', p.get('call_jaxpr')))
    return (j, j.invars[i]) if j is not None else None
  if name == 'scan':
    if p['num_consts'] <= i < p['num_consts'] + p['num_carry']:
      return None                                  # a carry is read again every iteration
    j = _jaxpr(p['jaxpr'])
    return j, j.invars[i]
  return None


def _only_cast(uses: _Uses, jaxpr, v, dtype) -> bool:
  users, is_out = uses.of(jaxpr, v)
  if is_out or len(users) != 1:
    return False
  e, i = users[0]
  name = e.primitive.name
  if name == 'convert_element_type':
    return np.dtype(e.params['new_dtype']) == np.dtype(dtype)
  if name in _LAYOUT:
    return i == 0 and _only_cast(uses, jaxpr, e.outvars[0], dtype)
  inner = _inner(e, i)
  return inner is not None and _only_cast(uses, *inner, dtype)


def cast_only_mask(fn, params, *args, dtype):
  """A pytree of bools like `params`: True where fn(params, *args) reads the fp32 leaf only as
  one cast to `dtype` (so its gradient may be taken in `dtype`, bit-identically)."""
  leaves, treedef = jax.tree.flatten(params)
  closed = jax.make_jaxpr(fn)(params, *args)
  jaxpr, uses = closed.jaxpr, _Uses()
  flags = [leaf.dtype == jnp.float32 and _only_cast(uses, jaxpr, v, dtype)
           for leaf, v in zip(leaves, jaxpr.invars[:len(leaves)])]
  return jax.tree.unflatten(treedef, flags)


def lower_params(params, mask, dtype):
  """params with the masked leaves cast to `dtype` (the loss then differentiates those in it)."""
  return jax.tree.map(lambda x, m: x.astype(dtype) if m else x, params, mask)
