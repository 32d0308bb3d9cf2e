"""HF-style safetensors -> a v4jax checkpoint that `python -m v4jax.train` resumes from
(tools/import_safetensors.py).

1. Check, before anything is written: every tensor the config's model needs is in the source
   with the HF shape (v4jax/convert/hf_names.py), nothing in the source is left over, FP8
   weights have their `weight_scale_inv`, MTP copies of the embedding and head equal the
   originals, and config.json (when present) agrees with the config. All problems go into one
   error. `fresh` components may be absent (they keep their fresh initialisation); `drop`
   components in the source are ignored (e.g. the MTP layer of a DeepSeek-V3 checkpoint when
   mtp.depth = 0).
2. Build the run's Trainer (fresh optimizer state) in a temporary directory next to the
   workdir, replace each imported tensor in place (one source tensor in host memory at a time),
   set the step, save, and rename the directory to the workdir.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from v4jax.cli import ToolError, atomic_output_dir, check_output_dir, progress
from v4jax.convert import hf_names
from v4jax.convert.safetensors_io import SafetensorsDir

FLOAT_CODES = ('F32', 'BF16', 'F16', 'F64', 'F8_E4M3', 'F8_E5M2')
FP8_CODES = ('F8_E4M3', 'F8_E5M2')
_SHOW = 8       # names listed per kind of problem in the error


def scale_name(weight_name: str) -> str:
  return weight_name[:-len('weight')] + 'weight_scale_inv' if weight_name.endswith('weight') \
      else weight_name + '_scale_inv'


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """fp32 W from FP8 blocks: each [b0, b1] block times its scale; ragged edge blocks are partial."""
  out = np.empty(w.shape, np.float32)
  b0, b1 = block
  for r in range(0, w.shape[0], b0):
    s = np.repeat(scale_inv[r // b0].astype(np.float32), b1)[:w.shape[1]]
    out[r:r + b0] = w[r:r + b0].astype(np.float32) * s
  return out


def _listing(kind: str, names: list[str]) -> str:
  more = f' (+{len(names) - _SHOW} more)' if len(names) > _SHOW else ''
  return f'{kind} ({len(names)}): {", ".join(names[:_SHOW])}{more}'


class _Plan:
  """The validated mapping: entries to import, entries left fresh, and how to read each piece."""

  def __init__(self, st: SafetensorsDir, entries, cfg, fresh, drop, hf_cfg, problems):
    self.st = st
    n_layers = cfg.model.n_layers
    q = (hf_cfg or {}).get('quantization_config') or {}
    self.block = tuple(q.get('weight_block_size', (128, 128)))
    problems = problems + hf_names.config_mismatches(hf_cfg or {}, cfg, fresh | drop)
    missing, shapes, dtypes, copies_bad = [], [], [], []
    used: set[str] = set()
    self.entries, self.fresh_entries = [], []
    for e in entries:
      absent = [n for n in e.hf if n not in st]
      if absent and e.components & fresh and len(absent) == len(e.hf):
        self.fresh_entries.append(e)
        continue
      missing += absent
      for n in e.hf + tuple(c for c in e.copies if c in st):
        if n not in st:
          continue
        used.add(n)
        got, want = st.shape(n), e.hf_piece_shape
        code = st.dtype(n)
        if got != want:
          shapes.append(f'{n} {list(got)} (expected {list(want)})')
        elif code not in FLOAT_CODES:
          dtypes.append(f'{n} is {code} (expected a float dtype)')
        elif code in FP8_CODES:
          s = scale_name(n)
          want_s = [math.ceil(v / b) for v, b in zip(got, self.block)]
          if s not in st:
            missing.append(s)
          elif len(got) != 2 or list(st.shape(s)) != want_s:
            shapes.append(f'{s} {list(st.shape(s))} (expected {want_s})')
          used.add(s)
      self.entries.append(e)
    self.hash_names = []
    if cfg.engram.enabled and 'engram' not in fresh:
      self.hash_names = hf_names.hash_tensor_names(cfg.engram.layer_ids)
      missing += [n for n in self.hash_names if n not in st]
      used.update(self.hash_names)
    extra = [n for n in st.names if n not in used and not (hf_names.components_of_hf(n, n_layers) & drop)]
    if not (missing or shapes or dtypes or extra):
      for e in self.entries:       # MTP copies must hold the same values as the originals
        for c in e.copies:
          if c in st and not np.array_equal(self.read_piece(c), self.read_piece(e.hf[0])):
            copies_bad.append(f'{c} differs from {e.hf[0]}')
    for kind, names in (('missing', missing), ('unexpected', extra), ('wrong shape', shapes),
                        ('wrong dtype', dtypes), ('bad MTP copy', copies_bad)):
      if names:
        problems.append(_listing(kind, names))
    if problems:
      hint = ''
      if missing:
        comps = sorted({c for n in missing for c in hf_names.components_of_hf(n, n_layers)})
        hint += f' [--fresh {",".join(comps)} initialises those components freshly]' if comps else ''
      if extra:
        comps = sorted({c for n in extra for c in hf_names.components_of_hf(n, n_layers)})
        hint += f' [--drop {",".join(comps)} ignores those source tensors]' if comps else ''
      raise ToolError(f'{st.directory}: does not match the config: ' + '; '.join(problems) + hint)

  def read_piece(self, name: str) -> np.ndarray:
    y = self.st.read(name)
    if self.st.dtype(name) in FP8_CODES:
      y = dequantize_fp8(y, self.st.read(scale_name(name)), self.block)
    return y

  def read_entry(self, e: hf_names.Entry, dtype) -> np.ndarray:
    """The v4jax tensor of entry e, assembled from its HF pieces, in `dtype`."""
    if not e.split:
      return np.ascontiguousarray(hf_names.from_hf(e.kind, self.read_piece(e.hf[0]), e.shape), dtype)
    out = np.empty(e.shape, dtype)
    for i, n in enumerate(e.hf):
      out[i] = hf_names.from_hf(e.kind, self.read_piece(n), e.piece_shape)
    return out


def _abstract_shapes(cfg, rows):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from v4jax.model.transformer import Transformer  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from v4jax.config import host_tables  # pylint: disable=import-outside-toplevel
  from v4jax.optim import path_str  # pylint: disable=import-outside-toplevel
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0), engram_rows_per_layer=rows))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  out = {}
  for coll, tree in (('params', params), ('rest', rest)):
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      key = path_str(p)
      out[(coll, key[:-len('/value')] if key.endswith('/value') else key)] = tuple(leaf.shape)
  g = cfg.engram
  if host_tables(cfg):    # tables outside the model (v4jax.memory)
    d_h = g.d_mem // ((g.max_ngram - 1) * g.heads_per_ngram)
    for layer in g.layer_ids:
      out[('host_tables', f'engram/{layer}/table')] = (rows[layer], d_h)
  return out


def _import_stack(plan, entries, old, bar):
  """The stacked tensor `old` [L, ...] with each imported layer written in place on the devices,
  one layer in host memory at a time (None entries keep their fresh values)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  sh = old.sharding
  layer_sh = NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:]))    # 'layers' is never sharded
  put = jax.jit(lambda a, x, l: a.at[l].set(x), donate_argnums=0, out_shardings=sh)
  for l, e in enumerate(entries):
    if e is not None:
      x = jax.device_put(plan.read_entry(e, np.dtype(old.dtype)), layer_sh)
      old = put(old, x, np.int32(l))
      bar.update(math.prod(e.shape))
  return old


