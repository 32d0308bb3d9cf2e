"""tools/bench_moe.py --smoke runs on any backend and writes its JSON rows."""
from helpers import load_tool, run_tool_smoke


def test_bench_moe_smoke(tmp_path):
  rows = run_tool_smoke(tmp_path, 'bench_moe')['rows']
  # 2 GEMMs x 2 routings x (dense, ragged; mgpu only on Hopper)
  assert len(rows) >= 8 and all('error' not in x for x in rows), rows
  assert {x['impl'] for x in rows} >= {'dense', 'ragged'}
  assert all(x['fwd_ms'] > 0 and x['fwdbwd_ms'] > 0 for x in rows)
  # the dense baseline is timed before and after the other impls; the faster time counts
  for x in rows:
    if x['impl'] == 'dense':
      assert len(x['fwd_ms_runs']) == 2 and x['fwd_ms'] == min(x['fwd_ms_runs'])
      assert x['fwdbwd_ms'] == min(x['fwdbwd_ms_runs']) and x['fwd_vs_dense'] == 1.0


def test_compile_all_compiles_side_by_side_and_returns_errors():
  """The sweep's AOT compiles in a thread pool: each result runs like its function, and a
  candidate that fails to trace comes back as its exception instead of stopping the sweep."""
  import jax.numpy as jnp
  import numpy as np
  mod = load_tool('bench_moe')
  rs = np.random.RandomState(0)
  x, w = rs.randn(8, 16).astype(np.float32), rs.randn(3, 16, 4).astype(np.float32)

  def bad(x, w):
    raise ValueError('tiling rejected')
  fns = [lambda x, w, g=g: jnp.dot(x, w[g]) for g in range(3)] + [bad]
  out = mod.compile_all(fns, (x, w), workers=2)
  for g in range(3):
    np.testing.assert_allclose(np.asarray(out[g](x, w)), x @ w[g], rtol=1e-5, atol=1e-5)
  assert isinstance(out[3], ValueError) and 'tiling rejected' in str(out[3])
