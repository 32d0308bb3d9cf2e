"""tools/prepare_data.py: shards that read back to the tokenised documents, a deterministic split
and output, BPE training, one-line errors with nothing written, and training on the shards."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, load_tool, small_tiny
from v4jax.cli import ToolError
from v4jax.data.sources import TokenShardSource, read_manifest

prepare_data = load_tool('prepare_data')

WORDS = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu ünï 数据'.split()


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Two JSONL files (with a blank line and an empty text) and three text files."""
  d = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  docs = []
  for f in range(2):
    with open(d / f'part{f}.jsonl', 'w', encoding='utf-8') as fh:
      for i in range(150):
        text = ' '.join(rng.choice(WORDS, rng.integers(3, 60)))
        docs.append(text)
        fh.write(json.dumps({'text': text, 'id': i}, ensure_ascii=False) + '\n')
      fh.write('\n' + json.dumps({'text': ''}) + '\n')
  for i in range(3):
    text = f'plain file {i}\n' + 'lorem ipsum ' * (i + 1)
    (d / f'doc{i}.txt').write_text(text, encoding='utf-8')
    docs.append(text)
  return d, docs


def _docs(out, split):
  src = TokenShardSource(str(out), split)
  return [src[i] for i in range(len(src))]


def _digest(out):
  h = hashlib.sha256()
  for name in sorted(os.listdir(out)):
    h.update(name.encode() + open(os.path.join(out, name), 'rb').read())
  return h.hexdigest()


def test_byte_shards_read_back_deterministically(corpus, tmp_path):
  d, docs = corpus
  inputs = [str(d / '*.jsonl'), str(d / 'doc*.txt')]
  m = prepare_data.prepare(inputs, str(tmp_path / 'a'), num_shards=2, val_fraction=0.1)
  assert m['vocab_size'] == 258 and m['tokenizer'] == 'byte' and m['created_by']['skipped_empty_docs'] == 4
  # every document is in exactly one split, in input order, as its UTF-8 bytes
  split = {t: ('validation' if int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], 'big') / 2**64 < 0.1
               else 'train') for t in docs}
  for s in ('train', 'validation'):
    want = [np.frombuffer(t.encode(), np.uint8).astype(np.int32) for t in docs if split[t] == s]
    got = _docs(tmp_path / 'a', s)
    assert len(got) == len(want) == m['splits'][s]['num_docs'] > 0
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
  assert len(m['splits']['train']['shards']) == 2
  prepare_data.prepare(inputs, str(tmp_path / 'b'), num_shards=2, val_fraction=0.1)
  assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')


def test_train_bpe_and_reuse_tokenizer(corpus, tmp_path):
  d, _ = corpus
  m = prepare_data.prepare([str(d / '*.jsonl')], str(tmp_path / 'bpe'), train_bpe=300)
  tok_path = tmp_path / 'bpe' / 'tokenizer.json'
  assert m['vocab_size'] == 300 and m['tokenizer'] == 'tokenizer.json' and tok_path.exists()
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(tok_path))
  assert (m['eos_id'], m['pad_id']) == (tok.token_to_id('<eos>'), tok.token_to_id('<pad>'))
  texts = [json.loads(l)['text'] for l in open(d / 'part0.jsonl', encoding='utf-8') if l.strip()]
  decoded = {tok.decode(ids.tolist()) for ids in _docs(tmp_path / 'bpe', 'train')}
  assert decoded & set(texts) and decoded <= set(texts) | {''} | {
      json.loads(l)['text'] for l in open(d / 'part1.jsonl', encoding='utf-8') if l.strip()}
  # the trained tokenizer as --tokenizer gives the same shards
  prepare_data.prepare([str(d / '*.jsonl')], str(tmp_path / 'again'), tokenizer=str(tok_path))
  for s in ('train', 'validation'):
    for a, b in zip(_docs(tmp_path / 'bpe', s), _docs(tmp_path / 'again', s)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('case,needle', [
    ('glob', "--input '{d}/*.nope' matches no files"),
    ('jsonl', '{d}/bad.jsonl:3: malformed JSON line (JSONDecodeError'),
    ('field', "{d}/bad_field.jsonl:1: expected a JSON object with a 'text' field"),
    ('tokenizer', "tokenizer file '{d}/missing/tokenizer.json' does not exist"),
    ('one_doc', 'the inputs hold 1 non-empty document(s); at least 2 are needed'),
])
def test_bad_inputs_one_line_nothing_written(tmp_path, case, needle):
  d = tmp_path
  (d / 'bad.jsonl').write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
  (d / 'bad_field.jsonl').write_text('{"body": "a"}\n')
  (d / 'one.jsonl').write_text('{"text": "only"}\n')
  args = {'glob': ['--input', f'{d}/*.nope'], 'jsonl': ['--input', f'{d}/bad.jsonl'],
          'field': ['--input', f'{d}/bad_field.jsonl'],
          'tokenizer': ['--input', f'{d}/bad.jsonl', '--tokenizer', f'{d}/missing/tokenizer.json'],
          'one_doc': ['--input', f'{d}/one.jsonl']}[case]
  r = subprocess.run([sys.executable, 'tools/prepare_data.py', *args, '--out', str(d / 'out')],
                     cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2
  assert r.stderr.startswith('prepare_data.py: error: ') and r.stderr.count('\n') == 1, r.stderr
  assert needle.format(d=d) in r.stderr
  assert not [p for p in os.listdir(d) if p.startswith('out')]


def test_refuses_non_empty_out(corpus, tmp_path):
  d, _ = corpus
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'keep.txt').write_text('x')
  with pytest.raises(ToolError, match='is not empty'):
    prepare_data.prepare([str(d / '*.jsonl')], str(tmp_path / 'out'))
  assert os.listdir(tmp_path / 'out') == ['keep.txt']


def test_train_on_prepared_shards(corpus, tmp_path):
  from v4jax.trainer import Trainer
  d, _ = corpus
  out = str(tmp_path / 'data')
  m = prepare_data.prepare([str(d / '*.jsonl'), str(d / '*.txt')], out, val_fraction=0.1)
  assert read_manifest(out)['splits']['train']['num_tokens'] == m['splits']['train']['num_tokens']
  cfg = small_tiny(**{'data.source': 'array_record', 'data.path': out, 'train.steps': 2,
                      'checkpoint.enabled': False, 'mhc.streams': 1, 'engram.enabled': False,
                      'dsa.enabled': False, 'dsa.stage': 'dense', 'mtp.depth': 0,
                      'moe.enabled': False, 'model.n_layers': 1})
  tr = Trainer(cfg, str(tmp_path / 'run'))
  losses = tr.run()
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert abs(losses[0] - np.log(258)) < 0.5     # untrained: about uniform over the vocabulary
  assert np.isfinite(tr.evaluate())
  cfg.model.vocab_size = 200
  with pytest.raises(Exception, match='vocab_size=200 is smaller than the data vocabulary'):
    Trainer(cfg, str(tmp_path / 'run2'))
