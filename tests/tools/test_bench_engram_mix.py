"""tools/bench_engram_mix.py --smoke runs on any backend, and autodiff of gate_conv's forward gives
the custom VJP's values and gradients (fp32 tiny config: within 1e-4 of each tensor's largest
magnitude, as tests/model/test_engram.py bounds them)."""
from helpers import run_tool_smoke


def test_bench_engram_mix_smoke(tmp_path):
  rows = run_tool_smoke(tmp_path, 'bench_engram_mix')['rows']
  assert [(r['name'], r['pass_']) for r in rows] == [
      ('custom_vjp', 'fwd'), ('custom_vjp', 'fwd+bwd'), ('autodiff', 'fwd'),
      ('autodiff', 'fwd+bwd')]
  assert all(r['ms'] > 0 for r in rows)
  assert all(r['diff'] < 1e-4 for r in rows), rows
