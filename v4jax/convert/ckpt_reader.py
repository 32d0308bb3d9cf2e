"""Reads a v4jax Orbax checkpoint one tensor at a time (for export: memory stays near the largest
tensor, whatever the model size).

The `state` item is a zarr tensor store (v4jax/checkpoint.py), in one OCDBT store or one
directory per array. The list of arrays comes from the item's `_METADATA` tree and each array's
`.zarray` (Orbax's own metadata reader where they do not suffice), so a plain export never
imports Orbax or JAX. An array stored as Orbax writes it (zarr v2, one chunk, zstd or no
compression) is read by `read(key, out)` straight into a caller's reused buffer: its stored
bytes are mapped in 16 MB windows from the OCDBT data file that holds them (located through
TensorStore's dump of the store's B+tree, not read through its key-value API, whose copies cost
half as much CPU as the decode) or from its own file (`checkpoint.use_ocdbt=False`), and libzstd
(ctypes) decodes them in a stream, reporting its progress so that a caller can use the leading
rows early. Decoding into fresh memory is what made reads slow on the VM measured (first-touch
page faults cost ~1.5 s per GB, more than the zstd decode itself). A raw file (no OCDBT, no
compression) can instead be mapped (`mapped(key)`): no copy at all. Any other layout (zarr3,
several chunks, a slice of a stacked array, no libzstd) goes through TensorStore with the read
spec Orbax itself uses (`orbax.checkpoint.type_handlers.get_json_tspec_read`). Only the `params`
and `rest` collections are read; optimizer moments are never touched.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import mmap
import os
import urllib.parse

import ml_collections
import numpy as np

from v4jax.cli import ToolError
from v4jax.convert import hf_names


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp


# Orbax's TensorStore context for OCDBT reads (orbax type_handlers.get_ts_context), written out
# so that a plain export never imports Orbax (and with it JAX: ~1.5 CPU s at start).
_TS_CONTEXT = {'cache_pool#ocdbt': {'total_bytes_limit': 100_000_000},
               'file_io_concurrency': {'limit': 128}}


def _read_context():
  """The TensorStore context, reading files through mmap where this TensorStore supports it
  (`file_io_mode`: about 23% less read time than pread, measured)."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  try:
    return ts.Context(ts.Context.Spec({**_TS_CONTEXT, 'file_io_mode': {'mode': 'memmap'}}))
  except ValueError:
    return ts.Context(ts.Context.Spec(_TS_CONTEXT))


_RANGE = 16 * 2**20       # stored bytes mapped (and decoded) at a time
_ZSTD_D_STABLE_OUT_BUFFER = 1001       # ZSTD_d_experimentalParam2 in zstd.h


def _windows(path: str, offset: int, length: int | None):
  """Bytes [offset, offset + length) of a file (length None: to its end) as read-only mapped
  windows of at most _RANGE bytes, each unmapped when the next is taken: the page cache's own
  pages, no copy, and resident memory grows by one window, not by the value. The kernel is asked
  to read the whole range ahead."""
  with open(path, 'rb') as fh:
    size = os.fstat(fh.fileno()).st_size
    end = size if length is None else offset + length
    if end > size:
      raise ValueError(f'{path} holds {size} bytes, the value ends at byte {end}')
    if hasattr(os, 'posix_fadvise'):
      os.posix_fadvise(fh.fileno(), offset, end - offset, os.POSIX_FADV_WILLNEED)
    a = offset - offset % mmap.ALLOCATIONGRANULARITY
    while a < end:
      b = min(end, a + _RANGE)
      m = mmap.mmap(fh.fileno(), b - a, offset=a, prot=mmap.PROT_READ,
                    flags=mmap.MAP_SHARED | getattr(mmap, 'MAP_POPULATE', 0))
      try:
        with memoryview(m) as view:
          yield view[max(offset - a, 0):]
      finally:
        try:
          m.close()
        except BufferError:                # a caller's error left the window referenced: GC
          pass
      a = b


