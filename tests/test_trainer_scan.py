"""Trainer with model.scan_layers: one step on the fake 8-device mesh (data 2 x fsdp 2 x
expert 2, fsdp_ep rules) equals the unrolled trainer's step.

Oracle: the unrolled Trainer (scan_layers=False) from the same seed; a scanned model's init draws
the same numbers per layer (tests/model/test_scan_layers.py), so both start from one model. Runs:
small_tiny at 3 layers (dense 0, MoE stack [1-2]) plus the MTP block, Engram off (its blocks are
never stacked; the model test covers them).
"""
import re

import numpy as np
from flax import nnx

from helpers import small_tiny
from v4jax.trainer import Trainer


def _unstacked(state):
  """{path: numpy} with every 'blocks/a-b/rest' [L,...] split into 'blocks/i/rest'."""
  out = {}
  for p, v in nnx.to_flat_state(state):
    path, v = '/'.join(map(str, p)), np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
    m = re.match(r'blocks/(\d+)-(\d+)/(.+)$', path)
    if m:
      a, b = int(m.group(1)), int(m.group(2))
      out.update({f'blocks/{i}/{m.group(3)}': v[i - a] for i in range(a, b + 1)})
    else:
      out[path] = v
  return out


def test_trainer_step_fsdp_ep_equals_unrolled(tmp_path):
  """One step on the fake 8-device mesh (data 2 x fsdp 2 x expert 2, fsdp_ep rules)."""
  over = {'checkpoint.enabled': False, 'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.expert': 2,
          'mesh.rules': 'fsdp_ep', 'model.n_layers': 3, 'engram.enabled': False,
          'model.n_dense_layers': 1}
  trs = [Trainer(small_tiny(**over, **{'model.scan_layers': s}), str(tmp_path / str(s)))
         for s in (False, True)]
  assert trs[1].graphdef != trs[0].graphdef
  bias = trs[1].state['rest']['blocks']['1-2']['ffn']['router']['bias']
  assert bias.shape == (2, 8) and bias.sharding.spec[0] is None
  batch = next(trs[0].train_iter)
  stats = [tr.step(batch) for tr in trs]
  # fp32, 8 shards, Adam normalises small gradient differences: as in test_trainer, 2e-4.
  np.testing.assert_allclose(float(stats[1]['loss']), float(stats[0]['loss']), rtol=1e-5)
  np.testing.assert_allclose(float(stats[1]['grad_norm']), float(stats[0]['grad_norm']), rtol=1e-5)
  p = [_unstacked(tr.state['params']) for tr in trs]
  assert set(p[0]) == set(p[1])
  for k in p[0]:
    np.testing.assert_allclose(p[1][k], p[0][k], rtol=2e-4, atol=2e-6, err_msg=k)
  r = [_unstacked(tr.state['rest']) for tr in trs]
  assert set(r[0]) == set(r[1]) and len(r[0]) == 3    # router biases of layers 1, 2 and MTP
  for k in r[0]:     # sign updates of integer counts: exact
    np.testing.assert_array_equal(r[1][k], r[0][k], err_msg=k)
  assert any(np.any(v != 0) for v in r[0].values())
