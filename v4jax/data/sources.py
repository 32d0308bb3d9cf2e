"""Document sources: random-access (`__len__`/`__getitem__`) datasets of documents for Grain.

Two sources:
- `BuiltinCorpus`: the Python standard library's own text files, so training needs no download.
  Items are `str` (the pipeline tokenizes them).
- `TokenShardSource`: pre-tokenized ArrayRecord shards in the `v4jax-tokens-v1` format
  (docs/data.md), written by `write_token_shards`. Items are `np.int32 [n]` token ids.

Both are module-level classes that open files lazily and pickle without open handles, because
Grain's worker processes start by spawn and receive the source by pickling.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import sysconfig
from typing import Mapping, Sequence

import numpy as np

FORMAT_TAG = 'v4jax-tokens-v1'
MANIFEST = 'manifest.json'
SPLITS = ('train', 'validation')
_DTYPES = ('uint16', 'int32', 'uint32')   # stored little-endian

# ---------------------------------------------------------------------------------------------
# Built-in corpus: the standard library's text files.

# Directories skipped anywhere in the tree: test suites (Linux distributions ship them in a
# separate package, and they hold deliberately odd files), caches, third-party code.
_SKIP_DIRS = frozenset({'test', 'tests', 'idle_test', '__pycache__', 'site-packages',
                        'dist-packages', 'lib-dynload'})
# Top-level packages and files that distributions split off, add or patch, so that the same
# Python version lists the same files on pyenv, python.org, conda and Debian-style installs.
_SKIP_TOP = frozenset({'idlelib', 'tkinter', 'turtledemo', 'ensurepip', 'lib2to3', 'distutils',
                       'turtle.py', 'sitecustomize.py', '_distutils_system_mod.py', 'LICENSE.txt'})
_SUFFIXES = ('.py', '.txt', '.rst')


def stdlib_root() -> str:
  """The standard library directory (the base interpreter's, also inside a virtualenv)."""
  return sysconfig.get_paths()['stdlib']


@functools.lru_cache(maxsize=4)
def list_builtin_corpus(root: str | None = None) -> tuple[str, ...]:
  """Sorted POSIX relative paths of the corpus files under `root` (default: the stdlib).

  Rules: *.py, *.txt and *.rst files; non-empty; skipping `_SKIP_DIRS` at any depth, the
  build-specific `config-*` directories and `_sysconfigdata*` modules, and `_SKIP_TOP` entries
  at the top level. Symlinks are not followed.
  """
  root = root or stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    top = rel_dir == '.'
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith('config-')
                   and not (top and d in _SKIP_TOP)]
    for f in filenames:
      if not f.endswith(_SUFFIXES) or f.startswith('_sysconfigdata') or (top and f in _SKIP_TOP):
        continue
      full = os.path.join(dirpath, f)
      if os.path.islink(full) or os.path.getsize(full) == 0:
        continue
      out.append(f if top else f'{rel_dir}/{f}'.replace(os.sep, '/'))
  return tuple(sorted(out))


def split_of(rel_path: str, val_fraction: float) -> str:
  """'validation' when the SHA-256 of the path, read as a fraction in [0, 1), is below
  val_fraction, else 'train': stable across machines, runs and corpus sizes."""
  h = int.from_bytes(hashlib.sha256(rel_path.encode('utf-8')).digest()[:8], 'big')
  return 'validation' if h / 2.0**64 < val_fraction else 'train'


