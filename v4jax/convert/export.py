"""Orbax checkpoint -> HF-style sharded safetensors (tools/convert_to_safetensors.py).

Streams: the output plan (every HF tensor's name, dtype and shape, and which shard holds it)
comes from the checkpoint metadata alone; then each v4jax tensor is read, its HF pieces are
written from views (splits and transposes, materialised straight into the output's staging
buffers) and it is dropped before the next one is read. Tensors are decoded into one reused
arena of the largest tensor's size plus 512 MB, the next one read ahead by a thread into the
arena's other end when both fit, so peak memory stays near the largest tensor; tensors stored
as raw files (checkpoint.use_ocdbt=False, checkpoint.compression=none) are mapped instead. MTP
copies of the embedding and head are written again from the tensor still in memory (or, if it
is not, copied from the bytes already written).
Names: v4jax/convert/hf_names.py.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import mmap
import os
import re

import numpy as np

from v4jax.cli import ToolError, atomic_output_dir, check_output_dir, progress
from v4jax.convert import hf_names
from v4jax.convert.ckpt_reader import CheckpointReader
from v4jax.convert.safetensors_io import NAMES, ShardWriter, nbytes

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
  copy_of: str | None = None  # same bytes as this earlier item (an MTP copy): a file copy
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
    items += [_Item(n, code, shape, e, 0, copy_of=e.hf[0]) for n in e.copies]
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


_AHEAD = 512 * 2**20          # arena bytes beyond the largest tensor, for reading ahead
_MADV_POPULATE_WRITE = 23     # linux >= 5.14 (not yet a constant of Python's mmap module)


class _Tensors:
  """v4jax tensors in export order, decoded into one reused arena of the largest tensor's size
  plus _AHEAD: the current tensor at one end, the next one read ahead into the other end by a
  thread when both fit (so decoding overlaps writing and peak memory stays near the largest
  tensor). Reusing the arena matters: on the VM measured, faulting in fresh pages cost more than
  decoding into them; new parts of the arena are populated in bulk (MADV_POPULATE_WRITE)."""

  def __init__(self, reader, entries, pool):
    self.reader, self.pool = reader, pool
    self.order = list(dict.fromkeys(entries))
    self.size = {e: reader.nbytes((e.collection, e.path)) for e in self.order}
    largest = max(self.size.values(), default=0)
    self.cap = -(-min(largest + _AHEAD, sum(self.size.values())) // mmap.PAGESIZE) * mmap.PAGESIZE
    self.arena = mmap.mmap(-1, max(self.cap, mmap.PAGESIZE))
    self.buf = np.frombuffer(self.arena, np.uint8)
    self.touched = [0, 0]       # bytes used so far from the low end and from the high end
    self.populate = True
    self.index = {e: i for i, e in enumerate(self.order)}
    self.current, self.value, self.end, self.ahead = None, None, 0, None

  def _slot(self, n: int, end: int) -> np.ndarray:
    """n bytes of the arena at its low (0) or high (1) end, populated where new."""
    if n > self.touched[end] and self.populate:
      a, b = (self.touched[end], n) if end == 0 else (self.cap - n, self.cap - self.touched[end])
      page = mmap.PAGESIZE
      a, b = a - a % page, min(self.cap, -(-b // page) * page)
      try:
        self.arena.madvise(_MADV_POPULATE_WRITE, a, b - a)
      except (OSError, ValueError):   # an older kernel: pages fault in on first write
        self.populate = False
    self.touched[end] = max(self.touched[end], n)
    return self.buf[:n] if end == 0 else self.buf[self.cap - n:self.cap]

  def _read(self, e, end):
    key = (e.collection, e.path)
    view = self.reader.mapped(key)          # a file of raw bytes: mapped, the arena unused
    return view if view is not None else self.reader.read(key, self._slot(self.size[e], end))

  def get(self, e):
    if e is self.current:
      return self.value
    self.value = None                       # drop the previous tensor first
    if self.ahead is not None and self.ahead[0] is e:
      self.value, self.end = self.ahead[1].result(), self.ahead[2]
    else:
      if self.ahead is not None:            # never overwrite a read still in flight
        self.ahead[1].result()
      self.value, self.end = self._read(e, 0), 0
    self.current, self.ahead = e, None
    i = self.index[e] + 1
    if i < len(self.order) and self.size[e] + self.size[self.order[i]] <= self.cap:
      nxt, end = self.order[i], 1 - self.end
      self.ahead = (nxt, self.pool.submit(self._read, nxt, end), end)
    return self.value

  def close(self) -> None:
    if self.ahead is not None:
      self.ahead[1].result()
    self.current = self.value = self.ahead = self.buf = None
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
      progress(total, f'export step {reader.step}') as bar, \
      concurrent.futures.ThreadPoolExecutor(1) as pool:
    writers: dict[int, ShardWriter] = {}
    remaining = {s: sum(1 for it in items if it.shard == s) for s in range(n_shards)}
    written: dict[str, tuple[str, int]] = {}      # name -> (file, byte offset), for copies
    tensors = _Tensors(reader, [it.entry for it in items if it.entry and not it.copy_of], pool)
    for it in items:
      if it.shard not in writers:
        plan = [(j.name, j.dtype, j.shape) for j in items if j.shard == it.shard]
        writers[it.shard] = ShardWriter(os.path.join(tmp, shard_name(it.shard, n_shards)), plan)
      w = writers[it.shard]
      if it.copy_of and it.entry is not tensors.current:
        w.copy(it.name, *written[it.copy_of], on_bytes=bar.update)
      else:                   # an MTP copy right after its source is written again from memory
        if it.const is not None:
          view = it.const
        else:
          x = tensors.get(it.entry)
          view = hf_names.to_hf(it.entry.kind, x[it.piece] if it.entry.split else x)
        w.write(it.name, view, on_bytes=bar.update)
        view = x = None
      written[it.name] = (w.path, w.offsets[it.name])
      remaining[it.shard] -= 1
      if not remaining[it.shard]:
        writers.pop(it.shard).close()
    tensors.close()
    with open(os.path.join(tmp, INDEX), 'w', encoding='utf-8') as fh:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, fh, indent=2)
    config = hf_names.hf_config(reader.config, reader.hash_spec,
                                'bfloat16' if dtype == 'bf16' else 'float32')
    config['v4jax'] = {'step': reader.step, 'config': reader.config.to_dict()}
    with open(os.path.join(tmp, 'config.json'), 'w', encoding='utf-8') as fh:
      json.dump(config, fh, indent=2, default=list)
  return {'step': reader.step, 'tensors': len(items), 'bytes': total, 'shards': n_shards}
