"""Test setup: the fake 8-device CPU mesh, set before jax is imported."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
