"""Built-in corpus listing and split; ArrayRecord token shards: round trip and error cases."""
import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from v4jax.data import sources


def _touch(root, rel, text='x = 1\n'):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as fh:
    fh.write(text)


def test_listing_rules_on_a_synthetic_tree(tmp_path):
  root = str(tmp_path)
  keep = ['a.py', 'pkg/__init__.py', 'pkg/b.py', 'pkg/notes.txt', 'email/architecture.rst',
          'pkg/sub/z.py']
  skip = ['empty.py', 'test/test_a.py', 'pkg/tests/t.py', 'idlelib/x.py', 'pkg/idle_test/y.py',
          '__pycache__/a.py', 'site-packages/numpy/core.py', 'config-3.11-x86_64/c.py',
          '_sysconfigdata__linux.py', 'LICENSE.txt', 'pkg/data.json', 'distutils/core.py']
  for rel in keep + skip:
    _touch(root, rel, '' if rel == 'empty.py' else 'x = 1\n')
  _touch(root, 'pkg/idlelib/kept.py')   # _SKIP_TOP applies only at the top level
  keep.append('pkg/idlelib/kept.py')
  os.symlink(os.path.join(root, 'a.py'), os.path.join(root, 'link.py'))
  got = sources.list_builtin_corpus(root)
  assert list(got) == sorted(keep)


def test_stdlib_listing_deterministic_and_split_disjoint():
  files = sources.list_builtin_corpus()
  sources.list_builtin_corpus.cache_clear()
  assert sources.list_builtin_corpus() == files          # fresh walk, same answer
  assert list(files) == sorted(files) and len(files) > 100
  assert not any(part in ('test', 'tests', '__pycache__', 'site-packages')
                 for f in files for part in f.split('/'))
  train = sources.BuiltinCorpus('train', val_fraction=0.1)
  val = sources.BuiltinCorpus('validation', val_fraction=0.1)
  assert not set(train.files) & set(val.files)
  assert sorted(train.files + val.files) == list(files)
  assert 0.03 < len(val) / len(files) < 0.2
  # Independent oracle of the split rule for a few paths.
  for f in files[:50]:
    frac = int(hashlib.sha256(f.encode()).hexdigest()[:16], 16) / 2**64
    assert (f in val.files) == (frac < 0.1)
  again = sources.BuiltinCorpus('validation', val_fraction=0.1)
  assert again.files == val.files


def test_builtin_max_docs_content_and_pickle():
  src = sources.BuiltinCorpus('train', val_fraction=0.02, max_docs=20)
  full = sources.BuiltinCorpus('train', val_fraction=0.02)
  assert len(src) == 20 and src.files == full.files[:20]
  with open(os.path.join(sources.stdlib_root(), src.files[3]), 'rb') as fh:
    assert src[3] == fh.read().decode('utf-8')
  clone = pickle.loads(pickle.dumps(src))
  assert clone[3] == src[3]
  with pytest.raises(ValueError, match='split=.test. is not one of'):
    sources.BuiltinCorpus('test', val_fraction=0.02)


def _docs(rng, n, vocab, max_len=40):
  return [rng.integers(0, vocab, size=rng.integers(0, max_len)).astype(np.int64) for _ in range(n)]


@pytest.mark.parametrize('vocab,dtype,want', [(258, None, 'uint16'), (70000, None, 'int32'),
                                              (1000, 'uint32', 'uint32')])
