"""The export's fast paths against plain references (tools/bench_convert.py measures their speed).

- CheckpointReader's array table read from _METADATA and `.zarray` files equals Orbax's metadata.
- CheckpointReader.read(key, out): the libzstd / uncompressed streaming read into a reused buffer
  equals what TensorStore reads through Orbax's own read spec, bit for bit, for zstd and for
  uncompressed Orbax items, in an OCDBT store (values found through the B+tree dump and mapped
  from the data files) or one file per array, with 4 KB windows (many windows, a value ending
  exactly on a window boundary), reporting its progress in order; layouts it does not handle
  fall back to TensorStore. CheckpointReader.mapped(key) (raw files only) gives the same bytes,
  read-only. The OCDBT value index of a store whose B+tree is several levels deep.
- ShardWriter.write: transposed fp32 views (OpenBLAS's transpose, on one thread or split in two)
  and bf16 casts, written through 64 KB staging buffers so rows straddle them, read back equal
  to numpy's x.T and ml_dtypes' rounding (exact: both are copies / the same round-to-nearest-even).
"""
import os

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from v4jax.convert import ckpt_reader, safetensors_io
from v4jax.convert.ckpt_reader import CheckpointReader
from v4jax.convert.safetensors_io import SafetensorsFile, ShardWriter


def _item(path, arrays, compress, ocdbt=True):
  ckptr = ocp.PyTreeCheckpointer(use_compression=compress, use_ocdbt=ocdbt)
  ckptr.save(path, arrays)
  return str(path)


@pytest.mark.parametrize('compress,ocdbt', [(True, True), (False, True), (True, False),
                                            (False, False)])
def test_reader_fast_path_matches_tensorstore(tmp_path, monkeypatch, compress, ocdbt):
  monkeypatch.setattr(ckpt_reader, '_RANGE', 4096)
  rng = np.random.default_rng(3)
  arrays = {'a': rng.standard_normal((97, 131)).astype(np.float32),    # several ranges
            'b': rng.standard_normal((1024,)).astype(np.float32),      # exactly one 4 KB range
            'c': rng.integers(-9, 9, (5, 3, 7)).astype(np.int32),
            'd': np.asarray(7, np.int32),
            'e': rng.standard_normal((6, 4)).astype(ml_dtypes.bfloat16)}
  item = _item(tmp_path / 'item', arrays, compress, ocdbt)
  r = CheckpointReader.__new__(CheckpointReader)     # just the array table of one Orbax item
  r._ctx, r._kv, r._index = ckpt_reader._read_context(), {}, {}
  leaves = r._leaves(item, None)
  assert sorted(leaves) == sorted(CheckpointReader._leaves_orbax(item, None))   # Orbax's own view
  r.arrays = {(c, p): (s, d, n, item, ()) for c, p, s, d, n in leaves}
  buf = np.full(max(r.nbytes(k) for k in r.arrays) + 64, 0xAB, np.uint8)
  fast = 0
  for key in r.arrays:
    calls = []
    got = r.read(key, buf, calls.append)
    fast += np.shares_memory(got, buf)
    if np.shares_memory(got, buf):            # progress: 0 first, in order, all bytes last
      assert calls[0] == 0 and calls == sorted(calls) and calls[-1] == r.nbytes(key), (key, calls)
      assert len(calls) > 2 or r.nbytes(key) <= 16384, (key, calls)     # several windows
    want = r._read_ts(key)
    assert got.dtype == want.dtype and got.shape == want.shape, key
    view = r.mapped(key)
    assert (view is not None) == (not compress and not ocdbt), key
    if view is not None:
      assert not view.flags.writeable and view.dtype == want.dtype and view.shape == want.shape
      np.testing.assert_array_equal(np.asarray(view, np.float64), np.asarray(want, np.float64))
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(want, np.float64))
    np.testing.assert_array_equal(np.asarray(want, np.float64), arrays[key[1]].astype(np.float64))
  if compress and ckpt_reader._zstd() is None:
    pytest.skip('no libzstd: every array went through TensorStore')
  assert fast >= 4, 'the float32/int32 arrays should take the streaming path'


