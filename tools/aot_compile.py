"""Compile the train step of any config for a named TPU topology on a CPU machine (no TPU needed).

libtpu's compile-only client describes the topology's chips; the step is lowered and compiled
for them exactly as the trainer jits it (same state shardings, donation, rules), and the
compiled program's per-chip memory (arguments, outputs, temporaries; total vs the chip's HBM)
and FLOPs are printed. Needs `jax[tpu]` (libtpu) in the running venv, e.g. /work/venv-tpu.

  PYTHONPATH=. /work/venv-tpu/bin/python tools/aot_compile.py --config configs/v3_2_671b.py \\
      --topology v5p:8x8x16 --rules fsdp_ep --config.mesh.expert=16 --config.mesh.fsdp=-1 \\
      --config.data.global_batch=1024 [--out report.json]

Kernels: the run targets TPU (V4JAX_TARGET_PLATFORM=tpu), so `auto` seams pick their TPU Pallas
kernels and compile them through Mosaic rather than interpret mode. Engram tables in host memory
(`engram.table_memory=host`) stay out of the step: the hosts gather each step's rows, and the
step takes them as inputs, laid out as HostTables hands them over on the topology's hosts (one
host: replicated [U,3,H] rows; several: a [P*U,3,H] parts array sharded like the batch); the
report adds each host's share of the tables and moments. --engram_on_device compiles the tables
in HBM instead (sharded like the other parameters).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')   # libtpu's lockfile: one user otherwise
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Preset file, e.g. configs/tiny.py.',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', 'v5p:2x2x1', 'TPU topology name, e.g. v5p:8x8x16.')
_RULES = flags.DEFINE_string('rules', None, 'Shortcut for --config.mesh.rules.')
_ENGRAM_DEV = flags.DEFINE_bool('engram_on_device', False, 'Compile host-table Engram configs '
                                'with the tables in HBM instead.')
_OUT = flags.DEFINE_string('out', None, 'Write the report as JSON here.')
_EXTRAP = flags.DEFINE_string('extrapolate', None, 'L1,L2: compile at n_layers L1 and L2 (same '
                              'dense layers) and extrapolate the per-chip memory linearly to the '
                              "config's n_layers; the state bytes at full depth are exact.")
flags.mark_flags_as_required(['config'])

GIB = 1024 ** 3
# HBM per chip (GiB), from the vendors' data sheets.
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5litepod': 16, 'v5p': 95, 'v6e': 32}


def topology_desc(topology: str):
  """libtpu's description of a named topology. One below a host's 2x2 chips (e.g. v6e:1x1, a
  single-chip slice) needs the host bounds said explicitly. (On one chip, bench_h200's step then
  stopped in Pallas TPU lowering, "Unsupported TPU device kind: cpu"; 2x2x1 compiles.)"""
  from jax.experimental import topologies
  kw = {}
  dims = re.fullmatch(r'[a-z0-9]+:(\d+(?:x\d+)*)', topology)
  if dims:
    d = [int(x) for x in dims.group(1).split('x')]
    if math.prod(d) < 4:
      kw['chips_per_host_bounds'] = d + [1] * (3 - len(d))
  return topologies.get_topology_desc(platform='tpu', topology_name=topology, **kw)


def hbm_bytes(topology: str) -> int | None:
  gen = topology.split(':')[0].split('-')[0].lower()
  return HBM_GIB[gen] * GIB if gen in HBM_GIB else None


def abstract_trainer(cfg, devices):
  """A Trainer with its mesh, rules, model graph, optimizer and state shardings, but no data,
  checkpoints or device state: enough to trace `Trainer._step` for abstract devices."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from v4jax import compat
  from v4jax.config import validate
  from v4jax.model.transformer import Transformer
  from v4jax.optim import make_optimizer
  from v4jax.parallel import rules as rules_lib
  from v4jax.parallel.mesh import make_mesh
  from v4jax.trainer import Trainer, engram_setup, opt_shardings, var_shardings

  tr = object.__new__(Trainer)   # __init__ would build data pipelines and materialise state
  tr.cfg = validate(cfg)
  compat.set_scan_outputs(cfg.train.scan_outputs)   # as Trainer.__init__: lowered as it trains
  tr.mesh = make_mesh(cfg.mesh, devices)
  tr.rules = rules_lib.RULES[cfg.mesh.rules]
  tr.hash_spec, rows = engram_setup(cfg, None)
  abs_model = nnx.eval_shape(
      lambda: Transformer(cfg, rngs=nnx.Rngs(params=0), engram_rows_per_layer=rows))
  tr.graphdef, abs_params, abs_rest = nnx.split(abs_model, nnx.Param, ...)
  tr.tx = make_optimizer(cfg, abs_params)
  p_sh = var_shardings(abs_params, tr.mesh, tr.rules)
  rep = NamedSharding(tr.mesh, P())
  opt_shapes = jax.eval_shape(tr.tx.init, abs_params)
  tr.state_shardings = {'step': rep, 'params': p_sh,
                        'rest': var_shardings(abs_rest, tr.mesh, tr.rules),
                        'opt': opt_shardings(opt_shapes, p_sh, tr.mesh), 'skipped': rep}
  shapes = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abs_params,
            'rest': abs_rest, 'opt': opt_shapes, 'skipped': jax.ShapeDtypeStruct((), jnp.int32)}
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       shapes, tr.state_shardings)
  return tr, state


