"""tools/bench_xent.py --smoke runs on any backend and its kernel rows (interpret mode) agree with
the reference: loss to 1e-6 relative, the bf16 gradient to one bf16 ulp of its largest entries."""
from helpers import run_tool_smoke


def test_bench_xent_smoke(tmp_path):
  rows = run_tool_smoke(tmp_path, 'bench_xent', '--block_v', '256,512')['rows']
  assert [r['name'] for r in rows] == ['copy', 'reference', 'pallas', 'pallas']
  assert [r['block_v'] for r in rows[2:]] == [256, 512]
  assert all(r['ms'] > 0 and r['gbps'] > 0 for r in rows)
  for r in rows[2:]:
    assert r['loss_diff'] < 1e-6 and r['grad_diff'] <= 2.0 ** -8, r
