"""Tokenizers: the byte-level default and HF `tokenizer.json` files.

Both expose the same small interface the data pipeline needs: `name`, `vocab_size`, `eos_id`
(the document separator the packer inserts), `pad_id` (None when the tokenizer has none),
`encode(text) -> np.int32 [n]` and `decode(ids) -> str`. Objects pickle cheaply (Grain sends
them to worker processes): the HF tokenizer is loaded lazily and dropped in `__getstate__`.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

BYTE_EOS_ID = 256
BYTE_PAD_ID = 257
BYTE_VOCAB_SIZE = 258

# Special tokens looked up (in this order) when an HF tokenizer is given without explicit names.
_EOS_CANDIDATES = ('<eos>', '</s>', '<|endoftext|>', '<｜end▁of▁sentence｜>', '<|end_of_text|>',
                   '<|im_end|>', '[SEP]')
_PAD_CANDIDATES = ('<pad>', '<|pad|>', '<｜▁pad▁｜>', '[PAD]', '<|finetune_right_pad_id|>')


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus 256 = <eos> (document separator) and 257 = <pad>.

  Needs no files and round-trips every string exactly.
  """

  name = 'byte'
  vocab_size = BYTE_VOCAB_SIZE
  eos_id = BYTE_EOS_ID
  pad_id = BYTE_PAD_ID

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
    """Bytes back to text; invalid UTF-8 (possible in sampled output) decodes as U+FFFD.

    Special ids are dropped, or written as `<eos>`/`<pad>` when skip_special is False.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
      raise ValueError(f'token id {bad} out of range [0, {self.vocab_size}) for the byte tokenizer')
    if skip_special:
      return ids[ids < 256].astype(np.uint8).tobytes().decode('utf-8', errors='replace')
    parts, start = [], 0
    for i in np.flatnonzero(ids >= 256):
      parts.append(ids[start:i].astype(np.uint8).tobytes().decode('utf-8', errors='replace'))
      parts.append('<eos>' if ids[i] == self.eos_id else '<pad>')
      start = i + 1
    parts.append(ids[start:].astype(np.uint8).tobytes().decode('utf-8', errors='replace'))
    return ''.join(parts)

  def __repr__(self):
    return 'ByteTokenizer()'


class HFTokenizer:
  """A HuggingFace `tokenizer.json` through the `tokenizers` library (imported on first use).

  eos_token/pad_token name the special tokens; by default the first present of a few common
  names is used (`<eos>`, `</s>`, `<|endoftext|>`, ...). A tokenizer without any end-of-document
  token is rejected; one without a pad token gets pad_id None (no target is masked).
  """

  def __init__(self, path: str, *, eos_token: str | None = None, pad_token: str | None = None):
    if os.path.isdir(path):
      path = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'tokenizer file {path!r} does not exist (expected a tokenizer.json)')
    self.path = path
    self.name = os.path.abspath(path)
    self._tok = None
    tok = self._load()
    self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
    self.eos_id = self._find(tok, eos_token, _EOS_CANDIDATES, 'eos_token')
    if self.eos_id is None:
      raise ValueError(f'tokenizer {path!r} has none of the end-of-document tokens '
                       f'{_EOS_CANDIDATES}; pass eos_token=')
    self.pad_id = self._find(tok, pad_token, _PAD_CANDIDATES, 'pad_token')

  @staticmethod
  def _find(tok, explicit, candidates, what):
    if explicit is not None:
      i = tok.token_to_id(explicit)
      if i is None:
        raise ValueError(f'{what}={explicit!r} is not in the tokenizer vocabulary')
      return int(i)
    for name in candidates:
      i = tok.token_to_id(name)
      if i is not None:
        return int(i)
    return None

  def _load(self):
    if self._tok is None:
      try:
        import tokenizers  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        raise ImportError('HFTokenizer needs the `tokenizers` package: pip install tokenizers') from e
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    return self._tok

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._load().encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._load().decode(ids, skip_special_tokens=skip_special)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_tok'} | {'_tok': None}

  def __repr__(self):
    return f'HFTokenizer({self.path!r})'


def get_tokenizer(name_or_path: str) -> ByteTokenizer | HFTokenizer:
  """'byte' -> ByteTokenizer; otherwise a tokenizer.json file (or a directory holding one)."""
  if name_or_path == 'byte':
    return ByteTokenizer()
  if not name_or_path or not os.path.exists(name_or_path):
    raise ValueError(f"config.data.tokenizer={name_or_path!r} is neither 'byte' nor an existing "
                     'tokenizer.json path')
  return HFTokenizer(name_or_path)
