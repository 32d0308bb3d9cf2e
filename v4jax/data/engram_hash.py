"""Engram N-gram hash on the host (SPEC §6.1-6.2), NumPy only, bit-exact with the Engram demo.

Dims: B batch, T positions, G n-gram order index (orders 2..N), J = (N-1)*K_e table heads.

Token ids are first compressed (tokenizer-normalised ids), then for each Engram layer the n-gram
ending at position t is mixed with per-layer odd multipliers (int64 multiply + XOR) and reduced
modulo one distinct prime per (order, head); adding the head's offset gives a row of the layer's
concatenated table. Multipliers, primes, offsets and the lookup form a frozen artefact
(`EngramHashSpec`) that the trainer stores in the checkpoint and never regenerates: NumPy
Generator streams are not guaranteed across versions, and the lookup depends on the tokenizer files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

__all__ = ['EngramHashSpec', 'build_hash_spec', 'make_hash_spec', 'hash_rows',
           'build_compressed_lookup', 'identity_lookup']

_FORMAT = 'v4jax.engram_hash/1'
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True, eq=False)
class EngramHashSpec:
  """Frozen hash artefact. Per-layer tuples follow `layer_ids` order; table heads are in j order,
  j = (order - 2) * heads_per_ngram + head."""
  layer_ids: tuple[int, ...]
  max_ngram: int                            # N: orders 2..N
  heads_per_ngram: int                      # K_e
  base_rows: tuple[int, ...]                # R_n per order 2..N
  seed: int
  pad_id: int                               # tokenizer pad id
  compressed_pad_id: int                    # pad' = lookup[pad_id]
  compressed_vocab_size: int                # V'
  lookup: np.ndarray                        # int64 [V], read-only
  multipliers: tuple[tuple[int, ...], ...]  # [layers][N], odd int64
  table_sizes: tuple[tuple[int, ...], ...]  # [layers][J], distinct primes
  offsets: tuple[tuple[int, ...], ...]      # [layers][J], exclusive cumsum of table_sizes

  @property
  def vocab_size(self) -> int:
    return int(self.lookup.shape[0])

  @property
  def num_heads(self) -> int:
    return (self.max_ngram - 1) * self.heads_per_ngram

  def layer_index(self, layer_id: int) -> int:
    if layer_id not in self.layer_ids:
      raise KeyError(f'engram layer {layer_id} is not in the hash spec layer_ids={self.layer_ids}')
    return self.layer_ids.index(layer_id)

  def rows_in_layer(self, layer_id: int) -> int:
    """R_l: rows of layer `layer_id`'s concatenated table (sum of its primes)."""
    return sum(self.table_sizes[self.layer_index(layer_id)])

  @property
  def total_rows(self) -> dict[int, int]:
    return {l: self.rows_in_layer(l) for l in self.layer_ids}

  def to_json(self) -> str:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d['lookup'] = self.lookup.tolist()
    return json.dumps({'format': _FORMAT, **d})

  @classmethod
  def from_json(cls, text: str) -> 'EngramHashSpec':
    d = json.loads(text)
    if d.pop('format', None) != _FORMAT:
      raise ValueError(f'EngramHashSpec.from_json: expected format {_FORMAT!r}')
    names = {f.name for f in dataclasses.fields(cls)}
    if set(d) != names:
      raise ValueError(f'EngramHashSpec.from_json: fields {sorted(set(d) ^ names)} missing or '
                       'unknown')
    tup = lambda x: tuple(tuple(int(v) for v in r) for r in x)
    spec = cls(
        layer_ids=tuple(int(v) for v in d['layer_ids']), max_ngram=int(d['max_ngram']),
        heads_per_ngram=int(d['heads_per_ngram']),
        base_rows=tuple(int(v) for v in d['base_rows']), seed=int(d['seed']),
        pad_id=int(d['pad_id']), compressed_pad_id=int(d['compressed_pad_id']),
        compressed_vocab_size=int(d['compressed_vocab_size']),
        lookup=_frozen(np.asarray(d['lookup'], np.int64)),
        multipliers=tup(d['multipliers']), table_sizes=tup(d['table_sizes']),
        offsets=tup(d['offsets']))
    _check_spec(spec)
    return spec

  def __eq__(self, other):
    return isinstance(other, EngramHashSpec) and self.to_json() == other.to_json()

  __hash__ = None


def _frozen(a: np.ndarray) -> np.ndarray:
  a = np.array(a, np.int64)
  a.setflags(write=False)
  return a


