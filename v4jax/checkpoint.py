"""Orbax checkpoints: train state, data iterator, config and frozen artefacts (Engram hash).

Items per step: `state` (params, router biases, optimizer state, counters; restored into the
current mesh's shardings, so a restore may change the mesh), `data_iter` (Grain iterator state),
`meta` (JSON: the config and the Engram hash constants, which are never regenerated on resume),
and with engram.table_memory=host `host_tables` (each Engram layer's [R, 3, d_h] table and Adam
moments: NumPy arrays from one process, a global array split by row range from several; either
restores onto any mesh and process count).
Orbax writes each step to a temporary directory and renames it when complete, so a crash leaves
only whole steps and `latest_step()` is always a valid one.
"""
from __future__ import annotations

import dataclasses
import json
import os

import grain
import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint could not be read; the message names the directory and the problem."""


def manager(workdir: str, cfg) -> ocp.CheckpointManager:
  """The run's checkpoint manager. The array items (`state`, `host_tables`) are written as
  `checkpoint.use_ocdbt` (one OCDBT store per item, Orbax's default, or one zarr file per array)
  and `checkpoint.compression` (zstd or none) say; a restore reads any of them."""
  c = cfg.checkpoint
  opts = ocp.CheckpointManagerOptions(max_to_keep=c.max_to_keep,
                                      enable_async_checkpointing=c.async_save, create=True)
  arrays = lambda: ocp.PyTreeCheckpointHandler(use_ocdbt=c.use_ocdbt,
                                               use_compression=c.compression == 'zstd')
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=opts,
                               item_names=('state', 'data_iter', 'meta', 'host_tables'),
                               item_handlers={'state': arrays(), 'host_tables': arrays()})


def tree_save(tree) -> ocp.args.PyTreeSave:
  """Save args of an array item (`state`, `host_tables`) of a `manager`."""
  return ocp.args.PyTreeSave(tree)


def tree_restore(abstract, strict: bool = True) -> ocp.args.PyTreeRestore:
  """Restore args of an array item into the shapes, dtypes and shardings of `abstract`; with
  strict=False arrays may be cut or padded to the abstract shapes."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  if not strict:
    restore_args = jax.tree.map(
        lambda a: dataclasses.replace(a, strict=False) if hasattr(a, 'strict') else a,
        restore_args)
  return ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, meta: dict,
         force: bool = False, host_tables: dict | None = None) -> bool:
  items = dict(state=tree_save(state),
               data_iter=grain.checkpoint.CheckpointSave(data_iter),
               meta=ocp.args.JsonSave(meta))
  if host_tables is not None:   # NumPy leaves: Orbax copies them before returning
    items['host_tables'] = tree_save(host_tables)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  try:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # noqa: BLE001 - reported with the path
    raise CheckpointError(f'checkpoint {mngr.directory}/{step}: cannot read meta ({e})') from e


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter):
  """Restores `state` into the shardings of `abstract_state` and the iterator in place."""
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        state=tree_restore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
  except Exception as e:  # noqa: BLE001 - reported with the path
    raise CheckpointError(
        f'checkpoint {mngr.directory}/{step} is corrupt or does not match this config: '
        f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from e
  return out['state']


def _check_table_rows(mngr: ocp.CheckpointManager, step: int, abstract: dict) -> None:
  """Refuses saved tables that the non-strict restore would silently cut or pad: each layer
  must hold R..2R-1 rows (R = this run's rows; a run of P <= R processes pads fewer than P) and
  the same trailing dims. Skipped where this Orbax cannot read the item's metadata."""
  try:
    saved = {k: tuple(v.shape) for k, v in mngr.item_metadata(step)['host_tables'].items()}
  except Exception:  # noqa: BLE001 - no metadata: the restore itself reports unreadable items
    return
  for key, want in abstract.items():
    got, (rows, *rest) = saved.get(key), tuple(want.shape)
    if got is None or tuple(got[1:]) != tuple(rest) or not rows <= got[0] < 2 * max(rows, 1):
      raise CheckpointError(
          f'checkpoint {mngr.directory}/{step}: Engram host table {key!r} has shape {got}, '
          f'expected [{rows}..{2 * max(rows, 1) - 1}, {", ".join(map(str, rest))}] (this run\'s '
          'rows, padded to the saving run\'s process count): a different engram config?')


def restore_host_tables(mngr: ocp.CheckpointManager, step: int, abstract: dict) -> dict:
  """The `host_tables` item in the shapes and shardings of `abstract`. A run of P processes saves
  each layer padded to a multiple of P rows (memory/host_tables.py): the restore cuts those rows
  (or pads to this run's count), after `_check_table_rows` has refused tables of another size."""
  _check_table_rows(mngr, step, abstract)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        host_tables=tree_restore(abstract, strict=False)))
  except Exception as e:  # noqa: BLE001 - reported with the path
    raise CheckpointError(
        f'checkpoint {mngr.directory}/{step}: cannot read the Engram host tables (saved with '
        f'engram.table_memory=host?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    ) from e
  return out['host_tables']


def abstract_of(state_shapes, shardings):
  """ShapeDtypeStructs carrying the target shardings (for resharding restores)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shapes, shardings)


def config_json(cfg) -> str:
  return json.dumps(cfg.to_dict(), default=list, sort_keys=True)
