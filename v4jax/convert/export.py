"""Orbax checkpoint -> HF-style sharded safetensors (tools/convert_to_safetensors.py).

Streams: the output plan (every HF tensor's name, dtype and shape, and which shard holds it)
comes from the checkpoint metadata alone; then each v4jax tensor is read, its HF pieces are
written from views (splits and transposes, materialised straight into the output's staging
buffers) and it is dropped. Two threads decode the tensors ahead of the writer into one arena
of the largest tensor's size plus 512 MB (_Tensors), and a tensor's rows are written as soon as
they are decoded, so peak memory stays near the largest tensor; tensors stored as raw files
(checkpoint.use_ocdbt=False, checkpoint.compression=none) are mapped instead. MTP copies of the
embedding and head are written again from the tensor still in memory.
Names: v4jax/convert/hf_names.py.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import mmap
import os
import re
import threading

import numpy as np

from v4jax.cli import ToolError, atomic_output_dir, check_output_dir, progress
from v4jax.convert import hf_names
from v4jax.convert.ckpt_reader import CheckpointReader
from v4jax.convert.safetensors_io import (MADV_POPULATE_WRITE, NAMES, Buffers, ShardWriter, nbytes,
                                         private_map)

__all__ = ['export', 'plan_export', 'parse_size', 'shard_name', 'INDEX']

INDEX = 'model.safetensors.index.json'


@dataclasses.dataclass
class _Item:
  name: str
  dtype: str                  # safetensors dtype code
  shape: tuple[int, ...]
  entry: hf_names.Entry | None = None
  piece: int = 0
  const: np.ndarray | None = None
  shard: int = 0


def parse_size(text: str) -> int:
  """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
  m = re.fullmatch(r'\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*', text, re.IGNORECASE)
  if not m:
    raise ToolError(f'--max-shard-size {text!r} is not a size like 5GB or 500MB')
  unit = (m.group(2) or 'B').upper()
  mult = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
          'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}[unit]
  return int(float(m.group(1)) * mult)


def plan_export(reader: CheckpointReader, dtype: str, max_shard_bytes: int) -> tuple[list[_Item], int]:
  """Every HF tensor in write order with its shard; returns (items, number of shards)."""
  cfg = reader.config
  try:
    entries = hf_names.layout(cfg.model.n_layers, reader.shapes())
  except ValueError as e:
    raise ToolError(str(e)) from None
  items = []
  for e in entries:
    code = 'F32' if dtype == 'fp32' or e.keep_fp32 else 'BF16'
    shape = e.hf_piece_shape
    items += [_Item(n, code, shape, e, i) for i, n in enumerate(e.hf)]
    items += [_Item(n, code, shape, e, 0) for n in e.copies]     # MTP copies: piece 0 again
  if reader.hash_spec is not None:
    for name, arr in hf_names.hash_tensors(reader.hash_spec).items():
      items.append(_Item(name, NAMES[arr.dtype], arr.shape, const=arr))
  shard, used = 0, 0
  for it in items:
    n = nbytes(it.dtype, it.shape)
    if used and used + n > max_shard_bytes:
      shard, used = shard + 1, 0
    it.shard, used = shard, used + n
  return items, shard + 1


_AHEAD = 512 * 2**20          # the small tensors' lane (larger tensors take the large one)
_DECODERS = 2                 # tensors decoded at once (where there are two or more cores)
_POPULATE = 64 * 2**20        # arena bytes populated ahead of the decoder at a time


def _pages(n: int) -> int:
  return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


@dataclasses.dataclass(eq=False)
class _Slot:
  """One tensor on its way from the checkpoint: where it sits in the arena and how much of it is
  decoded."""
  index: int                  # in export order
  n: int                      # bytes
  lane: int = 0               # 0: the large tensors' lane, 1: the others'
  free: bool = False          # written: its place can be reused
  start: int = -1             # arena offset (-1: not placed yet)
  fresh: tuple[int, int] = (0, 0)   # the part of its place no tensor used before (to populate)
  decoded: int = 0            # leading bytes already final
  streaming: bool = False     # being decoded into the arena
  done: bool = False
  value: np.ndarray | None = None
  error: BaseException | None = None


