"""mHC stream-mixing seam (SPEC §5): the coefficients' normed mix, read-in and write-back, and
the normed mix with the read-in as one op (mix_read_in, what the model calls).

Dims: B batch, T positions, N mHC streams, D model dim, C coefficient slots ((2+N)N at a site,
N at the HyperHead).

`impl` takes `config.kernels.hc_mix`:
  reference -> reference.py: custom VJPs in jnp (every backend; on GPU XLA runs each pass as
               several memory-bound kernels: fp32 converts, reductions, cotangent adds);
  pallas    -> gpu.py: one Triton kernel per pass and direction over blocks of tokens, each
               reading and writing the streams once (interpret mode on CPU; no TPU kernel);
  auto      -> pallas on GPU, reference elsewhere.
The normed mix takes its kernel for bf16 streams only (fp32 streams stay on the reference, whose
fp32 GEMMs the kernel's bf16 splits would not reproduce exactly). Compiled on the H200 the
kernels meet the fp32 oracle (tests/kernels/test_hc_mix.py, seventeenth session), and the normed
mix's kernel took a further 0.7% off bench_h200's step after the read-in and write-back kernels
(docs/performance.md row 63).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels import pallas_common
from v4jax.kernels.hc_mix import reference
from v4jax.kernels.hc_mix.reference import pre_gate, read_in_reference, write_back_reference

__all__ = ['IMPLS', 'resolve_impl', 'normed_mix', 'read_in', 'write_back', 'mix_read_in',
           'pre_gate', 'read_in_reference', 'write_back_reference']

IMPLS = pallas_common.GPU_IMPLS


def resolve_impl(impl: str) -> str:
  """The concrete impl `auto` stands for on this platform (pallas on GPU, else reference)."""
  return pallas_common.resolve_gpu_impl(impl, 'kernels.hc_mix')


def _pallas(impl: str) -> bool:
  if resolve_impl(impl) == 'reference':
    return False
  if pallas_common.target_platform() == 'tpu':
    raise NotImplementedError("hc_mix: no TPU Pallas kernel; use config.kernels.hc_mix="
                              "'reference' (or 'auto')")
  return True


def normed_mix(X_BTND: jax.Array, fn_KC: jax.Array, eps: float, mode: str, *,
               impl: str = 'auto') -> jax.Array:
  """mu [B,T,C] = (x . fn) / sqrt(mean(x^2) + eps) over each token's flattened ND features, fp32
  (SPEC §5 step 1); fn [N*D, C] fp32. `mode`: the reference's layers.dot_f32 mode. The kernel
  for bf16 streams only (module docstring)."""
  if _pallas(impl) and X_BTND.dtype == jnp.bfloat16:
    from v4jax.kernels.hc_mix import gpu
    return gpu.normed_mix(X_BTND, fn_KC, eps)
  return reference.normed_mix(X_BTND, fn_KC, eps, mode)


def mix_read_in(X_BTND: jax.Array, fn_KC: jax.Array, scale: jax.Array, base_N: jax.Array,
                eps: float, pre_eps: float, mode: str, *, pass_streams: bool = False,
                impl: str = 'auto'):
  """(mu [B,T,C], u [B,T,D]) = the normed mix and the read-in with weights pre_gate(mu, scale,
  base, pre_eps); with `pass_streams`, (mu, u, X): the site's write-back takes that X, so the
  kernel adds the write-back's stream cotangent in its own dX pass (gpu.py). The kernel for bf16
  streams only, as normed_mix's."""
  if _pallas(impl) and X_BTND.dtype == jnp.bfloat16:
    from v4jax.kernels.hc_mix import gpu
    return gpu.mix_read_in(X_BTND, fn_KC, scale, base_N, eps, pre_eps,
                           pass_streams=pass_streams)
  out = reference.mix_read_in(X_BTND, fn_KC, scale, base_N, eps, pre_eps, mode)
  return (*out, X_BTND) if pass_streams else out


def read_in(X_BTND: jax.Array, pre_BTN: jax.Array, *, impl: str = 'auto') -> jax.Array:
  """u [B,T,D] = sum_m pre_m X_m in X's dtype; pre [B,T,N] fp32."""
  if _pallas(impl):
    from v4jax.kernels.hc_mix import gpu
    return gpu.read_in(X_BTND, pre_BTN)
  return reference.read_in(X_BTND, pre_BTN)


def write_back(X_BTND: jax.Array, y_BTD: jax.Array, post_BTN: jax.Array, comb_BTNN: jax.Array, *,
               impl: str = 'auto') -> jax.Array:
  """X'_k = post_k y + sum_j comb[j,k] X_j [B,T,N,D] in X's dtype; post, comb fp32."""
  if _pallas(impl):
    from v4jax.kernels.hc_mix import gpu
    return gpu.write_back(X_BTND, y_BTD, post_BTN, comb_BTNN)
  return reference.write_back(X_BTND, y_BTD, post_BTN, comb_BTNN)
