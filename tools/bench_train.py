"""End-to-end training-step benchmark: compile time, step time, tokens/s, TFLOP/s, MFU, memory,
and (--profile) the share of step time per model component.

  python tools/bench_train.py --config configs/peer_maxtext_small.py[:dsa|:full] \\
      [--steps 30 --warmup 5 --out bench.json --profile --ablate dsa,mhc,engram] \\
      [--variant dsa.sparse_attention=masked] [--variant xla_gpu_memory_limit_slop_factor=95] \\
      [--per_device_batch 8] [--config.model.remat=full ...]
  python tools/bench_train.py --config configs/tiny.py --steps 3 --warmup 1     # CPU smoke

Method (docs/performance.md):
- The Trainer is built as for training (checkpoints, eval and TensorBoard off). Its jitted step is
  lowered and compiled ahead of time on the first batch, so tracing+lowering and XLA compilation
  are timed apart; the steps then run that same executable through `Trainer.step` (host-table
  Engram protocol, data pipeline and host->device batch transfer included).
- After `--warmup` steps, `--steps` steps run back to back (the host dispatches ahead, as in
  training) in windows of `--window` steps, each closed by waiting for the state (and the Engram
  host tables' write-back). step_time_s = total / steps; the window medians are reported too.
- FLOPs: SPEC §10 model FLOPs (v4jax/flops.py, MaxText-compatible: 3 x forward matmul FLOPs, no
  remat). TFLOP/s per device = FLOPs/token x tokens/s / devices; MFU against the chip's dense bf16
  peak (None on CPU). XLA's own count of the compiled step (which includes remat recompute) is
  reported as xla_tflops_per_device.
- Memory: the largest `peak_bytes_in_use` of the local devices (None where the backend keeps no
  statistics, e.g. CPU), and the compiled step's memory analysis (printed per run as `XLA memory
  GB`: arguments, outputs and the part aliased to donated inputs, temporaries, XLA's peak).
- Profile (--profile): `--profile_steps` steps under jax.profiler.trace. The trace (.xplane.pb) is
  read with jax.profiler.ProfileData (in jaxlib: no TensorBoard plugin needed). Each device op
  event carries its HLO instruction name; the compiled step's HLO text maps that name to its
  op_name metadata, which holds the jax.named_scope path. The model is instrumented for the run
  by wrapping component entry points in named scopes (`instrument`; nothing in v4jax is edited,
  the originals are restored afterwards); the innermost `v4_<tag>` scope names the component.
  Self time per event (children on the same line subtracted) is summed per component
  (`s_per_step`, op time: an async copy overlapping a kernel counts in full on both, and
  stretches while it shares the GPU); `busy_s_per_step` splits the busy time instead, each
  instant in equal parts among the ops running then (one per line), so it sums to the busy time
  and an overlap costs each side only its share. Memcpy
  events and host-memory copies count as host transfers; ops of other programs (Engram table
  gather/scatter jits, transfers) are listed per program. `top_ops` lists the costliest HLO ops,
  `top_op_groups` the costliest kernels with their ops summed per op_name (one row for a kernel
  that every scanned or repeated layer runs; each with the bytes its ops read and write per
  step and the GB/s that makes), `top_op_groups_by_component` the 15 costliest groups of each
  component (the same fields), `below_memory_speed` the groups of data-movement ops (XLA's
  loop and reduction fusions, copies, ...) ranked by their time beyond their bytes at 3 TB/s
  (a fusion reading its operands with a bad stride shows up here, as the attention backward's
  `stack` did in the thirty-first session: 36 ms per step), `data_movement` the compiled
  step's constant fills, copies, transposes and dynamic(-update) slices by bytes per loop body
  and per step (tools/hlo_report.py: what the unattributed time is). If the trace cannot be
  read, the profile section says so and `--ablate` (timing with one component switched off at
  a time) is the fallback.
- Kernel registers (--ptxas): the first step (where the Mosaic GPU kernels compile) runs with
  MOSAIC_GPU_DUMP_PTXAS=1 and its output captured (v4jax.cli.ptxas_report): `mosaic_kernels`
  lists each kernel's registers, stack and spill bytes and ptxas' performance-loss notes, and
  the summary names the kernels that spill. A spilling kernel runs well below its peers (the
  attention's dk/dv: 278 TFLOP/s spilling, 425 without; performance.md row 91).
- `--ablate` and `--variant` repeat the measurement with config overrides, one after another on
  the same machine, so their step times compare with the main one. By default (`--isolate
  process`) the main measurement and each comparison run in a fresh child process: on a GPU the
  allocator's pool keeps the layout one build left, and bench_h200's next build then found no
  contiguous room for its temporaries (performance.md row 54); `--isolate none` runs them all in
  this process (a shared jit cache, no pool isolation). A variant's `xla_*` keys are XLA compiler
  options for that build's compile (`Lowered.compile(compiler_options=...)`), e.g. `--variant
  xla_gpu_memory_limit_slop_factor=95` against the XLA_FLAGS of the main run. With --profile each
  of them is profiled too (its breakdown under its own `profile`): where a component's saved
  time went, e.g. how much of Engram's cost is its own ops and how much the rest of the step.
"""
from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import functools
import gc
import glob
import importlib
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hlo_report  # noqa: E402
from v4jax.cli import ToolError, claim_gpu_memory, ptxas_report, run_tool  # noqa: E402
from v4jax.config import load_config_file  # noqa: E402

# Components switched off by --ablate, as config overrides.
ABLATIONS = {
    'dsa': {'dsa.enabled': False, 'dsa.stage': 'dense'},
    'mhc': {'mhc.streams': 1},
    'engram': {'engram.enabled': False},
    'mtp': {'mtp.depth': 0},
}

# (module, attribute, tag): component entry points wrapped in jax.named_scope('v4_<tag>') for
# --profile. Module-level functions are patched where the caller looks them up.
SCOPES = (
    ('v4jax.model.transformer', 'Transformer.__call__', 'model'),
    ('v4jax.model.transformer', 'Transformer.embed_tokens', 'embed'),
    ('v4jax.model.transformer', 'cross_entropy_sum', 'head'),
    ('v4jax.model.mla', 'MLA.__call__', 'attn'),
    ('v4jax.model.dsa', 'Indexer.__call__', 'indexer'),
    ('v4jax.model.mla', 'indexer_topk', 'indexer'),
    ('v4jax.model.mla', 'dense_indexer_kl', 'indexer'),
    ('v4jax.model.mla', 'sparse_indexer_kl', 'indexer'),
    ('v4jax.model.moe', 'MoE.__call__', 'moe'),
    ('v4jax.model.moe', 'DenseFFN.__call__', 'ffn'),
    ('v4jax.model.mhc', 'HCSite.__call__', 'mhc'),
    ('v4jax.model.mhc', 'HyperHead.__call__', 'mhc'),
    ('v4jax.model.engram', 'Engram.retrieve', 'engram'),
    ('v4jax.model.engram', 'Engram.mix', 'engram'),
    ('v4jax.memory.rows', 'embeddings', 'engram'),
    ('v4jax.trainer', 'patch_rows', 'engram'),
    ('v4jax.trainer', 'lazy_adam_rows', 'engram'),
    ('v4jax.trainer', 'clip_grads', 'optimizer'),
)

