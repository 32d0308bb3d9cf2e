"""Version and backend shims: the few JAX APIs that differ between jax 0.10 (CPU CI) and 0.11
(the GPU image), and the host-memory checks the Engram host tables need.

- `on_host(f)`: run `f` as XLA host compute. jax 0.10 has `compute_on2(f, compute_type=,
  out_memory_spaces=)` (its `compute_on` is a context manager); jax 0.11 has only
  `compute_on(f, compute_type=, out_memory_spaces=)`.
- `require_memory_kind(device, kind)`: a clear error, naming the 'device' fallback, where a backend
  has no such memory (TPU/GPU builds differ: the H200 has no `unpinned_host`).
- `host_view(arr)`: a writable NumPy view of a single-device host-memory jax.Array, so the host can
  update rows in place (XLA's donated host scatter rewrites the whole table, FACTS.md).
- `set_scan_outputs(mode)`: how `lax.scan` creates its stacked outputs when lowered ('zeros',
  jax's own broadcast of zeros, or 'empty', `lax.empty`'s uninitialised buffer on GPU and TPU).
"""
from __future__ import annotations

import ctypes

import jax
import numpy as np
from jax.experimental import compute_on as _compute_on

__all__ = ['HOST', 'DEVICE', 'HostMemoryError', 'on_host', 'require_memory_kind', 'host_view',
           'set_scan_outputs', 'SCAN_OUTPUTS']

HOST, DEVICE = jax.memory.Space.Host, jax.memory.Space.Device
_FALLBACK = "set config.engram.table_memory='device' to keep the Engram tables in device memory"


class HostMemoryError(RuntimeError):
  """This backend lacks a piece the host-memory Engram tables need."""


def on_host(f, out_memory_spaces=HOST):
  """`f` as XLA host compute ('device_host'), portable across jax 0.10 and 0.11."""
  fn = getattr(_compute_on, 'compute_on2', None) or _compute_on.compute_on
  return fn(f, compute_type='device_host', out_memory_spaces=out_memory_spaces)


def require_memory_kind(device, kind: str):
  """The Memory of `kind` on `device`, or HostMemoryError naming the device fallback."""
  kinds = [m.kind for m in device.addressable_memories()]
  if kind not in kinds:
    raise HostMemoryError(f'{device.platform} device {device.id} has no {kind!r} memory '
                          f'(it has {kinds}); {_FALLBACK}')
  return device.memory(kind)


def host_view(arr: jax.Array, check: bool = True) -> np.ndarray:
  """A zero-copy, writable NumPy view of a single-device `pinned_host` (or CPU) jax.Array.

  jax.Arrays are immutable to JAX: the caller owns the ordering (no XLA computation may read the
  array while the host writes it) and must not read it back through `np.asarray(arr)`, which caches
  a copy. With `check`, a probe written through the view is read back by XLA; a backend whose
  buffer pointer is not host addressable raises HostMemoryError.
  """
  if len(arr.addressable_shards) != 1 or not arr.is_fully_addressable:
    raise HostMemoryError(f'host_view needs a single-device array, got sharding {arr.sharding}')
  arr.block_until_ready()
  try:
    ptr = arr.addressable_shards[0].data.unsafe_buffer_pointer()
  except Exception as e:  # noqa: BLE001 - reported with the fallback
    raise HostMemoryError(f'cannot address the host buffer of a {arr.sharding.memory_kind} array '
                          f'on {arr.sharding} ({type(e).__name__}: {e}); {_FALLBACK}') from e
  dtype = np.dtype(arr.dtype)
  n = int(np.prod(arr.shape)) * dtype.itemsize
  view = np.frombuffer((ctypes.c_char * max(n, 1)).from_address(ptr), dtype=dtype,
                       count=int(np.prod(arr.shape))).reshape(arr.shape)
  if check:
    _check_view(arr, view)
  return view


