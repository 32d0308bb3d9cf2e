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
  assert kinds == ['pinned_host', 'device'], kinds
  # the first step of a phase compiles at most once; the later steps reuse it, same inputs
  assert [p['compiles_after_first_step'] for p in rep['phases']] == [0, 0]
  assert all(p['input_changes'] == [] for p in rep['phases'])
  assert all(0 < p['loss'] < 10 and p['step_ms'] > 0 for p in rep['phases'])  # ln 256 = 5.5
  s = rep['summary'][0]
  assert s['host_step_ms'] > 0 and s['hbm_step_ms'] > 0 and rep['largest_trained_gib'] > 0