class _Lane:
  """A FIFO ring over arena bytes [lo, hi) for its tensors, placed and released in export
  order."""

  def __init__(self, lo: int, hi: int, slots: list[_Slot]):
    self.lo, self.hi, self.slots = lo, hi, slots
    self.taken, self.head, self.used = 0, lo, lo    # used: high-water mark of placed bytes
    self.ring: collections.deque[_Slot] = collections.deque()

  def fit(self) -> int | None:
    """Where the next untaken slot fits after the placed ones, or None (none left / no room)."""
    if self.taken == len(self.slots):
      return None
    n = _pages(self.slots[self.taken].n)
    if not self.ring:
      return self.lo
    tail, head = self.ring[0].start, self.head
    if tail < head:
      return head if head + n <= self.hi else (self.lo if self.lo + n <= tail else None)
    return head if head + n <= tail else None

  def place(self, start: int) -> _Slot:
    slot = self.slots[self.taken]
    self.taken += 1
    slot.start, self.head = start, start + _pages(slot.n)
    slot.fresh = (max(start, self.used), self.head)
    self.used = max(self.used, self.head)
    self.ring.append(slot)
    return slot


class _Tensors:
  """v4jax tensors in export order, decoded by reader threads into one arena ahead of the
  writer; a tensor can be written while it is still decoding (`ready`), so the rows of a large
  one go out as they come. The arena has two lanes, each a FIFO ring: one the size of the
  largest tensor for the tensors larger than _AHEAD, one of _AHEAD (at least two of its
  tensors) for the rest, so peak memory stays near the largest tensor plus _AHEAD. Decoders take
  the earliest tensor that has room in its lane: while the small ones flow through their ring,
  a large one (the head, which must be whole before its transpose is written) decodes early
  instead of holding up the end. Two decode at once where there are two cores (the decode is the
  export's largest cost). Tensors stored as raw files are mapped instead, holding their place
  unused (so the same bound holds). The arena is reused and populated in bulk just ahead of the
  decoder (MADV_POPULATE_WRITE): on the VM measured, faulting in fresh pages cost more than
  decoding into them."""

  def __init__(self, reader, entries):
    self.reader = reader
    self.order = list(dict.fromkeys(entries))
    self.index = {e: i for i, e in enumerate(self.order)}
    self.slots = [_Slot(i, reader.nbytes((e.collection, e.path))) for i, e in enumerate(self.order)]
    for s in self.slots:
      s.lane = int(s.n <= _AHEAD)
    big, small = ([s for s in self.slots if s.lane == k] for k in (0, 1))
    b = max((_pages(s.n) for s in big), default=0)
    r = min(max(_pages(_AHEAD), 2 * max((_pages(s.n) for s in small), default=0)),
            sum(_pages(s.n) for s in small))
    self.lanes = [_Lane(0, b, big), _Lane(b, b + r, small)]
    self.arena = private_map(max(b + r, mmap.PAGESIZE))
    self.buf = np.frombuffer(self.arena, np.uint8)
    self.cond = threading.Condition()
    self.taken = 0
    self.populate, self.closed = True, False
    n = _DECODERS if (os.cpu_count() or 1) >= 2 else 1
    self.threads = [threading.Thread(target=self._decode, daemon=True, name=f'decode{i}')
                    for i in range(n)]
    for t in self.threads:
      t.start()

  def _next(self) -> tuple[_Lane, int] | None:
    """The lane whose next tensor has room and comes first in export order, and its place."""
    best = None
    for lane in self.lanes:
      start = lane.fit()
      if start is not None and (best is None
                                or lane.slots[lane.taken].index < best[0].slots[best[0].taken].index):
        best = (lane, start)
    return best

  def _decode(self) -> None:
    while True:
      with self.cond:
        self.cond.wait_for(lambda: self.closed or self.taken == len(self.slots)
                           or self._next() is not None)
        if self.closed or self.taken == len(self.slots):
          return
        lane, start = self._next()
        slot = lane.place(start)
        self.taken += 1
      e = self.order[slot.index]
      key = (e.collection, e.path)
      try:
        view = self.reader.mapped(key)      # a file of raw bytes: mapped, its place unused
        if view is None:
          view = self.reader.read(key, self.buf[slot.start:slot.start + slot.n],
                                  lambda k, slot=slot: self._progress(slot, k))
        self._finish(slot, view, None)
      except BaseException as err:  # noqa: BLE001 - raised in the writer
        self._finish(slot, None, err)

  def _progress(self, slot: _Slot, k: int) -> None:
    """The first k bytes of the slot are final; populates its fresh pages up to _POPULATE
    beyond them before the decoder reaches them."""
    with self.cond:
      slot.streaming, slot.decoded = True, k
      self.cond.notify_all()
    a, b = slot.fresh
    if a < b and a < slot.start + k + _POPULATE // 2 and self.populate:
      b = min(b, slot.start + k + _POPULATE)
      try:
        self.arena.madvise(MADV_POPULATE_WRITE, a, _pages(b) - a)
      except (OSError, ValueError):       # an older kernel: pages fault in on first write
        self.populate = False
      slot.fresh = (_pages(b), slot.fresh[1])

  def _finish(self, slot: _Slot, value, error) -> None:
    with self.cond:
      slot.value, slot.error, slot.done = value, error, True
      self.cond.notify_all()

  def get(self, e):
    """Tensor e; it may still be decoding, so read it only through `ready`, and until
    `release(e)`."""
    slot = self.slots[self.index[e]]
    with self.cond:
      self.cond.wait_for(lambda: slot.done or slot.streaming)
    if slot.error is not None:
      raise slot.error
    if slot.done:
      return slot.value
    shape, dtype = self.reader.arrays[(e.collection, e.path)][:2]
    return self.buf[slot.start:slot.start + slot.n].view(dtype).reshape(shape)

  def ready(self, e, part: np.ndarray) -> None:
    """Waits until every byte of `part`, a view of tensor e, is decoded."""
    slot = self.slots[self.index[e]]
    if not slot.done and part.size:
      end = (part.ctypes.data - self.buf.ctypes.data - slot.start + part.itemsize
             + sum((k - 1) * s for k, s in zip(part.shape, part.strides)))
      if min(part.strides) < 0:
        end = slot.n
      with self.cond:
        self.cond.wait_for(lambda: slot.done or slot.decoded >= end)
    if slot.error is not None:
      raise slot.error

  def release(self, e) -> None:
    """Tensor e is written: its place can be reused."""
    slot = self.slots[self.index[e]]
    with self.cond:
      slot.free, slot.value = True, None
      lane = self.lanes[slot.lane]
      while lane.ring and lane.ring[0].free:
        lane.ring.popleft()
      self.cond.notify_all()

  def close(self) -> None:
    """Stops the decoders (each after its current tensor) and drops the arena."""
    with self.cond:
      self.closed = True
      self.cond.notify_all()
    for t in self.threads:
      t.join()
    for s in self.slots:
      s.value = None
    self.buf = None
    try:
      self.arena.close()
    except BufferError:                     # a caller still holds a view: left to the GC
      pass


