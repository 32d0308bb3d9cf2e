"""Safetensors export/import of a scanned model (model.scan_layers): stacked `blocks/a-b` tensors.

A scanned run's checkpoint (tiny at 4 layers: dense 0, Engram 1, MoE stack [2-3], MTP) with
random router biases is exported through the CheckpointReader (which reads each stacked tensor
as its per-layer slices), then imported both into the
scanned config and into the unrolled one. Oracle: the original checkpoint's arrays, stacked
layer i = unrolled `blocks/i`; every tensor must come back bit-identical (fp32).
"""
import jax
import numpy as np
import pytest

from helpers import small_tiny
from v4jax.convert import export as export_mod
from v4jax.convert import hf_names
from v4jax.convert.ckpt_reader import CheckpointReader
from v4jax.convert.importer import import_checkpoint
from v4jax.trainer import Trainer


def _cfg(scan):
  return small_tiny(**{'model.n_layers': 4, 'model.scan_layers': scan})


def _arrays(workdir):
  r = CheckpointReader(workdir)
  return {k: r.read(k) for k in r.arrays}


def test_stack_members_and_unstack():
  assert hf_names.stack_members(('params', 'blocks/3-5/attn/wq_a')) == [
      ('params', f'blocks/{i}/attn/wq_a') for i in (3, 4, 5)]
  assert hf_names.stack_members(('params', 'blocks/3/attn/wq_a')) is None
  shapes = hf_names.unstack({('rest', 'blocks/2-3/ffn/router/bias'): (2, 8),
                             ('params', 'embed'): (5, 4)})
  assert shapes == {('rest', 'blocks/2/ffn/router/bias'): (8,),
                    ('rest', 'blocks/3/ffn/router/bias'): (8,), ('params', 'embed'): (5, 4)}
  with pytest.raises(ValueError, match='hf_names.unstack'):
    hf_names.layout(4, {('params', 'blocks/2-3/attn/wq_a'): (2, 64, 32)})


def test_scanned_checkpoint_round_trip(tmp_path):
  wd = str(tmp_path / 'run')
  tr = Trainer(_cfg(True), wd)
  rng = np.random.default_rng(0)
  tr.state['rest'] = jax.tree.map(
      lambda x: jax.device_put(rng.normal(size=x.shape).astype(x.dtype), x.sharding),
      tr.state['rest'])
  tr.save(force=True)
  tr.mngr.wait_until_finished()
  out = str(tmp_path / 'hf')
  export_mod.export(wd, out, dtype='fp32')
  ref = _arrays(wd)
  assert ('params', 'blocks/3/attn/wq_a') in ref and ('rest', 'blocks/2/ffn/router/bias') in ref
  for scan in (True, False):
    back = str(tmp_path / f'import_{scan}')
    import_checkpoint(out, _cfg(scan), back)
    got = _arrays(back)
    assert set(got) == set(ref)
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f'scan={scan} {k}')