def _check_view(arr: jax.Array, view: np.ndarray):
  """Writes a probe through the view and reads it back through XLA (then restores the value)."""
  if view.size == 0:
    return
  flat = view.reshape(-1)
  old = flat[0].copy()
  probe = np.array(-1234.5, dtype=view.dtype) if view.dtype.kind == 'f' else old + 1
  flat[0] = probe
  dev = next(iter(arr.devices()))
  try:
    corner = lambda t: jax.lax.slice(t, (0,) * t.ndim, (1,) * t.ndim)
    first = jax.jit(lambda a: jax.device_put(on_host(corner)(a), DEVICE))(arr)
    seen = np.asarray(jax.device_get(first)).reshape(-1)[0]
  except Exception as e:  # noqa: BLE001
    flat[0] = old
    raise HostMemoryError(f'cannot read a {arr.sharding.memory_kind} array back on {dev} '
                          f'({type(e).__name__}: {str(e).splitlines()[0]}); {_FALLBACK}') from e
  flat[0] = old
  if seen != probe:
    raise HostMemoryError(f'the buffer pointer of a {arr.sharding.memory_kind} array on {dev} is '
                          f'not a host address (wrote {probe}, XLA read {seen}); {_FALLBACK}')


# ---- scan outputs ------------------------------------------------------------------------------
# jax 0.10-0.11 lower a scan's stacked outputs ([L, ...] per scanned-out value: the layer scans'
# saved activations and stacked weight gradients) as a broadcast of zeros that the loop then
# overwrites slice by slice (`_empty_array` in jax/_src/lax/control_flow/loops.py, with a TODO to
# use `lax.empty`). At bench_h200 those fills write ~20 GB per micro-batch (docs/performance.md,
# open item 9). 'empty' swaps in `lax.empty`, which XLA:GPU and TPU lower to an uninitialised
# `AllocateBuffer` (other backends still fill zeros). Every element is written by the loop before
# it is read, so results do not change. Private API: it is patched only when asked for, and a
# jax without the function fails with the config field to change.
SCAN_OUTPUTS = ('zeros', 'empty')
try:
  from jax._src.lax.control_flow import loops as _loops
  _ZEROS_INIT = _loops._empty_array
except (ImportError, AttributeError):
  _loops = _ZEROS_INIT = None


def _uninitialized_outputs(prefix, length_spec, aval):
  """`_empty_array` with lax.empty for device-memory outputs outside manual (shard_map) axes,
  typed with the stacked sharding jax's fill would have (the mesh axes of the model's sharding
  constraints ride on every activation's type); jax's zero fill for every other case."""
  mat = getattr(aval, 'mat', None)
  if aval.memory_space != DEVICE or (mat is not None and mat.varying):
    return _ZEROS_INIT(prefix, length_spec, aval)
  shape = (*prefix, *aval.shape)
  if aval.sharding.mesh.empty:
    return jax.lax.empty(shape, aval.dtype)
  spec = aval.sharding.spec
  sharding = aval.sharding.update(spec=spec.update(partitions=(*length_spec, *spec.partitions)))
  with jax.sharding.use_abstract_mesh(sharding.mesh):
    return jax.lax.empty(shape, aval.dtype, out_sharding=sharding)


def set_scan_outputs(mode: str):
  """Lower every later-traced `lax.scan` with its stacked outputs made by `mode` ('zeros' |
  'empty'; config.train.scan_outputs). Process-wide; 'zeros' restores jax's own. A change of
  mode clears jax's caches."""
  if mode not in SCAN_OUTPUTS:
    raise ValueError(f'config.train.scan_outputs={mode!r} is not one of {SCAN_OUTPUTS}')
  if mode == 'zeros' and _loops is None:
    return
  if _ZEROS_INIT is None or not hasattr(jax.lax, 'empty'):
    raise NotImplementedError(f"config.train.scan_outputs='empty' needs jax's private "
                              f"lax.control_flow.loops._empty_array and lax.empty, which jax "
                              f"{jax.__version__} lacks; set config.train.scan_outputs='zeros'")
  init = _uninitialized_outputs if mode == 'empty' else _ZEROS_INIT
  if _loops._empty_array is not init:
    _loops._empty_array = init
    jax.clear_caches()     # lowerings of scans made in the other mode are cached