def _check_spec(s: EngramHashSpec):
  n_l, j = len(s.layer_ids), s.num_heads
  if (len(s.multipliers), len(s.table_sizes), len(s.offsets)) != (n_l, n_l, n_l):
    raise ValueError(f'EngramHashSpec: per-layer tuples must have {n_l} entries (layer_ids)')
  for i, l in enumerate(s.layer_ids):
    if len(s.multipliers[i]) != s.max_ngram or any(m % 2 == 0 for m in s.multipliers[i]):
      raise ValueError(f'EngramHashSpec.multipliers[{l}] must be {s.max_ngram} odd integers')
    if len(s.table_sizes[i]) != j or list(s.offsets[i]) != _exclusive_cumsum(s.table_sizes[i]):
      raise ValueError(f'EngramHashSpec: layer {l} needs {j} table_sizes and offsets = their '
                       'exclusive cumsum')
    if sum(s.table_sizes[i]) > _INT32_MAX:
      raise ValueError(f'EngramHashSpec: layer {l} has {sum(s.table_sizes[i])} rows, over 2^31-1')
  if not 0 <= s.compressed_pad_id < s.compressed_vocab_size:
    raise ValueError(f'EngramHashSpec.compressed_pad_id={s.compressed_pad_id} must lie in '
                     f'[0, compressed_vocab_size={s.compressed_vocab_size})')


def _exclusive_cumsum(sizes: Sequence[int]) -> list[int]:
  out, acc = [], 0
  for v in sizes:
    out.append(acc)
    acc += v
  return out


def _is_prime(v: int) -> bool:
  if v < 2:
    return False
  if v % 2 == 0 or v % 3 == 0:
    return v in (2, 3)
  f = 5
  while f * f <= v:
    if v % f == 0 or v % (f + 2) == 0:
      return False
    f += 6
  return True


