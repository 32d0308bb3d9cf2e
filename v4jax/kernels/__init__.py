"""Kernel seams, one package per op (reference | pallas | library), chosen by backend and config."""
from __future__ import annotations

import importlib

# The Pallas kernel modules. The seams import their GPU and TPU modules together, whatever the
# platform (each imports jax's Pallas backend for it), so all of them are preloaded.
_PALLAS_MODULES = ('attention.gpu', 'attention.tpu', 'hc_mix.gpu', 'indexer.gpu', 'indexer.tpu',
                   'sinkhorn.gpu', 'sparse_attention.gpu', 'sparse_attention.tpu', 'xent.gpu')


def preload() -> None:
  """Imports the kernel modules that the seams import lazily (all Pallas kernel modules; on GPU
  jax's cuDNN attention and, on Hopper, Mosaic-GPU modules; on TPU megablox), and the jax modules
  behind them, before a train step is first traced.

  Why: a jitted function's cache key includes the trace context, whose length grows when a jax
  module that defines a trace-context option is imported. The seams import their kernels lazily,
  i.e. during the step's first trace; the key stored for that trace then no longer matches the
  next call's, and the whole step is traced and compiled a second time. Seen on the H200 with
  jax 0.11.2: the DSA seams imported `jax.experimental.pallas.tpu` (next to the GPU kernels)
  during the first step, the context went from 50 to 51 values, and step 1 compiled again
  (bench_engram's host phase: 47.8 s). Importing first keeps one key.
  """
  import jax.numpy as jnp
  from v4jax.kernels.grouped_matmul import megablox, resolve_impl
  from v4jax.kernels.pallas_common import target_platform
  platform = target_platform()
  for name in _PALLAS_MODULES:
    importlib.import_module(f'{__name__}.{name}')
  if platform == 'gpu':
    from v4jax.kernels.attention import library
    try:
      library.cudnn_module()
    except ImportError:   # the cuDNN seam says so if the model uses it
      pass
    if resolve_impl('auto', jnp.bfloat16) == 'mgpu':
      from v4jax.kernels.grouped_matmul import mgpu
      mgpu.kernel_modules()
  elif platform == 'tpu':
    megablox.kernel_module()
