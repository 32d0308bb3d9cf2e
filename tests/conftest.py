"""Test setup: the fake 8-device CPU mesh, set before jax is imported."""
import os

# Optimisation level 0 halves XLA:CPU compile time, which dominates this suite; numerics are
# unchanged (tests compare against oracles with stated tolerances).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# One persistent compilation cache per test session (inherited by subprocess runs), so the many
# identical tiny-model compiles across tests and child processes are paid once.
import atexit
import shutil
import tempfile

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  # Made by this process (the pytest-xdist workers inherit it): removed when this process exits.
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='v4jax-jit-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


# Scheduling for `pytest -n 2 --dist loadfile` (the CI command): pytest-xdist hands out whole
# files, by default sorted by test count (most tests first), which queues this suite's heaviest
# files -- one or two whole-Trainer or multi-process tests each -- last, so one worker ran a 1-2
# minute file while the other had nothing left. Instead the files below go first, heaviest first
# (longest-processing-time-first scheduling); every other file follows in collection order, so
# the many short files fill the end evenly. Seconds per file are the sums of a `--durations=60`
# run of the README's test command on the 2-core CPU VM (2026-12-02, two workers sharing the
# cores; twenty-sixth session, `--durations=0`), for ordering only; keep the list roughly current.
HEAVY_FILES = {
    'tests/memory/test_host_tables.py': 203,
    'tests/parallel/test_parity.py': 128,
    'tests/tools/test_aot_compile.py': 128,      # libtpu only (CI's tpu extra)
    'tests/parallel/test_multiprocess_engram.py': 110,
    'tests/test_trainer.py': 97,
    'tests/test_trainer_resume.py': 91,
    'tests/kernels/test_indexer.py': 89,
    'tests/tools/test_convert.py': 87,
    'tests/model/test_scan_layers.py': 85,
    'tests/kernels/test_hc_mix.py': 79,
    'tests/model/test_transformer.py': 78,
    'tests/model/test_dsa.py': 71,
    'tests/test_trainer_scan.py': 70,
    'tests/tools/test_bench_train.py': 68,
    'tests/kernels/test_tpu_aot.py': 67,         # libtpu only
    'tests/tools/test_convert_scan.py': 54,
    'tests/test_cast_once.py': 51,
    'tests/kernels/test_grouped_matmul_pallas.py': 46,
    'tests/tools/test_bench_kernels.py': 43,
    'tests/tools/test_bench_engram.py': 41,
    'tests/parallel/test_expert.py': 37,
    'tests/model/test_moe.py': 36,
}


def pytest_configure(config):
  # Keep the collection order below (xdist's own reorder by test count would undo it).
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  def weight(item):
    path = os.path.relpath(str(item.path), str(config.rootpath)).replace(os.sep, '/')
    return -HEAVY_FILES.get(path, 0)
  items.sort(key=weight)      # stable: tests keep their order within a file


@pytest.fixture
def quick_tpu_compile():
  """TPU compiles at XLA's lowest execution-time effort (jax_exec_time_optimization_effort=-1):
  the ahead-of-time tests check that a step or kernel compiles for a TPU topology and fits its
  HBM, not how fast the program would run (the two files: 167 -> 107 s on the 2-core VM)."""
  import jax
  old = jax.config.jax_exec_time_optimization_effort
  jax.config.update('jax_exec_time_optimization_effort', -1.0)
  yield
  jax.config.update('jax_exec_time_optimization_effort', old)
