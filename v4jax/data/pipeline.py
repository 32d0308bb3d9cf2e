"""Grain input pipeline: documents -> packed rows -> this process's slice of each global batch.

Stages (docs/data.md has the full contract):
  source documents -> (train: reshuffle every epoch with data.shuffle_seed; validation: fixed
  order) -> repeat forever -> tokenize, each document becomes [<eos>, ids...] -> greedy packing of
  that stream into rows of seq_len + 1 tokens, documents split across rows where they fall ->
  global batch k = rows [k*G, (k+1)*G) of the stream (G = data.global_batch); process p keeps
  rows [p*b, (p+1)*b), b = G / process_count -> features (+ Engram row ids) in numpy.

Every process packs the same global stream and materialises only its own rows, so the global
batch and every process's iterator state are independent of the process count.

Batch fields (b rows, T = data.seq_len): tokens, targets (next token), positions, segment_ids
int32 [b, T]; loss_mask float32 [b, T]; engram_rows_<layer> int32 [b, T, J] when Engram is on.

data.source='synthetic' (benchmarks) skips documents and packing: `SyntheticRows` draws each
global row from its own seeded generator, with the same batch fields.
"""
from __future__ import annotations

from absl import flags
import grain
import numpy as np

from v4jax.config import ConfigError
from v4jax.data import sources
from v4jax.data.tokenizer import get_tokenizer

# Grain's worker processes read absl flags; outside absl.app.run they would be unparsed.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

_READ_OPTIONS = dict(num_threads=4, prefetch_buffer_size=64)


class EncodeDocument:
  """Document -> np.int32 [1 + n] = [eos, ids...]; tokenizer None means already token ids."""

  def __init__(self, tokenizer, eos_id: int):
    self.tokenizer = tokenizer
    self.eos_id = eos_id

  def __call__(self, doc) -> np.ndarray:
    ids = self.tokenizer.encode(doc) if self.tokenizer is not None else doc
    out = np.empty(len(ids) + 1, np.int32)
    out[0] = self.eos_id
    out[1:] = ids
    return out


class PackedRows(grain.IterDataset):
  """Greedy packing of a stream of token arrays into global batches of `global_rows` rows of
  `row_len` tokens; yields only rows [first_row, first_row + num_rows) of each global batch as
  {'tokens': int32 [num_rows, row_len], 'doc_start': bool [num_rows, row_len]}.

  doc_start marks where a stream element (a document) begins.
  """

  def __init__(self, parent: grain.IterDataset, *, row_len: int, global_rows: int,
               first_row: int, num_rows: int):
    super().__init__(parent)
    if not 0 <= first_row < first_row + num_rows <= global_rows:
      raise ValueError(f'rows [{first_row}, {first_row + num_rows}) are not inside a global '
                       f'batch of {global_rows} rows')
    self._args = dict(row_len=row_len, global_rows=global_rows, first_row=first_row,
                      num_rows=num_rows)

  def __iter__(self):
    return _PackedRowsIterator(self._parent.__iter__(), **self._args)

  def __str__(self):
    return f'PackedRows({self._args})'


class _PackedRowsIterator(grain.DatasetIterator):
  """State = the parent's state just before the partly used document, plus how many of its
  tokens are used, so the state stays a few integers however long documents are."""

  def __init__(self, parent, *, row_len, global_rows, first_row, num_rows):
    super().__init__(parent)
    self._row_len, self._num_rows = row_len, num_rows
    self._total = global_rows * row_len
    self._lo = first_row * row_len
    self._hi = self._lo + num_rows * row_len
    self._doc = np.zeros(0, np.int32)
    self._off = 0
    self._doc_state = None

  def __next__(self):
    lo, hi = self._lo, self._hi
    tokens = np.empty(hi - lo, np.int32)
    starts = np.zeros(hi - lo, np.bool_)
    n = 0
    while n < self._total:
      if self._off >= len(self._doc):
        self._doc_state = self._parent.get_state()
        self._doc = next(self._parent)
        self._off = 0
      take = min(len(self._doc) - self._off, self._total - n)
      a, b = max(n, lo), min(n + take, hi)
      if a < b:
        tokens[a - lo:b - lo] = self._doc[self._off + a - n:self._off + b - n]
        if self._off == 0 and a == n:
          starts[n - lo] = True
      self._off += take
      n += take
    shape = (self._num_rows, self._row_len)
    return {'tokens': tokens.reshape(shape), 'doc_start': starts.reshape(shape)}

  def get_state(self):
    if self._off < len(self._doc):
      return {'parent': self._doc_state, 'doc_offset': int(self._off)}
    return {'parent': self._parent.get_state(), 'doc_offset': 0}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._doc, self._off, self._doc_state = np.zeros(0, np.int32), 0, None
    if state['doc_offset'] > 0:
      self._doc_state = state['parent']
      self._doc = next(self._parent)
      self._off = int(state['doc_offset'])