def shard_name(i: int, n: int) -> str:
  return f'model-{i + 1:05d}-of-{n:05d}.safetensors'


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = 'bf16',
           max_shard_bytes: int = 5 * 10**9, overwrite: bool = False) -> dict:
  """Writes `out`; returns a summary {step, tensors, bytes, shards}."""
  if dtype not in ('bf16', 'fp32'):
    raise ToolError(f"--dtype {dtype!r} is not one of ('bf16', 'fp32')")
  check_output_dir(out, overwrite, '--out')
  reader = CheckpointReader(workdir, step)
  items, n_shards = plan_export(reader, dtype, max_shard_bytes)
  total = sum(nbytes(it.dtype, it.shape) for it in items)
  weight_map = {it.name: shard_name(it.shard, n_shards) for it in items}
  if len(weight_map) != len(items):
    raise ToolError('two v4jax tensors map to the same HF name (check v4jax/convert/hf_names.py)')
  with atomic_output_dir(out, overwrite) as tmp, \
      progress(total, f'export step {reader.step}') as bar:
    tensors = _Tensors(reader, [it.entry for it in items if it.entry is not None])
    buffers, w, shard, held = Buffers(), None, None, None
    try:
      for it in items:
        if it.shard != shard:
          if w is not None:
            w.close()
          plan = [(j.name, j.dtype, j.shape) for j in items if j.shard == it.shard]
          w = ShardWriter(os.path.join(tmp, shard_name(it.shard, n_shards)), plan, buffers=buffers)
          shard = it.shard
        if it.const is not None:
          w.write(it.name, it.const, on_bytes=bar.update)
          continue
        if it.entry is not held:        # each tensor's pieces (and MTP copies) come together
          if held is not None:
            tensors.release(held)
          held = it.entry
        x = tensors.get(it.entry)
        view = hf_names.to_hf(it.entry.kind, x[it.piece] if it.entry.split else x)
        w.write(it.name, view, on_bytes=bar.update, ready=functools.partial(tensors.ready, it.entry))
        view = x = None
      w.close()
    finally:
      tensors.close()
      buffers.close()
    with open(os.path.join(tmp, INDEX), 'w', encoding='utf-8') as fh:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, fh, indent=2)
    config = hf_names.hf_config(reader.config, reader.hash_spec,
                                'bfloat16' if dtype == 'bf16' else 'float32')
    config['v4jax'] = {'step': reader.step, 'config': reader.config.to_dict()}
    with open(os.path.join(tmp, 'config.json'), 'w', encoding='utf-8') as fh:
      json.dump(config, fh, indent=2, default=list)
  return {'step': reader.step, 'tensors': len(items), 'bytes': total, 'shards': n_shards}
