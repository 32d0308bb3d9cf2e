"""tools/bench_mhc.py --smoke runs on any backend; its Sinkhorn formulations agree with the model's."""
import json
import os
import subprocess
import sys

from helpers import ROOT


def test_bench_mhc_smoke(tmp_path):
  out = tmp_path / 'bench.json'
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools/bench_mhc.py'), '--smoke',
                      '--sinkhorn_iters', '3', '--out', str(out)], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = json.load(open(out))['rows']
  names = [x['name'] for x in rows]
  assert names == ['loop', 'sinkhorn', 'unrolled_reduce', 'unrolled_adds', 'site'], names
  assert all(x['ms'] > 0 for x in rows)
  # fp32, 3 iterations of the same math in different orders: agree to 1e-6
  assert all(x['max_abs_diff'] < 1e-6 for x in rows if x['name'] != 'site'), rows
