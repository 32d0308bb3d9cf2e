"""tools/bench_engram.py --smoke on CPU: both modes run end to end against the current host-table
API (a stale call into the store fails here, not on the GPU) and report consistent figures."""
from helpers import run_tool_smoke


def test_bench_engram_update_only_smoke(tmp_path):
  rep = run_tool_smoke(tmp_path, 'bench_engram', '--update-only', '--steps', '2', '--warmup', '1',
                       '--rows', '4096')
  rows = rep['update_only']
  assert [r['size_gib'] for r in rows] == [0.008, 0.002] and not rep['errors']
  for r in rows:
    assert 0 < r['rows_per_step'] <= 2 * 4096
    assert r['update_ms'] == r['gather_ms'] + r['scatter_ms'] > 0
    assert abs(r['update_over_floor'] - r['update_ms'] / r['floor_ms']) < 1e-9


def test_bench_engram_step_smoke(tmp_path):
  rep = run_tool_smoke(tmp_path, 'bench_engram', '--steps', '1', '--warmup', '2', '--sizes-gib',
                       '0.002', '--batch', '16', '--accum', '2')
  assert not rep['errors'], rep['errors']
  kinds = [p['memory_kind'] for p in rep['phases']]
  assert kinds == ['device', 'pinned_host'], kinds     # HBM first (bench_engram._plan)
  # the first step of a phase compiles at most once; the later steps reuse it, same inputs
  assert [p['compiles_after_first_step'] for p in rep['phases']] == [0, 0]
  assert all(p['input_changes'] == [] for p in rep['phases'])
  assert all(0 < p['loss'] < 10 and p['step_ms'] > 0 for p in rep['phases'])  # ln 256 = 5.5
  s = rep['summary'][0]
  assert s['host_step_ms'] > 0 and s['hbm_step_ms'] > 0 and rep['largest_trained_gib'] > 0


def test_host_adam_probe_matches_lazy_adam_rows():
  """The probe's numba row Adam (the host-side Adam design, timed by --host-adam-probe) equals
  rows.lazy_adam_rows on the same rows within fp32 rounding (rtol 1e-5) and leaves the rows it
  was not given bit-identical."""
  import types
  import numpy as np
  import pytest
  pytest.importorskip('numba')
  import jax.numpy as jnp
  from helpers import load_tool
  from v4jax.memory.rows import lazy_adam_rows
  mod = load_tool('bench_engram')
  rs = np.random.RandomState(0)
  R, W = 50, 8
  tab = rs.randn(R, 3, W).astype(np.float32)
  tab[:, 2] = np.abs(tab[:, 2])
  before = tab.copy()
  ids = np.sort(rs.choice(R, 20, replace=False)).astype(np.int32)
  tasks = lambda sel: [(0, 0, sel[0][0].astype(np.intp), 0, 0, 9),       # two thread tasks
                       (0, 0, sel[0][0].astype(np.intp), 0, 9, 20)]
  store = types.SimpleNamespace(width=W, chunk=R, views=[tab], _row_tasks=tasks,
                                _run=lambda fn, ts: [fn(*t) for t in ts])
  rng = np.random.default_rng(3)
  times = mod.host_adam_probe(store, {0: (ids, 0)}, rng, count=4)
  assert set(times) == {'probe_theta_gather_ms', 'probe_adam_ms'}
  g = np.random.default_rng(3).standard_normal((20, W), dtype=np.float32)   # the probe's draws
  want = np.asarray(lazy_adam_rows(jnp.asarray(before[ids]), jnp.asarray(g), jnp.int32(4),
                                   jnp.float32(1e-3), 0.9, 0.95, 1e-8, jnp.bool_(True)))
  np.testing.assert_allclose(tab[ids], want, rtol=1e-5, atol=1e-7)
  rest = np.setdiff1d(np.arange(R), ids)
  np.testing.assert_array_equal(tab[rest], before[rest])


def test_bench_engram_host_adam_probe_smoke(tmp_path):
  """--update-only --host-adam-probe reports the probe's time and its ratio to the same floor."""
  import pytest
  pytest.importorskip('numba')
  rep = run_tool_smoke(tmp_path, 'bench_engram', '--update-only', '--steps', '2', '--warmup', '1',
                       '--rows', '4096', '--host-adam-probe')
  for r in rep['update_only']:
    assert r['probe_update_ms'] == r['probe_theta_gather_ms'] + r['probe_adam_ms'] > 0
    assert abs(r['probe_over_floor'] - r['probe_update_ms'] / r['floor_ms']) < 1e-9
