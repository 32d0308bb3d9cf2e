"""tools/remat_report.py on the tiny config under block remat: the residual bytes it reports are
the sum of its sources (jax's own report of the saved residuals, traced with abstract params),
and `model.remat_recompute=('mla_up','indexer_q','ffn_in')` takes out only weight-matmul outputs,
at least one per layer and name, and nothing comes in."""
import collections
import json
import math
import os
import subprocess
import sys

from helpers import ROOT


def _report(tmp_path, name, *over):
  out = tmp_path / f'{name}.json'
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'remat_report.py'),
                      '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
                      '--config.model.remat=block', '--batch', '2', '--out', str(out), *over],
                     env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'residuals kept for the backward' in r.stdout
  return json.load(open(out))


def test_remat_report_sees_what_remat_recompute_frees(tmp_path):
  base = _report(tmp_path, 'base')
  rec = _report(tmp_path, 'rec', "--config.model.remat_recompute=('mla_up','indexer_q','ffn_in')")
  for rep in (base, rec):
    assert rep['residual_bytes'] == sum(s['bytes'] for s in rep['sources']) > 0
    assert rep['argument_bytes'] > 0 and rep['batch'] == 2 and rep['remat'] == 'block'
  count = lambda rep: collections.Counter({s['residual']: s['count'] for s in rep['sources']})
  gone, new = count(base) - count(rec), count(rec) - count(base)
  assert not new, new
  assert gone and all('output of dot_general' in k and '(matmul)' in k for k in gone), gone
  assert sum(gone.values()) >= 3 * 4, gone        # q, k/v, indexer q in each of the 4 layers
  assert rec['residual_bytes'] < base['residual_bytes']
  # the drop is the gone arrays' bytes, each counted here from its printed fp32 shape
  shape_bytes = lambda k: 4 * math.prod(int(d) for d in k[len('f32['):k.index(']')].split(','))
  assert all(k.startswith('f32[') for k in gone), gone
  assert base['residual_bytes'] - rec['residual_bytes'] == sum(
      n * shape_bytes(k) for k, n in gone.items())
