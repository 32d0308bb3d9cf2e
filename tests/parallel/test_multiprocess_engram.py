"""Two local processes x 4 CPU devices (jax.distributed on loopback, gloo collectives, mesh
fsdp=4 x expert=2 with the fsdp_ep preset: parameters gathered across the process boundary, the
expert exchange inside each process's device pairs) train the tiny config with its Engram tables
in host memory against one process: the losses match, and each process holds half of every
table's rows, the row ids go through the coordination service's key-value store, the step assembles the
rows from their owners, and the checkpoint saves each layer split by row range.

The workers run `python -m v4jax.train` (started and killed here on a timeout) and save a
checkpoint at the last step; this process trains the same config on its own 8 CPU devices, then
restores the tables of the two-process checkpoint into one process on that mesh and continues
one step from them.
"""
import json

import jax
import numpy as np

from helpers import small_tiny
from multiprocess_util import RTOL, STEPS, losses, two_workers
from v4jax import checkpoint as ckpt
from v4jax.memory.host_tables import HostTables
from v4jax.trainer import Trainer

ROWS = 1009       # engram.base_rows: four tables of ~1K rows, so many rows stay untouched
HOST = ('--config.engram.table_memory=host', f'--config.engram.base_rows={ROWS}',
        f'--config.checkpoint.every={STEPS}', '--config.checkpoint.async_save=False')


def _cfg():
  return small_tiny(**{'train.steps': STEPS, 'checkpoint.every': STEPS, 'engram.table_memory': 'host',
                       'engram.base_rows': ROWS})


def test_two_processes_host_tables_match_one_process(tmp_path):
  work = tmp_path / 'multi'
  with two_workers(work, *HOST):   # the one-process reference trains here while the workers run
    ref = Trainer(_cfg(), str(tmp_path / 'single'))
    init = ref.tables.slots(1)
    want = [float(ref.step(next(ref.train_iter))['loss']) for _ in range(STEPS)]
  got = losses(work)
  assert sorted(got) == list(range(1, STEPS + 1))
  for s in got:
    np.testing.assert_allclose(got[s], want[s - 1], rtol=RTOL[s], err_msg=f'step {s}')

  # The two-process checkpoint's tables (each layer split by row range) restored into this one
  # process, on its 8-device mesh. (The whole Trainer cannot resume a two-process run in one
  # process: Grain's iterator state is per process.)
  mngr = ckpt.manager(str(work), ref.cfg)
  assert mngr.latest_step() == STEPS
  restored = HostTables(ref.cfg, ref.tables.rows, ref.mesh, init=False)
  restored.load(ckpt.restore_host_tables(mngr, STEPS, restored.abstract()))
  two, one = restored.slots(1), ref.tables.slots(1)
  assert two.shape == one.shape == init.shape
  touched = np.any(one[:, 1] != 0, axis=1)
  np.testing.assert_array_equal(np.any(two[:, 1] != 0, axis=1), touched)
  assert (~touched).sum() > 100 and touched.sum() > 100
  # Rows no batch touched: never written, so their moments stay exactly zero and theta stays the
  # init. Each process drew its own rows with the same keys, but in another process's compile of
  # the draw: in one full-suite run 1.5% of these values differed from this process's draws by
  # one ulp (never in isolation; XLA does not promise bit-equal code across compiles). So theta
  # is held to 2 ulp. An Adam step moves an element by about its rate (this run's Engram rates
  # after the warm-up's first step: 7.5e-3, 1.5e-2), ~10^7 ulp of these ~1e-2 values.
  # Bit-identity of untouched rows within one run is tested in tests/memory/test_host_tables.py.
  np.testing.assert_array_equal(two[~touched][:, 1:], 0)
  np.testing.assert_array_max_ulp(two[~touched][:, 0], init[~touched][:, 0], maxulp=2)
  # Touched rows: the same lazy Adam steps from fp32 gradients that differ at rounding level
  # (other reduction order). Adam moves an element by at most ~its step's lr whatever the
  # gradient, so an element whose gradient is rounding noise may differ by up to 2 * sum(lr)
  # (sum of this run's Engram rates); typical elements agree to 1e-7 (median; measured max
  # 6e-6 of a 9e-2 bound). Moments: 1% of their largest entry.
  rows = [json.loads(l) for l in open(work / 'metrics.jsonl')]
  bound = 2 * ref.cfg.engram.lr_mult * sum(r['lr'] for r in rows if 'lr' in r)
  diff = np.abs(two[:, 0] - one[:, 0])
  assert diff.max() <= bound and np.median(diff[touched]) < 1e-7, (diff.max(), bound)
  for k in (1, 2):
    np.testing.assert_allclose(two[:, k], one[:, k], rtol=0, atol=1e-2 * np.abs(one[:, k]).max())

  # One more step of the reference from the restored tables: the same loss as from its own.
  batch = next(ref.train_iter)
  state = jax.tree.map(lambda x: x.copy(), ref.state)
  l_own = float(ref.step(batch)['loss'])
  ref.state = state
  ref.tables.load(restored.state_for_save())
  np.testing.assert_allclose(float(ref.step(batch)['loss']), l_own, rtol=1e-4)  # as steps 2-3
  restored.close()
  ref.tables.close()
