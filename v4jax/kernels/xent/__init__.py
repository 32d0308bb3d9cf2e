"""Cross-entropy seam (SPEC §9): a chunk's token NLL and its gradient in the logits, in one op.

Dims: B batch, C positions of a chunk, V vocabulary.

The chunked LM-head loss (model/loss.py) forms each chunk's loss and logits gradient together,
for a unit cotangent. `impl` takes `config.kernels.xent`:
  reference -> reference.py in jnp: XLA reads the chunk's bf16 logits three times (the max, the
               sum of exponentials, the gradient) and writes the gradient once;
  pallas    -> gpu.py: one Triton kernel that walks each row twice (logsumexp, then gradient)
               and writes the gradient once (interpret mode on CPU; no TPU kernel); 1.22x
               XLA's passes at bench_h200's chunk on the H200, the step 0.5% shorter;
  auto      -> pallas on GPU unless the vocabulary is sharded over the mesh (the kernel needs
               whole rows), reference elsewhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels import pallas_common
from v4jax.kernels.xent import reference
from v4jax.parallel import rules as _rules

__all__ = ['IMPLS', 'resolve_impl', 'nll_and_grad']

IMPLS = pallas_common.GPU_IMPLS


def _vocab_sharded(V: int) -> bool:
  cur = _rules.current()
  if cur is None:
    return False
  mesh, table = cur
  return _rules.logical_to_spec(('vocab',), table, mesh, (V,))[0] is not None


def resolve_impl(impl: str, V: int = 0) -> str:
  """The concrete impl `auto` stands for here (pallas on GPU with whole rows per device)."""
  out = pallas_common.resolve_gpu_impl(impl, 'kernels.xent')
  return 'reference' if impl == 'auto' and _vocab_sharded(V) else out


def nll_and_grad(logits_BCV: jax.Array, targets_BC: jax.Array, weight_BC: jax.Array, *,
                 impl: str = 'auto', interpret=None):
  """(sum_t weight_t * (logsumexp(logits_t) - logits_t[target_t]) fp32, weight * (softmax -
  onehot) in the logits' dtype). Targets in [0, V); weight 0 marks padding."""
  if logits_BCV.ndim != 3 or targets_BC.shape != logits_BCV.shape[:2] or \
      weight_BC.shape != targets_BC.shape:
    raise ValueError(f'xent: logits {logits_BCV.shape}, targets {targets_BC.shape} and weights '
                     f'{weight_BC.shape} must be [B,C,V], [B,C], [B,C]')
  if resolve_impl(impl, logits_BCV.shape[-1]) == 'reference':
    return reference.nll_and_grad(logits_BCV, targets_BC, weight_BC)
  if pallas_common.target_platform() == 'tpu':
    raise NotImplementedError("xent: no TPU Pallas kernel; use config.kernels.xent='reference' "
                              "(or 'auto')")
  from v4jax.kernels.xent import gpu
  fn = lambda l, t, w: gpu.lse_target_grad(l, t, w, interpret=interpret)
  row = ('batch', None)
  lse_BC, tgt_BC, d_BCV = pallas_common.per_device(fn, (row + (None,), row, row),
                                                   (row, row, row + (None,)))(
      logits_BCV, targets_BC.astype(jnp.int32), weight_BC.astype(jnp.float32))
  return jnp.sum((lse_BC - tgt_BC) * weight_BC), d_BCV
