"""Shared by the multi-process tests: the tiny-config train command, the worker environment and
a context manager that starts two `python -m v4jax.train` workers on loopback and stops them."""
import contextlib
import json
import os
import socket
import subprocess
import sys

from helpers import ROOT, small_tiny

STEPS = 3
# fp32 losses; gloo vs in-process reductions, one device vs eight: step 1 to 1e-5 relative;
# Adam's first steps turn tiny gradient differences into sign-level update differences, so
# later steps get 1e-4.
RTOL = {1: 1e-5, 2: 1e-4, 3: 1e-4}
MESH = ('--config.mesh.fsdp=4', '--config.mesh.expert=2', '--config.mesh.rules=fsdp_ep')


def train_cmd(workdir, *extra):
  """`python -m v4jax.train` of the CI-sized tiny config for STEPS steps, logging every step."""
  c = small_tiny()
  over = [f'--config.data.seq_len={c.data.seq_len}', f'--config.data.global_batch={c.data.global_batch}',
          f'--config.data.max_docs={c.data.max_docs}', '--config.model.n_layers=2',
          '--config.dsa.topk=8', f'--config.train.steps={STEPS}', '--config.train.log_every=1',
          '--config.train.eval_every=0', '--config.log.tensorboard=False',
          '--config.log.progress=False']
  return [sys.executable, '-m', 'v4jax.train', '--config', os.path.join(ROOT, 'configs/tiny.py'),
          *over, '--workdir', str(workdir), *extra]


def worker_env(n_devices):
  """CPU with n_devices devices. Not the fake-8-device flag (it would override the device count),
  but the XLA:CPU optimisation level of conftest.py, so workers and this process compile alike."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, JAX_NUM_CPU_DEVICES=str(n_devices),
              XLA_FLAGS='--xla_backend_optimization_level=0')


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def two_workers(workdir, *extra, timeout=600):
  """Two processes x 4 CPU devices training on one MESH; on leaving the block waits for both
  (asserting they succeeded) and kills whatever still runs."""
  port = _free_port()
  procs = [subprocess.Popen(train_cmd(workdir, *MESH, *extra,
                                      f'--coordinator_address=localhost:{port}',
                                      '--num_processes=2', f'--process_id={i}'),
                            cwd=ROOT, env=worker_env(4), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE) for i in range(2)]
  try:
    yield procs
    errs = [p.communicate(timeout=timeout)[1].decode()[-3000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), '\n'.join(errs)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