# Reported components (the breakdown) from the innermost scope tag.
COMPONENT_OF_TAG = {
    'attn': 'attention+indexer', 'indexer': 'attention+indexer', 'moe': 'moe',
    'ffn': 'dense_ffn', 'mhc': 'mhc', 'engram': 'engram', 'head': 'head+loss',
    'embed': 'embedding', 'model': 'model_other', 'optimizer': 'optimizer',
}
COMPONENTS = ('attention+indexer', 'moe', 'dense_ffn', 'mhc', 'engram', 'head+loss',
              'embedding', 'model_other', 'optimizer', 'host_transfer', 'other_programs',
              'unattributed')
_TAG_RE = re.compile(r'v4_([a-z]+)')


# ---- config ------------------------------------------------------------------------------------
def load_config(spec: str):
  """`path.py` or `path.py:arg` -> get_config() / get_config(arg) (ml_collections' convention)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ToolError(f'--config {path!r}: no such config file')
  try:
    return load_config_file(path, variant=arg or None)
  except (TypeError, ValueError) as e:
    raise ToolError(f'--config {spec!r}: {e}') from e


def _parse_value(path: str, text: str, current):
  if isinstance(current, bool):
    low = text.strip().lower()
    if low not in ('true', 'false', '1', '0'):
      raise ToolError(f'--config.{path}={text!r}: expected a bool (true/false)')
    return low in ('true', '1')
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ToolError(f'--config.{path}={text!r}: not a Python literal '
                    f'(expected {type(current).__name__})') from e
  if isinstance(current, tuple) and isinstance(value, (list, tuple, int)):
    return tuple(value) if not isinstance(value, int) else (value,)
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if current is not None and not isinstance(value, type(current)):
    raise ToolError(f'--config.{path}={text!r}: expected {type(current).__name__}')
  return value


def apply_overrides(cfg, overrides: dict[str, object]):
  """Sets `section.field` (str values are parsed against the field's type). Unknown fields fail."""
  for path, raw in overrides.items():
    *parents, leaf = path.split('.')
    node = cfg
    for p in parents:
      if p not in node:
        raise ToolError(f'--config.{path}: no config section {p!r}')
      node = node[p]
    if leaf not in node:
      raise ToolError(f'--config.{path}: no such config field')
    node[leaf] = _parse_value(path, raw, node[leaf]) if isinstance(raw, str) else raw
  return cfg


def parse_overrides(rest: list[str]) -> dict[str, str]:
  """['--config.a.b=1', ...] (the arguments argparse left) -> {'a.b': '1'}; anything else fails."""
  overrides = {}
  for a in rest:
    m = re.fullmatch(r'--config\.([\w.]+)=(.*)', a, re.S)
    if not m:
      raise ToolError(f'unknown argument {a!r} (config overrides are --config.section.field=value)')
    overrides[m.group(1)] = m.group(2)
  return overrides


def parse_args(argv: list[str]):
  ap = argparse.ArgumentParser(prog='bench_train', description=__doc__.split('\n')[0])
  ap.add_argument('--config', required=True, help='config file, optionally path.py:variant')
  ap.add_argument('--steps', type=int, default=20, help='timed steps')
  ap.add_argument('--warmup', type=int, default=3, help='untimed steps after the first')
  ap.add_argument('--window', type=int, default=0, help='steps per timing window (0 = all)')
  ap.add_argument('--per_device_batch', type=int, default=0,
                  help='sets data.global_batch = this x device count (0 = config as is)')
  ap.add_argument('--out', default='', help='write the JSON report here')
  ap.add_argument('--profile', action='store_true', help='trace steps; per-component shares')
  ap.add_argument('--profile_steps', type=int, default=3)
  ap.add_argument('--profile_dir', default='',
                  help='trace directories go under it, one per run (default: temp dirs)')
  ap.add_argument('--ablate', default='', help=f'comma list of {sorted(ABLATIONS)}: time each '
                  'with that component off')
  ap.add_argument('--variant', action='append', default=[], metavar='FIELD=VALUE[,FIELD=VALUE]',
                  help='time the config again with these overrides '
                  '(repeatable), e.g. --variant dsa.sparse_attention=masked; xla_* keys are XLA '
                  'compiler options for that build, e.g. xla_gpu_memory_limit_slop_factor=95')
  ap.add_argument('--workdir', default='', help='Trainer workdir (default: a temp dir)')
  ap.add_argument('--ptxas', action='store_true',
                  help="report ptxas' registers and spills of each Mosaic GPU kernel the step "
                       "compiles (MOSAIC_GPU_DUMP_PTXAS=1 during the first step)")
  ap.add_argument('--isolate', choices=('process', 'none'), default='process',
                  help='with --ablate/--variant: each measurement (the main one too) in its own '
                  'process, one after another (default), or all in this one (none)')
  ap.add_argument('--measure_spec', default='', help=argparse.SUPPRESS)   # a child's one run
  args, rest = ap.parse_known_args(argv)
  overrides = parse_overrides(rest)
  for name in ('steps', 'profile_steps'):
    if getattr(args, name) <= 0:
      raise ToolError(f'--{name}={getattr(args, name)} must be a positive integer')
  if args.warmup < 0 or args.window < 0 or args.per_device_batch < 0:
    raise ToolError('--warmup, --window and --per_device_batch must be >= 0')
  args.ablate = [a for a in args.ablate.split(',') if a]
  for a in args.ablate:
    if a not in ABLATIONS:
      raise ToolError(f'--ablate {a!r} is not one of {sorted(ABLATIONS)}')
  args.variant = [_parse_variant(v) for v in args.variant]
  return args, overrides


def _parse_variant(text: str) -> dict[str, str]:
  """'a.b=1,c.d=(1,2)' -> {'a.b': '1', 'c.d': '(1,2)'} (commas inside brackets stay). Keys that
  start with `xla_` are XLA compiler options (`_split_variant`), the others config fields."""
  out = {}
  for part in re.split(r',(?![^()\[\]]*[)\]])', text):
    m = re.fullmatch(r'([\w.]+)=(.+)', part.strip(), re.S)
    if not m:
      raise ToolError(f'--variant {text!r}: expected field=value[,field=value], e.g. '
                      'dsa.sparse_attention=masked')
    out[m.group(1)] = m.group(2)
  return out


def _split_variant(variant: dict[str, str]) -> tuple[dict[str, str], dict[str, str | bool]]:
  """A variant's (config overrides, XLA compiler options): config fields never start with
  `xla_`; XLA's option names all do. An option's true / false (any case) becomes a bool: XLA
  reads a string only as True or False."""
  xla = {k: v for k, v in variant.items() if k.startswith('xla_')}
  config = {k: v for k, v in variant.items() if k not in xla}
  return config, {k: {'true': True, 'false': False}.get(v.lower(), v) for k, v in xla.items()}


def bench_config(args, overrides):
  """The config to benchmark: file + overrides, with checkpoints, eval and logging off."""
  import jax
  cfg = apply_overrides(load_config(args.config), overrides)
  if args.per_device_batch:
    cfg.data.global_batch = args.per_device_batch * jax.device_count()
  cfg.checkpoint.enabled = False
  cfg.train.eval_every = 0
  cfg.log.update(tensorboard=False, progress=False)
  return cfg


# ---- instrumentation ---------------------------------------------------------------------------
def _scoped(fn, tag):
  import jax

  @functools.wraps(fn)
  def wrapper(*a, **k):
    with jax.named_scope(f'v4_{tag}'):
      return fn(*a, **k)
  return wrapper


@contextlib.contextmanager
def patched(targets):
  """Replaces each (object, attribute, wrap) by wrap(original) while active. On exit an attribute
  the object held itself is put back; one that only shadowed a class's method is removed."""
  undo = []
  try:
    for obj, name, wrap in targets:
      undo.append((obj, name, name in vars(obj), vars(obj).get(name)))
      setattr(obj, name, wrap(getattr(obj, name)))
    yield
  finally:
    for obj, name, own, orig in reversed(undo):
      if own:
        setattr(obj, name, orig)
      else:
        delattr(obj, name)


@contextlib.contextmanager
def instrument(trainer=None):
  """Wraps the SCOPES entry points (and the trainer's optimizer update and router-bias update)
  in named scopes; restores every original on exit. Use before the step is first traced.
  Yields the list of SCOPES targets that no longer exist (their ops fall to the enclosing scope)."""
  targets, missing = [], []
  for mod_name, attr, tag in SCOPES:
    obj = importlib.import_module(mod_name)
    *owner, name = attr.split('.')
    for o in owner:
      obj = getattr(obj, o, None)
    if obj is None or not callable(getattr(obj, name, None)):
      missing.append(f'{mod_name}.{attr}')
      continue
    targets.append((obj, name, functools.partial(_scoped, tag=tag)))
  if trainer is not None:
    import optax
    targets += [(trainer, 'tx', lambda tx: optax.GradientTransformation(
                    tx.init, _scoped(tx.update, 'optimizer'))),
                (trainer, '_update_biases', functools.partial(_scoped, tag='optimizer'))]
  with patched(targets):
    yield missing


class AotStep:
  """Stands in for Trainer._train_step: lowers and compiles on the first call (timed apart, with
  `compiler_options` if given), then calls the compiled executable."""

  def __init__(self, jitted, compiler_options: dict[str, str] | None = None):
    self.jitted, self.compiled = jitted, None
    self.compiler_options = compiler_options or None
    self.trace_lower_s = self.compile_s = None

  def __call__(self, *args):
    if self.compiled is None:
      t0 = time.perf_counter()
      lowered = self.jitted.lower(*args)
      t1 = time.perf_counter()
      self.compiled = lowered.compile(compiler_options=self.compiler_options)
      self.trace_lower_s, self.compile_s = t1 - t0, time.perf_counter() - t1
    return self.compiled(*args)


# ---- measurements ------------------------------------------------------------------------------
def _sync(trainer):
  import jax
  jax.block_until_ready(trainer.state)
  if trainer.tables is not None:
    trainer.tables.flush()


def run_steps(trainer, n: int, host: dict | None = None) -> dict:
  """n steps; returns the last step's scalars (device arrays). `host` collects the main thread's
  ms per step: 'data' (next batch from the pipeline) and 'step_call' (Trainer.step: host-table
  wait and prefetch, batch transfer, dispatch, write-back submission; `timed_calls` splits it);
  the device runs behind these unless dispatch blocks."""
  scalars = None
  for _ in range(n):
    t0 = time.perf_counter()
    batch = next(trainer.train_iter)
    t1 = time.perf_counter()
    scalars = trainer.step(batch)
    if host is not None:
      host['data'].append(1e3 * (t1 - t0))
      host['step_call'].append(1e3 * (time.perf_counter() - t1))
  return scalars


def timed_calls(host: dict, targets):
  """Appends the ms of every call of each (object, attribute, key) target to host[key] while
  active (a context manager: `patched`)."""
  def timer(key):
    def wrap(fn):
      def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
          return fn(*a, **k)
        finally:
          host[key].append(1e3 * (time.perf_counter() - t0))
      return wrapper
    return wrap
  return patched([(obj, name, timer(key)) for obj, name, key in targets
                  if getattr(obj, name, None) is not None])


def peak_memory() -> dict:
  import jax
  peak = limit = None
  for d in jax.local_devices():
    try:
      s = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics
      s = None
    if s:
      peak = max(peak or 0, int(s.get('peak_bytes_in_use', 0)))
      limit = max(limit or 0, int(s.get('bytes_limit', 0)))
  return {'peak_bytes_in_use': peak, 'bytes_limit': limit}


def compiled_analysis(compiled) -> dict:
  """XLA's FLOPs/bytes count and memory analysis of the compiled step (None where missing)."""
  out = {'xla_flops_per_step': None, 'xla_bytes_accessed_per_step': None, 'memory': None}
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out['xla_flops_per_step'] = float(ca.get('flops', 0.0)) or None
    out['xla_bytes_accessed_per_step'] = float(ca.get('bytes accessed', 0.0)) or None
  except Exception:  # noqa: BLE001 - not every backend implements it
    pass
  try:
    ma = compiled.memory_analysis()
    out['memory'] = {k: int(getattr(ma, k)) for k in dir(ma)
                     if k.endswith('_in_bytes') and isinstance(getattr(ma, k), int)}
  except Exception:  # noqa: BLE001
    pass
  return out


def param_count(trainer) -> int:
  import jax
  import numpy as np
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.state['params']))
  if trainer.tables is not None:
    n += sum(r * trainer.tables.width for r in trainer.tables.rows.values())
  return n


