"""Reads a v4jax Orbax checkpoint one tensor at a time (for export: memory stays near the largest
tensor, whatever the model size).

The `state` item is an OCDBT/zarr tensor store (v4jax/checkpoint.py). The list of arrays comes
from Orbax's metadata; each array is then opened through TensorStore with the read spec Orbax
itself uses (`orbax.checkpoint.type_handlers.get_json_tspec_read`) and read into host memory
alone. Only the `params` and `rest` collections are read; optimizer moments are never touched.
"""
from __future__ import annotations

import functools
import json
import os

import ml_collections
import numpy as np

from v4jax.cli import ToolError


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp


def _read_context():
  """Orbax's TensorStore context, reading files through mmap where this TensorStore supports
  it (`file_io_mode`: about 23% less read time than pread, measured)."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  base = _ocp().type_handlers.get_ts_context(use_ocdbt=True)
  try:
    return ts.Context(ts.Context.Spec({**base.spec.to_json(), 'file_io_mode': {'mode': 'memmap'}}))
  except ValueError:
    return base


@functools.lru_cache(maxsize=8)
def _storage(item_dir: str) -> tuple[bool, bool]:
  """(use_ocdbt, use_zarr3) of an Orbax pytree item, from its _METADATA file."""
  with open(os.path.join(item_dir, '_METADATA'), encoding='utf-8') as fh:
    raw = json.load(fh)
  return bool(raw.get('use_ocdbt', True)), bool(raw.get('use_zarr3', False))


class CheckpointReader:
  """The checkpoint of `workdir` at `step` (default: the newest complete one)."""

  COLLECTIONS = ('params', 'rest')

  def __init__(self, workdir: str, step: int | None = None):
    ocp = _ocp()
    root = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    if not os.path.isdir(root):
      raise ToolError(f'--workdir {workdir!r} has no checkpoints/ directory')
    mngr = ocp.CheckpointManager(root, item_names=('state', 'data_iter', 'meta'),
                                 options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    steps = sorted(mngr.all_steps())
    if not steps:
      raise ToolError(f'{root} holds no complete checkpoint')
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ToolError(f'--step {step}: {root} has steps {steps}')
    self.step = int(step)
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # noqa: BLE001 - reported with the path
      raise ToolError(f'{root}/{step}/meta: cannot read ({str(e).splitlines()[0]})') from None
    self.config = self._config(meta['config'])
    self.hash_spec = None
    if meta.get('engram_hash'):
      from v4jax.data.engram_hash import EngramHashSpec  # pylint: disable=import-outside-toplevel
      self.hash_spec = EngramHashSpec.from_json(meta['engram_hash'])
    self.state_dir = os.path.join(root, str(step), 'state')
    # (collection, path) -> (shape, dtype, Orbax array name, item directory, index into it)
    self.arrays: dict[tuple[str, str], tuple] = {}
    for coll, path, shape, dtype, name in self._leaves(self.state_dir, self.COLLECTIONS):
      self.arrays[(coll, path)] = (shape, dtype, name, self.state_dir, ())
    # engram.table_memory=host: each layer's [R, 3, d_h] (theta, m, v) lives in the
    # `host_tables` item; its theta is the layer's table.
    tables_dir = os.path.join(root, str(step), 'host_tables')
    if os.path.isdir(tables_dir):
      for _, key, shape, dtype, name in self._leaves(tables_dir, None):
        layer = int(key.split('_')[-1])
        self.arrays[('host_tables', f'blocks/{layer}/engram/table')] = (
            (shape[0], shape[2]), dtype, name, tables_dir, (slice(None), 0, slice(None)))
    self._ctx = _read_context()

  @staticmethod
  def _leaves(item_dir: str, collections):
    """(collection, path, shape, dtype, array name) of every array of an Orbax pytree item."""
    import jax  # pylint: disable=import-outside-toplevel
    try:
      md = _ocp().PyTreeCheckpointer().metadata(item_dir)
    except Exception as e:  # noqa: BLE001
      raise ToolError(f'{item_dir}: cannot read the metadata ({str(e).splitlines()[0]})') from None
    tree = getattr(md, 'item_metadata', md)
    tree = getattr(tree, 'tree', tree)
    out = []
    for coll in collections or [None]:
      sub = tree if coll is None else tree.get(coll)
      if sub is None:
        raise ToolError(f'{item_dir}: no {coll!r} collection (not a v4jax checkpoint?)')
      for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
        parts = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
        if parts and parts[-1] == 'value':
          parts = parts[:-1]
        name = getattr(leaf, 'name', None) or '.'.join(([coll] if coll else []) + parts)
        out.append((coll, '/'.join(parts), tuple(leaf.shape), np.dtype(leaf.dtype), name))
    return out

  @staticmethod
  def _config(text: str) -> ml_collections.ConfigDict:
    """The run's config: today's defaults updated with the stored values (so fields added
    since the checkpoint was written have their defaults)."""
    from v4jax.config import default_config  # pylint: disable=import-outside-toplevel
    cfg = default_config()
    cfg.update(json.loads(text))
    return cfg

  def shapes(self) -> dict[tuple[str, str], tuple[int, ...]]:
    return {k: v[0] for k, v in self.arrays.items()}

  def nbytes(self, key) -> int:
    shape, dtype = self.arrays[key][:2]
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

  def read(self, key: tuple[str, str]) -> np.ndarray:
    """The array at (collection, path) as a numpy array."""
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    from etils import epath  # pylint: disable=import-outside-toplevel
    ocp = _ocp()
    shape, _, name, item_dir, index = self.arrays[key]
    use_ocdbt, use_zarr3 = _storage(item_dir)
    info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(item_dir),
                                       use_zarr3=use_zarr3, ts_context=self._ctx)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
    try:
      arr = ts.open(spec, context=self._ctx, open=True, read=True).result()
      out = np.asarray(arr[index].read().result() if index else arr.read().result())
    except Exception as e:  # noqa: BLE001 - reported with the tensor
      raise ToolError(f'{item_dir}: cannot read {name} ({str(e).splitlines()[0]})') from None
    if out.shape != shape:
      raise ToolError(f'{item_dir}: {name} has shape {out.shape}, metadata says {shape}')
    return out