class SyntheticRows:
  """Random-access batches of uniform random token ids in [0, vocab_size) (data.source='synthetic').

  Item k = rows [first_row, first_row + num_rows) of global batch k in PackedRows' form
  ({'tokens': int32 [num_rows, row_len], 'doc_start': bool}). Global row j of batch k comes from
  its own generator seeded (seed, split, k, j), so batches do not depend on the process count and
  Grain's iterator state (the next index) resumes exactly. Each row is one document without
  <eos> (segment 1, positions 0..T-1), like MaxText's synthetic data.
  """

  def __init__(self, *, vocab_size: int, row_len: int, first_row: int, num_rows: int, seed: int,
               split: str):
    self.vocab_size, self.row_len = vocab_size, row_len
    self.first_row, self.num_rows = first_row, num_rows
    self.seed, self.split_id = seed, sources.SPLITS.index(split)

  def __len__(self):
    return 2**31 - 1

  def __getitem__(self, k):
    draw = lambda j: np.random.default_rng([self.seed, self.split_id, int(k), j]).integers(
        0, self.vocab_size, self.row_len, dtype=np.int32)
    tokens = np.stack([draw(self.first_row + i) for i in range(self.num_rows)])
    starts = np.zeros(tokens.shape, np.bool_)
    starts[:, 0] = True
    return {'tokens': tokens, 'doc_start': starts}


class RowFeatures:
  """Packed rows [b, T+1] -> the model's batch dict (see the module docstring).

  segment_ids count documents within a row from 1 (a row that starts mid-document starts with
  segment 1); positions are 0..T-1, or, with respect_doc_boundaries, restart at 0 at every
  document start and at the row start.
  """

  def __init__(self, *, seq_len: int, respect_doc_boundaries: bool, pad_id: int | None,
               hash_spec=None):
    self.seq_len = seq_len
    self.respect_doc_boundaries = respect_doc_boundaries
    self.pad_id = pad_id
    self.hash_spec = hash_spec

  def __call__(self, packed: dict) -> dict:
    t = self.seq_len
    rows = packed['tokens']
    start = packed['doc_start'][:, :t].copy()
    start[:, 0] = True
    seg = np.cumsum(start, axis=1, dtype=np.int32)
    iota = np.arange(t, dtype=np.int32)
    if self.respect_doc_boundaries:
      pos = iota - np.maximum.accumulate(np.where(start, iota, 0), axis=1)
    else:
      pos = np.broadcast_to(iota, seg.shape)
    targets = np.ascontiguousarray(rows[:, 1:])
    mask = np.ones(seg.shape, np.float32) if self.pad_id is None else \
        (targets != self.pad_id).astype(np.float32)
    out = {'tokens': np.ascontiguousarray(rows[:, :t]), 'targets': targets,
           'positions': np.ascontiguousarray(pos, dtype=np.int32), 'segment_ids': seg,
           'loss_mask': mask}
    if self.hash_spec is not None:
      from v4jax.data.engram_hash import hash_rows  # pylint: disable=import-outside-toplevel
      hashed = hash_rows(self.hash_spec, out['tokens'],
                         seg if self.respect_doc_boundaries else None)
      for layer, ids in hashed.items():
        out[f'engram_rows_{layer}'] = np.asarray(ids, dtype=np.int32)
    return out