def progress(label: str, msg: str):
  """One line on stderr as each phase ends, so that a run cut off by its time slot still shows
  how far it got (init, compile, the timed windows)."""
  print(f'[bench_train {label}] {msg}', file=sys.stderr, flush=True)


def measure(cfg, args, *, profile: bool, label: str = 'main',
            compiler_options: dict[str, str] | None = None) -> tuple[dict, dict | None]:
  """Builds a Trainer for cfg, compiles (with XLA `compiler_options` if given), warms up and
  times; (report, profile inputs)."""
  import jax
  import numpy as np
  from v4jax import flops as flops_lib
  from v4jax.trainer import Trainer

  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_train-')
  t0 = time.perf_counter()
  trainer = Trainer(cfg, workdir)
  _sync(trainer)
  init_s = time.perf_counter() - t0
  progress(label, f'init {init_s:.1f} s')
  scope = instrument(trainer) if profile else contextlib.nullcontext([])
  with scope as missing_scopes:
    aot = trainer._train_step = AotStep(trainer._train_step, compiler_options)
    t0 = time.perf_counter()
    with ptxas_report(args.ptxas) as kernels:     # Mosaic kernels compile in the first step
      run_steps(trainer, 1)
      _sync(trainer)
    first_step_s = time.perf_counter() - t0
    progress(label, f'trace+lower {aot.trace_lower_s:.1f} s  compile {aot.compile_s:.1f} s  '
                    f'first step {first_step_s:.1f} s')
    run_steps(trainer, args.warmup)
    _sync(trainer)

    window = args.window or args.steps
    windows, done, total, scalars = [], 0, 0.0, None
    host = collections.defaultdict(list)
    if trainer.tables is not None:
      trainer.tables.stats.clear()     # the timed steps' own figures
    parts = [(trainer, 'to_global', 'to_global'), (trainer, '_train_step', 'dispatch')]
    if trainer.tables is not None:
      parts += [(trainer.tables, 'begin', 'tables_begin'), (trainer.tables, 'end', 'tables_end'),
                (trainer.train_iter, 'peek', 'peek')]
    with timed_calls(host, parts):
      while done < args.steps:
        n = min(window, args.steps - done)
        t0 = time.perf_counter()
        scalars = run_steps(trainer, n, host)
        _sync(trainer)
        dt = time.perf_counter() - t0
        windows.append(dt / n)
        done, total = done + n, total + dt
        progress(label, f'steps {done}/{args.steps}: {1e3 * dt / n:.1f} ms per step')
    step_s = total / args.steps

    prof = None
    if profile:
      prof_dir = (os.path.join(args.profile_dir, label) if args.profile_dir else
                  tempfile.mkdtemp(prefix=f'bench_train-trace-{label}-'))
      t0 = time.perf_counter()
      with jax.profiler.trace(prof_dir):
        run_steps(trainer, args.profile_steps)
        _sync(trainer)
      prof = {'dir': prof_dir, 'wall_s': time.perf_counter() - t0, 'missing': missing_scopes,
              'steps': args.profile_steps, 'hlo_text': aot.compiled.as_text()}
      with open(os.path.join(prof_dir, 'train_step.hlo.txt'), 'w') as f:
        f.write(prof['hlo_text'])     # for re-reading the trace: analyse_trace(dir, text, ...)

  fl = flops_lib.flops_per_token(cfg)
  tokens = cfg.data.global_batch * cfg.data.seq_len
  n_dev = jax.device_count()
  peak = flops_lib.peak_tflops_for(jax.devices()[0])
  model_tf = fl.model_train_per_token * tokens / 1e12
  xla = compiled_analysis(aot.compiled)
  last = {k: float(v) for k, v in jax.device_get(scalars).items() if np.ndim(v) == 0}
  rep = {
      'label': label,
      'params': param_count(trainer),
      'tokens_per_step': tokens,
      'model_flops_per_token': fl.model_train_per_token,
      'hardware_flops_per_token': fl.hardware_train_per_token,
      'init_s': init_s,
      'trace_lower_s': aot.trace_lower_s,
      'compile_s': aot.compile_s,
      'first_step_s': first_step_s,
      **({'mosaic_kernels': kernels} if args.ptxas else {}),
      'warmup_steps': args.warmup,
      'steps': args.steps,
      'step_time_s': step_s,
      'step_time_median_s': statistics.median(windows),
      'window_step_times_s': windows,
      'tokens_per_s': tokens / step_s,
      'tflops_per_device': model_tf / step_s / n_dev,
      'hw_tflops_per_device': fl.hardware_train_per_token * tokens / 1e12 / step_s / n_dev,
      'xla_tflops_per_device': (xla['xla_flops_per_step'] / 1e12 / step_s / n_dev
                                if xla['xla_flops_per_step'] else None),
      'mfu': flops_lib.mfu(model_tf, step_s, n_dev, peak),
      'peak_tflops': peak,
      'memory': {**peak_memory(), 'compiled': xla['memory']},
      'xla_flops_per_step': xla['xla_flops_per_step'],
      'xla_bytes_accessed_per_step': xla['xla_bytes_accessed_per_step'],
      'host_main_thread_ms': {k: float(np.median(v)) for k, v in host.items()},
      'final_loss': last.get('loss'),
      'finite': bool(last.get('finite', 1.0)),
  }
  if trainer.tables is not None:
    rep['engram_host_ms'] = {k: float(np.median(v)) for k, v in trainer.tables.stats.items()
                             if k.endswith('_ms') and len(v)}
    trainer.tables.close()
  del trainer, aot
  gc.collect()
  return rep, prof


