"""tools/bench_gather_sum.py --smoke runs on any backend and its kernel rows (interpret mode)
agree with the reference: fp32 sums to 1e-5, bf16 sums within one bf16 rounding (|sum| < 16)."""
from helpers import run_tool_smoke


def test_bench_gather_sum_smoke(tmp_path):
  rows = run_tool_smoke(tmp_path, 'bench_gather_sum', '--block_n', '8,16')['rows']
  assert [(r['use'], r['name']) for r in rows] == [
      (u, n) for u in ('combine', 'dispatch') for n in ('copy', 'reference', 'pallas', 'pallas')]
  assert all(r['ms'] > 0 and r['gbps'] > 0 for r in rows)
  for r in rows:
    if r['name'] == 'pallas':
      assert r['diff'] <= (1e-5 if r['use'] == 'combine' else 2.0 ** -4), r