def state_bytes_per_chip(state) -> int:
  """Bytes of one chip's shard of every state leaf (the train step's donated argument)."""
  import jax
  import numpy as np
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(state))


def abstract_batch(tr):
  """ShapeDtypeStructs of one global batch, sharded over the batch axes like `to_global`."""
  import jax
  from jax.sharding import NamedSharding

  from v4jax.data.pipeline import batch_fields
  from v4jax.parallel import rules as rules_lib

  out = {}
  for k, (shape, dt) in batch_fields(tr.cfg, tr.cfg.data.global_batch).items():
    spec = rules_lib.logical_to_spec(('batch',) + (None,) * (len(shape) - 1), tr.rules)
    out[k] = jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(tr.mesh, spec))
  return out


def lower_step(cfg, devices):
  """(abstract trainer, abstract state, lowered train step) for `devices`: the Trainer's own
  jitted step (its donations; for host tables the rows as inputs, the new rows as an output)."""
  from v4jax.config import host_tables

  tr, state = abstract_trainer(cfg, devices)
  args = (state, abstract_batch(tr))
  if host_tables(cfg):
    from v4jax.memory.host_tables import abstract_step_inputs
    eng = abstract_step_inputs(cfg, tr.mesh)
    args += (eng, eng.pop('prev'))
  return tr, state, tr.jit_step().trace(*args).lower()