def test_array_record_round_trip(tmp_path, vocab, dtype, want):
  rng = np.random.default_rng(1)
  train, val = _docs(rng, 23, vocab), _docs(rng, 5, vocab)
  d = str(tmp_path / 'tok')
  m = sources.write_token_shards(d, {'train': train, 'validation': val}, tokenizer='t',
                                 vocab_size=vocab, eos_id=vocab - 2, pad_id=vocab - 1,
                                 num_shards={'train': 4, 'validation': 1}, dtype=dtype)
  assert m['dtype'] == want
  with open(os.path.join(d, 'manifest.json'), encoding='utf-8') as fh:
    on_disk = json.load(fh)
  assert on_disk == m and on_disk['format'] == 'v4jax-tokens-v1'
  files = [s['file'] for s in on_disk['splits']['train']['shards']]
  assert files == [f'train-{i:05d}-of-00004.array_record' for i in range(4)]
  assert on_disk['splits']['train']['num_docs'] == 23
  assert on_disk['splits']['train']['num_tokens'] == sum(len(x) for x in train)
  assert [s['num_docs'] for s in on_disk['splits']['train']['shards']] == [6, 6, 6, 5]
  for split, docs in (('train', train), ('validation', val)):
    src = sources.TokenShardSource(d, split)
    assert len(src) == len(docs) and (src.vocab_size, src.eos_id, src.pad_id) == (vocab, vocab - 2,
                                                                                  vocab - 1)
    for i in rng.permutation(len(docs)):   # random access
      got = src[i]
      assert got.dtype == np.int32
      np.testing.assert_array_equal(got, docs[i])
    clone = pickle.loads(pickle.dumps(src))   # handles are not pickled, reopened on use
    assert clone._reader is None
    np.testing.assert_array_equal(clone[len(docs) - 1], docs[-1])
  # Records are raw little-endian bytes of the manifest dtype (read with array_record directly).
  from array_record.python.array_record_module import ArrayRecordReader
  r = ArrayRecordReader(os.path.join(d, files[1]))
  raw = r.read([0])[0]
  r.close()
  np.testing.assert_array_equal(np.frombuffer(raw, np.dtype(want).newbyteorder('<')), train[6])


def test_array_record_errors(tmp_path):
  d = str(tmp_path / 'tok')
  with pytest.raises(FileNotFoundError, match='has no manifest.json'):
    sources.TokenShardSource(d, 'train')
  rng = np.random.default_rng(2)
  docs = [rng.integers(0, 258, size=30) for _ in range(6)]
  docs[4][7] = 257
  sources.write_token_shards(d, {'train': docs}, tokenizer='byte', vocab_size=258, eos_id=256,
                             pad_id=None, num_shards=2)
  mpath = os.path.join(d, 'manifest.json')
  m = json.load(open(mpath, encoding='utf-8'))
  with pytest.raises(ValueError, match="has no split 'validation'"):
    sources.TokenShardSource(d, 'validation')

  json.dump(dict(m, format='other-v0'), open(mpath, 'w', encoding='utf-8'))
  with pytest.raises(ValueError, match="format='other-v0', expected 'v4jax-tokens-v1'"):
    sources.TokenShardSource(d, 'train')

  # Shrink the declared vocabulary: document 4 (shard 1, record 1) holds id 257.
  json.dump(dict(m, vocab_size=257), open(mpath, 'w', encoding='utf-8'))
  src = sources.TokenShardSource(d, 'train')
  src[0]
  with pytest.raises(ValueError, match=r'token id 257 out of range \[0, 257\) in shard '
                                       r'train-00001-of-00002.array_record record 1'):
    src[4]

  bad = json.loads(json.dumps(m))
  bad['splits']['train']['shards'][0]['num_docs'] = 2
  json.dump(bad, open(mpath, 'w', encoding='utf-8'))
  with pytest.raises(ValueError, match='shards hold 6 records, manifest.json says 5'):
    sources.TokenShardSource(d, 'train')[0]

  os.remove(os.path.join(d, 'train-00000-of-00002.array_record'))
  json.dump(m, open(mpath, 'w', encoding='utf-8'))
  with pytest.raises(FileNotFoundError, match='train-00000-of-00002.array_record.*does not exist'):
    sources.TokenShardSource(d, 'train')

  with pytest.raises(ValueError, match=r"document 1: token id 300 out of range \[0, 258\)"):
    sources.write_token_shards(str(tmp_path / 'w'), {'train': [np.arange(3), np.array([1, 300])]},
                               tokenizer='byte', vocab_size=258, eos_id=256, pad_id=257)
  with pytest.raises(ValueError, match='does not fit dtype=uint16'):
    sources.write_token_shards(str(tmp_path / 'w'), {'train': []}, tokenizer='x',
                               vocab_size=70000, eos_id=0, pad_id=None, dtype='uint16')
