"""Test setup: the fake 8-device CPU mesh, set before jax is imported."""
import os

# Optimisation level 0 halves XLA:CPU compile time, which dominates this suite; numerics are
# unchanged (tests compare against oracles with stated tolerances).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import sys

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
