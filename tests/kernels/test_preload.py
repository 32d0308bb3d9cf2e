"""kernels.preload: the kernel modules a step's seams import are imported before its first trace.

jax 0.11.2 on the H200 grew the trace context (50 -> 51 values) when the DSA seams first imported
`jax.experimental.pallas.tpu` inside the step's trace, so the next call of the jitted step traced
and compiled it again. jax 0.10.2 (this CPU) does not grow the context on that import, so the
test checks the cause instead: tracing the tiny step with every seam on its Pallas kernels
(interpret mode) imports no v4jax kernel module and no jax Pallas backend package that
`Trainer` (which calls preload) had not imported already. A fresh process, so that nothing the
other tests imported hides a lazy import.
"""
import os
import subprocess
import sys

from helpers import ROOT

CODE = '''
import sys, tempfile
import jax
from v4jax.config import load_config_file
from v4jax.trainer import Trainer
cfg = load_config_file('configs/tiny.py')
cfg.kernels.impl = 'pallas'
cfg.data.source = 'synthetic'
cfg.checkpoint.enabled = False
tr = Trainer(cfg, tempfile.mkdtemp())
batch = tr.to_global(next(tr.train_iter))
before = set(sys.modules)
jax.eval_shape(tr._step, tr.state, batch)
watched = ('v4jax.kernels', 'jax.experimental.pallas')
print('NEW', sorted(m for m in set(sys.modules) - before if m.startswith(watched)))
'''


def test_step_trace_imports_no_kernel_module_after_preload():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-c', CODE], env=env, cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  line = next(l for l in r.stdout.splitlines() if l.startswith('NEW'))
  assert line == 'NEW []', f'imported during the first trace (add them to kernels.preload): {line}'
