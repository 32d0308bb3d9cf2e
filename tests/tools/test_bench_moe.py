"""tools/bench_moe.py --smoke runs on any backend and writes its JSON rows."""
from helpers import load_tool, run_tool_smoke


def test_bench_moe_smoke(tmp_path):
  rows = run_tool_smoke(tmp_path, 'bench_moe')['rows']
  # 2 GEMMs x 2 routings x (dense, ragged; mgpu only on Hopper)
  assert len(rows) >= 8 and all('error' not in x for x in rows), rows
  assert {x['impl'] for x in rows} >= {'dense', 'ragged'}
  assert all(x['fwd_ms'] > 0 and x['fwdbwd_ms'] > 0 for x in rows)
  # every other impl is timed in rounds interleaved with dense: its own dense time and ratio
  for x in rows:
    if x['impl'] == 'dense':
      assert x['fwd_vs_dense'] == 1.0 and x['fwdbwd_vs_dense'] == 1.0
    else:
      for k in ('fwd', 'fwdbwd'):
        assert x[f'{k}_dense_ms'] > 0 and 0 < x[f'{k}_vs_dense'] < float('inf')


def test_paired_seconds_times_both_in_every_round():
  """Each round times f and the reference once, in alternating order; the per-round ratio of a
  function against itself slowed by a known sleep is recovered."""
  import time
  from v4jax.cli import paired_seconds
  calls = []

  def f(a):
    calls.append('f')
    time.sleep(0.004)
    return a

  def ref(a):
    calls.append('r')
    time.sleep(0.002)
    return a
  tf, tr = paired_seconds(f, (1,), ref, (1,), iters=6)
  assert len(tf) == len(tr) == 6
  assert calls == ['f', 'r'] + ['f', 'r', 'r', 'f'] * 3      # one untimed call each, then rounds
  ratio = sorted(a / b for a, b in zip(tr, tf))[3]
  assert 0.3 < ratio < 0.7, ratio      # ~0.5 (sleep granularity on a loaded 2-core CPU)
  # reps: each timed block dispatches that many calls and reports seconds per call
  calls.clear()
  tf, tr = paired_seconds(f, (1,), ref, (1,), iters=2, reps=3)
  assert calls == ['f', 'r'] + ['f'] * 3 + ['r'] * 3 + ['r'] * 3 + ['f'] * 3
  assert all(0.003 < t < 0.012 for t in tf), tf       # per call (~4 ms), not per block (~12)


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


def test_sweep_around_the_tiling_in_use():
  """--sweep-consumers 3: the tiling in use and, for the warp-specialized kernel, its forms with
  one WGMMA group in flight and with 2-CTA clusters (in_flight only below the stage count)."""
  from v4jax.kernels.grouped_matmul.mgpu import Tiles
  mod = load_tool('bench_moe')
  ws = Tiles(128, 128, 64, 3, 4, 2)
  got = mod.sweep_candidates('fwd', 3, ws)
  assert got == [ws, ws._replace(in_flight=1), ws._replace(cluster=2),
                 ws._replace(in_flight=1, cluster=2)]
  assert mod.sweep_candidates('fwd', 3, ws._replace(stages=1)) == [
      ws._replace(stages=1), ws._replace(stages=1, cluster=2)]
  assert mod.sweep_candidates('dw', 3, Tiles()) == [Tiles()]     # jax's kernels: as they are
