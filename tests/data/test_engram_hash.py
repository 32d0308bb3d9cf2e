"""Engram hash (SPEC §6.1-6.2): the SPEC test vectors, a loop oracle, determinism, doc boundaries,
the frozen JSON artefact and the tokenizer compression. Integer work: comparisons are exact."""
import json
import re
import unicodedata

import numpy as np
import pytest

from v4jax.config import default_config
from v4jax.data.engram_hash import (EngramHashSpec, build_compressed_lookup, build_hash_spec,
                                    hash_rows, identity_lookup, make_hash_spec)


def _tiny(**kw):
  args = dict(layer_ids=[1], max_ngram=3, heads_per_ngram=2, base_rows=101,
              lookup=identity_lookup(256), pad_id=2, seed=0)
  args.update(kw)
  return build_hash_spec(**args)


def _sieve(limit):
  is_p = np.ones(limit + 1, bool)
  is_p[:2] = False
  for i in range(2, int(limit ** 0.5) + 1):
    if is_p[i]:
      is_p[i * i::i] = False
  return np.flatnonzero(is_p)


def oracle_rows(tokens, lookup, pad, mults, primes_by_order, offsets, seg=None):
  """Per-position Python-int loop of SPEC §6.2 (primes_by_order[n-2][k], offsets in j order)."""
  B, T = tokens.shape
  n_max = len(mults)
  k_e = len(primes_by_order[0])
  out = np.zeros((B, T, (n_max - 1) * k_e), np.int64)
  for b in range(B):
    for t in range(T):
      def tok(i):
        s = t - i
        if s < 0 or (seg is not None and any(seg[b, r] != seg[b, t] for r in range(s, t + 1))):
          return pad
        x = int(tokens[b, s])
        return int(lookup[x]) if x >= 0 else x
      mix = tok(0) * mults[0]
      for n in range(2, n_max + 1):
        mix ^= tok(n - 1) * mults[n - 1]
        for k in range(k_e):
          j = (n - 2) * k_e + k
          out[b, t, j] = mix % primes_by_order[n - 2][k] + offsets[j]
  return out


def test_tiny_vectors():
  s = _tiny()
  assert s.multipliers == ((29662608052400909, 1873410163432121, 13919202536988139),)
  assert np.reshape(s.table_sizes[0], (2, 2)).tolist() == [[101, 103], [107, 109]]
  assert s.offsets == ((0, 101, 204, 311),)
  assert s.compressed_pad_id == 2 and s.compressed_vocab_size == 256
  assert s.rows_in_layer(1) == 420 and s.total_rows == {1: 420}
  rows = hash_rows(s, np.array([[5, 17, 200, 3, 5, 17]]))
  assert set(rows) == {1}
  assert rows[1].dtype == np.int32 and rows[1].shape == (1, 6, 4)
  assert rows[1][0].tolist() == [[14, 164, 307, 414], [14, 154, 291, 400], [75, 131, 264, 388],
                                 [86, 193, 297, 361], [3, 191, 212, 322], [14, 154, 307, 368]]


def test_demo_config_primes():
  s = build_hash_spec(layer_ids=[1, 15], max_ngram=3, heads_per_ngram=8, base_rows=646_400,
                      lookup=identity_lookup(129_280), pad_id=2)
  assert s.table_sizes[0][:8] == (646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523)
  assert s.table_sizes[0][8:] == (646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619)
  assert s.table_sizes[1][0] == 646631
  # Oracle (sieve): every head skips the primes already used, so the 32 are consecutive primes.
  primes = _sieve(647_500)
  after = primes[primes > 646_399]
  assert list(s.table_sizes[0]) + list(s.table_sizes[1]) == after[:32].tolist()
  assert s.offsets[1] == tuple(np.concatenate([[0], np.cumsum(s.table_sizes[1])[:-1]]).tolist())