class _Zstd:
  """libzstd's streaming decoder through ctypes (the GIL is released while it runs)."""

  class _Buf(ctypes.Structure):   # ZSTD_inBuffer / ZSTD_outBuffer: {ptr, size, pos}
    _fields_ = [('ptr', ctypes.c_void_p), ('size', ctypes.c_size_t), ('pos', ctypes.c_size_t)]

  def __init__(self, lib: ctypes.CDLL):
    self.lib = lib
    lib.ZSTD_createDCtx.restype = ctypes.c_void_p
    lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
    lib.ZSTD_decompressStream.restype = ctypes.c_size_t
    lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    lib.ZSTD_getErrorName.restype = ctypes.c_char_p
    lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
    lib.ZSTD_DCtx_setParameter.restype = ctypes.c_size_t
    lib.ZSTD_DCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]

  def decoder(self, out: np.ndarray):
    """A function feeding compressed pieces (bytes or mapped windows) that decodes them into the
    uint8 array `out`; it returns True once the frame is complete."""
    ctx = self.lib.ZSTD_createDCtx()
    # ZSTD_d_stableOutBuffer: decode straight into `out` rather than through the decoder's
    # window buffer and a copy (-30% decode time); an older libzstd refuses it and copies.
    self.lib.ZSTD_DCtx_setParameter(ctx, _ZSTD_D_STABLE_OUT_BUFFER, 1)
    dst = self._Buf(out.ctypes.data, out.size, 0)

    def feed(piece) -> bool:
      src = self._Buf(np.frombuffer(piece, np.uint8).ctypes.data, len(piece), 0)
      while True:
        before = (src.pos, dst.pos)
        r = self.lib.ZSTD_decompressStream(ctx, ctypes.byref(dst), ctypes.byref(src))
        if self.lib.ZSTD_isError(r):
          raise ValueError(f'zstd: {self.lib.ZSTD_getErrorName(r).decode()}')
        if r == 0 or src.pos == src.size:
          return r == 0
        if (src.pos, dst.pos) == before:     # input left but no room for its output
          raise ValueError('zstd: the chunk decodes to more bytes than the array holds')

    feed.done = lambda: dst.pos          # bytes decoded so far
    feed.close = lambda: self.lib.ZSTD_freeDCtx(ctx)
    return feed


@functools.lru_cache(maxsize=1)
def _zstd() -> _Zstd | None:
  """The system libzstd, or None (then every array goes through TensorStore)."""
  name = ctypes.util.find_library('zstd')
  try:
    return _Zstd(ctypes.CDLL(name or 'libzstd.so.1'))
  except (OSError, AttributeError):
    return None


@functools.lru_cache(maxsize=8)
def _storage(item_dir: str) -> tuple[bool, bool]:
  """(use_ocdbt, use_zarr3) of an Orbax pytree item, from its _METADATA file."""
  with open(os.path.join(item_dir, '_METADATA'), encoding='utf-8') as fh:
    raw = json.load(fh)
  return bool(raw.get('use_ocdbt', True)), bool(raw.get('use_zarr3', False))