def compile_step(cfg, topology: str):
  """Compiles the train step for `topology`; returns (compiled, report dict)."""
  import jax

  from v4jax import flops as flops_lib
  from v4jax.config import host_tables

  topo = topology_desc(topology)
  devices = list(topo.devices)
  t0 = time.time()
  tr, state, lowered = lower_step(cfg, devices)
  host = host_tables(cfg)
  t1 = time.time()
  n_params = sum(int(x.size) for x in jax.tree.leaves(state['params']))
  state_bytes = state_bytes_per_chip(state)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:   # libtpu refuses programs that exceed HBM
    m = re.search(r'HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)', str(e))
    if not m:
      raise
    compiled, t2 = None, time.time()
    temp, code = int(float(m.group(1)) * GIB), 0
    args = outs = alias = state_bytes            # the donated state (the batch is small)
    cost = {}
  else:
    t2 = time.time()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    code = mem.generated_code_size_in_bytes
  total = args + outs - alias + temp + code
  hosts, host_bytes = len({d.process_index for d in devices}), None
  if host:                     # tables + Adam moments: each host keeps ceil(R_l / P) rows per layer
    from v4jax.memory.host_tables import row_dims
    host_bytes = sum(-(-tr.hash_spec.rows_in_layer(l) // hosts) for l in cfg.engram.layer_ids) * \
        3 * row_dims(cfg)[1] * 4
  tokens = cfg.data.global_batch * cfg.data.seq_len
  model_flops = flops_lib.flops_per_token(cfg).model_train_per_token * tokens / len(devices)
  hbm = hbm_bytes(topology)
  report = {
      'topology': topology, 'chips': len(devices), 'device_kind': devices[0].device_kind,
      'mesh': dict(tr.mesh.shape), 'rules': cfg.mesh.rules, 'params': n_params,
      'global_batch': cfg.data.global_batch, 'seq_len': cfg.data.seq_len,
      'grad_accum': cfg.train.grad_accum, 'remat': cfg.model.remat,
      'grouped_matmul': cfg.kernels.grouped_matmul,
      'n_layers': cfg.model.n_layers, 'state_bytes_per_chip': state_bytes,
      'bytes_per_chip': {'arguments': args, 'outputs': outs, 'aliased': alias,
                         'temporaries': temp, 'code': code, 'total': total},
      'compile_error': None if compiled is not None else 'libtpu: HLO temporaries exceed HBM',
      'hbm_bytes': hbm, 'fits': None if hbm is None else total <= hbm,
      'hosts': hosts,
      'engram_host_bytes_per_process': host_bytes,
      'hlo_flops_per_chip': float(cost['flops']) if cost and 'flops' in cost else None,
      'model_flops_per_chip': model_flops,
      'lower_s': round(t1 - t0, 1), 'compile_s': round(t2 - t1, 1),
  }
  return compiled, report


def format_report(r: dict) -> str:
  b = r['bytes_per_chip']
  hbm = f"{r['hbm_bytes'] / GIB:.1f} GiB" if r['hbm_bytes'] else 'unknown'
  lines = [
      f"topology {r['topology']} ({r['chips']} chips, {r['device_kind']}), mesh {r['mesh']}, "
      f"rules {r['rules']}",
      f"params {r['params'] / 1e9:.2f}B ({r['n_layers']} layers), "
      f"batch {r['global_batch']} x {r['seq_len']} "
      f"(grad_accum {r['grad_accum']}), remat {r['remat']}, grouped_matmul {r['grouped_matmul']}",
      'per-chip memory:',
  ]
  for k in ('arguments', 'outputs', 'aliased', 'temporaries', 'code', 'total'):
    lines.append(f'  {k:<12} {b[k] / GIB:9.2f} GiB')
  verdict = {True: 'fits', False: 'DOES NOT FIT', None: '?'}[r['fits']]
  lines.append(f'  HBM          {hbm}  -> {verdict}')
  if r.get('engram_host_bytes_per_process') is not None:
    lines.append(f"Engram tables + moments in host memory: "
                 f"{r['engram_host_bytes_per_process'] / GIB:.2f} GiB per host ({r['hosts']} hosts)")
  if r.get('compile_error'):
    lines.append(f"  ({r['compile_error']}: temporaries from libtpu's error; arguments/outputs "
                 'are the exact state bytes)')
  if r['hlo_flops_per_chip'] is not None:
    lines.append(f"FLOPs per chip per step: compiled HLO {r['hlo_flops_per_chip']:.3e}, "
                 f"model (6N + attention, flops.py) {r['model_flops_per_chip']:.3e}")
  if r.get('extrapolated_from'):
    lines.append('memory EXTRAPOLATED linearly in n_layers from compiles at ' + ', '.join(
        f"{e['n_layers']} layers (total {e['bytes_per_chip']['total'] / GIB:.2f} GiB, "
        f"compile {e['compile_s']} s)" for e in r['extrapolated_from']) +
                 '; state bytes at full depth exact')
  else:
    lines.append(f"lower {r['lower_s']} s, compile {r['compile_s']} s")
  return '\n'.join(lines)


def at_depth(cfg, n_layers: int):
  """cfg with n_layers blocks (Engram layers past the end moved to the last free blocks)."""
  c = cfg.copy_and_resolve_references()
  with c.unlocked():
    c.model.n_layers = n_layers
    if c.engram.enabled:
      ids, free = [], [i for i in range(n_layers - 1, -1, -1)]
      for lid in c.engram.layer_ids:
        lid = lid if lid < n_layers and lid not in ids else next(i for i in free if i not in ids)
        ids.append(lid)
      c.engram.layer_ids = tuple(sorted(ids))
  return c


def extrapolate(cfg, topology: str, depths: tuple[int, int]) -> dict:
  """Compiles at two depths; per-chip bytes linear in n_layers, evaluated at cfg's depth. The
  state (parameters + optimizer) at full depth is computed exactly from its shardings."""
  import jax

  from v4jax import flops as flops_lib

  reports = [compile_step(at_depth(cfg, d), topology)[1] for d in depths]
  (d1, r1), (d2, r2) = zip(depths, reports)
  L = cfg.model.n_layers
  est = {}
  for k in r1['bytes_per_chip']:
    a, b = r1['bytes_per_chip'][k], r2['bytes_per_chip'][k]
    est[k] = int(a + (b - a) * (L - d1) / (d2 - d1))
  devices = list(topology_desc(topology).devices)
  _, state = abstract_trainer(cfg, devices)
  full_state = state_bytes_per_chip(state)
  # arguments/outputs/aliased are the donated state plus the batch: take the exact state
  batch = r2['bytes_per_chip']['arguments'] - r2['state_bytes_per_chip']
  est.update(arguments=full_state + batch, outputs=full_state, aliased=full_state)
  est['total'] = (est['arguments'] + est['outputs'] - est['aliased'] + est['temporaries'] +
                  est['code'])
  out = dict(reports[-1])
  out.update(n_layers=L, params=sum(int(x.size) for x in jax.tree.leaves(state['params'])),
             state_bytes_per_chip=full_state, bytes_per_chip=est,
             fits=None if out['hbm_bytes'] is None else est['total'] <= out['hbm_bytes'],
             extrapolated_from=[{k: r[k] for k in ('n_layers', 'bytes_per_chip', 'compile_s',
                                                  'hlo_flops_per_chip')} for r in reports])
  f1, f2 = r1['hlo_flops_per_chip'], r2['hlo_flops_per_chip']
  out['hlo_flops_per_chip'] = f1 + (f2 - f1) * (L - d1) / (d2 - d1)
  out['model_flops_per_chip'] = (flops_lib.flops_per_token(cfg).model_train_per_token *
                                 cfg.data.global_batch * cfg.data.seq_len / out['chips'])
  return out


def main(argv):
  del argv
  os.environ.setdefault('V4JAX_TARGET_PLATFORM', 'tpu')   # set here, not at import: importers keep theirs
  cfg = _CONFIG.value
  with cfg.unlocked():
    if _RULES.value:
      cfg.mesh.rules = _RULES.value
    cfg.checkpoint.enabled = False
    if _ENGRAM_DEV.value and cfg.engram.enabled:
      cfg.engram.table_memory = 'device'
  if _EXTRAP.value:
    d1, d2 = (int(x) for x in _EXTRAP.value.split(','))
    report = extrapolate(cfg, _TOPOLOGY.value, (d1, d2))
  else:
    _, report = compile_step(cfg, _TOPOLOGY.value)
  report['engram_tables'] = cfg.engram.table_memory if cfg.engram.enabled else None
  print(format_report(report), flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  app.run(main)