class BuiltinCorpus:
  """The standard library's text files as documents (one file = one document, a `str`).

  The file list is deterministic (sorted relative paths, fixed skip rules) and the train /
  validation split depends only on each path, so any machine with the same Python version gets
  the same documents. The content does depend on the Python version (3.11 and 3.12 differ).
  Files are read as UTF-8 with undecodable bytes replaced. max_docs > 0 keeps the first
  max_docs files of the split in sorted order.
  """

  def __init__(self, split: str, *, val_fraction: float, max_docs: int = 0,
               root: str | None = None):
    if split not in SPLITS:
      raise ValueError(f'split={split!r} is not one of {SPLITS}')
    self.root = root or stdlib_root()
    files = [f for f in list_builtin_corpus(self.root) if split_of(f, val_fraction) == split]
    self.files = tuple(files[:max_docs] if max_docs > 0 else files)
    if not self.files:
      raise ValueError(f'the built-in corpus {split} split under {self.root!r} is empty '
                       f'(data.val_fraction={val_fraction}, data.max_docs={max_docs})')

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> str:
    with open(os.path.join(self.root, self.files[index]), 'rb') as fh:
      return fh.read().decode('utf-8', errors='replace')

  def __repr__(self):
    return f'BuiltinCorpus(root={self.root!r}, num_docs={len(self.files)})'


# ---------------------------------------------------------------------------------------------
# Token shards (format v4jax-tokens-v1, docs/data.md).

def shard_name(split: str, index: int, count: int) -> str:
  return f'{split}-{index:05d}-of-{count:05d}.array_record'