# ---- trace analysis ----------------------------------------------------------------------------
_CALLS_RE = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)'
                       r'|(?:called_computations|branch_computations)=\{([^}]*)\}')


def hlo_index(hlo_text: str) -> tuple[str, dict]:
  """(module name, {instruction: (op_name, called computations, operands, is_host_copy)}) of HLO
  text (parsed by tools/hlo_report.py); '@<computation>' keys hold the op_names of a
  computation's instructions."""
  module = next((line.split()[1].rstrip(',') for line in hlo_text.splitlines()
                 if line.startswith('HloModule')), '')
  info: dict[str, tuple] = {}
  for comp, instrs in hlo_report.parse(hlo_text).items():
    names = info.setdefault('@' + comp, ([], [], [], False))[0]
    for ins in instrs:
      op = re.search(r'op_name="([^"]*)"', ins.rest)
      calls = [c.strip().lstrip('%') for g in _CALLS_RE.findall(ins.rest)
               for c in ','.join(g).split(',') if c.strip()]
      operands = [o for o in re.findall(r'%([\w.\-]+)', ins.rest.split(', metadata=')[0])
                  if o not in calls]
      host_copy = ins.opcode in ('copy-start', 'copy-done', 'copy') and 'S(5)' in ins.shape
      info[ins.name] = (op.group(1) if op else '', calls, operands, host_copy)
      names.append(op.group(1) if op else '')
  return module, info


