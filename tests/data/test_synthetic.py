"""data.source='synthetic': uniform random ids over the vocabulary with the pipeline's batch fields,
deterministic, independent of the process count, resumable, with Engram rows when Engram is on."""
import numpy as np
import pytest

from v4jax.config import ConfigError, default_config, validate
from v4jax.data import pipeline
from v4jax.data.engram_hash import hash_rows, make_hash_spec

T, G, V = 24, 4, 129280


def _cfg(**data):
  c = default_config()
  c.model.vocab_size = V
  c.data.update(dict(source='synthetic', seq_len=T, global_batch=G), **data)
  return validate(c)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_fields_range_and_determinism():
  c = _cfg()
  a = _take(iter(pipeline.make_dataset(c, 'train')), 3)
  b = _take(iter(pipeline.make_dataset(c, 'train')), 3)
  for x, y in zip(a, b):
    assert set(x) == {'tokens', 'targets', 'positions', 'segment_ids', 'loss_mask'}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  x = a[0]
  assert x['tokens'].shape == (G, T) and x['tokens'].dtype == np.int32
  np.testing.assert_array_equal(x['tokens'][:, 1:], x['targets'][:, :-1])   # next-token targets
  np.testing.assert_array_equal(x['positions'], np.broadcast_to(np.arange(T), (G, T)))
  assert (x['segment_ids'] == 1).all() and (x['loss_mask'] == 1).all()
  toks = np.concatenate([y['tokens'] for y in a])
  assert toks.min() >= 0 and toks.max() < V
  # roughly uniform over the whole vocabulary (ids far past the byte range occur), fresh per step
  assert toks.max() > V // 2 and len(np.unique(toks)) > 0.9 * toks.size
  assert not np.array_equal(a[0]['tokens'], a[1]['tokens'])
  v = next(iter(pipeline.make_dataset(c, 'validation')))
  assert not np.array_equal(v['tokens'], a[0]['tokens'])
  other = next(iter(pipeline.make_dataset(_cfg(shuffle_seed=7), 'train')))
  assert not np.array_equal(other['tokens'], a[0]['tokens'])


def test_process_slices_and_resume():
  c = _cfg()
  full = _take(iter(pipeline.make_dataset(c, 'train')), 2)
  for p in range(2):
    part = _take(iter(pipeline.make_dataset(c, 'train', process_index=p, process_count=2)), 2)
    for f, q in zip(full, part):
      np.testing.assert_array_equal(q['tokens'], f['tokens'][2 * p:2 * p + 2])
  it = iter(pipeline.make_dataset(c, 'train'))
  next(it)
  state = it.get_state()
  want = _take(it, 2)
  it2 = iter(pipeline.make_dataset(c, 'train'))
  it2.set_state(state)
  for w, g in zip(want, _take(it2, 2)):
    np.testing.assert_array_equal(w['tokens'], g['tokens'])
  with pytest.raises(ConfigError, match='global_batch'):
    pipeline.make_dataset(c, 'train', process_index=0, process_count=3)


def test_engram_rows():
  c = _cfg()
  c.engram.update(enabled=True, layer_ids=(0, 2), pad_id=0)
  spec = make_hash_spec(c)
  b = next(iter(pipeline.make_dataset(c, 'train', hash_spec=spec)))
  want = hash_rows(spec, b['tokens'])
  for l in (0, 2):
    np.testing.assert_array_equal(b[f'engram_rows_{l}'], want[l])
