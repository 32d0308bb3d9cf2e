"""Pipeline: packing against a plain-Python oracle, process slices, shuffling, resume, Engram hook."""
import json
import os
import sys
import types

import numpy as np
import pytest

from v4jax.config import ConfigError, default_config
from v4jax.data import pipeline, sources
from v4jax.data.engram_hash import make_hash_spec

T, G = 32, 4
EOS, PAD = 256, 257


def _cfg(**data):
  cfg = default_config()
  cfg.data.update(dict(seq_len=T, global_batch=G, max_docs=20, num_workers=0), **data)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _oracle(docs, n_rows, respect):
  """Docs in order, repeated: concatenate [eos] + doc, cut rows of T+1, then per-token loops."""
  stream, starts, i = [], [], 0
  while len(stream) < n_rows * (T + 1):
    doc = [int(x) for x in docs[i % len(docs)]]
    stream += [EOS] + doc
    starts += [True] + [False] * len(doc)
    i += 1
  out = {k: [] for k in ('tokens', 'targets', 'positions', 'segment_ids')}
  for r in range(n_rows):
    row, st = stream[r * (T + 1):(r + 1) * (T + 1)], starts[r * (T + 1):(r + 1) * (T + 1)]
    seg, pos, s, p = [], [], 0, 0
    for t in range(T):
      if t == 0 or st[t]:
        s, p = s + 1, 0
      else:
        p += 1
      seg.append(s)
      pos.append(p if respect else t)
    out['tokens'].append(row[:T])
    out['targets'].append(row[1:])
    out['positions'].append(pos)
    out['segment_ids'].append(seg)
  return {k: np.array(v) for k, v in out.items()}


