"""Tokenizers: byte ids are exactly the UTF-8 bytes; HF tokenizer.json loading and errors."""
import pickle

import numpy as np
import pytest

from v4jax.config import default_config
from v4jax.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer


def _random_text(rng, n):
  # ASCII, Latin-1, CJK, emoji and control characters.
  pool = [chr(c) for c in list(range(9, 127)) + list(range(0xA0, 0x180))
          + list(range(0x4E00, 0x4E40)) + list(range(0x1F600, 0x1F620))]
  return ''.join(rng.choice(pool, size=n))


def test_byte_round_trip_and_ids():
  tok = ByteTokenizer()
  rng = np.random.default_rng(0)
  for n in (0, 1, 17, 500):
    text = _random_text(rng, n)
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, list(text.encode('utf-8')))   # oracle: Python's UTF-8
    assert tok.decode(ids) == text


def test_byte_specials_match_config():
  tok = ByteTokenizer()
  cfg = default_config()
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
  assert cfg.model.vocab_size == tok.vocab_size and cfg.engram.pad_id == tok.pad_id
  ids = np.concatenate([tok.encode('ab'), [256], tok.encode('c'), [257]])
  assert tok.decode(ids) == 'abc'
  assert tok.decode(ids, skip_special=False) == 'ab<eos>c<pad>'
  assert tok.decode([0xE2, 0x82]) == '\ufffd'   # truncated UTF-8 from sampling does not raise
  with pytest.raises(ValueError, match=r'token id 300 out of range \[0, 258\)'):
    tok.decode([1, 300])


def _write_hf(path, specials=('<eos>', '<pad>')):
  tokenizers = pytest.importorskip('tokenizers')
  vocab = {'<unk>': 0, 'hello': 1, 'world': 2, 'again': 3}
  for s in specials:
    vocab[s] = len(vocab)
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(list(specials))
  tok.save(str(path))
  return vocab


def test_hf_tokenizer(tmp_path):
  vocab = _write_hf(tmp_path / 'tokenizer.json')
  for arg in (tmp_path / 'tokenizer.json', tmp_path):   # a file or its directory
    tok = get_tokenizer(str(arg))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (6, vocab['<eos>'], vocab['<pad>'])
    ids = tok.encode('hello world again')
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [1, 2, 3])
    assert tok.decode(ids) == 'hello world again'
  clone = pickle.loads(pickle.dumps(tok))
  assert clone._tok is None   # the library object is not pickled, reloaded on use
  np.testing.assert_array_equal(clone.encode('world hello'), [2, 1])


def test_hf_tokenizer_errors(tmp_path):
  _write_hf(tmp_path / 'tokenizer.json', specials=('<pad>',))
  with pytest.raises(ValueError, match='none of the end-of-document tokens'):
    HFTokenizer(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ValueError, match="eos_token='<nope>' is not in the tokenizer vocabulary"):
    HFTokenizer(str(tmp_path / 'tokenizer.json'), eos_token='<nope>')
  tok = HFTokenizer(str(tmp_path / 'tokenizer.json'), eos_token='<pad>')
  assert tok.eos_id == 4
  with pytest.raises(FileNotFoundError, match='does not exist'):
    HFTokenizer(str(tmp_path / 'missing.json'))
  with pytest.raises(ValueError, match="config.data.tokenizer='nope' is neither 'byte'"):
    get_tokenizer('nope')
  assert isinstance(get_tokenizer('byte'), ByteTokenizer)
