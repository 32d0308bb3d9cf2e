"""Which parameters the train step casts to the compute dtype once per step (train.cast_params_once).

Weights are stored in fp32 and cast to bf16 where they are used (SPEC §0). Inside a step of A
micro-batches under block remat, each such weight is cast 3A times (forward, recomputation,
backward), and its fp32 gradient is written per micro-batch. A parameter whose only use in the
loss is one cast to the compute dtype can instead be cast once per step, with the step
differentiating that copy: the cast's transpose is a cast back, so the gradients are bit-identical
(tests/test_cast_once.py). On the H200 at bench_h200 the casts of the weights (sliced per layer
out of the scanned stacks) took ~33 ms of each 500 ms micro-batch (docs/performance.md).

The test is on the loss's jaxpr: the parameter's variable has exactly one use, and that use is a
`convert_element_type` to the compute dtype, reached through layout-only ops (reshape, transpose,
slice, ...) and into the bodies of jit, scan, remat, shard_map and cond. A parameter used twice,
in fp32 math, in a gather, a Pallas call or a custom-derivative function stays fp32: there the
gradient would be summed or formed in the compute dtype instead of fp32.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.extend import core as jcore

# one operand in, one out, and a transpose that moves values without adding them
_LAYOUT = frozenset({'reshape', 'squeeze', 'expand_dims', 'transpose', 'slice', 'dynamic_slice',
                     'copy', 'copy_p'})
# higher-order primitives whose body takes the eqn's operands one for one (cond: after the index)
_BODIES = ('pjit', 'jit', 'closed_call', 'core_call', 'remat', 'checkpoint', 'scan', 'shard_map',
           'cond')


def _sub_jaxprs(eqn) -> list:
  out = []
  for v in eqn.params.values():
    for j in (v if isinstance(v, (list, tuple)) else (v,)):
      if isinstance(j, jcore.ClosedJaxpr):
        out.append(j.jaxpr)
      elif isinstance(j, jcore.Jaxpr):
        out.append(j)
  return out


def _cast_only(jaxpr, var, dtype) -> bool:
  """True if `var`'s one use in `jaxpr` leads (layout ops, bodies) to one cast to `dtype`."""
  if any(v is var for v in jaxpr.outvars):
    return False
  uses = [(e, i) for e in jaxpr.eqns for i, v in enumerate(e.invars) if v is var]
  if len(uses) != 1:
    return False
  eqn, i = uses[0]
  name = eqn.primitive.name
  if name == 'convert_element_type':
    return eqn.params['new_dtype'] == dtype
  if name in _LAYOUT:
    return i == 0 and _cast_only(jaxpr, eqn.outvars[0], dtype)
  subs = _sub_jaxprs(eqn)
  if not subs or not any(b in name for b in _BODIES):
    return False
  for sub in subs:
    off = len(eqn.invars) - len(sub.invars)
    if not (off == 0 or (off == 1 and name == 'cond')) or i < off:
      return False
    if not _cast_only(sub, sub.invars[i - off], dtype):
      return False
  return True


def cast_mask(loss: Callable[[Any], Any], params: Any, dtype, return_shape: bool = False):
  """Pytree of bools like `params`: True where loss(params) uses the leaf only through one cast
  to `dtype` (and the leaf is not already in it). With return_shape also the shapes of
  loss(params)'s outputs, from the same trace (as jax.make_jaxpr's return_shape)."""
  leaves, treedef = jax.tree.flatten(params)
  closed, shape = jax.make_jaxpr(lambda *ls: loss(jax.tree.unflatten(treedef, ls)),
                                 return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  mask = jax.tree.unflatten(treedef, [leaf.dtype != dtype and _cast_only(jaxpr, v, dtype)
                                      for leaf, v in zip(leaves, jaxpr.invars)])
  return (mask, shape) if return_shape else mask