def _stack(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _write(tmp_path, docs, pad_id=PAD, split='validation'):
  d = str(tmp_path / 'shards')
  sources.write_token_shards(d, {split: docs}, tokenizer='byte', vocab_size=258, eos_id=EOS,
                             pad_id=pad_id, num_shards=3)
  return d


def _check_against_oracle(batches, docs, respect):
  got = _stack(batches)
  want = _oracle(docs, len(got['tokens']), respect)
  for k, v in want.items():
    assert got[k].dtype == np.int32, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  np.testing.assert_array_equal(got['tokens'][:, 1:], got['targets'][:, :-1])
  assert got['loss_mask'].dtype == np.float32


@pytest.mark.parametrize('respect', [False, True])
def test_builtin_validation_packing_matches_oracle(respect):
  cfg = _cfg(respect_doc_boundaries=respect)
  src = sources.BuiltinCorpus('validation', val_fraction=cfg.data.val_fraction,
                              max_docs=cfg.data.max_docs)
  docs = []
  for f in src.files:   # oracle tokens: the files' raw bytes
    with open(os.path.join(src.root, f), 'rb') as fh:
      docs.append(np.frombuffer(fh.read(), np.uint8))
  batches = _take(iter(pipeline.make_dataset(cfg, 'validation')), 40)
  assert set(batches[0]) == {'tokens', 'targets', 'positions', 'segment_ids', 'loss_mask'}
  assert batches[0]['tokens'].shape == (G, T)
  _check_against_oracle(batches, docs, respect)


@pytest.mark.parametrize('respect', [False, True])
def test_short_docs_wrap_epochs_and_pad_mask(tmp_path, respect):
  rng = np.random.default_rng(3)
  # Ids cover the whole vocabulary: a document may hold <eos> or <pad> (segments come from the
  # document structure, not from token values); document 2 is empty.
  docs = [rng.integers(0, 258, size=rng.integers(1, 12)) for _ in range(9)]
  docs[2] = np.zeros(0, np.int64)
  docs[4][0] = PAD
  cfg = _cfg(source='array_record', path=_write(tmp_path, docs), respect_doc_boundaries=respect)
  batches = _take(iter(pipeline.make_dataset(cfg, 'validation')), 6)   # ~10 epochs of 9 docs
  _check_against_oracle(batches, docs, respect)
  got = _stack(batches)
  assert (got['targets'] == PAD).any()
  np.testing.assert_array_equal(got['loss_mask'], (got['targets'] != PAD).astype(np.float32))
  assert respect == (got['positions'] != np.arange(T)).any()


def test_no_pad_id_means_full_mask(tmp_path):
  docs = [np.full(5, PAD), np.arange(7)]
  cfg = _cfg(source='array_record', path=_write(tmp_path, docs, pad_id=None))
  b = next(iter(pipeline.make_dataset(cfg, 'validation')))
  assert (b['targets'] == PAD).any() and (b['loss_mask'] == 1).all()


def _docs_in_stream(batches):
  """Splits the concatenated rows at <eos>; the stream starts with <eos>."""
  rows = [np.concatenate([b['tokens'], b['targets'][:, -1:]], axis=1) for b in batches]
  stream = np.concatenate(rows).reshape(-1)
  assert stream[0] == EOS
  cuts = np.flatnonzero(stream == EOS)
  return [tuple(stream[a + 1:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def test_train_reshuffles_every_epoch(tmp_path):
  rng = np.random.default_rng(4)
  docs = [np.concatenate([[i], rng.integers(0, 256, size=rng.integers(0, 8))]) for i in range(20)]
  path = _write(tmp_path, docs, split='train')
  want = sorted(tuple(int(x) for x in d) for d in docs)
  orders = {}
  for seed in (0, 1):
    cfg = _cfg(source='array_record', path=path, shuffle_seed=seed)
    seen = _docs_in_stream(_take(iter(pipeline.make_dataset(cfg, 'train')), 12))
    epoch1, epoch2 = seen[:20], seen[20:40]
    assert sorted(epoch1) == want and sorted(epoch2) == want   # each epoch is a permutation
    assert epoch1 != epoch2
    orders[seed] = epoch1
  assert orders[0] != orders[1]
  assert [d[0] for d in orders[0]] != list(range(20))


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_process_slices_partition_the_global_batch(split):
  whole = iter(pipeline.make_dataset(_cfg(), split))
  parts = [iter(pipeline.make_dataset(_cfg(), split, process_index=p, process_count=2))
           for p in range(2)]
  for _ in range(5):
    w = next(whole)
    ps = [next(p) for p in parts]
    assert ps[0]['tokens'].shape == (G // 2, T)
    for k in w:
      np.testing.assert_array_equal(np.concatenate([ps[0][k], ps[1][k]]), w[k], err_msg=k)
  with pytest.raises(ConfigError, match='config.data.global_batch=4 must be a positive multiple '
                                        'of the process count 3'):
    pipeline.make_dataset(_cfg(), split, process_count=3)
  with pytest.raises(ValueError, match=r'process_index=2 must be in \[0, process_count=2\)'):
    pipeline.make_dataset(_cfg(), split, process_index=2, process_count=2)


def test_resume_exact_with_get_set_state():
  cfg = _cfg(respect_doc_boundaries=True)
  ds = pipeline.make_dataset(cfg, 'train')
  it = iter(ds)
  for n in (0, 7, 3):   # states at batch 0, 7, 10
    _take(it, n)
    state = json.loads(json.dumps(it.get_state()))   # JSON-serialisable
    want = _take(it, 6)
    fresh = iter(pipeline.make_dataset(cfg, 'train'))
    fresh.set_state(state)
    assert fresh.get_state() == state
    for a, b in zip(want, _take(fresh, 6)):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_through_orbax(tmp_path):
  grain = pytest.importorskip('grain')
  ocp = pytest.importorskip('orbax.checkpoint')
  cfg = _cfg()
  it = iter(pipeline.make_dataset(cfg, 'train'))
  _take(it, 5)
  mngr = ocp.CheckpointManager(str(tmp_path / 'ckpt'))
  mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = _take(it, 4)
  fresh = iter(pipeline.make_dataset(cfg, 'train'))
  restored = mngr.restore(5, args=ocp.args.Composite(
      data_iter=grain.checkpoint.CheckpointRestore(fresh)))['data_iter']
  for a, b in zip(want, _take(restored, 4)):
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
  mngr.close()


def test_validation_deterministic_and_seed_independent():
  a = _take(iter(pipeline.make_dataset(_cfg(shuffle_seed=0), 'validation')), 8)
  b = _take(iter(pipeline.make_dataset(_cfg(shuffle_seed=5), 'validation')), 8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
  t0 = next(iter(pipeline.make_dataset(_cfg(shuffle_seed=0), 'train')))['tokens']
  t5 = next(iter(pipeline.make_dataset(_cfg(shuffle_seed=5), 'train')))['tokens']
  assert not np.array_equal(t0, t5)


def test_engram_rows_hook(monkeypatch):
  calls = []

  def hash_rows(spec, tokens, segment_ids=None):
    calls.append(segment_ids)
    return {layer: np.stack([tokens * spec + layer, tokens + j], -1) for layer in (1, 3)
            for j in (7,)}

  monkeypatch.setitem(sys.modules, 'v4jax.data.engram_hash',
                      types.SimpleNamespace(hash_rows=hash_rows))
  for respect in (False, True):
    cfg = _cfg(respect_doc_boundaries=respect)
    cfg.engram.enabled = True
    b = next(iter(pipeline.make_dataset(cfg, 'train', hash_spec=2)))
    for layer in (1, 3):
      rows = b[f'engram_rows_{layer}']
      assert rows.dtype == np.int32 and rows.shape == (G, T, 2)
      np.testing.assert_array_equal(rows[..., 0], b['tokens'] * 2 + layer)
    if respect:
      np.testing.assert_array_equal(calls[-1], b['segment_ids'])
    else:
      assert calls[-1] is None
  cfg.engram.enabled = False
  b = next(iter(pipeline.make_dataset(cfg, 'train', hash_spec=2)))
  assert not any(k.startswith('engram_rows_') for k in b)


def test_config_errors(tmp_path):
  cfg = _cfg()
  cfg.model.vocab_size = 200
  with pytest.raises(ConfigError, match=r'config.model.vocab_size=200 is smaller than the data '
                                        r'vocabulary \(258 ids\)'):
    pipeline.make_dataset(cfg, 'train')
  with pytest.raises(ValueError, match="split='eval' is not one of"):
    pipeline.make_dataset(_cfg(), 'eval')
  with pytest.raises(FileNotFoundError, match='has no manifest.json'):
    pipeline.make_dataset(_cfg(source='array_record', path=str(tmp_path)), 'train')


@pytest.mark.parametrize('engram', [False, True])
def test_batch_fields_describe_the_batches(engram):
  """pipeline.batch_fields (the abstract batch of tools/aot_compile.py and remat_report.py) names
  exactly the fields, shapes and dtypes of a real batch, Engram row ids included."""
  cfg = _cfg()
  cfg.engram.enabled = engram
  cfg.engram.table_memory = 'device'
  spec = make_hash_spec(cfg) if engram else None
  b = next(iter(pipeline.make_dataset(cfg, 'validation', hash_spec=spec)))
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == \
      {k: (shape, np.dtype(dt)) for k, (shape, dt) in pipeline.batch_fields(cfg, G).items()}
  assert any(k.startswith('engram_rows_') for k in b) == engram
