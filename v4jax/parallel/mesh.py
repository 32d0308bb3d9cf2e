"""Device mesh from `config.mesh`: ICI x DCN sizes per axis, `-1` for the rest, multi-host init."""
from __future__ import annotations

import glob
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from v4jax.config import ConfigError
from v4jax.parallel.rules import MESH_AXES


def resolve_axis_sizes(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
  """Replaces one -1 by whatever makes the product equal `total`; errors name the product."""
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if -1 in sizes.values():
    if total % fixed:
      raise ConfigError(f'{what}: the fixed axis sizes {sizes} (product {fixed}) do not divide '
                        f'the {total} devices')
    sizes = {k: (total // fixed if v == -1 else v) for k, v in sizes.items()}
  if math.prod(sizes.values()) != total:
    raise ConfigError(f'{what}: axis sizes {sizes} multiply to {math.prod(sizes.values())}, '
                      f'not the {total} devices')
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A 4-axis mesh (data, fsdp, expert, tensor). DCN sizes split across slices/hosts first."""
  devices = list(devices if devices is not None else jax.devices())
  dcn = {a: mesh_cfg[f'dcn_{a}'] for a in MESH_AXES}
  n_dcn = math.prod(dcn.values())
  if len(devices) % n_dcn:
    raise ConfigError(f'config.mesh: the DCN sizes {dcn} (product {n_dcn}) do not divide the '
                      f'{len(devices)} devices')
  ici = resolve_axis_sizes({a: mesh_cfg[a] for a in MESH_AXES}, len(devices) // n_dcn,
                           'config.mesh (ICI sizes per slice)')
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  if n_dcn > 1 and len(slices) > 1:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_hybrid_device_mesh(
        [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices)
  else:
    shape = [ici[a] * dcn[a] for a in MESH_AXES]
    try:
      from jax.experimental import mesh_utils
      arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU / unusual topologies: plain order
      arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _on_cloud_tpu_vm() -> bool:
  """A TPU VM exposes its chips as /dev/accel* (v4/v5p) or /dev/vfio/<n> (v5e/v6e)."""
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts JAX's multi-host runtime: explicit flags; or jax's own cluster detection on a Cloud TPU
  VM (metadata server; GKE's TPU_WORKER_HOSTNAMES) and under SLURM with more than one task."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _on_cloud_tpu_vm():
    jax.distributed.initialize()
  elif 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