def _tag_of(op_name: str) -> str | None:
  """Innermost v4_<tag> scope of an op_name ('optimizer' outside all of them, None if empty)."""
  tags = _TAG_RE.findall(op_name)
  if not tags:
    # Inside the step but outside every model scope: parameter update, clipping, guards.
    return 'optimizer' if op_name else None
  inner = tags[-1]
  return 'moe' if inner == 'ffn' and 'moe' in tags else inner


def _infer_tag(hlo_op: str, info: dict, depth: int = 0) -> str | None:
  """The op's tag; where XLA left its op_name empty (copies, converts, some fusions): the most
  common tag of the computations it calls, else of its operands (a few levels up); a bare copy
  of the train state (parameters, optimizer moments) counts as optimizer work."""
  op_name, calls, operands, _ = info.get(hlo_op, ('', [], [], False))
  tag = _tag_of(op_name)
  if tag is not None or depth > 3:
    return tag
  votes = collections.Counter(t for c in calls for o in info.get('@' + c, ([],))[0]
                              if (t := _tag_of(o)))
  if not votes:
    votes = collections.Counter(t for o in operands if (t := _infer_tag(o, info, depth + 1)))
  if votes:
    return votes.most_common(1)[0][0]
  return 'optimizer' if any(o.startswith('state') for o in operands) else None


def component_of(hlo_op: str, info: dict) -> str:
  """Reported component of one HLO instruction (COMPONENTS)."""
  if info.get(hlo_op, (None, None, None, False))[3]:
    return 'host_transfer'
  return COMPONENT_OF_TAG.get(_infer_tag(hlo_op, info), 'unattributed')


_SKIP_LINES = ('XLA Modules', 'Steps', 'XLA TraceMe', 'Framework Ops', 'Framework Name Scope',
               'Source code', 'Launch Stats', 'TensorFlow Ops', 'TensorFlow Name Scope')


def _self_times(events):
  """[(event, self_ns)]: duration minus the children nested in it (events of one line)."""
  evs = sorted(events, key=lambda e: (e[1], -e[2]))
  out, stack = [], []               # stack of [end, index into out]
  for ev in evs:
    start, dur = ev[1], ev[2]
    while stack and stack[-1][0] <= start:
      stack.pop()
    if stack:
      parent = out[stack[-1][1]]
      parent[1] -= min(dur, stack[-1][0] - start)
    out.append([ev, dur])
    stack.append([start + dur, len(out) - 1])
  return [(e, max(s, 0)) for e, s in out]


def _event_stats(ev) -> dict:
  try:
    return {k: v for k, v in ev.stats}
  except Exception:  # noqa: BLE001
    return {}


def _line_events(plane, is_device: bool, kernels: dict):
  """Per counted line of a plane: [(event, start_ns, dur_ns, stats)] of device ops and copies.
  Where a device plane has a derived 'XLA Ops' line, ops come from it and copies from streams.
  A device kernel without an hlo_op stat is matched by name (`kernels`: kernel -> instruction)."""
  lines = [ln for ln in plane.lines if ln.name not in _SKIP_LINES]
  derived = is_device and any(ln.name == 'XLA Ops' for ln in lines)
  for line in lines:
    if derived and not (line.name == 'XLA Ops' or line.name.startswith('Stream')):
      continue
    evs = []
    for ev in line.events:
      st = _event_stats(ev)
      is_copy = is_device and 'memcpy' in ev.name.lower()
      if derived and line.name.startswith('Stream') and not is_copy:
        continue
      if 'hlo_op' not in st and not is_copy:
        if not (is_device and ev.name in kernels):
          continue
        st['hlo_op'] = kernels[ev.name]
      evs.append((ev, float(ev.start_ns), float(ev.duration_ns), st))
    yield evs


def _union_ns(intervals) -> float:
  total, cur_s, cur_e = 0.0, None, None
  for s, e in sorted(intervals):
    if cur_e is None or s > cur_e:
      total += (cur_e - cur_s) if cur_e is not None else 0.0
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  return total + ((cur_e - cur_s) if cur_e is not None else 0.0)


def _busy_split(timed) -> collections.Counter:
  """Component -> ns of busy time, [(start, end, component, line)] of one plane: each instant
  where ops run goes to them in equal parts, one per line (on a line the innermost, latest
  started event). The parts sum to the interval union, so the components add up to the busy
  time, where self times count an async copy that overlaps a kernel in full on both."""
  bounds = sorted({t for s, e, _, _ in timed for t in (s, e)})
  starts = sorted(timed, key=lambda x: (x[0], -x[1]))
  active, out, k = collections.defaultdict(list), collections.Counter(), 0
  for lo, hi in zip(bounds, bounds[1:]):
    while k < len(starts) and starts[k][0] <= lo:
      s, e, comp, line = starts[k]
      active[line].append((s, e, comp))
      k += 1
    inner = []
    for line in list(active):
      evs = [ev for ev in active[line] if ev[1] > lo]
      if evs:
        active[line] = evs
        inner.append(max(evs, key=lambda ev: (ev[0], -ev[1]))[2])
      else:
        del active[line]
    for comp in inner:
      out[comp] += (hi - lo) / len(inner)
  return out


# The bandwidth a data-movement op should reach: ~60% of the H200's 4.8 TB/s peak, what its
# streaming copies and reductions reach in practice. `below_memory_speed` ranks ops by time
# beyond it; the figure is a yardstick, not a measured peak (on a CPU every op falls below it).
MEMORY_SPEED = 3.0e12
_DATA_OPCODES = ('copy', 'transpose', 'reduce', 'concatenate', 'gather', 'scatter', 'slice',
                 'dynamic-slice', 'dynamic-update-slice', 'broadcast', 'select', 'convert', 'pad')


def _is_data_op(m: hlo_report.Moved) -> bool:
  """An op whose work is moving bytes: a loop or reduction fusion, or a bare data opcode (not a
  library call, a kernel, or a custom fusion around a GEMM)."""
  return m.kind in ('kLoop', 'kInput') if m.opcode == 'fusion' else m.opcode in _DATA_OPCODES


