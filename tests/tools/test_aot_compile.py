"""tools/aot_compile.py: the tiny config's whole train step compiles for a 4-chip TPU v5p slice
on this CPU machine (libtpu compile-only), with the TPU kernels (megablox grouped matmul, and the
other Pallas seams on `auto`) and expert parallelism over ragged_all_to_all; per-chip memory and
FLOPs come back.

Needs libtpu (`pip install "jax[tpu]==0.10.2"`, the `tpu` extra); skipped without it.
"""
import importlib.util
import os
import sys

import pytest

from helpers import ROOT, small_tiny
from v4jax import compat

if importlib.util.find_spec('libtpu') is None:
  pytest.skip('libtpu is not installed (pip install -e ".[tpu]"): no TPU AOT compile',
              allow_module_level=True)

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import aot_compile  # noqa: E402

pytestmark = pytest.mark.usefixtures('quick_tpu_compile')   # conftest.py


def test_tiny_train_step_compiles_for_v5p(monkeypatch):
  """... with the layer scans' stacked outputs uninitialised (train.scan_outputs='empty', as
  bench_h200 trains): lax.empty with the sharded types of the fsdp_ep preset compiles for TPU."""
  monkeypatch.setenv('V4JAX_TARGET_PLATFORM', 'tpu')     # TPU kernels, compiled (not interpreted)
  cfg = small_tiny(**{'checkpoint.enabled': False, 'mesh.fsdp': 2, 'mesh.expert': 2,
                      'mesh.rules': 'fsdp_ep', 'model.remat': 'full', 'model.logits_chunk': 16,
                      'train.scan_outputs': 'empty'})
  try:
    compiled, r = aot_compile.compile_step(cfg, 'v5p:2x2x1')
  finally:
    compat.set_scan_outputs('zeros')     # process-wide: back to jax's own for later tests
  assert r['chips'] == 4 and r['mesh'] == {'data': 1, 'fsdp': 2, 'expert': 2, 'tensor': 1}
  b = r['bytes_per_chip']
  assert 0 < b['arguments'] and 0 < b['total'] < r['hbm_bytes'] and r['fits']
  assert r['hlo_flops_per_chip'] > 0
  hlo = compiled.as_text()
  assert 'ragged-all-to-all' in hlo or 'ragged_all_to_all' in hlo   # the EP exchange
  assert 'tpu_custom_call' in hlo                                     # Mosaic kernels (megablox)
  print(aot_compile.format_report(r))



def test_host_table_step_compiles(monkeypatch):
  """engram.table_memory=host on two hosts (v5p 2x2x2): the step takes the [P*U,H] theta and
  [P*U,2,H] moment parts arrays of the hosts' gathered rows, assembles each row from its owner by
  a u32 sum, and returns the [U,3,H] rows after lazy Adam. One host hands over replicated [U,H]
  and [U,2,H] rows instead. DSA and MTP are off (the first test compiles them for TPU; they do
  not touch the rows), which shortens this compile."""
  from jax.sharding import PartitionSpec as P
  from v4jax.memory.host_tables import abstract_step_inputs, row_dims
  from v4jax.parallel.mesh import make_mesh
  from v4jax.trainer import engram_setup
  monkeypatch.setenv('V4JAX_TARGET_PLATFORM', 'tpu')
  cfg = small_tiny(**{'checkpoint.enabled': False, 'engram.table_memory': 'host',
                      'mesh.fsdp': -1, 'model.logits_chunk': 16, 'dsa.enabled': False,
                      'dsa.stage': 'dense', 'mtp.depth': 0})
  u_max, width = row_dims(cfg)
  one_host = abstract_step_inputs(cfg, make_mesh(cfg.mesh, aot_compile.topology_desc(
      'v5p:2x2x1').devices))
  assert 'bounds' not in one_host
  assert all(r.shape == (u_max, width) and r.sharding.spec == P() for r in
             one_host['theta'].values())
  assert all(r.shape == (u_max, 2, width) and r.sharding.spec == P() for r in
             one_host['moments'].values())
  compiled, r = aot_compile.compile_step(cfg, 'v5p:2x2x2')
  assert r['hosts'] == 2 and r['fits']
  rows = sum(-(-n // 2) for n in engram_setup(cfg, None)[1].values())
  assert r['engram_host_bytes_per_process'] == rows * 3 * width * 4
  hlo = compiled.as_text()
  assert f'f32[{u_max},3,{width}]' in hlo                     # the step's [U,3,H] rows
  reduced = [ln.split(' all-reduce(')[0] for ln in hlo.splitlines() if ' all-reduce(' in ln]
  for dims in (f'{u_max},{width}', f'{u_max},2,{width}'):        # parts -> theta, moments
    assert any(f'u32[{dims}]' in ln for ln in reduced), dims      # (XLA may combine the two)
