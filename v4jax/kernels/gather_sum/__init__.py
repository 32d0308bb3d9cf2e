"""Row gather-sum seam: out[n] = sum_j x[idx[n, j]] with fp32 accumulation.

Dims: M source rows, D row width, N output rows, K rows summed per output row.

The MoE sums each token's K expert-sorted slot rows twice per layer: its forward combine
(parallel/expert.py `slot_sum`) and the dispatch gather's backward (`permuted_rows`). `impl`
takes `config.kernels.gather_sum`:
  reference -> reference.py in jnp (XLA fuses the gather, the fp32 widening and the sum into one
               pass: 96-97% of a copy's rate on the H200 at bench_h200's shapes);
  pallas    -> gpu.py: one Triton kernel reading each gathered row once and writing the sum once
               (interpret mode on CPU; no TPU kernel). On the H200 it ran 0.86x (combine) and
               0.98x (dispatch) XLA's pass alone and added 30 ms to bench_h200's step
               (docs/performance.md row 83), so the config default is `reference`;
  auto      -> pallas on GPU, reference elsewhere.
The arrays must be whole on the device that runs the kernel (the MoE calls it per device: in
`shard_map` under expert parallelism, or on a one-device mesh).
"""
from __future__ import annotations

import jax

from v4jax.kernels import pallas_common
from v4jax.kernels.gather_sum import reference

__all__ = ['IMPLS', 'resolve_impl', 'gather_sum']

IMPLS = pallas_common.GPU_IMPLS


def resolve_impl(impl: str) -> str:
  """The concrete impl `auto` stands for here."""
  return pallas_common.resolve_gpu_impl(impl, 'kernels.gather_sum')


def gather_sum(x_MD: jax.Array, idx_NK: jax.Array, out_dtype, *, impl: str = 'auto',
               interpret=None) -> jax.Array:
  """[N,D] in out_dtype: each row the fp32 sum of the K rows of x that idx names."""
  if x_MD.ndim != 2 or idx_NK.ndim != 2:
    raise ValueError(f'gather_sum: x {x_MD.shape} and idx {idx_NK.shape} must be [M,D] and [N,K]')
  if resolve_impl(impl) == 'reference':
    return reference.gather_sum(x_MD, idx_NK, out_dtype)
  if pallas_common.target_platform() == 'tpu':
    raise NotImplementedError("gather_sum: no TPU Pallas kernel; use "
                              "config.kernels.gather_sum='reference' (or 'auto')")
  from v4jax.kernels.gather_sum import gpu
  return gpu.gather_sum(x_MD, idx_NK, out_dtype, interpret=interpret)