def analyse_trace(trace_dir: str, hlo_text: str, steps: int, wall_s: float) -> dict:
  """Per-component device time of the traced steps (see the module docstring). Times are per
  step and per device (averaged over the device planes)."""
  from jax.profiler import ProfileData
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise RuntimeError(f'no .xplane.pb under {trace_dir}')
  module, info = hlo_index(hlo_text)
  moved = hlo_report.instruction_bytes(hlo_text)
  # XLA:GPU names a fusion's kernel after the instruction, '.' -> '_'
  kernels = {k.replace('.', '_'): k for k in info if not k.startswith('@')}
  kernels.update({k: k for k in info if not k.startswith('@')})
  data = ProfileData.from_file(paths[-1])
  per_comp, per_op, per_module, per_tag, busy_comp, runs = (collections.Counter()
                                                             for _ in range(6))
  busy = []                                     # per counted plane: busy ns (interval union)
  # GPU/TPU: device planes only (host threads may carry hlo_op stats too); CPU: the host plane.
  has_device = any(p.name.startswith('/device:') and any(True for ln in p.lines for _ in ln.events)
                   for p in data.planes)
  for plane in data.planes:
    is_device = plane.name.startswith('/device:')
    if has_device != is_device:
      continue
    intervals, timed = [], []
    for line, evs in enumerate(_line_events(plane, is_device, kernels)):
      for (ev, start, dur, st), self_ns in _self_times(evs):
        hlo_op, mod, name = str(st.get('hlo_op', '')), str(st.get('hlo_module', '')), \
            ev.name.lower()
        if 'memcpy' in name and re.search(r'h2d|d2h|htod|dtoh', name):
          comp = 'host_transfer'
        elif 'memcpy' in name and not hlo_op:
          comp = 'other_programs'
        elif mod and module and mod != module:
          comp = 'other_programs'
          per_module[mod] += self_ns
        else:
          comp = component_of(hlo_op, info)
          per_tag[_infer_tag(hlo_op, info) or 'none'] += self_ns
        per_comp[comp] += self_ns
        per_op[(comp, hlo_op or ev.name)] += self_ns
        runs[(comp, hlo_op or ev.name)] += 1
        intervals.append((start, start + dur))
        timed.append((start, start + dur, comp, line))
    if intervals:
      busy.append(_union_ns(intervals))
      busy_comp += _busy_split(timed)
  total = sum(per_comp.values())
  if not total:
    raise RuntimeError('the trace holds no device op events of the step')
  per = 1e9 * steps * len(busy)                 # ns -> s per step per device
  # One kernel of a scanned or repeated layer shows up as several ops (fusion.12, fusion.40, ...)
  # under one op_name: summed here, so each kernel's total cost per step reads off one row.
  groups, members, group_bytes, mixed = (collections.Counter() for _ in range(4))
  for (comp, op), t in per_op.items():
    key = (comp, info.get(op, ('',))[0][:200] or re.sub(r'\.\d+$', '', op))
    groups[key] += t
    members[key] += 1
    m = moved.get(op)
    group_bytes[key] += m.bytes * runs[(comp, op)] if m else 0
    mixed[key] += not (m and _is_data_op(m))      # a member that is not a data-movement op

  def group(c, k, t):      # a group's row: its time, and the bytes its ops moved and the GB/s
    b = group_bytes[(c, k)] / (steps * len(busy))
    return {'op_name': k, 'ops': members[(c, k)], 's_per_step': t / per, 'bytes_per_step': b,
            'gb_per_s': b / (t / per) / 1e9 if t and b else None}

  # data-movement groups (XLA's loop and reduction fusions, copies, transposes, ...) by their
  # time beyond what their bytes take at MEMORY_SPEED: glue that XLA fused badly
  slow = []
  for (c, k), t in groups.items():
    if not mixed[(c, k)]:
      r = group(c, k, t)
      slow.append(dict(component=c, **r,
                       excess_s_per_step=r['s_per_step'] - r['bytes_per_step'] / MEMORY_SPEED))
  return {
      'method': 'trace: jax.profiler xplane + HLO op_name named scopes',
      'trace_file': paths[-1],
      'module': module,
      'steps': steps,
      'device_planes': len(busy),
      'wall_s_per_step': wall_s / steps,
      'device_busy_s_per_step': sum(busy) / per,
      'op_time_s_per_step': total / per,
      'shares': {c: per_comp.get(c, 0.0) / total for c in COMPONENTS},
      's_per_step': {c: per_comp.get(c, 0.0) / per for c in COMPONENTS},
      'busy_s_per_step': {c: busy_comp.get(c, 0.0) / per for c in COMPONENTS},
      'shares_by_scope': {t: v / total for t, v in per_tag.most_common()},   # attn vs indexer
      'other_programs_s_per_step': {m: t / per for m, t in per_module.most_common(10)},
      'top_ops': [{'component': c, 'op': o, 's_per_step': t / per,
                   'op_name': info.get(o, ('',))[0][:200]}
                  for (c, o), t in per_op.most_common(80)],
      'top_op_groups': [dict(component=c, **group(c, k, t))
                        for (c, k), t in groups.most_common(80)],
      'below_memory_speed': sorted((r for r in slow if r['excess_s_per_step'] > 0),
                                   key=lambda r: -r['excess_s_per_step'])[:15],
      'top_op_groups_by_component': {
          comp: [group(c, k, t) for (c, k), t in groups.most_common() if c == comp][:15]
          for comp in per_comp},
      'top_unattributed_ops': [{'op': o, 's_per_step': t / per}
                               for (c, o), t in per_op.most_common() if c == 'unattributed'][:10],
  }


# ---- report ------------------------------------------------------------------------------------
def _fmt(v, unit='', scale=1.0, digits=3):
  return 'n/a' if v is None else f'{v * scale:.{digits}f}{unit}'


def _shares(p: dict) -> str:
  """'device busy N% of wall; comp x% ...' of one profile report."""
  parts = [f'{c} {100 * s:.1f}%' for c, s in sorted(p['shares'].items(), key=lambda x: -x[1])
           if s > 0.0005]
  busy = p['device_busy_s_per_step'] / p['wall_s_per_step'] * 100
  return f'device busy {busy:.0f}% of wall; ' + ', '.join(parts)