@pytest.mark.parametrize('split', [False, True])
def test_writer_transposes_and_casts_through_small_buffers(tmp_path, monkeypatch, split):
  """split: every transpose of 1,000+ elements is shared with the helper thread (odd row counts
  give unequal halves)."""
  monkeypatch.setattr(safetensors_io, '_CHUNK', 64 * 1024)
  monkeypatch.setattr(safetensors_io, '_SPLIT_ELEMS', 1000 if split else 2**22)
  rng = np.random.default_rng(5)
  src = {'t32': rng.standard_normal((300, 77)).astype(np.float32),     # written as .T, fp32
         'odd': rng.standard_normal((3,)).astype(np.float32),          # bf16: 6 bytes, misaligns
         't16': rng.standard_normal((129, 250)).astype(np.float32),    # written as .T, bf16
         'id16': rng.standard_normal((70, 90)).astype(np.float32),     # bf16, no transpose
         'big': rng.standard_normal((40, 1000)).astype(np.float32)}    # rows of 4 KB, fp32
  views = {'t32': src['t32'].T, 'odd': src['odd'], 't16': src['t16'].T, 'id16': src['id16'],
           'big': src['big']}
  codes = {'t32': 'F32', 'odd': 'BF16', 't16': 'BF16', 'id16': 'BF16', 'big': 'F32'}
  path = os.path.join(tmp_path, 'x.safetensors')
  w = ShardWriter(path, [(n, codes[n], views[n].shape) for n in views])
  for n, v in views.items():
    w.write(n, v)
  w.close()
  f = SafetensorsFile(path)
  for n, v in views.items():
    want = np.ascontiguousarray(v).astype(safetensors_io.DTYPES[codes[n]])
    np.testing.assert_array_equal(f.read(n).view(np.uint8), want.view(np.uint8), err_msg=n)


@pytest.mark.parametrize('compress', [True, False])
def test_reader_truncated_chunk_file_is_one_clear_error(tmp_path, compress):
  """An item written without OCDBT whose chunk file lost its tail: ToolError naming the array
  (not a short array or a hang in the decoder)."""
  from v4jax.cli import ToolError
  a = np.random.default_rng(4).standard_normal((64, 33)).astype(np.float32)
  item = _item(tmp_path / 'item', {'a': a}, compress, ocdbt=False)
  chunk = os.path.join(item, 'a', '0.0')
  with open(chunk, 'r+b') as fh:
    fh.truncate(os.path.getsize(chunk) // 2)
  r = CheckpointReader.__new__(CheckpointReader)
  r._ctx, r._kv, r._index = ckpt_reader._read_context(), {}, {}
  r.arrays = {(c, p): (s, d, n, item, ()) for c, p, s, d, n in r._leaves(item, None)}
  if compress and ckpt_reader._zstd() is None:
    pytest.skip('no libzstd: the array goes through TensorStore')
  key, = r.arrays
  with pytest.raises(ToolError, match=r': (cannot read a |a holds)'):
    r.read(key, np.empty(a.nbytes + 8, np.uint8))


def test_ocdbt_value_index_of_a_deep_tree(tmp_path):
  """CheckpointReader._values lists every key of an OCDBT store whose B+tree is several levels
  deep (child keys are relative to their parents' common prefixes), with the newest version's
  value: inline bytes, or the (file, offset, length) holding it."""
  import tensorstore as ts
  store = str(tmp_path / 'store') + '/'
  kv = ts.KvStore.open({'driver': 'ocdbt', 'base': 'file://' + store,
                        'config': {'max_decoded_node_bytes': 400, 'max_inline_value_bytes': 16}}).result()
  rng, want = np.random.default_rng(0), {}
  for version in range(2):                  # the second commit rewrites every other key
    with ts.Transaction() as txn:
      for i in range(0, 150, 1 + version):
        key, value = f'k{i:04d}'.encode(), rng.bytes(int(rng.integers(0, 300)))
        kv.with_transaction(txn)[key] = value
        want[key] = value
  assert ts.ocdbt.dump(ts.KvStore.open('file://' + store).result()).result()['versions'][-1][
      'root_height'] >= 2
  r = CheckpointReader.__new__(CheckpointReader)
  r._ctx, r._kv, r._index = ckpt_reader._read_context(), {}, {}
  got = r._values(store.rstrip('/'))
  assert set(got) == set(want)
  for key, where in got.items():
    if not isinstance(where, bytes):
      path, offset, length = where
      with open(path, 'rb') as fh:
        fh.seek(offset)
        where = fh.read(length)
    assert where == want[key], key
  assert any(isinstance(w, bytes) for w in got.values())
