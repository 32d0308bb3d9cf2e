"""Engram tables and their Adam moments in host memory (`engram.table_memory='host'`, SPEC §6.4).

Storage. All Engram layers share one row space [sum_l R_l, 3, H] fp32 (layer l from row base_l,
SPEC §6.2; row r holds theta_r, m_r, v_r, so one random access reads or writes a row and both
its moments), held as jax.Arrays of memory kind `pinned_host` on the first local device, each a
chunk of at most `engram.host_chunk_mib` (2 GiB) of rows: the GPU client's pinned pool grows in
power-of-two regions and refused one 48 GiB buffer; chunks fill any region and are reused by
later tables. The tables are not part of the jitted train state; checkpoints carry each layer's
[R_l, 3, H] as their own Orbax item (mesh and chunk independent). `memory_kind='device'` keeps
the same rows in one HBM array with the same sparse machinery: the benchmark's baseline.

Per step s (host work runs on one job thread, in submission order, item 1 (unique rows) on a
second thread; NumPy, which releases the GIL, is spread over a thread pool):
  1. the unique rows U_s of the global batch and each position's index into them;
  2. gather of U_s's rows from the tables into pinned staging buffers, theta [U,H] and the Adam
     moments [U,2,H] apart (zero-copy views of the chunks, `compat.host_view`; all layers and
     chunks in one pass over the thread pool; or XLA host compute with `engram.host_gather='xla'`,
     then the tables are one chunk). One device with the NumPy gather: the step takes the staging
     arrays as inputs and copies them to the device inside its own program where it first uses
     them: theta at the start (XLA overlaps the copy with the layers before the first Engram
     layer), the moments only for the optimizer at the end (`engram.late_moments`), so 2/3 of
     the rows' bytes are neither copied ahead of the first layers nor live through the backward;
     two staging sets so the next gather never writes rows a running step still reads. The
     parts in `engram.rows_ahead` are instead DMA'd to the device by the job thread as soon as
     they are gathered, while the previous step runs (for an Engram layer that comes first,
     whose copy nothing in the step would hide). Several devices: one DMA per layer and part
     to the device before the step;
  3. the jitted train step patches in the rows step s-1 updated (`rows.patch_rows`), runs the model
     on theta, sums duplicate references deterministically, clips the row gradients with the main
     group and applies row-wise lazy Adam on the device (`rows.lazy_adam_rows`) to theta and the
     moments, patched the same way;
  4. write-back: the new rows come back by DMA and are scattered into the table in place. Only the
     U_s rows are read or written: nothing scales with the table size.
Step s+1 takes step s's new rows (for the patch) as a donated input that XLA reuses for its own
new rows: one [U_max, 3, H] buffer per layer instead of two live through the step. So the
write-back's DMA of step s's rows (or, for HBM tables, its device scatter) is queued on the main
thread right after step s is dispatched, before step s+1 can donate them.
Overlap: while step s runs on the device, the job thread gathers for step s+1 (the batch comes from
`Lookahead.peek`), then writes step s back once its rows exist. Rows of U_s that step s+1 uses were
read before that write-back, so the device patches them from step s's output: no step ever sees a
stale row (SPEC §6.4 exactness).

Several processes (docs/engram_host_tables.md): process p holds only its contiguous row range of
every layer; the processes all-gather their batches' unique row ids through the jax.distributed
key-value store (host to host, on the job thread); each gathers its segment of the sorted global
rows into its slot of a parts array over the batch shards, which the step assembles bit-exactly
(`rows.assemble_rows`); each writes back its own segment; checkpoints split each layer by row
range (restorable on any process count).
"""
from __future__ import annotations

import collections
import functools
import itertools
import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from v4jax import compat
from v4jax.config import ConfigError, host_tables
from v4jax.data.engram_hash import make_hash_spec
from v4jax.memory import rows as rows_lib

__all__ = ['HostTables', 'Lookahead', 'abstract_step_inputs', 'parts_layout', 'pinned_bytes',
           'pinned_pool_gib', 'row_dims']

_BLOCK = 4096            # init: rows per PRNG block (values do not depend on the chunking)
_CHUNK_BLOCKS = 256      # init: blocks generated per device call
_MIN_ROWS_PER_TASK = 2048
_MOMENT_SLOTS = np.array([1, 2], np.int64)   # a row's Adam m and v after its theta (slot 0)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _normal_blocks(key, first, n_blocks: int, width: int, std: float):
  """std * N(0,1) rows for PRNG blocks first..first+n_blocks-1, [n_blocks * _BLOCK, width]."""
  ids = first + jnp.arange(n_blocks, dtype=jnp.uint32)
  vals = jax.vmap(lambda b: jax.random.normal(jax.random.fold_in(key, b), (_BLOCK, width)))(ids)
  return (std * vals).reshape(n_blocks * _BLOCK, width)


def _zeros(shape, sharding) -> jax.Array:
  """fp32 zeros placed by `sharding`, made by XLA. A device_put of np.zeros first faults in every
  page of the NumPy copy: 2.7 s against 0.8 s per 2 GiB of pinned_host on the CPU
  (docs/benchmarks.md). Host memory kinds are moved to the host space inside the program, so the
  array types as a host array (`float32<host>`) like a device_put one; XLA's host gather needs
  that."""
  host = sharding.memory_kind in ('pinned_host', 'unpinned_host')

  def make():
    z = jnp.zeros(tuple(shape), jnp.float32)
    return jax.device_put(z, compat.HOST) if host else z
  return jax.jit(make, out_shardings=sharding)()


