"""Streaming safetensors reading and writing (the format: 8-byte little-endian header length N,
N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then
the tensor bytes, little-endian, row-major, offsets relative to the end of the header).

Written here rather than through the `safetensors` package so that a shard is written tensor by
tensor from views (transposes included) in bounded chunks, and so that a malformed or truncated
file gives one error line naming the file. Files read back with `safetensors.safe_open`.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import fcntl
import functools
import glob
import json
import math
import mmap
import os
import sys

import ml_dtypes
import numpy as np

from v4jax.cli import ToolError

DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2), 'I64': np.dtype(np.int64),
    'I32': np.dtype(np.int32), 'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8),
    'U8': np.dtype(np.uint8), 'U16': np.dtype(np.uint16), 'U32': np.dtype(np.uint32),
    'U64': np.dtype(np.uint64), 'BOOL': np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20      # the safetensors package's own limit
_CHUNK = 64 * 2**20            # bytes converted and written at a time
_NBUF = 3                      # staging buffers: one fills while the others are written
_TILE = 512                    # tile edge of the blocked transpose copy
_SPLIT_ELEMS = 2**22           # transposes this large run on two threads
_BLOCK = 4096                  # O_DIRECT alignment of offsets and lengths
_ROW_MAJOR, _TRANS = 101, 112  # CBLAS_ORDER / CBLAS_TRANSPOSE values
MADV_POPULATE_WRITE = 23       # linux >= 5.14 (not yet a constant of Python's mmap module)

if sys.byteorder != 'little':   # pragma: no cover - every supported platform is little-endian
  raise ImportError('v4jax.convert.safetensors_io assumes a little-endian machine')


def nbytes(dtype: str, shape) -> int:
  return DTYPES[dtype].itemsize * math.prod(shape)


def private_map(n: int) -> mmap.mmap:
  """n bytes of private anonymous memory, page-aligned (O_DIRECT needs that). Private, not
  Python's default shared mapping: shared anonymous pages are shmem, which cost ~1.7x the
  system time to populate and to free on the VM measured."""
  if hasattr(mmap, 'MAP_ANONYMOUS'):
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  return mmap.mmap(-1, n)


class Buffers:
  """Page-aligned private memory for ShardWriters: _NBUF staging buffers for the writes,
  populated in bulk (faulting fresh pages in one at a time cost ~3x the system time on the VM
  measured), and two conversion buffers (used in full only for bf16 transposes). One set serves
  the writers of consecutive shards."""

  def __init__(self):
    self._map = private_map((_NBUF + 2) * _CHUNK)
    try:
      self._map.madvise(MADV_POPULATE_WRITE, 0, _NBUF * _CHUNK)
    except (OSError, ValueError):        # an older kernel: pages fault in on first write
      pass
    whole = np.frombuffer(self._map, np.uint8)
    self.staging = [whole[i * _CHUNK:(i + 1) * _CHUNK] for i in range(_NBUF)]
    self.convert = [whole[(_NBUF + i) * _CHUNK:(_NBUF + i + 1) * _CHUNK] for i in range(2)]

  def close(self) -> None:
    self.staging = self.convert = None
    try:
      self._map.close()
    except BufferError:                   # a caller still holds a view: left to the GC
      pass


@functools.lru_cache(maxsize=1)
def _somatcopy():
  """OpenBLAS's out-of-place fp32 transpose `cblas_somatcopy` from the OpenBLAS that numpy's
  wheels ship (4-9 GB/s on the VM measured, against 0.4-1.5 GB/s for numpy's strided or tiled
  copies), checked once on a small matrix; None where numpy has no such library."""
  libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, 'numpy.libs', '*openblas*'))
  for path in libs:
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for sym, int_t in (('scipy_cblas_somatcopy64_', ctypes.c_int64), ('cblas_somatcopy64_', ctypes.c_int64),
                       ('scipy_cblas_somatcopy', ctypes.c_int32), ('cblas_somatcopy', ctypes.c_int32)):
      f = getattr(lib, sym, None)
      if f is None:
        continue
      f.restype = None
      f.argtypes = [ctypes.c_int, ctypes.c_int, int_t, int_t, ctypes.c_float, ctypes.c_void_p, int_t,
                    ctypes.c_void_p, int_t]
      a = np.arange(35, dtype=np.float32).reshape(5, 7)
      b = np.zeros((7, 5), np.float32)
      f(_ROW_MAJOR, _TRANS, 5, 7, 1.0, a.ctypes.data, 7, b.ctypes.data, 5)
      if np.array_equal(b, a.T):
        return f
  return None


@functools.lru_cache(maxsize=1)
def _helper() -> concurrent.futures.ThreadPoolExecutor:
  """One thread that takes half of each large transpose (ctypes releases the GIL)."""
  return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='transpose')


def _transpose(part: np.ndarray, out: np.ndarray) -> bool:
  """out[...] = part for a 2-D fp32 view whose first axis is the contiguous one (a transposed
  kernel), through OpenBLAS, rows split between this thread and a helper from _SPLIT_ELEMS
  elements on (the export's reader and writer threads leave a core mostly idle); False where
  that does not apply."""
  f = _somatcopy()
  r, c = part.shape
  if (f is None or part.ndim != 2 or part.dtype != np.float32 or out.dtype != np.float32
      or part.strides[0] != 4 or part.strides[1] % 4 or part.strides[1] <= 0 or not out.flags.c_contiguous):
    return False
  ld = part.strides[1] // 4
  run = lambda a, b: f(_ROW_MAJOR, _TRANS, c, b - a, 1.0, part[a:b].ctypes.data, ld,
                       out[a:b].ctypes.data, c)
  if r * c < _SPLIT_ELEMS or (os.cpu_count() or 1) < 2:
    run(0, r)
    return True
  half = _helper().submit(run, r // 2, r)
  run(0, r // 2)
  half.result()
  return True


def _copy_rows(x: np.ndarray, a: int, b: int, out: np.ndarray,
               scratch: np.ndarray | None = None) -> np.ndarray:
  """Writes x[a:b] into the C-contiguous `out` (converting to its dtype). A view whose first
  axis is the contiguous one (a transposed kernel) goes through OpenBLAS's transpose (into
  `scratch`, an fp32 buffer of out's shape, first when out is not fp32) or else is copied in
  cache-sized tiles: numpy's plain strided copy of a large transpose is several times slower."""
  part = x[a:b]
  if part.ndim == 2 and part.strides[0] == part.itemsize and not part.flags.c_contiguous:
    if _transpose(part, out):
      return out
    if scratch is not None and _transpose(part, scratch):
      np.copyto(out, scratch, casting='unsafe')
      return out
    for i in range(0, part.shape[0], _TILE):
      for j in range(0, part.shape[1], _TILE):
        out[i:i + _TILE, j:j + _TILE] = part[i:i + _TILE, j:j + _TILE]
  else:
    np.copyto(out, part, casting='unsafe')
  return out


class _Sink:
  """Sequential output to one file through _NBUF page-aligned 64 MB staging buffers: one fills
  while background threads write the others with pwrite() (two writes in flight: O_DIRECT
  writes of 64 MB reached 1.6 GB/s one at a time and 2.0 GB/s two at a time on the machine
  measured). The file is opened with O_DIRECT where the filesystem allows it, so the bytes skip
  the page cache (there, buffered writes cost over 10x the CPU time); otherwise plain writes."""

  def __init__(self, path: str, staging: list[np.ndarray]):
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    self.direct = hasattr(os, 'O_DIRECT')
    try:
      self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o666)
    except OSError:                    # e.g. tmpfs refuses O_DIRECT
      self.fd, self.direct = os.open(path, flags, 0o666), False
    self._bufs = staging
    self._futs: list = [None] * _NBUF
    self._pool = concurrent.futures.ThreadPoolExecutor(_NBUF - 1)
    self._cur, self._fill, self._base = 0, 0, 0    # base: file offset of the current buffer

  def _pwrite(self, k: int, n: int, offset: int) -> None:
    view, done = memoryview(self._bufs[k][:n]), 0
    while done < n:
      try:
        done += os.pwrite(self.fd, view[done:], offset + done)
      except OSError as e:             # a filesystem that takes O_DIRECT opens but not writes
        if not self.direct or e.errno != errno.EINVAL:
          raise
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
    view.release()

  def write(self, data) -> None:
    src = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    pos = 0
    while pos < src.size:
      k = min(_CHUNK - self._fill, src.size - pos)
      self._bufs[self._cur][self._fill:self._fill + k] = src[pos:pos + k]
      self.advance(k)
      pos += k

  def room(self) -> np.ndarray:
    """The free rest of the current staging buffer: fill its start, then call advance()."""
    return self._bufs[self._cur][self._fill:]

  def advance(self, k: int) -> None:
    """Takes k more bytes of the current staging buffer as written."""
    self._fill += k
    if self._fill == _CHUNK:
      self._futs[self._cur] = self._pool.submit(self._pwrite, self._cur, _CHUNK, self._base)
      self._cur, self._fill, self._base = (self._cur + 1) % _NBUF, 0, self._base + _CHUNK
      if self._futs[self._cur] is not None:
        self._futs[self._cur].result()
        self._futs[self._cur] = None

  def close(self, size: int) -> None:
    """Writes the rest (the last buffer padded to the block size) and sets the file's size."""
    try:
      for f in self._futs:
        if f is not None:
          f.result()
      if self._fill:
        self._pwrite(self._cur, -(-self._fill // _BLOCK) * _BLOCK, self._base)
      os.ftruncate(self.fd, size)      # drop the padding of the last block
    finally:
      os.close(self.fd)
      self._pool.shutdown()
      self._bufs = []


class ShardWriter:
  """Writes one safetensors file whose tensors (name, dtype code, shape) are known up front:
  the header goes first, then each tensor in the planned order, through `write(name, array)`.
  `buffers`: a Buffers set to work in (the caller's to close), else the writer makes its own."""

  def __init__(self, path: str, plan: list[tuple[str, str, tuple[int, ...]]],
               metadata: dict | None = None, buffers: Buffers | None = None):
    header, off = {}, 0
    for name, dtype, shape in plan:
      n = nbytes(dtype, shape)
      header[name] = {'dtype': dtype, 'shape': [int(s) for s in shape], 'data_offsets': [off, off + n]}
      off += n
    header['__metadata__'] = metadata or {'format': 'pt'}
    raw = json.dumps(header, separators=(',', ':')).encode('utf-8')
    raw += b' ' * (-len(raw) % 8)
    self.path, self.plan, self.size = path, list(plan), 8 + len(raw) + off
    self._next = 0
    self._own = buffers is None
    self._bufs = Buffers() if buffers is None else buffers
    self._sink = _Sink(path, self._bufs.staging)
    self._sink.write(len(raw).to_bytes(8, 'little') + raw)

  def _buffer(self, dtype, shape, which: int = 0) -> np.ndarray:
    n = dtype.itemsize * math.prod(shape)
    if n > _CHUNK:
      return np.empty(shape, dtype)
    return self._bufs.convert[which][:n].view(dtype).reshape(shape)

  def _check_next(self, name, shape):
    want, dtype, planned = self.plan[self._next]
    if name != want or tuple(shape) != tuple(planned):
      raise ValueError(f'{self.path}: expected tensor {want} {list(planned)} next, got {name} '
                       f'{list(shape)}')
    return DTYPES[dtype]

  def _rows(self, x: np.ndarray, a: int, k: int, out: np.ndarray | None, dt, ready) -> np.ndarray:
    """Rows x[a:a+k] converted to dt into out (else a conversion buffer), as uint8."""
    shape = (k,) + x.shape[1:]
    out = self._buffer(dt, shape) if out is None else out.view(dt).reshape(shape)
    scratch = None
    if dt != np.float32 and x.dtype == np.float32 and x.ndim == 2:
      scratch = self._buffer(np.dtype(np.float32), shape, 1)
    ready(x[a:a + k])
    return _copy_rows(x, a, a + k, out, scratch).reshape(-1).view(np.uint8)

  def write(self, name: str, x: np.ndarray, on_bytes=None, ready=None) -> None:
    """Writes x (any strides, e.g. a transposed view) as the next planned tensor, converting
    to the planned dtype a block of rows at a time (at most about 64 MB), straight into the
    output's staging buffer (through a conversion buffer where a row would straddle two).
    ready(part), when given, is called before each block of rows `part` is read (a tensor
    still being decoded: it waits for the bytes that block covers)."""
    dt = self._check_next(name, x.shape)
    ready = ready or (lambda part: None)
    on_bytes = on_bytes or (lambda k: None)
    self._next += 1
    if x.ndim == 0 or x.size == 0:
      ready(x)
      self._sink.write(np.asarray(x, dt).tobytes())
      on_bytes(dt.itemsize * x.size)
      return
    row = x[0].size * dt.itemsize
    step = max(1, _CHUNK // max(1, x[0].size * max(dt.itemsize, x.dtype.itemsize)))
    a = 0
    while a < x.shape[0]:
      room = self._sink.room()
      aligned = room.ctypes.data % dt.itemsize == 0
      k = min(x.shape[0] - a, step, room.size // row) if aligned else 0
      if k:
        self._sink.advance(self._rows(x, a, k, room[:k * row], dt, ready).size)
      else:                   # one row straddling two staging buffers, or a misaligned output
        k = min(x.shape[0] - a, step if not aligned else 1)
        self._sink.write(self._rows(x, a, k, None, dt, ready))
      on_bytes(k * row)
      a += k

  def close(self) -> None:
    self._sink.close(self.size)
    if self._own:
      self._bufs.close()
    if self._next != len(self.plan):
      raise ValueError(f'{self.path}: {len(self.plan) - self._next} planned tensors not written')
    if os.path.getsize(self.path) != self.size:
      raise ValueError(f'{self.path}: wrote {os.path.getsize(self.path)} bytes, planned {self.size}')


class SafetensorsFile:
  """One .safetensors file: the header is read and checked on open; `read(name)` loads one
  tensor. Any inconsistency raises ToolError naming the file."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    bad = lambda why: ToolError(f'{path}: not a valid safetensors file ({why})')
    with open(path, 'rb') as fh:
      head = fh.read(8)
      if len(head) < 8:
        raise bad(f'{size} bytes, shorter than the 8-byte header length')
      n = int.from_bytes(head, 'little')
      if n > _MAX_HEADER or 8 + n > size:
        raise bad(f'header length {n} does not fit the file of {size} bytes')
      try:
        header = json.loads(fh.read(n).decode('utf-8'))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f'header is not JSON: {str(e).splitlines()[0]}') from None
    if not isinstance(header, dict):
      raise bad('header is not a JSON object')
    self.metadata = header.pop('__metadata__', None) or {}
    self.data_start, data_size = 8 + n, size - 8 - n
    self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
      try:
        dtype, shape, (b, e) = info['dtype'], tuple(int(s) for s in info['shape']), info['data_offsets']
      except (KeyError, TypeError, ValueError):
        raise bad(f'entry {name!r} lacks dtype/shape/data_offsets') from None
      if dtype not in DTYPES:
        raise bad(f'tensor {name} has unknown dtype {dtype!r}')
      if min(shape, default=0) < 0 or e - b != nbytes(dtype, shape) or b < 0:
        raise bad(f'tensor {name}: data_offsets {[b, e]} do not match {dtype}{list(shape)}')
      if e > data_size:
        raise ToolError(f'{path}: truncated: tensor {name} needs data bytes [{b}, {e}) but the '
                        f'file holds {data_size}')
      self.tensors[name] = (dtype, shape, b, e)

  def dtype(self, name: str) -> str:
    return self.tensors[name][0]

  def shape(self, name: str) -> tuple[int, ...]:
    return self.tensors[name][1]

  def read(self, name: str) -> np.ndarray:
    dtype, shape, b, e = self.tensors[name]
    with open(self.path, 'rb') as fh:
      fh.seek(self.data_start + b)
      buf = bytearray(e - b)
      if fh.readinto(buf) != e - b:
        raise ToolError(f'{self.path}: truncated while reading tensor {name}')
    return np.frombuffer(buf, DTYPES[dtype]).reshape(shape)


class SafetensorsDir:
  """All tensors of a directory: through model.safetensors.index.json when present, else every
  *.safetensors file in it. Names must be unique across files."""

  INDEX = 'model.safetensors.index.json'

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise ToolError(f'--src {directory!r} is not a directory')
    self.directory = directory
    index = os.path.join(directory, self.INDEX)
    if os.path.exists(index):
      try:
        with open(index, encoding='utf-8') as fh:
          weight_map = json.load(fh)['weight_map']
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ToolError(f'{index}: not a valid index ({e.__class__.__name__}: {e})') from None
      files = sorted(set(weight_map.values()))
    else:
      weight_map = None
      files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
      if not files:
        raise ToolError(f'--src {directory!r} holds no *.safetensors files')
    self.files: dict[str, SafetensorsFile] = {}
    for f in files:
      path = os.path.join(directory, f)
      if not os.path.isfile(path):
        raise ToolError(f'{index} lists {f}, which does not exist')
      self.files[f] = SafetensorsFile(path)
    self.where: dict[str, str] = {}
    for f, sf in self.files.items():
      for name in sf.tensors:
        if name in self.where:
          raise ToolError(f'tensor {name} is in both {self.where[name]} and {f}')
        self.where[name] = f
    if weight_map is not None:
      wrong = [n for n, f in weight_map.items() if self.where.get(n) != f]
      if wrong:
        raise ToolError(f'{index} maps {len(wrong)} tensor(s) to files that do not hold them, '
                        f'e.g. {wrong[0]} -> {weight_map[wrong[0]]}')

  @property
  def names(self) -> list[str]:
    return list(self.where)

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def dtype(self, name: str) -> str:
    return self.files[self.where[name]].dtype(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.files[self.where[name]].shape(name)

  def read(self, name: str) -> np.ndarray:
    return self.files[self.where[name]].read(name)
