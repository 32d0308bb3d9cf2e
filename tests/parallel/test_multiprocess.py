"""Two local processes x 4 CPU devices (jax.distributed on loopback, gloo collectives) train the
tiny config on one 8-device mesh and log the losses of a single-process run.

Mesh fsdp=4 x expert=2 with the fsdp_ep preset: parameters are gathered across the process
boundary and the expert exchange runs inside each process's device pairs; each process feeds
its half of every global batch. The test starts both workers with `python -m v4jax.train` and
explicit coordinator flags, and stops them (kill) if they do not finish in time.
"""
import subprocess

import numpy as np

from helpers import ROOT
from multiprocess_util import RTOL, STEPS, losses, train_cmd, two_workers, worker_env


def test_two_processes_match_single_process(tmp_path):
  ref = tmp_path / 'single'
  subprocess.run(train_cmd(ref, '--config.checkpoint.enabled=False'), cwd=ROOT, env=worker_env(1),
                 check=True, capture_output=True, timeout=600)
  want = losses(ref)
  work = tmp_path / 'multi'
  with two_workers(work, '--config.checkpoint.enabled=False'):
    pass   # nothing to do beside them: leaving the block waits for both
  got = losses(work)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for s in got:
    np.testing.assert_allclose(got[s], want[s], rtol=RTOL[s], err_msg=f'step {s}')