@jax.jit
def _xla_host_gather(slots, idx):
  """(theta [U,H], moments [U,2,H]) of the rows idx, gathered on the host, on the device."""
  rows = compat.on_host(lambda t, i: t.at[i].get(mode='promise_in_bounds'))(slots, idx)
  rows = jax.device_put(rows, compat.DEVICE)
  return rows[:, 0], rows[:, 1:]


@jax.jit
def _device_gather(slots, idx):
  rows = jnp.take(slots, idx, axis=0, mode='clip')
  return rows[:, 0], rows[:, 1:]


@functools.partial(jax.jit, donate_argnums=0)
def _device_scatter(slots, idx, new):
  return slots.at[idx].set(new, mode='drop')


@functools.partial(jax.jit, donate_argnums=0)
def _device_set_rows(slots, r0, vals):
  return jax.lax.dynamic_update_slice(slots, vals, (r0, 0, 0))


def _tasks(n: int, workers: int) -> list[slice]:
  k = max(1, min(workers, n // _MIN_ROWS_PER_TASK))
  b = np.linspace(0, n, k + 1).astype(np.int64)
  return [slice(int(b[i]), int(b[i + 1])) for i in range(k) if b[i + 1] > b[i]]


def _row_void(a: np.ndarray) -> np.ndarray:
  """[N, ...] contiguous -> [N] of opaque rows (NumPy copies whole rows faster)."""
  n = a.shape[0]
  return a.reshape(n, -1).view(np.dtype((np.void, a[0].nbytes))).reshape(n)


def _parts(place: dict) -> tuple:
  """(place['theta'], place['moments']): the order of a gathered row pair."""
  return place['theta'], place['moments']


def _unzip(pairs: dict) -> tuple[dict, dict]:
  """{l: (theta, moments)} -> ({l: theta}, {l: moments})."""
  return {l: p[0] for l, p in pairs.items()}, {l: p[1] for l, p in pairs.items()}


def _layout(rows: dict[int, int]) -> tuple[dict[int, int], int]:
  """Each layer's first row in the one row space of all layers (SPEC §6.2), and the total."""
  base, total = {}, 0
  for l, r in rows.items():
    base[l], total = total, total + r
  if total >= 2**31:
    raise ValueError(f'Engram tables have {total} rows in all; row indices must fit in int32')
  return base, total


class _HostStore:
  """All layers' tables in one row space (layer l from row base_l), held as `pinned_host` chunks
  of at most `chunk_rows` rows and read and written through zero-copy NumPy views.

  Chunks, not one buffer: the GPU client's pinned pool is a BFC allocator that grows by regions
  of min(next power of two, what its cap leaves) and backs off by 10% when the OS refuses one. A
  single 96 GiB buffer needs one 96 GiB pinned region; 2 GiB chunks fill regions of 2, 4, 8, ...
  GiB and the last one clipped to the cap, so the tables fit whenever the cap and the RAM hold
  them. Sorted row ids map to chunks by one searchsorted; each thread task copies rows of one chunk.
  """

  def __init__(self, device, rows: dict[int, int], width: int, u_max: int, gather: str, pool,
               chunk_rows: int):
    compat.require_memory_kind(device, 'pinned_host')
    self.sh = SingleDeviceSharding(device, memory_kind='pinned_host')
    self.device, self.gather_mode, self.pool, self.rows = device, gather, pool, rows
    self.u_max, self.width = u_max, width
    self.base, total = _layout(rows)
    self.chunk = max(1, total if gather == 'xla' else min(chunk_rows, total))  # XLA reads one array
    self.chunks, self.views, self.void, self.slot_void = [], [], [], []
    for r0 in range(0, total, self.chunk):      # tables first: later small buffers fill the gaps
      a = _zeros((min(self.chunk, total - r0), 3, width), self.sh)
      v = compat.host_view(a, check=not self.chunks)   # one probe per store proves the pointer
      self.chunks.append(a)
      self.views.append(v)
      self.void.append(_row_void(v))
      self.slot_void.append(_row_void(v.reshape(-1, width)))   # [3N]: row r's slot j at 3r+j
    # Two staging sets, used in turn, each per layer theta [U,H] and the moments [U,2,H] apart
    # (the step copies them to the device at different times). readers[k]: arrays whose
    # readiness proves that the step which took set k as input has read it (set by the caller,
    # `mark_read`).
    self.stages = [{l: (_zeros((u_max, width), self.sh), _zeros((u_max, 2, width), self.sh))
                    for l in rows} for _ in range(2)]
    self.stage_voids = [{l: tuple(_row_void(compat.host_view(a, check=False).reshape(-1, width))
                               for a in pair) for l, pair in st.items()} for st in self.stages]
    self.readers: list = [None, None]
    self.turn = 0                          # the set the next gather fills

  @property
  def slots(self):
    return self.chunks[0]

  def _pieces(self, g0: int, g1: int):
    """(chunk, first row in it, last row + 1, offset from g0) covering global rows [g0, g1)."""
    g = g0
    while g < g1:
      c, a = divmod(g, self.chunk)
      b = min(self.chunk, a + g1 - g)
      yield c, a, b, g - g0
      g += b - a

  def _row_tasks(self, sel: dict) -> list:
    """Thread tasks (layer, chunk, row-space ids, offset, lo, hi) over every layer's selected rows
    (sel[l] = (sorted ids in the layer's rows here, their first position in the staging rows))."""
    workers = self.pool._max_workers  # pylint: disable=protected-access
    total = max(sum(len(ids) for ids, _ in sel.values()), 1)
    out = []
    for l, (ids, off) in sel.items():
      k = len(ids)
      if not k:
        continue
      g = ids.astype(np.intp) + self.base[l]
      cuts = [0] + list(np.searchsorted(g, np.arange(g[0] // self.chunk + 1,
                                                     g[-1] // self.chunk + 1) * self.chunk)) + [k]
      for a, b in zip(cuts[:-1], cuts[1:]):
        if b <= a:
          continue
        c = int(g[a]) // self.chunk
        parts = max(1, min(round(2 * workers * (b - a) / total), (b - a) // _MIN_ROWS_PER_TASK))
        e = np.linspace(a, b, parts + 1).astype(np.int64)
        out += [(l, c, g, off, int(e[i]), int(e[i + 1])) for i in range(parts) if e[i + 1] > e[i]]
    return out

  def _run(self, fn, tasks):
    list(self.pool.map(lambda t: fn(*t), tasks))

  @property
  def last_set(self) -> int:
    """The staging set the last gather filled."""
    return self.turn ^ 1

  def mark_read(self, k: int, readers):
    """Set k may be overwritten once `readers` (outputs of the step that took it) are ready."""
    self.readers[k] = readers

  def gather(self, sel: dict, place: dict, stats) -> tuple[dict, dict]:
    """({layer: theta [u_max, H]}, {layer: moments [u_max, 2, H]}): the selected rows at their
    positions, the other positions stale filler. place[part] moves that part to the step's
    devices; for a part whose place is None the pinned staging arrays themselves are returned
    (set `last_set`), for a step that copies them to the device itself and is then registered
    with `mark_read`."""
    t0 = time.perf_counter()
    if self.gather_mode == 'xla':     # one process: sel[l] = (all U rows, 0); both parts placed
      out = {}
      for l, (ids, _) in sel.items():
        idx = np.full((self.u_max,), ids[-1] if len(ids) else 0, np.int32)
        idx[:len(ids)] = ids
        idx = jax.device_put(idx + self.base[l], self.sh)
        out[l] = tuple(f(a) for f, a in zip(_parts(place), _xla_host_gather(self.slots, idx)))
      jax.block_until_ready(out)
      stats['gather_ms'].append(1e3 * (time.perf_counter() - t0))
      return _unzip(out)

    k, self.turn = self.turn, self.turn ^ 1
    if self.readers[k] is not None:        # the step that read this set two gathers ago
      jax.block_until_ready(self.readers[k])
      self.readers[k] = None
    stage, stage_void = self.stages[k], self.stage_voids[k]

    def copy(l, c, g, off, lo, hi):
      # Contiguous sources and outputs only (np.take copies a strided source whole): the chunk
      # as [3N] slots, theta at 3r, the moments at 3r+1, 3r+2 (into [2U] moment slots).
      first = 3 * (g[lo:hi].astype(np.int64) - c * self.chunk)
      theta, moments = stage_void[l]
      np.take(self.slot_void[c], first, out=theta[off + lo:off + hi], mode='clip')
      np.take(self.slot_void[c], (first[:, None] + _MOMENT_SLOTS).reshape(-1),
              out=moments[2 * (off + lo):2 * (off + hi)], mode='clip')
    self._run(copy, self._row_tasks(sel))
    t1 = time.perf_counter()
    stats['gather_ms'].append(1e3 * (t1 - t0))
    out = {l: tuple(a if f is None else f(a) for f, a in zip(_parts(place), pair))
           for l, pair in stage.items()}
    if all(f is not None for f in _parts(place)):
      # Nothing staged for the step: the set is free again once the DMAs are done. (With a
      # part staged, the step that reads it also waited for these DMAs: `mark_read` covers them.)
      jax.block_until_ready(out)
      stats['h2d_ms'].append(1e3 * (time.perf_counter() - t1))
    return _unzip(out)

  def fetch(self, sel: dict, new_dev: dict, stats) -> dict:
    """Queues the DMA of this device's new rows into pinned host arrays (returned; they are
    ready once the step that made the rows has finished)."""
    del sel, stats
    return {l: jax.device_put(next(s.data for s in a.addressable_shards if s.device ==
                                   self.device), self.sh) for l, a in new_dev.items()}

  def write(self, sel: dict, fetched: dict, stats):
    """Scatters each layer's selected rows of `fetch`'s host rows into the tables, in place."""
    t0 = time.perf_counter()
    host = jax.block_until_ready(fetched)
    new = {l: _row_void(compat.host_view(a, check=False)) for l, a in host.items()}
    t1 = time.perf_counter()

    def copy(l, c, g, off, lo, hi):
      self.void[c][g[lo:hi] - c * self.chunk] = new[l][off + lo:off + hi]
    self._run(copy, self._row_tasks(sel))
    stats['d2h_ms'].append(1e3 * (t1 - t0))
    stats['scatter_ms'].append(1e3 * (time.perf_counter() - t1))

  def set_theta(self, l, r0, vals):
    for c, a, b, o in self._pieces(self.base[l] + r0, self.base[l] + r0 + vals.shape[0]):
      self.views[c][a:b, 0] = vals[o:o + b - a]

  def load(self, l, arr):
    for c, a, b, o in self._pieces(self.base[l], self.base[l] + self.rows[l]):
      np.copyto(self.views[c][a:b], arr[o:o + b - a])

  def export(self, l) -> np.ndarray:
    """Layer l's [R, 3, H]: a zero-copy view if it lies in one chunk, else a copy."""
    parts = [self.views[c][a:b] for c, a, b, _ in
             self._pieces(self.base[l], self.base[l] + self.rows[l])]
    if not parts:                   # a process that owns no rows of layer l
      return np.zeros((0, 3, self.width), np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _DeviceStore:
  """The same tables in device memory (HBM), updated by a donated in-place scatter."""

  def __init__(self, device, rows: dict[int, int], width: int, u_max: int):
    self.device, self.sh = device, SingleDeviceSharding(device)
    self.base, self.total = _layout(rows)
    self.rows, self.u_max = rows, u_max
    self.slots = _zeros((self.total, 3, width), self.sh)
    # gather (job thread) and fetch (main thread) both dispatch on `slots`, which the scatter
    # donates: one at a time. Either order gives the same rows: a row both touch is one the
    # next step patches from this step's output anyway.
    self._lock = threading.Lock()

  def gather(self, sel: dict, place, stats) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    out = {}
    for l, (ids, off) in sel.items():
      idx = np.zeros((self.u_max,), np.int32)
      idx[off:off + len(ids)] = ids
      idx = jax.device_put(idx + self.base[l], self.sh)
      with self._lock:
        out[l] = tuple(f(a) for f, a in zip(_parts(place), _device_gather(self.slots, idx)))
    stats['gather_ms'].append(1e3 * (time.perf_counter() - t0))
    return _unzip(out)

  def fetch(self, sel: dict, new_dev: dict, stats):
    """Dispatches the in-place scatter of the step's new rows now (the next step donates them)."""
    t0 = time.perf_counter()
    for l, (ids, off) in sel.items():
      idx = np.full((self.u_max,), self.total, np.int32)        # self.total: dropped
      idx[off:off + len(ids)] = ids + self.base[l]
      shard = next(s.data for s in new_dev[l].addressable_shards if s.device == self.device)
      with self._lock:
        self.slots = _device_scatter(self.slots, jax.device_put(idx, self.sh), shard)
    stats['scatter_ms'].append(1e3 * (time.perf_counter() - t0))

  def write(self, sel: dict, fetched, stats):
    """Nothing left: `fetch` dispatched the scatter."""

  def set_theta(self, l, r0, vals):
    vals3 = jnp.pad(vals[:, None, :], ((0, 0), (0, 2), (0, 0)))    # m = v = 0 at init
    self.slots = _device_set_rows(self.slots, np.int32(self.base[l] + r0), vals3)

  def load(self, l, arr):
    self.slots = _device_set_rows(self.slots, np.int32(self.base[l]), jax.device_put(arr, self.sh))

  def export(self, l) -> np.ndarray:
    b = self.base[l]
    return np.asarray(jax.device_get(self.slots[b:b + self.rows[l]]))


class _RowExchange:
  """All-gather of bytes between the processes through the jax.distributed key-value store (the
  coordination service): host to host, so the job thread issues no device collective that could
  order differently against the train steps on different processes. Every process calls
  `all_gather` in the same sequence (all on its one job thread): call k posts key <k>/<process>
  and blocks on every other process's key <k>. Once a process has read all keys of call k, every
  process has posted k and so finished reading the keys of k-1: it deletes its own key k-1."""

  _instances = itertools.count()

  def __init__(self, timeout_s: float = 600.0):
    from jax._src import distributed    # the coordination client (jax 0.10 and 0.11 alike)
    self.client = getattr(distributed.global_state, 'client', None)
    if self.client is None or not hasattr(self.client, 'blocking_key_value_get_bytes'):
      raise RuntimeError('engram.table_memory=host with several processes needs '
                         'jax.distributed.initialize() (its key-value store exchanges row ids)')
    self.pid, self.nproc = jax.process_index(), jax.process_count()
    self.prefix = f'v4jax_engram_rows/{next(self._instances)}'
    self.timeout_ms, self.k = int(timeout_s * 1000), 0

  def all_gather(self, payload: bytes) -> list[bytes]:
    k, self.k = self.k, self.k + 1
    self.client.key_value_set_bytes(f'{self.prefix}/{k}/{self.pid}', payload)
    out = []
    for q in range(self.nproc):
      if q == self.pid:
        out.append(payload)
        continue
      try:
        out.append(self.client.blocking_key_value_get_bytes(f'{self.prefix}/{k}/{q}',
                                                            self.timeout_ms))
      except Exception as e:  # noqa: BLE001 - named with the peer
        raise RuntimeError(f'Engram row-id exchange {k}: process {q} sent nothing within '
                           f'{self.timeout_ms // 1000} s ({type(e).__name__}: {e})') from e
    if k:
      self.client.key_value_delete(f'{self.prefix}/{k - 1}/{self.pid}')
    return out


def _pack(arrays: list[np.ndarray]) -> bytes:
  lens = np.array([a.shape[0] for a in arrays], np.int64)
  return lens.tobytes() + b''.join(np.ascontiguousarray(a, np.int32).tobytes() for a in arrays)


def _unpack(b: bytes, n: int) -> list[np.ndarray]:
  lens = np.frombuffer(b, np.int64, n)
  flat = np.frombuffer(b, np.int32, offset=8 * n)
  return np.split(flat, np.cumsum(lens)[:-1])


def row_dims(cfg) -> tuple[int, int]:
  """(u_max, H): the step's bound on unique rows per layer (every slot of the global batch
  distinct) and the table row width d_mem / J."""
  g = cfg.engram
  heads = (g.max_ngram - 1) * g.heads_per_ngram
  return cfg.data.global_batch * cfg.data.seq_len * heads, g.d_mem // heads


def pinned_bytes(cfg, table_bytes: int | None = None) -> int:
  """Bytes of pinned host memory this config's host tables hold at once (0 without host
  tables): the tables and both moments (3 x table_bytes, by default from the hash spec's rows;
  fp32), and per Engram layer two staging sets and two sets of fetched new rows of
  [U_max, 3, H] fp32. All rows: with several processes, each of which holds its own row range,
  an upper bound (the pool only grows as far as a process allocates)."""
  if not host_tables(cfg):
    return 0
  u_max, width = row_dims(cfg)
  if table_bytes is None:
    table_bytes = sum(make_hash_spec(cfg).total_rows.values()) * width * 4
  return 3 * table_bytes + 4 * len(cfg.engram.layer_ids) * u_max * 3 * width * 4


def pinned_pool_gib(cfg, table_gib: float | None = None) -> int:
  """The GPU client's pinned pool cap this config needs (0 without host tables): `pinned_bytes`
  and the slack of the BFC pool's last region (6.5 GiB), in whole GiB. The client caps its pool
  at 64 GiB unless XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB says more (`cli.claim_gpu_memory` sets it
  from this)."""
  if not host_tables(cfg):
    return 0
  table_bytes = None if table_gib is None else int(table_gib * 2**30)
  return int(pinned_bytes(cfg, table_bytes) / 2**30 + 6.5) + 1


def parts_layout(cfg, mesh, u_max: int):
  """Several processes: the parts arrays the step assembles its rows from (one slot of U rows
  per batch shard, sharded like the batch over their first dim). (number of slots, sharding,
  {device: slot})."""
  from v4jax.parallel import rules as rules_lib
  spec = rules_lib.logical_to_spec(('batch',), rules_lib.RULES[cfg.mesh.rules])
  axes = spec[0] if isinstance(spec[0], tuple) else (() if spec[0] is None else (spec[0],))
  n_slots = int(np.prod([mesh.shape[a] for a in axes]))
  sharding = NamedSharding(mesh, P(spec[0]))
  slot_of = {d: i[0].start // u_max for d, i in sharding.devices_indices_map(
      (n_slots * u_max,)).items()}
  return n_slots, sharding, slot_of


def _part_shapes(u_max: int, width: int) -> dict:
  """Per-layer shapes of what the step takes: theta and its Adam moments apart."""
  return {'theta': (u_max, width), 'moments': (u_max, 2, width)}


def abstract_step_inputs(cfg, mesh) -> dict:
  """ShapeDtypeStructs of the host-table inputs `eng` of Trainer._step, as HostTables hands them
  over on the processes that `mesh` spans (ahead-of-time compiles: tools/aot_compile.py)."""
  u_max, width = row_dims(cfg)
  rep = NamedSharding(mesh, P())
  several = len({d.process_index for d in mesh.devices.flat}) > 1
  sds = jax.ShapeDtypeStruct
  eng = {'src': {}, 'prev': {}, 'theta': {}, 'moments': {}, **({'bounds': {}} if several else {})}
  # one process: replicated [U,...] parts; several: [P*U,...] sharded like the batch
  n_slots, sharding = parts_layout(cfg, mesh, u_max)[:2] if several else (1, rep)
  for l in cfg.engram.layer_ids:
    eng['src'][l] = sds((u_max,), jnp.int32, sharding=rep)
    eng['prev'][l] = sds((u_max, 3, width), jnp.float32, sharding=rep)
    for part, (_, *rest) in _part_shapes(u_max, width).items():
      eng[part][l] = sds((n_slots * u_max, *rest), jnp.float32, sharding=sharding)
    if several:
      eng['bounds'][l] = sds((n_slots, 2), jnp.int32, sharding=rep)
  return eng


class HostTables:
  """All Engram layers' tables + moments outside the device train state, with the per-step
  begin (rows for the device) / end (write-back, prefetch) protocol the Trainer drives.

  Several processes: process p owns rows [p*c_l, min((p+1)*c_l, R_l)) of layer l, c_l =
  ceil(R_l / P), the row split of a [P*c_l, 3, H] global array sharded over one device per
  process (the checkpoint layout). Its host memory holds only those rows."""

  def __init__(self, cfg, rows_per_layer: dict[int, int], mesh, *, memory_kind: str = 'pinned_host',
               init: bool = True, threads: int | None = None, chunk_rows: int | None = None):
    g = cfg.engram
    if g.table_optimizer != 'lazy_adam':
      raise ConfigError(f'config.engram.table_optimizer={g.table_optimizer!r}: host-memory tables '
                        "support only 'lazy_adam' (dense Adam touches every row every step); "
                        "use engram.table_memory='device' for dense_adam")
    self.nproc, self.pid = jax.process_count(), jax.process_index()
    if self.nproc > 1 and (memory_kind != 'pinned_host' or g.host_gather != 'numpy'):
      raise NotImplementedError(
          f'engram.table_memory=host with {self.nproc} processes supports the NumPy gather into '
          f"pinned_host tables only (got memory_kind={memory_kind!r}, "
          f'engram.host_gather={g.host_gather!r}); use host_gather=numpy')
    self.layers = tuple(g.layer_ids)
    self.u_max, self.width = row_dims(cfg)
    self.rows = {l: int(rows_per_layer[l]) for l in self.layers}
    self.span = {l: -(-r // self.nproc) for l, r in self.rows.items()}     # c_l
    self.lo = {l: min(self.pid * c, self.rows[l]) for l, c in self.span.items()}
    self.own = {l: min(self.lo[l] + c, self.rows[l]) - self.lo[l] for l, c in self.span.items()}
    self.memory_kind = memory_kind
    self.device = mesh.devices.flat[0]
    if self.device.process_index != self.pid:
      self.device = next(d for d in mesh.devices.flat if d.process_index == self.pid)
    self.row_sharding = NamedSharding(mesh, P())
    # One device (one process), NumPy gather into pinned staging: the step copies its rows to
    # the device, but for the parts in engram.rows_ahead, which are DMA'd while the previous
    # step runs. Meshes of several devices take replicated rows placed before the step.
    self.rows_in_step = (memory_kind == 'pinned_host' and g.host_gather == 'numpy' and
                         mesh.devices.size == 1)
    self.parts_in_step = tuple(p for p in ('theta', 'moments')
                               if self.rows_in_step and p not in g.rows_ahead)
    self._ckpt_kind = 'pinned_host' if memory_kind == 'pinned_host' else None
    if self.nproc > 1:
      self._setup_processes(cfg, mesh)
    self.threads = threads or min(16, os.cpu_count() or 1)
    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix='engram-np')
    self._jobs = ThreadPoolExecutor(1, thread_name_prefix='engram-jobs')
    # Unique rows need only the batch: their own thread, so step s+1's run while the job thread
    # still writes step s-1 back (several processes: the id exchanges stay in submission order).
    self._prep = ThreadPoolExecutor(1, thread_name_prefix='engram-unique')
    if memory_kind == 'pinned_host':
      chunk_rows = chunk_rows or max(1, (int(g.host_chunk_mib) << 20) // (3 * self.width * 4))
      self.store = _HostStore(self.device, self.own, self.width, self.u_max, g.host_gather,
                              self._pool, chunk_rows)
    elif memory_kind == 'device':
      self.store = _DeviceStore(self.device, self.own, self.width, self.u_max)
    else:
      raise ValueError(f"memory_kind={memory_kind!r} is not 'pinned_host' or 'device'")
    if init:
      self._init_theta(cfg.train.seed, g.table_init_std)
    self.stats: dict[str, collections.deque] = collections.defaultdict(
        lambda: collections.deque(maxlen=4096))
    self._reset_pipeline()

  def _setup_processes(self, cfg, mesh):
    """Several processes: the parts layout, the checkpoint sharding and the id exchange."""
    self.n_slots, self.parts_sharding, slot_of = parts_layout(cfg, mesh, self.u_max)
    slots = [{k for d, k in slot_of.items() if d.process_index == q} for q in range(self.nproc)]
    if any(slots[a] & slots[b] for a in range(self.nproc) for b in range(a)):
      raise NotImplementedError(
          'engram.table_memory=host with several processes needs the batch mesh axes '
          f'{self.parts_sharding.spec[0]} to split the processes (each process its own batch '
          'shards)')
    self.first_slot = [min(s) for s in slots]
    self._slot_devices = [(SingleDeviceSharding(d, memory_kind=d.default_memory().kind),
                           slot_of[d] == self.first_slot[self.pid])
                          for d in self.parts_sharding.addressable_devices]
    self._filler_rows = {(sh, shape): _zeros(shape, sh)                # masked out by the step
                         for sh, mine in self._slot_devices if not mine
                         for shape in _part_shapes(self.u_max, self.width).values()}
    devs = [next(d for d in mesh.devices.flat if d.process_index == q) for q in range(self.nproc)]
    self.ckpt_sharding = NamedSharding(Mesh(np.array(devs), ('rows',)), P('rows'),
                                       memory_kind=self._ckpt_kind)
    self._exchange = _RowExchange()

  # ---- init / checkpoint ----------------------------------------------------------------------
  def _init_theta(self, seed: int, std: float):
    """theta ~ N(0, std) in fixed PRNG blocks of rows (independent of chunking, device and the
    process count: each process draws the blocks over its own rows)."""
    for l, R in self.rows.items():
      key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x5E6A + l)
      lo, hi = self.lo[l], self.lo[l] + self.own[l]
      first, end = lo // _BLOCK, -(-hi // _BLOCK)
      for b0 in range(first, end, _CHUNK_BLOCKS):
        n_blocks = min(_CHUNK_BLOCKS, end - b0)
        r0 = b0 * _BLOCK
        vals = _normal_blocks(key, np.uint32(b0), n_blocks, self.width, float(std))
        a, b = max(r0, lo), min(r0 + vals.shape[0], hi)
        if b <= a:
          continue
        vals = vals[a - r0:b - r0]
        if self.memory_kind == 'device':
          self.store.set_theta(l, a - lo, jax.device_put(vals, self.store.sh))
        else:
          self.store.set_theta(l, a - lo, np.asarray(vals))

  def _replicated(self, x: np.ndarray) -> jax.Array:
    """A host value that every process computes alike, as one array replicated over the mesh."""
    if self.nproc == 1:
      return jax.device_put(x, self.row_sharding)
    return jax.make_array_from_callback(x.shape, self.row_sharding, lambda i: x[i])

  def _reset_pipeline(self):
    self._prev = None                      # (uniq, n) per layer of the last step
    # Made like the step's outputs, so that the step's jit sees one input signature.
    self._prev_rows = {l: _zeros((self.u_max, 3, self.width), self.row_sharding)
                       for l in self.layers}
    self._prefetch = None                  # (batch, Future)
    self._current = None
    self._pending: list[Future] = []

  def abstract(self) -> dict:
    """The `host_tables` checkpoint item to restore into: [R, 3, H] on this device (one process),
    or [P*c, 3, H] split by row range over one device per process."""
    if self.nproc == 1:
      sh = SingleDeviceSharding(self.device, memory_kind=self._ckpt_kind)
      return {f'layer_{l}': jax.ShapeDtypeStruct((r, 3, self.width), np.float32, sharding=sh)
              for l, r in self.rows.items()}
    return {f'layer_{l}': jax.ShapeDtypeStruct((self.nproc * c, 3, self.width), np.float32,
                                               sharding=self.ckpt_sharding)
            for l, c in self.span.items()}

  def state_for_save(self) -> dict:
    """After all pending write-backs: {'layer_<l>': [R,3,H] numpy} (one process; Orbax copies
    them on save), or [P*c, 3, H] global arrays split by row range (rows past R are zero)."""
    self.flush()
    if self.nproc == 1:
      return {f'layer_{l}': self.store.export(l) for l in self.layers}
    out = {}
    for l, c in self.span.items():
      piece = np.zeros((c, 3, self.width), np.float32)
      piece[:self.own[l]] = self.store.export(l)
      local = jax.device_put(piece, SingleDeviceSharding(self.device, memory_kind=self._ckpt_kind))
      out[f'layer_{l}'] = jax.make_array_from_single_device_arrays(
          (self.nproc * c, 3, self.width), self.ckpt_sharding, [local])
    return out

  def load(self, arrays: dict):
    """Loads this process's rows of each layer from NumPy [R, 3, H] arrays or from the arrays of
    `abstract()` (restored by Orbax)."""
    self.flush()
    for l in self.layers:
      a = arrays[f'layer_{l}']
      if isinstance(a, jax.Array):       # this device's shard starts at row lo
        a = np.asarray(next(s.data for s in a.addressable_shards if s.device == self.device))
        a = a[:self.own[l]]
      else:
        a = np.asarray(a, np.float32)
        if a.shape[0] != self.rows[l]:
          raise ValueError(f'host table layer {l}: checkpoint shape {a.shape}, expected '
                           f'{(self.rows[l], 3, self.width)}')
        a = a[self.lo[l]:self.lo[l] + self.own[l]]
      if a.shape != (self.own[l], 3, self.width):
        raise ValueError(f'host table layer {l}: checkpoint rows {a.shape}, expected '
                         f'{(self.own[l], 3, self.width)} (rows {self.lo[l]}.. of {self.rows[l]})')
      self.store.load(l, a)
    self._reset_pipeline()

  def slots(self, l: int) -> np.ndarray:
    """A copy of layer l's [R, 3, H] (theta, m, v) after pending write-backs (this process's
    rows [lo, lo + own) with several processes)."""
    self.flush()
    return np.array(self.store.export(l))

  # ---- per-step protocol ------------------------------------------------------------------------
  def begin(self, batch: dict, peek=None):
    """(batch without engram_rows_* and with engram_inv_<l> [B,T,J], eng inputs of the step).
    `peek` (the next batch, without consuming it) starts the next step's gather now, before this
    step is dispatched: the gather then overlaps this step even where dispatch blocks."""
    pf, self._prefetch = self._prefetch, None
    if self._current is not None:   # the last begin's step never ended: its prefetch assumed it
      pf = None
    fut = pf[1] if pf is not None and pf[0] is batch else self._submit_gather(batch, self._prev)
    t0 = time.perf_counter()
    got = fut.result()
    self.stats['wait_ms'].append(1e3 * (time.perf_counter() - t0))
    self._current = got
    if peek is not None:
      try:
        nxt = peek()
      except StopIteration:
        nxt = None
      if nxt is not None:      # queued after the previous step's write-back: reads its rows
        self._prefetch = (nxt, self._submit_gather(nxt, (got['uniq'], got['n'])))
    return self._device_batch(batch, got), self._eng(got)

  def end(self, new_rows: dict):
    """After dispatching the step: queue its write-back (after the prefetched gather, which
    takes the rows it shares with this step from `new_rows` on the device instead). The
    write-back's DMA (HBM tables: its scatter) is queued here, on the calling thread, so that
    the next step may take `new_rows` as a donated `prev`."""
    cur, self._current = self._current, None
    self._prev, self._prev_rows = (cur['uniq'], cur['n']), new_rows
    fetched = self.store.fetch(cur['sel'], new_rows, self.stats)
    if 'stage' in cur:                    # the DMA is ready only once the step read its staging
      self.store.mark_read(cur['stage'], fetched)
    self._pending.append(self._jobs.submit(self._writeback, cur['sel'], fetched))
    self._reap()

  def eval_inputs(self, batch: dict):
    """Rows for a forward-only step (all write-backs applied first; no `prev`)."""
    self.flush()
    got = self._submit_gather(batch, None, in_step=False).result()
    return self._device_batch(batch, got), self._eng(got, prev=False)

  def flush(self):
    """Waits for every queued gather and write-back; re-raises a failed one."""
    self._jobs.submit(lambda: None).result()
    self._reap()

  def close(self):
    self.flush()
    self._jobs.shutdown()
    self._prep.shutdown()
    self._pool.shutdown()

  # ---- jobs -----------------------------------------------------------------------------------
  def _eng(self, got, prev: bool = True):
    """The step's `eng` input; with prev, also 'prev': the last step's new rows, which the
    train step takes apart as a donated argument (Trainer.step)."""
    eng = {'theta': got['theta'], 'moments': got['moments'], 'src': got['src']}
    if prev:
      eng['prev'] = self._prev_rows
    if 'bounds' in got:
      eng['bounds'] = got['bounds']
    return eng

  def _device_batch(self, batch, got):
    out = {k: v for k, v in batch.items() if not k.startswith('engram_rows_')}
    out.update({f'engram_inv_{l}': got['inv'][l] for l in self.layers})
    return out

  def _submit_gather(self, batch, prev, in_step: bool = True):
    rows = {}
    for l in self.layers:
      r = batch.get(f'engram_rows_{l}')
      if r is None:
        raise KeyError(f'batch has no engram_rows_{l}: the data pipeline must hash Engram rows')
      rows[l] = np.asarray(r)
    uniq = self._prep.submit(self._unique, rows)
    return self._jobs.submit(self._gather, uniq, prev, in_step)

  def _unique(self, rows):
    """{l: (uniq, inv, n)} of the global batch: from this batch (one process), or from every
    process's unique rows through the id exchange (the same uniq on every process)."""
    t0 = time.perf_counter()
    if self.nproc == 1:
      out = dict(zip(self.layers, self._pool.map(
          lambda l: rows_lib.unique_rows(rows[l], self.u_max), self.layers)))
    else:
      local = list(self._pool.map(lambda l: np.unique(rows[l]).astype(np.int32), self.layers))
      parts = [_unpack(b, len(self.layers)) for b in self._exchange.all_gather(_pack(local))]
      out = {l: rows_lib.merge_unique_rows([p[i] for p in parts], rows[l], self.u_max)
             for i, l in enumerate(self.layers)}
    self.stats['unique_ms'].append(1e3 * (time.perf_counter() - t0))
    return out

  def _gather(self, uniq_fut, prev, in_step: bool):
    t0 = time.perf_counter()
    uniq, inv, n, src, sel, bounds = {}, {}, {}, {}, {}, {}
    for l, (u, i, k) in uniq_fut.result().items():
      if k and (u[k - 1] >= self.rows[l] or u[0] < 0):
        raise ValueError(f'engram_rows_{l} has rows outside the table [0, {self.rows[l]}): the '
                         'hash spec and the host table disagree')
      uniq[l], inv[l], n[l] = u, i, k
      p = None if prev is None else prev[0][l]
      src[l] = self._replicated(rows_lib.patch_map(u, k, p, 0 if prev is None else prev[1][l]))
      if self.nproc == 1:
        sel[l] = (u[:k], 0)
        continue
      c = self.span[l]       # process q's rows of U: a contiguous segment of the sorted U
      cut = np.searchsorted(u[:k], np.minimum(np.arange(self.nproc + 1) * c, self.rows[l]))
      b = np.zeros((self.n_slots, 2), np.int32)
      for q in range(self.nproc):
        b[self.first_slot[q]] = cut[q], cut[q + 1]
      bounds[l] = self._replicated(b)
      a0, a1 = int(cut[self.pid]), int(cut[self.pid + 1])
      sel[l] = (u[a0:a1] - self.lo[l], a0)
    self.stats['maps_ms'].append(1e3 * (time.perf_counter() - t0))   # incl. waiting for unique
    self.stats['rows'].append(sum(n.values()))
    staged = self.parts_in_step if in_step else ()
    place = {p: None if p in staged else self._place for p in ('theta', 'moments')}
    theta, moments = self.store.gather(sel, place, self.stats)
    got = {'uniq': uniq, 'inv': inv, 'n': n, 'src': src, 'sel': sel, 'theta': theta,
           'moments': moments}
    if staged:
      got['stage'] = self.store.last_set
    if bounds:
      got['bounds'] = bounds
    return got

  def _place(self, rows_U):
    """A layer's staged theta or moments [U,...] on the step's devices: replicated (one
    process), or as this process's first slot of the [P*U,...] parts that the step assembles
    (rows_lib)."""
    if self.nproc == 1:
      return jax.device_put(rows_U, self.row_sharding)
    shards = [jax.device_put(rows_U, sh) if mine else self._filler_rows[sh, rows_U.shape]
              for sh, mine in self._slot_devices]
    return jax.make_array_from_single_device_arrays(
        (self.n_slots * self.u_max, *rows_U.shape[1:]), self.parts_sharding, shards)

  def _writeback(self, sel, fetched):
    self.store.write(sel, fetched, self.stats)

  def _reap(self):
    done = [f for f in self._pending if f.done()]
    self._pending = [f for f in self._pending if not f.done()]
    for f in done:
      f.result()


class Lookahead:
  """An iterator that can `peek` one batch ahead, for the row prefetch. Its checkpoint state
  (Grain's handler: get_state -> bytes) is that of the last batch it returned, so a resumed run
  sees the peeked batch again."""

  def __init__(self, it):
    self._it, self._peeked, self._state = it, None, None

  def __iter__(self):
    return self

  def __next__(self):
    if self._peeked is not None:
      b, self._peeked = self._peeked, None
      return b
    return next(self._it)

  def peek(self):
    if self._peeked is None:
      self._state = self._it.get_state()
      self._peeked = next(self._it)
    return self._peeked

  def get_state(self) -> bytes:
    return json.dumps(self._state if self._peeked is not None else self._it.get_state()).encode()

  def set_state(self, state: bytes):
    self._peeked = None
    self._it.set_state(json.loads(state))

  def start_prefetch(self):
    getattr(self._it, 'start_prefetch', lambda: None)()