class CheckpointReader:
  """The checkpoint of `workdir` at `step` (default: the newest complete one)."""

  COLLECTIONS = ('params', 'rest')

  def __init__(self, workdir: str, step: int | None = None):
    root = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    if not os.path.isdir(root):
      raise ToolError(f'--workdir {workdir!r} has no checkpoints/ directory')
    self._ctx = _read_context()
    self._kv: dict[str, object] = {}
    self._index: dict[str, dict | None] = {}
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()   # Orbax renames a step's
                   and os.path.isdir(os.path.join(root, d, 'state')))  # directory when complete
    if not steps:
      raise ToolError(f'{root} holds no complete checkpoint')
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ToolError(f'--step {step}: {root} has steps {steps}')
    self.step = int(step)
    try:
      meta = self._meta(os.path.join(root, str(step)))
    except Exception as e:  # noqa: BLE001 - reported with the path
      raise ToolError(f'{root}/{step}/meta: cannot read ({str(e).splitlines()[0]})') from None
    self.config = self._config(meta['config'])
    self.hash_spec = None
    if meta.get('engram_hash'):
      from v4jax.data.engram_hash import EngramHashSpec  # pylint: disable=import-outside-toplevel
      self.hash_spec = EngramHashSpec.from_json(meta['engram_hash'])
    self.state_dir = os.path.join(root, str(step), 'state')
    # (collection, path) -> (shape, dtype, Orbax array name, item directory, index into it)
    self.arrays: dict[tuple[str, str], tuple] = {}
    for coll, path, shape, dtype, name in self._leaves(self.state_dir, self.COLLECTIONS):
      self.arrays[(coll, path)] = (shape, dtype, name, self.state_dir, ())
    # engram.table_memory=host: each layer's [R, 3, d_h] (theta, m, v) lives in the
    # `host_tables` item; its theta is the layer's table.
    tables_dir = os.path.join(root, str(step), 'host_tables')
    if os.path.isdir(tables_dir):
      for _, key, shape, dtype, name in self._leaves(tables_dir, None):
        layer = int(key.split('_')[-1])
        self.arrays[('host_tables', f'engram/{layer}/table')] = (
            (shape[0], shape[2]), dtype, name, tables_dir, (slice(None), 0, slice(None)))
    # model.scan_layers: a stacked `blocks/a-b/...` tensor reads as its per-layer slices.
    self.arrays = hf_names.unstack_reader_arrays(self.arrays)

  @staticmethod
  def _meta(step_dir: str) -> dict:
    """The `meta` item (JSON): the file Orbax's JsonCheckpointHandler wrote, else through Orbax."""
    path = os.path.join(step_dir, 'meta', 'metadata')
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as fh:
        return json.load(fh)
    ocp = _ocp()
    mngr = ocp.CheckpointManager(os.path.dirname(step_dir), item_names=('meta',),
                                 options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    step = int(os.path.basename(step_dir))
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def _leaves(self, item_dir: str, collections):
    """(collection, path, shape, dtype, array name) of every array of an Orbax pytree item:
    from its _METADATA tree and each array's zarr v2 `.zarray`, else through Orbax."""
    try:
      out = self._leaves_zarr(item_dir, collections)
    except (OSError, ValueError, KeyError, TypeError):
      out = None
    return out if out is not None else self._leaves_orbax(item_dir, collections)

  def _zarrays(self, item_dir: str, names: list[str]) -> list[dict | None]:
    """Each array's zarr v2 `.zarray` (None where absent): from the OCDBT store (reads issued
    together), or from the array's own directory in an item written without OCDBT."""
    if _storage(item_dir)[0]:
      kv = self._kvstore(item_dir)
      reads = [kv.read(f'{n}/.zarray'.encode()) for n in names]
      return [json.loads(r.value) if r.state == 'value' else None
              for r in (f.result() for f in reads)]
    out = []
    for n in names:
      try:
        with open(os.path.join(item_dir, n, '.zarray'), encoding='utf-8') as fh:
          out.append(json.load(fh))
      except FileNotFoundError:
        out.append(None)
    return out

  def _leaves_zarr(self, item_dir: str, collections):
    """None unless every leaf of the item is a zarr v2 array."""
    if _storage(item_dir)[1]:
      return None
    with open(os.path.join(item_dir, '_METADATA'), encoding='utf-8') as fh:
      tree = json.load(fh)['tree_metadata']
    leaves = []
    for entry in tree.values():
      keys = [str(k['key']) for k in entry['key_metadata']]
      coll = keys[0] if collections else None
      if collections and coll not in collections:
        continue
      parts = keys[1:] if collections else keys
      if parts and parts[-1] == 'value':
        parts = parts[:-1]
      leaves.append((coll, '/'.join(parts), '.'.join(keys)))
    out = []
    for (coll, path, name), z in zip(leaves, self._zarrays(item_dir, [n for *_, n in leaves])):
      if z is None:
        return None
      out.append((coll, path, tuple(z['shape']), np.dtype(z['dtype']).newbyteorder('='), name))
    for coll in collections or ():
      if not any(c == coll for c, *_ in out):
        raise ToolError(f'{item_dir}: no {coll!r} collection (not a v4jax checkpoint?)')
    return out

  @staticmethod
  def _leaves_orbax(item_dir: str, collections):
    import jax  # pylint: disable=import-outside-toplevel
    try:
      md = _ocp().PyTreeCheckpointer().metadata(item_dir)
    except Exception as e:  # noqa: BLE001
      raise ToolError(f'{item_dir}: cannot read the metadata ({str(e).splitlines()[0]})') from None
    tree = getattr(md, 'item_metadata', md)
    tree = getattr(tree, 'tree', tree)
    out = []
    for coll in collections or [None]:
      sub = tree if coll is None else tree.get(coll)
      if sub is None:
        raise ToolError(f'{item_dir}: no {coll!r} collection (not a v4jax checkpoint?)')
      for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
        parts = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
        if parts and parts[-1] == 'value':
          parts = parts[:-1]
        name = getattr(leaf, 'name', None) or '.'.join(([coll] if coll else []) + parts)
        out.append((coll, '/'.join(parts), tuple(leaf.shape), np.dtype(leaf.dtype), name))
    return out

  @staticmethod
  def _config(text: str) -> ml_collections.ConfigDict:
    """The run's config: today's defaults updated with the stored values (so fields added
    since the checkpoint was written have their defaults)."""
    from v4jax.config import default_config  # pylint: disable=import-outside-toplevel
    cfg = default_config()
    cfg.update(json.loads(text))
    return cfg

  def shapes(self) -> dict[tuple[str, str], tuple[int, ...]]:
    return {k: v[0] for k, v in self.arrays.items()}

  def nbytes(self, key) -> int:
    shape, dtype = self.arrays[key][:2]
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

  def _kvstore(self, item_dir: str):
    """The OCDBT key-value store of an item (opened once)."""
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    if item_dir not in self._kv:
      spec = {'driver': 'ocdbt', 'base': {'driver': 'file', 'path': item_dir.rstrip('/') + '/'}}
      self._kv[item_dir] = ts.KvStore.open(spec, context=self._ctx).result()
    return self._kv[item_dir]

  def _chunk(self, key) -> tuple[bytes | str, bool] | None:
    """(where the chunk is, zstd?) of an array kept as one zarr v2 chunk, C order, no filters, no
    or zstd compression: its OCDBT key (bytes), or its file path (str) in an item Orbax wrote
    without OCDBT; None for any other layout."""
    shape, dtype, name, item_dir, index = self.arrays[key]
    use_ocdbt, use_zarr3 = _storage(item_dir)
    if index or use_zarr3:
      return None
    try:
      zarray, = self._zarrays(item_dir, [name])
    except (OSError, ValueError):
      return None
    if zarray is None:
      return None
    compressor = zarray.get('compressor') or {'id': None}
    try:
      stored = np.dtype(zarray.get('dtype'))
    except TypeError:
      return None
    if (zarray.get('zarr_format') != 2 or zarray.get('filters') or zarray.get('order', 'C') != 'C'
        or list(zarray.get('chunks', ())) != list(shape) or list(zarray.get('shape', ())) != list(shape)
        or stored != dtype or stored.byteorder == '>'
        or compressor['id'] not in (None, 'zstd') or compressor['id'] and _zstd() is None):
      return None
    sep = zarray.get('dimension_separator', '.')
    chunk = f'{name}/' + (sep.join(['0'] * len(shape)) if shape else '0')
    return (chunk.encode() if use_ocdbt else os.path.join(item_dir, chunk),
            compressor['id'] == 'zstd')

  def mapped(self, key: tuple[str, str]) -> np.ndarray | None:
    """The array as a read-only view of its chunk file mapped into memory (an item written
    without OCDBT and without compression): no copy at all, the page cache's own pages,
    prefaulted in one call (MAP_POPULATE); unmapped when the view is dropped. None for any other
    layout (then `read`)."""
    shape, dtype, name, item_dir, _ = self.arrays[key]
    if _storage(item_dir)[0]:               # an OCDBT store: no file to map (no metadata read)
      return None
    chunk = self._chunk(key)
    if chunk is None or chunk[1]:
      return None
    n = self.nbytes(key)
    try:
      with open(chunk[0], 'rb') as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != n:
          raise ToolError(f'{item_dir}: {name} holds {size} bytes, metadata says {n} '
                          f'({shape} {dtype})')
        if n == 0:
          return np.zeros(shape, dtype)
        m = mmap.mmap(fh.fileno(), n, flags=mmap.MAP_PRIVATE | getattr(mmap, 'MAP_POPULATE', 0),
                      prot=mmap.PROT_READ)
    except OSError as e:
      raise ToolError(f'{item_dir}: cannot read {name} ({e})') from None
    return np.frombuffer(m, dtype).reshape(shape)

  def read(self, key: tuple[str, str], out: np.ndarray | None = None, progress=None) -> np.ndarray:
    """The array at (collection, path) as a numpy array: a view of `out` (a uint8 buffer of at
    least nbytes(key) bytes, reused across calls) where the array's layout allows it, else a
    new array. When it fills `out`, progress(k) is called as the first k bytes become final
    (first with k=0), so a caller can use the leading rows while the rest decodes."""
    if out is not None:
      chunk = self._chunk(key)
      if chunk is not None:
        return self._read_chunk(key, *chunk, out, progress or (lambda k: None))
    return self._read_ts(key)

  def _values(self, item_dir: str) -> dict[bytes, tuple[str, int, int] | bytes] | None:
    """Where each value of an item's OCDBT store lies: (data file, offset, length), or the
    value's bytes where the B+tree holds it inline; from TensorStore's dump of the newest version
    (manifest, then each tree node). None where the store cannot be listed so (then TensorStore
    reads the arrays)."""
    if item_dir in self._index:
      return self._index[item_dir]
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    out: dict[bytes, tuple[str, int, int] | bytes] | None = {}
    try:
      base = ts.KvStore.open({'driver': 'file', 'path': item_dir.rstrip('/') + '/'},
                             context=self._ctx).result()
      versions = ts.ocdbt.dump(base).result()['versions']
      root = max(versions, key=lambda v: v['generation_number'])['root'] if versions else {}
      nodes = [(root['location'], b'')] if 'location' in root else []
      while nodes:                                # (node, the key prefix its parents imply)
        location, prefix = nodes.pop()
        for e in ts.ocdbt.dump(base, location).result()['entries']:
          if 'location' in e:                     # an interior node's child
            nodes.append((e['location'], prefix + bytes(e['subtree_common_prefix'])))
          elif 'inline_value' in e:
            out[prefix + bytes(e['key'])] = bytes(e['inline_value'])
          else:                                   # value:base_path:relative_path:offset:length
            kind, base_path, rel, off, n = e['indirect_value'].split(':')
            if kind != 'value':
              raise ValueError(e['indirect_value'])
            path = os.path.join(item_dir, urllib.parse.unquote(base_path) + urllib.parse.unquote(rel))
            out[prefix + bytes(e['key'])] = (path, int(off), int(n))
    except (AttributeError, KeyError, TypeError, ValueError):   # not this dump format
      out = None
    self._index[item_dir] = out
    return out

  def _read_chunk(self, key, chunk: bytes | str, zstd: bool, out: np.ndarray,
                  progress) -> np.ndarray:
    """Decodes (or copies) the one stored chunk into out, from its bytes mapped in _RANGE
    windows: its own file, or its place in an OCDBT data file (no read through the key-value
    store: TensorStore's copies of every range cost about half as much CPU as the decode)."""
    shape, dtype, name, item_dir, _ = self.arrays[key]
    n = self.nbytes(key)
    dst = out[:n]
    if isinstance(chunk, str):
      where = (chunk, 0, None)
    else:
      values = self._values(item_dir)
      where = None if values is None else values.get(chunk)
      if where is None:                           # not listed, or a chunk never written (fill)
        return self._read_ts(key)
    feed = _zstd().decoder(dst) if zstd else None
    pieces = iter([where]) if isinstance(where, bytes) else _windows(*where)
    got, done = 0, False
    progress(0)
    try:
      while not done:
        piece = next(pieces, None)
        if piece is None:
          break
        if zstd:
          done, got = feed(piece), feed.done()
        else:
          k = min(len(piece), n - got)
          dst[got:got + k] = np.frombuffer(piece, np.uint8, k)
          got += len(piece)
        del piece                                 # the window can be unmapped
        progress(min(got, n))
    except (OSError, ValueError) as e:
      raise ToolError(f'{item_dir}: cannot read {name} ({str(e).splitlines()[0]})') from None
    finally:
      getattr(pieces, 'close', lambda: None)()
      if feed is not None:
        feed.close()
    if got != n:
      raise ToolError(f'{item_dir}: {name} holds {got} bytes, metadata says {n} ({shape} {dtype})')
    return dst.view(dtype).reshape(shape)

  def _read_ts(self, key) -> np.ndarray:
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    from etils import epath  # pylint: disable=import-outside-toplevel
    ocp = _ocp()
    shape, _, name, item_dir, index = self.arrays[key]
    use_ocdbt, use_zarr3 = _storage(item_dir)
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(item_dir),
                                       use_zarr3=use_zarr3, ts_context=self._ctx)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    try:
      arr = ts.open(spec, context=self._ctx, open=True, read=True).result()
      out = np.asarray(arr[index].read().result() if index else arr.read().result())
    except Exception as e:  # noqa: BLE001 - reported with the tensor
      raise ToolError(f'{item_dir}: cannot read {name} ({str(e).splitlines()[0]})') from None
    if out.shape != shape:
      raise ToolError(f'{item_dir}: {name} has shape {out.shape}, metadata says {shape}')
    return out