def _xla_memory(run: dict) -> str:
  """'XLA memory GB: args .. outputs .. (.. aliased) temps .. peak ..' of one run's compiled step
  (what donation and rematerialization change), or '' without the analysis."""
  c = (run.get('memory') or {}).get('compiled') or {}
  keys = ('argument_size', 'output_size', 'alias_size', 'temp_size', 'peak_memory')
  if any(f'{k}_in_bytes' not in c for k in keys):
    return ''
  args, outs, alias, temps, peak = (c[f'{k}_in_bytes'] / 1e9 for k in keys)
  return (f'XLA memory GB: args {args:.2f}  outputs {outs:.2f} ({alias:.2f} aliased)  '
          f'temps {temps:.2f}  peak {peak:.2f}')


def _ptxas_line(kernels: list[dict]) -> str:
  """The summary's line for --ptxas: the kernels that spill or that ptxas warns about."""
  def one(k):
    loss = f", {k['performance_loss'][0]}" if k['performance_loss'] else ''
    return (f"{k['kernel']}: {k['registers']} registers, {k['spill_store_bytes']} B spill "
            f"stores{loss}")
  bad = [one(k) for k in kernels if k['spill_store_bytes'] or k['performance_loss']]
  return (f'Mosaic GPU kernels (ptxas): {len(kernels)} compiled, '
          + ('; '.join(bad) if bad else 'none spilling'))


def summary(rep: dict) -> str:
  r = rep['result']
  gib = 1024 ** 3
  mem = r['memory']['peak_bytes_in_use']
  lines = [
      f"{rep['config']}  {rep['device']['kind']} x{rep['device']['count']}  "
      f"batch {rep['global_batch']} x {rep['seq_len']}  params {r['params'] / 1e6:,.1f}M",
      f"init {r['init_s']:.1f} s  trace+lower {_fmt(r['trace_lower_s'], ' s', digits=1)}  "
      f"compile {_fmt(r['compile_s'], ' s', digits=1)}  first step {r['first_step_s']:.1f} s",
      f"step {r['step_time_s'] * 1e3:.1f} ms (median window {r['step_time_median_s'] * 1e3:.1f})  "
      f"{r['tokens_per_s']:,.0f} tokens/s  {r['tflops_per_device']:.1f} TFLOP/s/device  "
      f"MFU {_fmt(r['mfu'], '%', 100, 1)}  peak mem {_fmt(mem and mem / gib, ' GiB', digits=2)}",
  ]
  if mem_line := _xla_memory(r):
    lines.append(mem_line)
  if 'mosaic_kernels' in r:
    lines.append(_ptxas_line(r['mosaic_kernels']))
  hosts = [(name, r.get(key) or {}) for name, key in
           (('main thread', 'host_main_thread_ms'), ('engram tables', 'engram_host_ms'))]
  for name, ms in hosts:
    if ms:
      lines.append(f'host ms/step (median), {name}: ' + '  '.join(f'{k} {v:.1f}' for k, v in ms.items()))
  p = rep.get('profile')
  if p and 'shares' in p:
    lines.append(f"profile ({p['steps']} steps): " + _shares(p))
    if 'busy_s_per_step' in p:
      lines.append('  busy ms/step, overlaps shared: ' + ', '.join(
          f'{c} {t * 1e3:.1f}' for c, t in sorted(p['busy_s_per_step'].items(),
                                                  key=lambda x: -x[1]) if t >= 5e-5))
    for g in p.get('top_op_groups', [])[:8]:    # the costliest kernels, summed over layers
      name = '/'.join(g['op_name'].split('/')[-3:])
      lines.append(f"  {g['s_per_step'] * 1e3:8.2f} ms/step  {g['component']:<18} x{g['ops']:<3} "
                   f"{name}")
    slow = p.get('below_memory_speed', [])[:5]        # data-movement ops below memory speed
    if slow:
      lines.append(f'  below {MEMORY_SPEED / 1e12:g} TB/s (data-movement ops, time beyond it):')
    for g in slow:
      name = '/'.join(g['op_name'].split('/')[-3:])
      lines.append(f"  {g['excess_s_per_step'] * 1e3:+8.2f} ms/step  {g['component']:<18} "
                   f"x{g['ops']:<3} {name}: {g['bytes_per_step'] / 1e9:,.1f} GB in "
                   f"{g['s_per_step'] * 1e3:.2f} ms ({g['gb_per_s'] or 0:,.0f} GB/s)")
    moved = hlo_report.per_step(p.get('data_movement', []))
    if any(moved.values()):
      lines.append('  data movement, GB written per step (loop trips counted): ' +
                   ', '.join(f'{c} {b / 1e9:,.1f}' for c, b in moved.items() if b))
  elif p:
    lines.append(f"profile: {p.get('error')}")
  for a in rep.get('ablations', []) + rep.get('variants', []):
    what = f"without {a['without']}" if 'without' in a else 'with ' + ','.join(
        f'{k}={v}' for k, v in {**a['overrides'], **a.get('xla_options', {})}.items())
    lines.append(f"  {what}: FAILED {a['error']}" if 'error' in a else
                 f"  {what}: step {a['step_time_s'] * 1e3:.1f} ms "
                 f"({a['saved_s_per_step'] * 1e3:+.1f} ms saved), compile {a['compile_s']:.1f} s")
    if mem_line := _xla_memory(a):
      lines.append('    ' + mem_line)
    if 'shares' in a.get('profile', {}):
      lines.append('    profile: ' + _shares(a['profile']))
  return '\n'.join(lines)


def write_report(rep: dict, out: str):
  """Writes the JSON report atomically (a .tmp file, then rename); nothing when `out` is empty."""
  if not out:
    return
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + '.tmp', 'w') as f:
    json.dump(rep, f, indent=1, default=str)
  os.replace(out + '.tmp', out)


def profile_report(prof: dict) -> dict:
  """The per-component breakdown of one traced run (`analyse_trace`), or why there is none."""
  try:
    rep = analyse_trace(prof['dir'], prof['hlo_text'], prof['steps'], prof['wall_s'])
    rep['scopes_missing'] = prof['missing']
    # what the unattributed fills, copies and slices are (tools/hlo_report.py), per loop body
    rep['data_movement'] = hlo_report.totals(hlo_report.report(prof['hlo_text']))
    return rep
  except Exception as e:  # noqa: BLE001 - reported; --ablate is the fallback
    return {'method': 'unavailable', 'error': f'{type(e).__name__}: {e}', 'trace_dir': prof['dir']}