def test_matches_loop_oracle_two_layers_compressed_lookup():
  rng = np.random.default_rng(0)
  lookup = rng.integers(0, 40, 60)                 # a many-to-one compression
  lookup[0] = 45                                   # V' = 46
  s = build_hash_spec(layer_ids=[0, 3], max_ngram=4, heads_per_ngram=3, base_rows=[50, 70, 90],
                      lookup=lookup, pad_id=7, seed=5)
  assert s.compressed_vocab_size == 46 and s.compressed_pad_id == lookup[7]
  all_p = [p for sizes in s.table_sizes for p in sizes]
  assert len(set(all_p)) == len(all_p) and set(all_p) <= set(_sieve(1000).tolist())
  assert min(s.table_sizes[0][:3]) > 49 and min(s.table_sizes[0][3:6]) > 69
  tokens = rng.integers(0, 60, (2, 11))
  got = hash_rows(s, tokens)
  for li, layer in enumerate(s.layer_ids):
    mults = [int(m) for m in s.multipliers[li]]
    v_half = max(1, ((2**63 - 1) // 46) // 2)
    want_m = (np.random.default_rng(5 + 10007 * layer).integers(0, v_half, 4, dtype=np.int64) * 2
              + 1).tolist()
    assert mults == want_m
    primes = np.reshape(s.table_sizes[li], (3, 3)).tolist()
    want = oracle_rows(tokens, lookup, int(lookup[7]), mults, primes, s.offsets[li])
    np.testing.assert_array_equal(got[layer], want)
    assert got[layer].max() < s.rows_in_layer(layer)


def test_doc_boundaries():
  s = _tiny()
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 256, (2, 12))
  seg = np.array([[1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3], [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
  mults = list(s.multipliers[0])
  primes = [[101, 103], [107, 109]]
  got = hash_rows(s, tokens, seg)[1]
  np.testing.assert_array_equal(got, oracle_rows(tokens, np.arange(256), 2, mults, primes,
                                                 s.offsets[0], seg))
  plain = hash_rows(s, tokens)[1]                  # default: n-grams cross documents
  np.testing.assert_array_equal(plain, oracle_rows(tokens, np.arange(256), 2, mults, primes,
                                                   s.offsets[0]))
  assert (got[0, 4] != plain[0, 4]).any()          # position 4 starts document 2
  np.testing.assert_array_equal(got[0, :4], plain[0, :4])
  # A document's first token hashes like a row start.
  np.testing.assert_array_equal(got[0, 4], hash_rows(s, tokens[:1, 4:5])[1][0, 0])


def test_determinism_and_json_roundtrip():
  a, b = _tiny(), _tiny()
  assert a == b
  tokens = np.random.default_rng(2).integers(0, 256, (3, 9))
  np.testing.assert_array_equal(hash_rows(a, tokens)[1], hash_rows(b, tokens)[1])
  c = EngramHashSpec.from_json(a.to_json())
  assert c == a and c.lookup.dtype == np.int64
  np.testing.assert_array_equal(hash_rows(c, tokens)[1], hash_rows(a, tokens)[1])
  # The stored artefact wins: a changed multiplier in the JSON is used, never regenerated.
  d = json.loads(a.to_json())
  d['multipliers'][0][0] = 12345
  e = EngramHashSpec.from_json(json.dumps(d))
  assert e.multipliers[0][0] == 12345 and e != a
  assert (hash_rows(e, tokens)[1] != hash_rows(a, tokens)[1]).any()
  with pytest.raises(ValueError, match='offsets'):
    d['offsets'][0][1] = 100
    EngramHashSpec.from_json(json.dumps(d))
  with pytest.raises(ValueError, match='format'):
    EngramHashSpec.from_json('{}')
  with pytest.raises(ValueError):
    a.lookup[0] = 1                                # read-only


def test_make_hash_spec_from_config_and_errors():
  cfg = default_config()
  cfg.engram.enabled = True
  s = make_hash_spec(cfg)
  assert s.vocab_size == cfg.model.vocab_size and s.compressed_pad_id == cfg.engram.pad_id
  assert s.layer_ids == tuple(cfg.engram.layer_ids)
  assert s.num_heads == (cfg.engram.max_ngram - 1) * cfg.engram.heads_per_ngram
  with pytest.raises(ValueError, match='lookup size'):
    hash_rows(s, np.array([[1, cfg.model.vocab_size]]))
  with pytest.raises(ValueError, match='pad_id'):
    build_hash_spec(layer_ids=[1], max_ngram=3, heads_per_ngram=2, base_rows=101,
                    lookup=identity_lookup(10), pad_id=10)
  with pytest.raises(KeyError, match='layer_ids'):
    s.rows_in_layer(99)


# ---- tokenizer compression --------------------------------------------------------------------

def oracle_key(text, raw):
  """SPEC §6.1 with Python's unicodedata/re instead of HF normalizers."""
  if '\ufffd' in text:
    return raw
  t = unicodedata.normalize('NFKC', text)
  t = unicodedata.normalize('NFD', t)
  t = ''.join(ch for ch in t if unicodedata.category(ch) != 'Mn')
  t = t.lower()
  t = re.sub(r'[ \t\r\n]+', ' ', t)
  t = '\ue000' if t == ' ' else t
  t = t.strip().replace('\ue000', ' ')
  return t or text


def test_compressed_lookup_word_level(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  words = ['<pad>', 'Hello', 'hello', 'HELLO', ' ', '\t', '  \n', 'café', 'cafe', 'Ｃａｆｅ', 'ﬁ',
           'fi', ' x ', 'x', 'Straße', 'strasse', '\u0301', '\u0300']   # last two normalise to ''
  vocab = {w: i for i, w in enumerate(words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<pad>'))
  path = str(tmp_path / 'tokenizer.json')
  tok.save(path)
  lookup = build_compressed_lookup(path)
  keys, want = {}, []
  for w in words:
    want.append(keys.setdefault(oracle_key(w, w), len(keys)))
  assert lookup.tolist() == want
  assert lookup[1] == lookup[2] == lookup[3] and lookup[4] == lookup[5] == lookup[6]
  assert lookup[7] == lookup[8] == lookup[9] and lookup[10] == lookup[11]
  assert lookup[12] == lookup[13] and len({lookup[16], lookup[17], lookup[4]}) == 3



def test_compressed_lookup_hf_clean_up(tmp_path):
  """AutoTokenizer.decode removes spaces before punctuation when the tokenizer config says so."""
  tokenizers = pytest.importorskip('tokenizers')
  words = ['<pad>', 'a .', 'a.', "don 't", "don't", 'b ,c', 'b,c']
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                         unk_token='<pad>'))
  path = str(tmp_path / 'tokenizer.json')
  tok.save(path)
  plain = build_compressed_lookup(path)
  assert plain.tolist() == list(range(len(words)))                   # no clean-up: all distinct
  cleaned = build_compressed_lookup(path, clean_up_tokenization_spaces=True)
  assert cleaned.tolist() == [0, 1, 1, 2, 3, 4, 4]                   # no HF rule for " 't"
  (tmp_path / 'tokenizer_config.json').write_text('{"clean_up_tokenization_spaces": true}')
  assert build_compressed_lookup(path).tolist() == cleaned.tolist()  # read beside the file


def test_compressed_lookup_needs_tokenizers(monkeypatch):
  monkeypatch.setitem(__import__('sys').modules, 'tokenizers', None)
  with pytest.raises(ImportError, match='tokenizers'):
    build_compressed_lookup('unused.json')


def test_compressed_lookup_byte_level_partial_utf8(tmp_path):
  tokenizers = pytest.importorskip('tokenizers')
  from tokenizers import decoders, models, pre_tokenizers
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  b2u = _bytes_to_unicode()
  vocab = {b2u[b]: i for i, b in enumerate([0xC3, 0xA9, 0x41, 0x61, 0xE2])}   # partial UTF-8 too
  assert set(vocab) <= set(alphabet)
  vocab[b2u[0xC3] + b2u[0xA9]] = len(vocab)                                    # 'é'
  tok = tokenizers.Tokenizer(models.BPE(vocab, [(b2u[0xC3], b2u[0xA9])]))
  tok.decoder = decoders.ByteLevel()
  path = str(tmp_path / 'tokenizer.json')
  tok.save(path)
  lookup = build_compressed_lookup(path)
  # 0xC3, 0xA9, 0xE2 alone decode to U+FFFD: keyed by their raw (distinct) token strings;
  # 'A' and 'a' share a key; 'é' normalises to 'e' (its own key here).
  assert len(set(lookup[[0, 1, 4]].tolist())) == 3
  assert lookup[2] == lookup[3]
  assert lookup.tolist() == [0, 1, 2, 2, 3, 4]


def _bytes_to_unicode():
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + \
      list(range(ord('®'), ord('ÿ') + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))