def read_manifest(directory: str) -> dict:
  """Loads and checks `directory/manifest.json`."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'token shard directory {directory!r} has no {MANIFEST} '
                            '(write it with v4jax.data.sources.write_token_shards)')
  with open(path, encoding='utf-8') as fh:
    m = json.load(fh)
  if m.get('format') != FORMAT_TAG:
    raise ValueError(f'{path}: format={m.get("format")!r}, expected {FORMAT_TAG!r}')
  for key in ('tokenizer', 'vocab_size', 'eos_id', 'pad_id', 'dtype', 'splits'):
    if key not in m:
      raise ValueError(f'{path}: missing key {key!r}')
  if m['dtype'] not in _DTYPES:
    raise ValueError(f'{path}: dtype={m["dtype"]!r} is not one of {_DTYPES}')
  return m


class TokenShardSource:
  """One split of a `v4jax-tokens-v1` directory: item i = document i's token ids, np.int32 [n].

  Documents are numbered across the split's shards in manifest order. The manifest is read at
  construction (so a bad directory fails early); the ArrayRecord readers open on first access
  and are dropped when pickled. Every record is checked against the manifest's vocab_size.
  """

  def __init__(self, directory: str, split: str):
    self.directory = directory
    self.split = split
    m = read_manifest(directory)
    if split not in m['splits']:
      raise ValueError(f'{os.path.join(directory, MANIFEST)} has no split {split!r} '
                       f'(has {sorted(m["splits"])})')
    self.tokenizer = m['tokenizer']
    self.vocab_size = int(m['vocab_size'])
    self.eos_id = int(m['eos_id'])
    self.pad_id = None if m['pad_id'] is None else int(m['pad_id'])
    self.dtype = m['dtype']
    shards = m['splits'][split]['shards']
    self._files = [os.path.join(directory, s['file']) for s in shards]
    for f in self._files:
      if not os.path.isfile(f):
        raise FileNotFoundError(f'shard {f!r} listed in {MANIFEST} does not exist')
    self._ends = list(np.cumsum([int(s['num_docs']) for s in shards]))
    self._num_docs = int(self._ends[-1]) if self._ends else 0
    if self._num_docs == 0:
      raise ValueError(f'split {split!r} of {directory!r} has no documents')
    self._reader = None

  def __len__(self) -> int:
    return self._num_docs

  def _open(self):
    if self._reader is None:
      from grain.sources import ArrayRecordDataSource  # pylint: disable=import-outside-toplevel
      reader = ArrayRecordDataSource(self._files)
      if len(reader) != self._num_docs:
        raise ValueError(f'split {self.split!r} of {self.directory!r}: shards hold {len(reader)} '
                         f'records, {MANIFEST} says {self._num_docs}')
      self._reader = reader
    return self._reader

  def _locate(self, index: int) -> tuple[str, int]:
    shard = bisect.bisect_right(self._ends, index)
    return os.path.basename(self._files[shard]), index - (self._ends[shard - 1] if shard else 0)

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    raw = self._open()[index]
    dt = np.dtype(self.dtype).newbyteorder('<')
    if len(raw) % dt.itemsize:
      f, r = self._locate(index)
      raise ValueError(f'record of {len(raw)} bytes is not a whole number of {self.dtype} '
                       f'tokens in shard {f} record {r}')
    ids = np.frombuffer(raw, dtype=dt)
    if ids.size and (ids.max() >= self.vocab_size or ids.min() < 0):
      bad = ids[(ids >= self.vocab_size) | (ids < 0)][0]
      f, r = self._locate(index)
      raise ValueError(f'token id {bad} out of range [0, {self.vocab_size}) in shard {f} record {r}')
    return ids.astype(np.int32)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_reader'} | {'_reader': None}

  def __repr__(self):
    return f'TokenShardSource({self.directory!r}, {self.split!r}, num_docs={self._num_docs})'


def write_token_shards(directory: str, splits: Mapping[str, Sequence[np.ndarray]], *,
                       tokenizer: str, vocab_size: int, eos_id: int, pad_id: int | None,
                       num_shards: int | Mapping[str, int] = 1, dtype: str | None = None) -> dict:
  """Writes each split's documents (token id arrays, no separators) as ArrayRecord shards plus
  manifest.json; returns the manifest. Documents go to shards in contiguous, equal-count runs,
  so reading the split back in order gives the input order. dtype defaults to uint16 when
  vocab_size <= 65536, else int32. The manifest is written last, atomically.
  """
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  dtype = dtype or ('uint16' if vocab_size <= 2**16 else 'int32')
  if dtype not in _DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of {_DTYPES}')
  if vocab_size > np.iinfo(dtype).max + 1:
    raise ValueError(f'vocab_size={vocab_size} does not fit dtype={dtype}')
  dt = np.dtype(dtype).newbyteorder('<')
  os.makedirs(directory, exist_ok=True)
  manifest = {'format': FORMAT_TAG, 'tokenizer': tokenizer, 'vocab_size': int(vocab_size),
              'eos_id': int(eos_id), 'pad_id': None if pad_id is None else int(pad_id),
              'dtype': dtype, 'splits': {}}
  for split, docs in splits.items():
    n = num_shards[split] if isinstance(num_shards, Mapping) else num_shards
    if n <= 0:
      raise ValueError(f'num_shards for split {split!r} must be positive, got {n}')
    shards = []
    for s, idx in enumerate(np.array_split(np.arange(len(docs)), n)):
      name = shard_name(split, s, n)
      writer = ArrayRecordWriter(os.path.join(directory, name), 'group_size:1')
      tokens = 0
      for i in idx:
        ids = np.asarray(docs[int(i)])
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
          raise ValueError(f'split {split!r} document {int(i)}: expected a 1-D integer array, '
                           f'got {ids.dtype}{list(ids.shape)}')
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
          bad = ids[(ids < 0) | (ids >= vocab_size)][0]
          raise ValueError(f'split {split!r} document {int(i)}: token id {bad} out of range '
                           f'[0, {vocab_size})')
        writer.write(ids.astype(dt).tobytes())
        tokens += int(ids.size)
      writer.close()
      shards.append({'file': name, 'num_docs': int(len(idx)), 'num_tokens': tokens})
    manifest['splits'][split] = {'shards': shards, 'num_docs': sum(s['num_docs'] for s in shards),
                                 'num_tokens': sum(s['num_tokens'] for s in shards)}
  tmp = os.path.join(directory, MANIFEST + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as fh:
    json.dump(manifest, fh, indent=1)
  os.replace(tmp, os.path.join(directory, MANIFEST))
  return manifest