def import_checkpoint(src: str, cfg, workdir: str, *, step: int = 0, fresh=(), drop=()) -> dict:
  """Writes a checkpoint of `cfg`'s model with the tensors of `src` into the new `workdir`."""
  from v4jax.config import ConfigError, validate  # pylint: disable=import-outside-toplevel
  fresh, drop = frozenset(fresh), frozenset(drop)
  for flag, comps in (('--fresh', fresh), ('--drop', drop)):
    if comps - set(hf_names.COMPONENTS):
      raise ToolError(f'{flag} {",".join(sorted(comps))}: components are {hf_names.COMPONENTS}')
  try:
    cfg = validate(cfg)
  except ConfigError as e:
    raise ToolError(str(e)) from None
  if not cfg.checkpoint.enabled:
    raise ToolError('config.checkpoint.enabled=False: the import writes a checkpoint; enable it')
  if step < 0:
    raise ToolError(f'--step {step} must be >= 0')
  check_output_dir(workdir, None, '--workdir')
  st = SafetensorsDir(src)
  hf_cfg = None
  if os.path.exists(os.path.join(src, 'config.json')):
    with open(os.path.join(src, 'config.json'), encoding='utf-8') as fh:
      hf_cfg = json.load(fh)

  spec, rows, problems = None, None, []
  if cfg.engram.enabled:
    from v4jax.data.engram_hash import make_hash_spec  # pylint: disable=import-outside-toplevel
    spec = make_hash_spec(cfg)
    names = hf_names.hash_tensor_names(cfg.engram.layer_ids)
    if all(n in st for n in names):      # else: missing (reported below) or --fresh engram
      try:
        theirs = hf_names.hash_spec_from_tensors(st.read, cfg, (hf_cfg or {}).get('engram'))
      except ValueError as e:
        raise ToolError(f'{src}: Engram hash constants: {e}') from None
      if theirs.total_rows == spec.total_rows:
        spec = theirs
      else:
        problems.append(f'Engram table rows per layer {theirs.total_rows} vs {spec.total_rows} '
                        'from config.engram (base_rows, layer_ids, max_ngram, heads_per_ngram)')
    rows = dict(spec.total_rows)

  try:
    entries = hf_names.layout(cfg.model.n_layers, hf_names.unstack(_abstract_shapes(cfg, rows)))
  except ValueError as e:
    raise ToolError(str(e)) from None
  plan = _Plan(st, entries, cfg, fresh, drop, hf_cfg, problems)

  import jax  # pylint: disable=import-outside-toplevel
  from v4jax.optim import path_str  # pylint: disable=import-outside-toplevel
  from v4jax.trainer import Trainer  # pylint: disable=import-outside-toplevel
  by_key = {(e.collection, e.path): e for e in plan.entries}
  total = sum(math.prod(e.shape) for e in plan.entries)
  with atomic_output_dir(workdir) as tmp:
    tr = Trainer(cfg, tmp)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tr.state)
    tr.state = None
    arrays = [leaf for _, leaf in leaves]
    with progress(total, f'import {src}', unit='params') as bar:
      for i, (p, old) in enumerate(leaves):
        parts = path_str(p).split('/')
        if parts[0] == 'step':
          arrays[i] = jax.device_put(np.asarray(step, old.dtype), old.sharding)
          continue
        key = (parts[0], '/'.join(parts[1:-1] if parts[-1] == 'value' else parts[1:]))
        members = hf_names.stack_members(key)
        if members is not None:    # a scanned run's [L, ...] tensor
          arrays[i] = None
          arrays[i] = _import_stack(plan, [by_key.get(k) for k in members], old, bar)
          continue
        e = by_key.get(key)
        if e is None:
          continue
        arrays[i] = None      # drop the fresh tensor before making the imported one
        arrays[i] = jax.device_put(plan.read_entry(e, np.dtype(old.dtype)), old.sharding)
        bar.update(math.prod(e.shape))
      host = [e for e in plan.entries if e.collection == 'host_tables']
      if host:       # theta from the source, fresh (zero) Adam moments
        tables = {}
        for e in host:
          slots = np.zeros((e.shape[0], 3, e.shape[1]), np.float32)
          slots[:, 0] = plan.read_entry(e, np.float32)
          tables[f'layer_{e.path.split("/")[1]}'] = slots
          bar.update(math.prod(e.shape))
        tr.tables.load(tables)
    leaves = None
    tr.state = jax.tree_util.tree_unflatten(treedef, arrays)
    if spec is not None:
      tr.hash_spec = spec
    tr.save(force=True)
    tr.mngr.wait_until_finished()
    tr.mngr.close()
  return {'step': step, 'imported': len(plan.entries), 'fresh': [e.path for e in plan.fresh_entries],
          'params': total}