def batch_fields(cfg, rows: int) -> dict[str, tuple[tuple[int, ...], type]]:
  """(shape, dtype) of each field of a batch of `rows` rows as the train step takes it (module
  docstring). With Engram tables in host memory the step gets `engram_inv_<layer>` instead of
  the row ids: each slot's index into the step's unique rows (memory/host_tables.py)."""
  shape = (rows, cfg.data.seq_len)
  fields = {k: (shape, np.int32) for k in ('tokens', 'targets', 'positions', 'segment_ids')}
  fields['loss_mask'] = (shape, np.float32)
  g = cfg.engram
  if g.enabled:
    key = 'engram_inv_{}' if g.table_memory == 'host' else 'engram_rows_{}'
    for lid in g.layer_ids:
      fields[key.format(lid)] = (shape + ((g.max_ngram - 1) * g.heads_per_ngram,), np.int32)
  return fields


def open_source(cfg, split: str):
  """(source, tokenizer or None, vocab_size, eos_id, pad_id) for cfg.data.source and split."""
  d = cfg.data
  if d.source == 'builtin':
    tok = get_tokenizer(d.tokenizer)
    src = sources.BuiltinCorpus(split, val_fraction=d.val_fraction, max_docs=d.max_docs)
    return src, tok, tok.vocab_size, tok.eos_id, tok.pad_id
  if d.source == 'array_record':
    src = sources.TokenShardSource(d.path, split)
    return src, None, src.vocab_size, src.eos_id, src.pad_id
  raise ConfigError(f"config.data.source={d.source!r} is not one of ('builtin', 'array_record')")


def make_dataset(cfg, split: str, *, hash_spec=None, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """The infinite IterDataset of this process's batches for `split` ('train' | 'validation').

  hash_spec: the Engram hashing spec; with cfg.engram.enabled the batches also carry
  engram_rows_<layer> from v4jax.data.engram_hash.hash_rows. Iterators resume exactly through
  get_state/set_state (and grain.checkpoint.CheckpointSave/Restore in an Orbax checkpoint).
  """
  d = cfg.data
  if split not in sources.SPLITS:
    raise ValueError(f'split={split!r} is not one of {sources.SPLITS}')
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  if d.global_batch <= 0 or d.global_batch % process_count:
    raise ConfigError(f'config.data.global_batch={d.global_batch} must be a positive multiple '
                      f'of the process count {process_count}')
  if d.seq_len <= 0:
    raise ConfigError(f'config.data.seq_len={d.seq_len} must be a positive integer')
  if not 0 <= d.shuffle_seed < 2**32:
    raise ConfigError(f'config.data.shuffle_seed={d.shuffle_seed} must be in [0, 2**32)')
  if d.source == 'synthetic':   # features (and Engram hashing) run in Grain's read threads
    rows = d.global_batch // process_count
    src = SyntheticRows(vocab_size=cfg.model.vocab_size, row_len=d.seq_len + 1,
                        first_row=process_index * rows, num_rows=rows, seed=d.shuffle_seed,
                        split=split)
    feats = RowFeatures(seq_len=d.seq_len, respect_doc_boundaries=d.respect_doc_boundaries,
                        pad_id=None, hash_spec=hash_spec if cfg.engram.enabled else None)
    it = grain.MapDataset.source(src).map(feats).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if d.num_workers > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
    return it
  src, tok, vocab_size, eos_id, pad_id = open_source(cfg, split)
  if vocab_size > cfg.model.vocab_size:
    raise ConfigError(f'config.model.vocab_size={cfg.model.vocab_size} is smaller than the data '
                      f'vocabulary ({vocab_size} ids)')

  ds = grain.MapDataset.source(src)
  if split == 'train':
    ds = ds.shuffle(seed=d.shuffle_seed)   # a new permutation each epoch (seed + epoch)
  ds = ds.repeat(None).map(EncodeDocument(tok, eos_id))
  rows = d.global_batch // process_count
  it = PackedRows(ds.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS)),
                  row_len=d.seq_len + 1, global_rows=d.global_batch,
                  first_row=process_index * rows, num_rows=rows)
  spec = hash_spec if cfg.engram.enabled else None
  it = it.map(RowFeatures(seq_len=d.seq_len, respect_doc_boundaries=d.respect_doc_boundaries,
                          pad_id=pad_id, hash_spec=spec))
  if d.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return it
