"""Small helpers shared by the Pallas kernels (GPU Triton-style and TPU Mosaic).

Every kernel builds its `pl.pallas_call` inside the op function, so the interpret mode is read at
call time: on a CPU backend GPU-flavoured kernels run under `interpret=True` and TPU kernels under
`pltpu.InterpretParams()` (what `pltpu.force_tpu_interpret_mode()` also switches on).

Pallas calls cannot be partitioned by XLA, so the dispatchers run them per device with
`per_device` (a shard_map over the active `parallel.rules` mesh, specs from logical names).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.parallel import rules as _rules

NEG_INF = float('-inf')


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def target_platform() -> str:
  """The platform code is compiled for: V4JAX_TARGET_PLATFORM (AOT for TPU on a CPU host) or
  the default backend."""
  return os.environ.get('V4JAX_TARGET_PLATFORM') or jax.default_backend()


HOPPER = ('H100', 'H200', 'H800', 'GH200')   # device kinds with WGMMA (Mosaic-GPU kernels)


def is_hopper() -> bool:
  """Whether code is compiled for a Hopper GPU (what the Mosaic-GPU kernels need)."""
  return target_platform() == 'gpu' and any(h in jax.devices()[0].device_kind for h in HOPPER)


def use_pallas(impl: str) -> bool:
  """config.kernels.impl -> whether the Pallas kernels run: 'auto' picks them on GPU and TPU."""
  return impl == 'pallas' or (impl == 'auto' and target_platform() in ('gpu', 'tpu'))


GPU_IMPLS = ('auto', 'reference', 'pallas')


def resolve_gpu_impl(impl: str, field: str) -> str:
  """A GPU-only kernel seam's impl (`config.<field>`, one of GPU_IMPLS): 'auto' is 'pallas' when
  compiling for a GPU, 'reference' elsewhere."""
  if impl not in GPU_IMPLS:
    raise ValueError(f'config.{field}={impl!r} is not one of {GPU_IMPLS}')
  if impl == 'auto':
    return 'pallas' if target_platform() == 'gpu' else 'reference'
  return impl


def gpu_interpret(interpret):
  """None -> interpret only when compiling for CPU (the Triton lowering needs a GPU)."""
  if interpret is None:
    return target_platform() == 'cpu'
  return interpret


def tpu_interpret(interpret):
  """None -> TPU interpret mode (simulated VMEM/SMEM/DMA) when compiling for CPU."""
  if interpret is None and target_platform() == 'cpu':
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()
  return bool(interpret) if interpret in (None, False, True) else interpret


def whole_arrays() -> bool:
  """True when no multi-device `rules.activate` mesh is current: a kernel sees whole arrays."""
  cur = _rules.current()
  return cur is None or cur[0].size == 1


def per_device(fn: Callable, in_axes: Sequence, out_axes: Sequence) -> Callable:
  """fn run on each device's shard (shard_map) when a multi-device `rules.activate` mesh is
  current; fn itself otherwise. in_axes / out_axes: logical names per array (None = whole dim).
  """
  if whole_arrays():
    return fn
  mesh, table = _rules.current()

  def wrapped(*args):
    spec = lambda axes, shape: _rules.logical_to_spec(axes, table, mesh, shape)
    in_specs = tuple(None if a is None else spec(ax, a.shape) for ax, a in zip(in_axes, args))
    outs = jax.eval_shape(fn, *args)
    flat = outs if isinstance(outs, (tuple, list)) else (outs,)
    out_specs = tuple(spec(ax, o.shape) for ax, o in zip(out_axes, flat))
    out_specs = out_specs if isinstance(outs, (tuple, list)) else out_specs[0]
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)
  return wrapped


def live_tile(compute: Callable[[], None], o_ref, live) -> None:
  """A Pallas kernel's [rows, keys] score tile: compute() writes it where `live` (a traced bool;
  None: every tile is), NEG_INF fills it where not (a tile wholly past the causal diagonal)."""
  from jax.experimental import pallas as pl
  if live is None:
    compute()
    return
  pl.when(live)(compute)

  @pl.when(jnp.logical_not(live))
  def _():
    o_ref[...] = jnp.full(o_ref.shape, NEG_INF, jnp.float32)


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads axis `axis` of x at the end up to `size`."""
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads, constant_values=value)


def sparse_attention_op(forward: Callable, backward: Callable) -> Callable:
  """A custom-VJP op (q, kv, idx, cfg) -> (o, lse) from a forward and a backward kernel driver;
  `backward(q, kv, idx, o, lse, do, dlse, cfg) -> (dq, dkv)`; the int indices get no gradient."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def op(q, kv, idx, cfg):
    return forward(q, kv, idx, cfg)

  def fwd(q, kv, idx, cfg):
    o, lse = forward(q, kv, idx, cfg)
    return (o, lse), (q, kv, idx, o, lse)

  def bwd(cfg, res, cts):
    q, kv, idx, o, lse = res
    do, dlse = cts
    dq, dkv = backward(q, kv, idx, o, lse, do, dlse.astype(jnp.float32), cfg)
    return dq, dkv, np.zeros(idx.shape, jax.dtypes.float0)

  op.defvjp(fwd, bwd)
  return op


def with_reference_vjp(kernel: Callable, reference_fn: Callable) -> Callable:
  """`kernel(q, k, w, opts)` in the forward, the VJP of `reference_fn(q, k, w)` in the backward
  (for kernels whose backward is the jnp oracle's)."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def op(q, k, w, opts):
    return kernel(q, k, w, opts)

  op.defvjp(lambda q, k, w, opts: (kernel(q, k, w, opts), (q, k, w)),
            lambda opts, res, g: jax.vjp(reference_fn, *res)[1](g))
  return op


def given_value_vjp(backward: Callable) -> Callable:
  """An op (q, k, w, idx, value, opts) -> value whose gradient in q, k, w is
  `backward(opts, (q, k, w, idx), g)` (a kernel's own backward) and none flows into `value`:
  for a forward whose result another kernel already computed (the indexer's KL student, given the
  top-k kernel's scores at idx)."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def op(q, k, w, idx, value, opts):
    return value

  op.defvjp(lambda q, k, w, idx, value, opts: (value, (q, k, w, idx)),
            lambda opts, res, g: backward(opts, res, g) + (None,))
  return op