def run(argv: list[str]) -> dict:
  """Parses argv, benchmarks, prints the summary, writes --out; returns the report."""
  args, overrides = parse_args(argv)
  if args.profile and '--xla_gpu_enable_command_buffer=' not in os.environ.get('XLA_FLAGS', ''):
    # XLA:GPU wraps runs of kernels in command buffers (CUDA graphs), whose trace events carry
    # no HLO op: with them on, nearly all device time would be unattributed. Set before jax
    # starts its backend; the report records the flags.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_gpu_enable_command_buffer=').strip()
  from v4jax.config import ConfigError, validate
  from v4jax.memory.host_tables import pinned_pool_gib
  # Configs are built and checked before jax's backend starts (--per_device_batch needs it, so
  # it is applied when measuring): claim_gpu_memory sizes the pinned pool from them, at the
  # config's global batch.
  check_args = argparse.Namespace(**dict(vars(args), per_device_batch=0))
  if args.measure_spec:
    spec = json.loads(args.measure_spec)
    claim_gpu_memory(pinned_pool_gib(apply_overrides(bench_config(check_args, overrides),
                                                     spec['overrides'])))
    return _measure_child(args, overrides, spec)
  # Each run's config, checked before the first compile: a bad variant fails now, not after
  # the main measurement. In isolated mode this process never starts jax's backend (it would
  # claim the GPU).
  comparisons = [(f'without_{n}', ABLATIONS[n], {}, 'ablations', {'without': n})
                 for n in args.ablate]
  for v in args.variant:
    ov, xla = _split_variant(v)
    comparisons.append(('variant', ov, xla, 'variants',
                        dict({'overrides': ov}, **({'xla_options': xla} if xla else {}))))
  isolated = args.isolate == 'process' and bool(comparisons)
  try:
    cfg = validate(bench_config(check_args, overrides))
    pinned = [pinned_pool_gib(cfg)] + [
        pinned_pool_gib(validate(apply_overrides(bench_config(check_args, overrides), ov)))
        for _, ov, _, _, _ in comparisons]
  except ConfigError as e:
    raise ToolError(str(e)) from e
  claim_gpu_memory(max(pinned))
  one = functools.partial(_measure_in_child, argv) if isolated else functools.partial(
      _measure_here, args, overrides)
  result = one('main', {}, {})
  if 'error' in result:
    raise ToolError(f'the main measurement failed: {result["error"]}')
  rep = {
      'tool': 'tools/bench_train.py',
      'started': time.strftime('%Y-%m-%d %H:%M:%S'),
      'config': args.config,
      'overrides': overrides,
      'per_device_batch': args.per_device_batch or None,
      'global_batch': result.pop('global_batch'),
      'seq_len': cfg.data.seq_len,
      'grad_accum': cfg.train.grad_accum,
      'isolate': 'process' if isolated else 'none',
      'device': result.pop('device'),
  }
  rep['result'] = result
  if 'profile' in result:
    rep['profile'] = result.pop('profile')
  rep['ablations'], rep['variants'] = [], []
  write_report(rep, args.out)   # each measurement lands before the next compile starts
  for label, ov, xla, key, extra in comparisons:
    r = one(label, ov, xla)
    for k in ('device', 'global_batch'):
      r.pop(k, None)
    r.update(extra)
    if 'error' not in r:
      r['saved_s_per_step'] = result['step_time_s'] - r['step_time_s']
    rep[key].append(r)
    write_report(rep, args.out)
  print(summary(rep), flush=True)
  return rep


def _device_info() -> dict:
  import jax
  dev = jax.devices()[0]
  return {'kind': dev.device_kind, 'platform': dev.platform, 'count': jax.device_count(),
          'jax': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'compilation_cache': os.environ.get('JAX_COMPILATION_CACHE_DIR') or None}


def _error(e: Exception) -> dict:
  """A failed measurement's record: the exception's type and first line."""
  return {'error': f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:300]}'}


def _measure_here(args, overrides, label: str, ov: dict, xla: dict) -> dict:
  """One measurement in this process: the config with `ov` applied, compiled with XLA options
  `xla`; its report (with its profile breakdown under --profile, the device, the global batch).
  A comparison's failure is recorded as {'error': ...}; the main run's propagates."""
  from v4jax.config import validate
  try:
    cfg = validate(apply_overrides(bench_config(args, overrides), ov))
    r, prof = measure(cfg, args, profile=args.profile, label=label, compiler_options=xla)
  except Exception as e:  # noqa: BLE001 - recorded; the other comparisons still run
    if label == 'main':
      raise
    gc.collect()
    return _error(e)
  if prof is not None:     # with a component off: where its time went
    r['profile'] = profile_report(prof)
  return dict(r, device=_device_info(), global_batch=cfg.data.global_batch)


def _measure_child(args, overrides, spec: dict) -> dict:
  """The child's side of `_measure_in_child`: one measurement, its report written to
  spec['out'] ({'error': ...} if it failed)."""
  try:
    r = _measure_here(args, overrides, spec['label'], spec['overrides'], spec['xla'])
  except Exception as e:  # noqa: BLE001 - the parent reports it
    r = _error(e)
  write_report(r, spec['out'])
  return r


def _die_with_parent():
  """In the child before exec (Linux): SIGKILL when the parent dies, so a parent killed by a
  time limit does not leave a child holding the GPU."""
  try:
    import ctypes
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, 9)   # PR_SET_PDEATHSIG, SIGKILL
  except OSError:
    pass


def _measure_in_child(argv: list[str], label: str, ov: dict, xla: dict) -> dict:
  """One measurement in a fresh process (`--isolate process`): a GPU's allocator pool keeps
  the layout one build left, and at bench_h200's size the next build's temporaries (~69 GiB)
  found no contiguous room in the same process (docs/performance.md row 54). The child gets
  this command line plus the measurement to make; its output (progress) is relayed to stderr."""
  import subprocess
  with tempfile.TemporaryDirectory(prefix='bench_train-child-') as tmp:
    spec = {'label': label, 'overrides': ov, 'xla': xla, 'out': os.path.join(tmp, 'r.json')}
    cmd = [sys.executable, os.path.abspath(__file__), *argv, '--measure_spec', json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_die_with_parent)
    tail = collections.deque(maxlen=20)
    try:
      for line in proc.stdout:
        sys.stderr.write(line)
        tail.append(line.strip())
      rc = proc.wait()
    finally:             # interrupted: the child must not keep the GPU
      if proc.poll() is None:
        proc.kill()
    if os.path.exists(spec['out']):
      with open(spec['out']) as f:
        return json.load(f)
  last = next((t for t in reversed(tail) if t), '')
  return {'error': f'the {label} measurement process exited with code {rc}: {last[:300]}'}


if __name__ == '__main__':
  run_tool('bench_train', lambda: run(sys.argv[1:]) and 0)
