"""v4jax.checkpoint's array items in each storage layout (checkpoint.use_ocdbt x
checkpoint.compression): what lands on disk, and a restore into another sharding and dtype-exact
values (fresh random arrays, bit-for-bit)."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import small_tiny
from v4jax import checkpoint as ckpt


@pytest.mark.parametrize('use_ocdbt,compression', [(True, 'zstd'), (False, 'none'),
                                                   (False, 'zstd'), (True, 'none')])
def test_array_items_in_each_layout(tmp_path, use_ocdbt, compression):
  cfg = small_tiny(**{'checkpoint.use_ocdbt': use_ocdbt, 'checkpoint.compression': compression,
                      'checkpoint.async_save': False})
  rng = np.random.default_rng(7)
  tree = {'params': {'w': rng.standard_normal((8, 6)).astype(np.float32),
                     'b': rng.standard_normal((6,)).astype(np.float32)},
          'step': np.asarray(3, np.int32)}
  mngr = ckpt.manager(str(tmp_path), cfg)
  mngr.save(0, args=ocp.args.Composite(state=ckpt.tree_save(tree)))
  mngr.wait_until_finished()
  item = os.path.join(str(tmp_path), 'checkpoints', '0', 'state')
  per_array = os.path.join(item, 'params.w', '.zarray')
  assert os.path.exists(per_array) == (not use_ocdbt)
  if not use_ocdbt:
    with open(per_array, encoding='utf-8') as fh:
      comp = json.load(fh)['compressor']
    assert (comp or {}).get('id') == (None if compression == 'none' else 'zstd')
    if compression == 'none':     # the raw bytes, which the export reads straight from the file
      with open(os.path.join(item, 'params.w', '0.0'), 'rb') as fh:
        assert fh.read() == tree['params']['w'].tobytes()
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ('d',))
  shard = lambda a: NamedSharding(mesh, P('d') if a.ndim and a.shape[0] % n == 0 else P())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shard(a)),
                          tree)
  got = mngr.restore(0, args=ocp.args.Composite(state=ckpt.tree_restore(abstract)))['state']
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert got['params']['w'].sharding == abstract['params']['w'].sharding
  mngr.close()
