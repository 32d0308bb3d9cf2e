#!/usr/bin/env python3
"""Tokenise text or JSONL files into ArrayRecord token shards (format v4jax-tokens-v1).

  python tools/prepare_data.py --input 'corpus/**/*.txt' --out data/corpus
  python tools/prepare_data.py --input data.jsonl --text-field text --train-bpe 32000 --out data/bpe
  python -m v4jax.train --config configs/tiny.py --config.data.source=array_record \\
      --config.data.path=data/corpus --config.model.vocab_size=<the printed vocab size>

Inputs: each --input is a file or a glob pattern (quote it; `**` recurses); matches are sorted.
Files named *.jsonl or *.jsonl.gz hold one JSON object per line and each line's --text-field is a
document; any other file is one UTF-8 document (undecodable bytes become U+FFFD). Empty documents
are skipped.

Split: a document goes to `validation` when SHA-256 of its text, read as a fraction of 2^64, is
below --val-fraction, else to `train` (so duplicates land in the same split and the split does
not depend on file names or order). If that leaves a split empty, the document with the
smallest (validation) or largest (train) hash moves there.

Tokenizer: `byte` (UTF-8 bytes + <eos> + <pad>, vocab 258), a tokenizer.json (copied into
--out), or --train-bpe VOCAB: a byte-level BPE trained with HF `tokenizers` on the train split
(specials <eos> and <pad>), written to --out/tokenizer.json.

Output (docs/data.md): <split>-XXXXX-of-YYYYY.array_record shards and manifest.json. The whole
directory is written under a temporary name and renamed when complete. The same inputs and
flags give byte-identical output.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from v4jax.cli import ToolError, atomic_output_dir, check_output_dir, progress, run_tool  # noqa: E402
from v4jax.data import sources  # noqa: E402
from v4jax.data.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402

BPE_SPECIALS = ('<eos>', '<pad>')
_BATCH = 256            # documents per encode_batch call
_SHARD_BYTES = 256e6    # --num-shards 0: about this many input bytes per train shard


def expand_inputs(patterns: list[str]) -> list[str]:
  """Files matching each pattern (sorted, duplicates removed); an empty match is an error."""
  files: list[str] = []
  for pat in patterns:
    hits = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
    if not hits:
      raise ToolError(f'--input {pat!r} matches no files')
    files.extend(hits)
  return list(dict.fromkeys(files))


def _is_jsonl(path: str) -> bool:
  return path.endswith(('.jsonl', '.jsonl.gz'))


def iter_documents(files: list[str], text_field: str):
  """Yields (text, input bytes consumed) per document, in file then line order."""
  for path in files:
    if not _is_jsonl(path):
      with open(path, 'rb') as fh:
        raw = fh.read()
      yield raw.decode('utf-8', errors='replace'), len(raw)
      continue
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as fh:
      for lineno, line in enumerate(fh, start=1):
        if not line.strip():
          yield '', len(line)
          continue
        try:
          obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise ToolError(f'{path}:{lineno}: malformed JSON line ({e.__class__.__name__}: '
                          f'{str(e).splitlines()[0]})') from None
        if not isinstance(obj, dict) or text_field not in obj:
          raise ToolError(f'{path}:{lineno}: expected a JSON object with a {text_field!r} field '
                          '(set --text-field)')
        text = obj[text_field]
        if not isinstance(text, str):
          raise ToolError(f'{path}:{lineno}: field {text_field!r} is {type(text).__name__}, '
                          'expected a string')
        yield text, len(line)


def _hash_fraction(text: str) -> float:
  return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'big') / 2.0**64


class SplitPlan:
  """Which document (by its index among the non-empty documents) goes to which split."""

  def __init__(self, files, text_field, val_fraction, total_bytes):
    self.counts = {'train': 0, 'validation': 0}
    self.bytes = {'train': 0, 'validation': 0}
    self.skipped_empty = 0
    lo = hi = None      # (hash, index) of the smallest / largest hash
    self._force: dict[int, str] = {}
    i = 0
    with progress(total_bytes, 'scanning') as bar:
      for text, nbytes in iter_documents(files, text_field):
        bar.update(nbytes)
        if not text:
          self.skipped_empty += 1
          continue
        h = _hash_fraction(text)
        split = 'validation' if h < val_fraction else 'train'
        self.counts[split] += 1
        self.bytes[split] += nbytes
        lo = min(lo, (h, i)) if lo else (h, i)
        hi = max(hi, (h, i)) if hi else (h, i)
        i += 1
    if i < 2:
      raise ToolError(f'the inputs hold {i} non-empty document(s); at least 2 are needed '
                      '(one for each of the train and validation splits)')
    for split, (_, idx), other in (('validation', lo, 'train'), ('train', hi, 'validation')):
      if self.counts[split] == 0:
        self._force[idx] = split
        self.counts[split], self.counts[other] = 1, self.counts[other] - 1
    self.val_fraction = val_fraction

  def split_of(self, index: int, text: str) -> str:
    if index in self._force:
      return self._force[index]
    return 'validation' if _hash_fraction(text) < self.val_fraction else 'train'


def iter_split(files, text_field, plan: SplitPlan, split: str):
  """Yields (text, bytes consumed) for the documents of `split`; bytes of skipped ones included."""
  i, pending = 0, 0
  for text, nbytes in iter_documents(files, text_field):
    pending += nbytes
    if not text:
      continue
    if plan.split_of(i, text) == split:
      yield text, pending
      pending = 0
    i += 1


class _TokenizedSplit:
  """A split's documents as token arrays, for write_token_shards, which reads them in order:
  documents are read and batch-encoded lazily, and only forward access is allowed."""

  def __init__(self, docs, count: int, encode_batch, bar):
    self._docs, self._count, self._encode, self._bar = docs, count, encode_batch, bar
    self._buf: list[np.ndarray] = []
    self._next = 0

  def __len__(self):
    return self._count

  def __getitem__(self, i: int) -> np.ndarray:
    if i != self._next:
      raise IndexError(f'documents must be read in order (asked for {i}, next is {self._next})')
    if not self._buf:
      texts, nbytes = [], 0
      for text, n in self._docs:
        texts.append(text)
        nbytes += n
        if len(texts) == _BATCH:
          break
      if not texts:
        raise ToolError('the inputs changed while they were being read (fewer documents than '
                        'in the scan)')
      self._buf = self._encode(texts)[::-1]
      self._bar.update(nbytes)
    self._next += 1
    return self._buf.pop()


def train_bpe_tokenizer(files, text_field, plan, vocab_size: int, out_path: str,
                        total_bytes: int):
  """Trains a byte-level BPE on the train split and writes tokenizer.json."""
  try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  except ImportError:
    raise ToolError('--train-bpe needs the HF `tokenizers` package (pip install tokenizers)') from None
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(BPE_SPECIALS):
    raise ToolError(f'--train-bpe {vocab_size} is too small: the byte alphabet and specials '
                    f'need {len(alphabet) + len(BPE_SPECIALS)} ids')
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                special_tokens=list(BPE_SPECIALS), initial_alphabet=alphabet)
  with progress(total_bytes, 'reading for BPE') as bar:
    def texts():
      for text, n in iter_split(files, text_field, plan, 'train'):
        bar.update(n)
        yield text
    tok.train_from_iterator(texts(), trainer=trainer, length=plan.counts['train'])
  tok.save(out_path)


def load_tokenizer(spec: str):
  """(tokenizer, encode_batch) for 'byte' or a tokenizer.json path (or a directory holding one)."""
  if spec == 'byte':
    tok = ByteTokenizer()
    return tok, lambda texts: [tok.encode(t) for t in texts]
  path = os.path.join(spec, 'tokenizer.json') if os.path.isdir(spec) else spec
  if not os.path.isfile(path):
    raise ToolError(f"--tokenizer {spec!r}: tokenizer file {path!r} does not exist (give 'byte' "
                    'or a tokenizer.json path)')
  try:
    tok = HFTokenizer(path)
    import tokenizers  # pylint: disable=import-outside-toplevel
    raw = tokenizers.Tokenizer.from_file(path)
  except ImportError:
    raise ToolError('a tokenizer.json needs the HF `tokenizers` package (pip install tokenizers)') from None
  except Exception as e:  # noqa: BLE001 - a bad tokenizer file, reported in one line
    raise ToolError(f'--tokenizer {path!r}: cannot load ({str(e).splitlines()[0]})') from None

  def encode_batch(texts):
    return [np.asarray(e.ids, np.int32) for e in raw.encode_batch(texts, add_special_tokens=False)]
  return tok, encode_batch


def prepare(inputs: list[str], out: str, *, tokenizer: str = 'byte', train_bpe: int = 0,
            text_field: str = 'text', val_fraction: float = 0.02, num_shards: int = 0,
            overwrite: bool = False) -> dict:
  """Writes the shard directory `out`; returns its manifest."""
  if not 0 < val_fraction < 1:
    raise ToolError(f'--val-fraction {val_fraction} must be in (0, 1)')
  if train_bpe and tokenizer != 'byte':
    raise ToolError('give either --tokenizer PATH or --train-bpe VOCAB, not both')
  if num_shards < 0:
    raise ToolError(f'--num-shards {num_shards} must be >= 0 (0 = about one per 256 MB of input)')
  check_output_dir(out, overwrite, '--out')
  if not train_bpe:
    tok, encode_batch = load_tokenizer(tokenizer)
  files = expand_inputs(inputs)
  total = sum(os.path.getsize(f) for f in files)
  plan = SplitPlan(files, text_field, val_fraction, total)
  n_train = num_shards or max(1, math.ceil(plan.bytes['train'] / _SHARD_BYTES))
  n_val = max(1, math.ceil(n_train * plan.counts['validation'] / max(plan.counts['train'], 1)))
  shards = {'train': min(n_train, plan.counts['train']),
            'validation': min(n_val, plan.counts['validation'])}
  with atomic_output_dir(out, overwrite) as tmp:
    if train_bpe:
      bpe_path = os.path.join(tmp, 'tokenizer.json')
      train_bpe_tokenizer(files, text_field, plan, train_bpe, bpe_path, total)
      tok, encode_batch = load_tokenizer(bpe_path)
      tok_name = 'tokenizer.json'
    elif tokenizer == 'byte':
      tok_name = 'byte'
    else:
      shutil.copyfile(tok.path, os.path.join(tmp, 'tokenizer.json'))
      tok_name = 'tokenizer.json'
    manifest = None
    for split in sources.SPLITS:
      with progress(total, f'tokenizing {split}') as bar:
        docs = _TokenizedSplit(iter_split(files, text_field, plan, split), plan.counts[split],
                               encode_batch, bar)
        m = sources.write_token_shards(tmp, {split: docs}, tokenizer=tok_name,
                                       vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                                       pad_id=tok.pad_id, num_shards=shards[split])
        bar.update(total - bar.n)     # bytes after the split's last document
      manifest = m if manifest is None else manifest
      manifest['splits'][split] = m['splits'][split]
    manifest['created_by'] = {
        'tool': 'tools/prepare_data.py', 'inputs': list(inputs), 'num_files': len(files),
        'input_bytes': total, 'text_field': text_field, 'val_fraction': val_fraction,
        'split_rule': 'sha256(document text)[:8] / 2^64 < val_fraction -> validation',
        'skipped_empty_docs': plan.skipped_empty, 'train_bpe': train_bpe or None}
    path = os.path.join(tmp, sources.MANIFEST)
    with open(path + '.tmp', 'w', encoding='utf-8') as fh:
      json.dump(manifest, fh, indent=1)
    os.replace(path + '.tmp', path)
  return manifest



def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--input', action='append', required=True, metavar='GLOB|FILE',
                 help='a file or a quoted glob pattern; repeatable')
  p.add_argument('--out', required=True, metavar='DIR', help='output directory (must be new or empty)')
  p.add_argument('--tokenizer', default='byte', metavar='byte|PATH',
                 help="'byte' (default) or a tokenizer.json (or a directory holding one)")
  p.add_argument('--train-bpe', type=int, default=0, metavar='VOCAB',
                 help='train a byte-level BPE of VOCAB ids (specials included) on the train split')
  p.add_argument('--text-field', default='text', help='JSONL field holding the text (default: text)')
  p.add_argument('--val-fraction', type=float, default=0.02,
                 help='fraction of documents for the validation split (default 0.02)')
  p.add_argument('--num-shards', type=int, default=0,
                 help='train shards (default 0: about one per 256 MB of input)')
  p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  a = p.parse_args(argv)
  m = prepare(a.input, a.out, tokenizer=a.tokenizer, train_bpe=a.train_bpe,
              text_field=a.text_field, val_fraction=a.val_fraction, num_shards=a.num_shards,
              overwrite=a.overwrite)
  for split, s in m['splits'].items():
    print(f'{split}: {s["num_docs"]} documents, {s["num_tokens"]} tokens, {len(s["shards"])} shard(s)')
  print(f'vocab_size={m["vocab_size"]} eos_id={m["eos_id"]} pad_id={m["pad_id"]} -> {a.out}')
  print(f'train with: --config.data.source=array_record --config.data.path={a.out} '
        f'--config.model.vocab_size={m["vocab_size"]}' +
        (f' (and --config.engram.pad_id={m["pad_id"]} with Engram on)' if m['pad_id'] is not None else ''))
  return 0


if __name__ == '__main__':
  run_tool('prepare_data.py', main)