def _multipliers(seed: int, layer_id: int, max_ngram: int,
                 compressed_vocab: int) -> tuple[int, ...]:
  half = max(1, ((2**63 - 1) // compressed_vocab) // 2)
  r = np.random.default_rng(seed + 10007 * layer_id).integers(0, half, size=max_ngram,
                                                              dtype=np.int64)
  return tuple(int(v) * 2 + 1 for v in r)


def identity_lookup(vocab_size: int) -> np.ndarray:
  """The compressed-id lookup of a tokenizer whose ids are already distinct (the byte tokenizer)."""
  return np.arange(vocab_size, dtype=np.int64)


def build_hash_spec(*, layer_ids: Sequence[int], max_ngram: int, heads_per_ngram: int,
                    base_rows: int | Sequence[int], lookup: np.ndarray, pad_id: int,
                    seed: int = 0) -> EngramHashSpec:
  """Generates multipliers and globally unique primes (layers in order, then orders 2..N)."""
  lookup = np.asarray(lookup)
  if lookup.ndim != 1 or not np.issubdtype(lookup.dtype, np.integer) or lookup.min() < 0:
    raise ValueError('engram lookup must be a 1-D array of non-negative integer ids')
  if not 0 <= pad_id < lookup.shape[0]:
    raise ValueError(f'config.engram.pad_id={pad_id} must lie in '
                     f'[0, len(lookup)={lookup.shape[0]})')
  if max_ngram < 2 or heads_per_ngram < 1:
    raise ValueError(f'engram max_ngram={max_ngram} must be >= 2 and heads_per_ngram='
                     f'{heads_per_ngram} >= 1')
  orders = max_ngram - 1
  base = (int(base_rows),) * orders if np.isscalar(base_rows) else tuple(int(r) for r in base_rows)
  if len(base) != orders or min(base) < 2:
    raise ValueError(f'engram base_rows={base_rows} must be one int >= 2 or {orders} of them')
  v_c = int(lookup.max()) + 1
  used: set[int] = set()
  mults, sizes = [], []
  for l in layer_ids:
    mults.append(_multipliers(seed, int(l), max_ngram, v_c))
    row = []
    for g in range(orders):
      start = base[g] - 1
      for _ in range(heads_per_ngram):
        p = start + 1
        while p in used or not _is_prime(p):
          p += 1
        used.add(p)
        row.append(p)
        start = p
    sizes.append(tuple(row))
  spec = EngramHashSpec(
      layer_ids=tuple(int(l) for l in layer_ids), max_ngram=max_ngram,
      heads_per_ngram=heads_per_ngram, base_rows=base, seed=seed, pad_id=pad_id,
      compressed_pad_id=int(lookup[pad_id]), compressed_vocab_size=v_c, lookup=_frozen(lookup),
      multipliers=tuple(mults), table_sizes=tuple(sizes),
      offsets=tuple(tuple(_exclusive_cumsum(s)) for s in sizes))
  _check_spec(spec)
  return spec


def make_hash_spec(cfg, lookup: np.ndarray | None = None) -> EngramHashSpec:
  """The spec for `cfg.engram`; `lookup=None` means the identity lookup over model.vocab_size."""
  g = cfg.engram
  if lookup is None:
    lookup = identity_lookup(cfg.model.vocab_size)
  return build_hash_spec(layer_ids=g.layer_ids, max_ngram=g.max_ngram,
                         heads_per_ngram=g.heads_per_ngram, base_rows=g.base_rows, lookup=lookup,
                         pad_id=g.pad_id, seed=g.seed)


def hash_rows(spec: EngramHashSpec, tokens_BT: np.ndarray,
              segment_ids_BT: np.ndarray | None = None) -> dict[int, np.ndarray]:
  """Table rows per Engram layer: {layer_id: int32 [B,T,J]} with the head offsets added.

  Positions before the row start use pad'. With `segment_ids_BT` (respect_doc_boundaries), a
  position of another segment than t also uses pad', so n-grams never cross a document start.
  """
  tokens = np.asarray(tokens_BT)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'hash_rows: tokens_BT must be an integer [B,T] array, got {tokens.dtype} '
                     f'{tokens.shape}')
  if tokens.size and tokens.max() >= spec.vocab_size:
    raise ValueError(f'hash_rows: token id {int(tokens.max())} >= lookup size {spec.vocab_size}')
  tokens = tokens.astype(np.int64)
  x = np.where(tokens >= 0, spec.lookup[np.maximum(tokens, 0)], tokens)   # negatives pass through
  B, T = tokens.shape
  pos = np.broadcast_to(np.arange(T), (B, T))
  start = np.zeros((B, T), np.int64)    # first position of t's document (0 = row start)
  if segment_ids_BT is not None:
    seg = np.asarray(segment_ids_BT)
    if seg.shape != tokens.shape:
      raise ValueError(f'hash_rows: segment_ids_BT shape {seg.shape} != tokens {tokens.shape}')
    new_doc = np.zeros((B, T), bool)
    new_doc[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start = np.maximum.accumulate(np.where(new_doc, pos, 0), axis=1)
  pad = np.int64(spec.compressed_pad_id)
  shifted = []                          # shifted[i][b,t] = x'[b, t-i], or pad' before the start
  for i in range(spec.max_ngram):
    s = np.full((B, T), pad, np.int64)
    if i < T:
      s[:, i:] = x[:, :T - i]
    s[pos - i < start] = pad
    shifted.append(s)
  out = {}
  k_e = spec.heads_per_ngram
  for li, layer in enumerate(spec.layer_ids):
    m = np.asarray(spec.multipliers[li], np.int64)
    sizes = np.asarray(spec.table_sizes[li], np.int64)
    rows = np.empty((B, T, spec.num_heads), np.int64)
    mix = shifted[0] * m[0]
    for g in range(spec.max_ngram - 1):            # order n = g + 2
      mix = np.bitwise_xor(mix, shifted[g + 1] * m[g + 1])
      for k in range(k_e):
        j = g * k_e + k
        rows[:, :, j] = mix % sizes[j] + spec.offsets[li][j]
    out[layer] = rows.astype(np.int32)
  return out


# HF `clean_up_tokenization` (applied by AutoTokenizer.decode when the tokenizer config asks).
_CLEAN_UP = ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def build_compressed_lookup(tokenizer_json_path: str,
                            clean_up_tokenization_spaces: bool | None = None) -> np.ndarray:
  """Compressed-id lookup int64 [V] of an HF tokenizer.json (SPEC §6.1); V' = lookup.max() + 1.

  Each id is decoded alone (special tokens kept), as HF AutoTokenizer.decode does: the backend
  decode, then HF's clean-up of spaces before punctuation when `clean_up_tokenization_spaces`
  (None: read from a tokenizer_config.json beside the file, False if absent; DeepSeek-V3's says
  True). Its key is the normalised text (NFKC, NFD, StripAccents, Lowercase, whitespace runs ->
  ' ', a lone ' ' kept, Strip), or the raw text if that is empty, or the raw token string if the
  text holds U+FFFD. New ids follow first appearance.
  """
  try:
    from tokenizers import Regex, Tokenizer, normalizers
  except ImportError as e:
    raise ImportError('build_compressed_lookup needs the HF `tokenizers` package '
                      '(pip install tokenizers)') from e
  if clean_up_tokenization_spaces is None:
    cfg_path = os.path.join(os.path.dirname(tokenizer_json_path), 'tokenizer_config.json')
    tok_cfg = {}
    if os.path.exists(cfg_path):
      with open(cfg_path, encoding='utf-8') as f:
        tok_cfg = json.load(f)
    clean_up_tokenization_spaces = bool(tok_cfg.get('clean_up_tokenization_spaces', False))
  tok = Tokenizer.from_file(tokenizer_json_path)
  sentinel = '\ue000'
  norm = normalizers.Sequence([
      normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
      normalizers.Replace(Regex(r'[ \t\r\n]+'), ' '), normalizers.Replace(Regex(r'^ $'), sentinel),
      normalizers.Strip(), normalizers.Replace(sentinel, ' ')])
  vocab = tok.get_vocab_size(with_added_tokens=True)
  key_to_id: dict[str, int] = {}
  lookup = np.empty(vocab, np.int64)
  for tid in range(vocab):
    text = tok.decode([tid], skip_special_tokens=False)
    if clean_up_tokenization_spaces:
      for a, b in _CLEAN_UP:
        text = text.replace(a, b)
    if '\ufffd' in text:
      key = tok.id_to_token(tid)
    else:
      key = norm.normalize_str(text) or text
    lookup[tid] = key_to_id.setdefault(key, len(key_to_id))
  return lookup
