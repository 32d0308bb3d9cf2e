"""Engram tables in host memory vs HBM (issue 5): step time, sparse update vs its floor, and the
largest table the trainer runs with, all in one process.

  python tools/bench_engram.py --out bench_engram.json --budget-s 540   # H200, one run
  python tools/bench_engram.py --smoke --out /tmp/e.json          # CPU: tiny config, tiny tables
  python tools/bench_engram.py --update-only --sizes-gib 1 --out /tmp/u.json   # sparse update only
  python tools/bench_engram.py --sizes-gib 32 --config.engram.donate_rows=false  # config overrides

Method:
- One Trainer at configs/bench_h200.py reduced to --layers blocks (Engram in every kept block up
  to two, MTP off; --layers 0 keeps the whole model), --batch x seq_len tokens per step in
  --accum micro-batches, engram.table_memory=host. The preset itself, as the issue asks:
  `--layers 0 --batch 32 --accum 8`. Its jitted
  step takes the gathered rows, so one compiled step serves every table size and both memories:
  per size the tool swaps in a `HostTables` with memory_kind 'pinned_host' (host) or 'device'
  (the same tables, moments and sparse machinery in HBM, updated by a donated in-place scatter).
- Table size S = the fp32 tables of all Engram layers (moments add 2 S). Batches use uniform random
  tokens (--tokens random: every n-gram new, the most rows per step) hashed with that size's spec.
- Step time: --warmup steps, then --steps steps as `Trainer.run` drives them (a host sync on the
  loss every step, the next batch's rows prefetched while the step runs); median wall time.
  Overhead = host / HBM - 1 at the same size.
- Host memory bandwidth: NumPy copies between two --bw-mib buffers on the tables' thread pool,
  counted as bytes read + written per second. Floor of the sparse update = the bytes of the
  touched rows and both moments, read once and written once (2 x U x 3 x d_h x 4 per step), at
  that bandwidth. Measured = the host-side gather of theta/m/v for the step plus the write-back
  scatter (NumPy parts; the DMAs run on the copy engines and are reported apart).
- Largest: the biggest table + moments that trained in host memory in this run (default sizes
  32, 24, 16, 8, 1 GiB: 16 GiB is 48 GiB with moments; 24 GiB runs only if 32 GiB did not train).
- Extras at the smallest size: the XLA host gather (compute_on) vs one NumPy take of the same
  whole [3, H] rows (the store's own gather, timed in `update`, takes theta and the moments
  apart), and the donated XLA host scatter of the same rows (FACTS.md: it rewrote the whole
  table).
Order: 32 GiB HBM and host first (the HBM store is one buffer of 3x the table, which a device
pool that earlier phases have broken up no longer places), then the phases that answer the other
goals (8 GiB HBM and host, the >= 48 GiB host point, then 1 GiB); each pair HBM before host. Tables are 2 GiB pinned chunks
(`engram.host_chunk_mib`), so the pinned pool, which never shrinks, serves every later size from
the chunks it already holds. --budget-s: a phase starts only if its estimated time (setup at the
rate measured so far, steps at the step time measured so far) fits what is left; SIGTERM or
SIGINT (e.g. `timeout`) writes the report before exiting.
--update-only: no model; times the tables' sparse update (gather of theta/m/v for U random rows
per layer, then the in-place write-back of those rows) against its floor, on any backend. With
--host-adam-probe it also times, on the same rows, the update of the host-side Adam design
(docs/engram_host_tables.md; not built): theta gathered for the H2D, then the row Adam applied
in place by a numba kernel (numba is not a v4jax dependency: `pip install numba`), against the
same floor: whether that design can reach the issue's <= 2x before it is built.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from v4jax.cli import ToolError, claim_gpu_memory  # noqa: E402  (no jax import: env first)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import apply_overrides, parse_overrides  # noqa: E402  (no jax import either)

GIB = 1 << 30


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--smoke', action='store_true', help='tiny config on CPU, tiny tables')
  p.add_argument('--out', default='bench_engram.json')
  p.add_argument('--sizes-gib', default=None,
                 help='table sizes (GiB, all Engram layers); default 32,24,16,8,1 (smoke: tiny)')
  p.add_argument('--hbm-sizes-gib', default=None,
                 help="sizes that also run in HBM; default 32,8,1 (smoke: all); '' for none")
  p.add_argument('--layers', type=int, default=2,
                 help='blocks kept (0: the config\'s full depth, its Engram layers and MTP)')
  p.add_argument('--batch', type=int, default=4, help='sequences per step')
  p.add_argument('--accum', type=int, default=1,
                 help='micro-batches per step (train.grad_accum; must divide --batch)')
  p.add_argument('--seq', type=int, default=0, help='0 = the config seq_len')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--steps', type=int, default=20,
                 help='timed steps per phase (the cut model\'s ~0.1 s steps spread by +-6%%: '
                 'a few steps cannot resolve the 1-2%% between the phases)')
  p.add_argument('--tokens', choices=('random', 'corpus'), default='random')
  p.add_argument('--init', choices=('zeros', 'normal'), default='zeros',
                 help='table init (zeros saves setup time; step time does not depend on it)')
  p.add_argument('--bw-mib', type=int, default=0, help='bandwidth buffers (0: 2048, smoke 64)')
  p.add_argument('--budget-s', type=float, default=0,
                 help='start no phase that would end after this many seconds (0 = no limit)')
  p.add_argument('--update-only', action='store_true',
                 help='time the host tables\' sparse update only (no model)')
  p.add_argument('--rows', type=int, default=262144, help='--update-only: rows per layer per step')
  p.add_argument('--threads', type=int, default=0, help='host threads (0: min(16, cores))')
  p.add_argument('--host-adam-probe', action='store_true',
                 help='--update-only: also time the update of the host-side Adam design '
                 '(docs/engram_host_tables.md, not built): theta gather + in-place row Adam, '
                 'compiled with numba (needs `pip install numba`)')
  p.add_argument('--chunk-mib', type=int, default=0,
                 help='engram.host_chunk_mib: pinned chunk size (0: the config default, 2048)')
  args, rest = p.parse_known_args()
  args.overrides = parse_overrides(rest)
  return args


def _setup_env(args, sizes):
  if args.smoke:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  else:
    # With 2 GiB table chunks the pinned pool's cap only has to hold the largest tables with
    # their moments and staging sets (memory.host_tables.pinned_pool_gib).
    from v4jax.memory.host_tables import pinned_pool_gib   # imports jax; its backend starts later
    claim_gpu_memory(pinned_pool_gib(bench_config(args), max(sizes)))


def _load(name):
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', os.path.join(root, 'configs',
                                                                             f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def bench_config(args):
  if args.smoke:
    c = _load('tiny')
    c.model.n_layers = 2
    c.engram.layer_ids = (1,)
    c.data.update(seq_len=args.seq or 32, global_batch=args.batch)
  else:
    c = _load('bench_h200')
    if args.layers:   # a cut model; 0 keeps the config's depth, Engram layers and MTP
      c.model.n_layers = args.layers
      c.model.n_dense_layers = min(c.model.n_dense_layers, args.layers - 1)
      c.engram.layer_ids = tuple(range(args.layers)) if args.layers <= 2 else (1, args.layers - 1)
      c.mtp.depth = 0
    c.data.update(seq_len=args.seq or c.data.seq_len, global_batch=args.batch)
  c.train.grad_accum = args.accum
  c.train.update(eval_every=0, log_every=1)
  c.engram.update(table_memory='host', base_rows=1009)
  if args.chunk_mib:
    c.engram.host_chunk_mib = args.chunk_mib
  c.checkpoint.enabled = False
  c.log.update(tensorboard=False, progress=False)
  return apply_overrides(c, args.overrides)


class _Cycle:
  """Checkpointable cycling iterator over prepared batches (for Lookahead)."""

  def __init__(self, items):
    self.items, self.i = items, 0

  def __next__(self):
    self.i += 1
    return self.items[(self.i - 1) % len(self.items)]

  def get_state(self):
    return {'i': self.i}

  def set_state(self, s):
    self.i = s['i']


def _batches(cfg, spec, tokens_list):
  from v4jax.data.engram_hash import hash_rows
  out = []
  for tok, tgt in tokens_list:
    b, t = tok.shape
    d = {'tokens': tok, 'targets': tgt,
         'positions': np.ascontiguousarray(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))),
         'segment_ids': np.ones((b, t), np.int32), 'loss_mask': np.ones((b, t), np.float32)}
    d.update({f'engram_rows_{l}': r for l, r in hash_rows(spec, tok).items()})
    out.append(d)
  return out


def _size_cfg(cfg, gib):
  """cfg with base_rows giving ~gib GiB of fp32 tables over all Engram layers, and its spec."""
  from v4jax.data.engram_hash import make_hash_spec
  g = cfg.engram
  heads = (g.max_ngram - 1) * g.heads_per_ngram
  d_h = g.d_mem // heads
  c = cfg.copy_and_resolve_references()
  c.engram.base_rows = max(2, int(gib * GIB / (len(g.layer_ids) * heads * d_h * 4)))
  spec = make_hash_spec(c)
  return c, spec, {l: int(spec.rows_in_layer(l)) for l in g.layer_ids}


_PROBE = '''
import numpy as np, jax
from jax.sharding import SingleDeviceSharding
from v4jax import compat
d = jax.devices()[0]
sh = SingleDeviceSharding(d, memory_kind='pinned_host')
a = jax.device_put(np.arange(8, dtype=np.float32), sh)
v = compat.host_view(a)
v[3] = 7.0
print('HOST_VIEW_OK', float(np.asarray(jax.device_put(a, SingleDeviceSharding(d)))[3]))
'''


def start_probe():
  """Zero-copy host views are tried in a child process (a bad pointer would crash, not raise);
  it runs while this process builds the trainer."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false',
             PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
  return subprocess.Popen([sys.executable, '-c', _PROBE], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)


def probe_result(proc):
  import subprocess
  try:
    out, _ = proc.communicate(timeout=180)
  except subprocess.TimeoutExpired:
    proc.kill()
    return False, 'timed out'
  lines = (out or '').strip().splitlines()
  return any(l.startswith('HOST_VIEW_OK 7.0') for l in lines), \
      (lines[-1][:300] if lines else f'exit {proc.returncode}')


def measure_bandwidth(pool, mib):
  """NumPy copy between two buffers on `pool`: (read + written bytes) / s."""
  from v4jax.memory.host_tables import _tasks
  n = mib * (1 << 20) // 4
  a, b = np.ones(n, np.float32), np.zeros(n, np.float32)
  ws = pool._max_workers  # pylint: disable=protected-access

  def copy():
    list(pool.map(lambda s: np.copyto(b[s], a[s]), [slice(x.start * 1024, x.stop * 1024)
                                                      for x in _tasks(n // 1024, ws)]))
  copy()
  best = float('inf')
  for _ in range(5):
    t = time.perf_counter()
    copy()
    best = min(best, time.perf_counter() - t)
  return 2 * a.nbytes / best


def _per_step(stats, key, n):
  v = list(stats.get(key, []))
  return sum(v) / n if v and n else 0.0


class _SignatureWatch:
  """Calls the jitted train step and records, for its first `watched` calls (the warm-up: the
  signature costs host time, ~26 ms for bench_h200's 415 state leaves on the CPU, which the timed
  steps must not pay), which inputs differ from the previous call in anything jit keys its cache
  on (shape, dtype, weak type, sharding, memory kind): the step after a change compiles again."""

  def __init__(self, fn, changes: list, watched: int):
    self.fn, self.changes, self.prev, self.calls, self.watched = fn, changes, None, 0, watched

  @staticmethod
  def _sig(args):
    import jax
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(args)[0]:
      sh = getattr(x, 'sharding', None)
      out[jax.tree_util.keystr(path)] = (
          getattr(x, 'shape', None), str(getattr(x, 'dtype', type(x).__name__)),
          getattr(x, 'weak_type', None), repr(sh), getattr(sh, 'memory_kind', None),
          getattr(x, 'committed', None))
    return out

  def __call__(self, *args):
    if self.calls >= self.watched:
      return self.fn(*args)
    sig = self._sig(args)
    if self.prev is not None:
      diff = [f'{k}: {self.prev.get(k)} -> {v}' for k, v in sig.items() if self.prev.get(k) != v]
      diff += [f'{k}: gone' for k in self.prev if k not in sig]
      self.changes.extend((self.calls, d) for d in diff[:8])
    self.prev, self.calls = sig, self.calls + 1
    return self.fn(*args)


def run_phase(tr, cfg_s, rows, memory_kind, batches, args, log):
  from v4jax.memory.host_tables import HostTables, Lookahead
  if tr.tables is not None:
    tr.tables.close()
    tr.tables = None
  gc.collect()
  t0 = time.perf_counter()
  tabs = HostTables(cfg_s, rows, tr.mesh, memory_kind=memory_kind, init=args.init == 'normal',
                    threads=args.threads or None)
  setup_s = time.perf_counter() - t0
  tr.tables = tabs
  tr.train_iter = Lookahead(_Cycle(batches))
  times, changes, n_logged, n_first = [], [], 0, 0
  step_fn = tr._train_step
  tr._train_step = _SignatureWatch(step_fn, changes, watched=args.warmup)
  try:
    for i in range(args.warmup + args.steps):
      if i == args.warmup:
        tabs.flush()
        tabs.stats.clear()
      t = time.perf_counter()
      loss = float(tr.step(next(tr.train_iter))['loss'])
      times.append(time.perf_counter() - t)
      n_prog = step_fn._cache_size() if hasattr(step_fn, '_cache_size') else -1
      n_first = n_prog if i == 0 else n_first
      log(f'  {memory_kind} step {i}: {times[-1] * 1e3:.1f} ms loss {loss:.4f} '
          f'(train-step programs compiled: {n_prog})')
      for c in changes[n_logged:]:
        log(f'    input changed at step {c[0]}: {c[1]}')
      n_logged = len(changes)
  finally:
    tr._train_step = step_fn
  tabs.flush()
  st = {k: list(v) for k, v in tabs.stats.items()}
  n_g = max(len(st.get('rows', [])), 1)
  n_w = args.steps
  res = {'memory_kind': memory_kind, 'setup_s': setup_s,
         'step_ms': 1e3 * statistics.median(times[args.warmup:]),
         'step_ms_mean': 1e3 * statistics.mean(times[args.warmup:]),
         'first_step_s': times[0], 'loss': loss,
         'rows_per_step': float(np.mean(st['rows'])) if st.get('rows') else 0.0,
         'unique_ms': _per_step(st, 'unique_ms', n_g), 'gather_ms': _per_step(st, 'gather_ms', n_g),
         'h2d_ms': _per_step(st, 'h2d_ms', n_g), 'd2h_ms': _per_step(st, 'd2h_ms', n_w),
         'scatter_ms': _per_step(st, 'scatter_ms', n_w), 'input_changes': changes,
         'train_step_programs': n_prog, 'compiles_after_first_step': n_prog - n_first}
  return res, tabs


def extras(tabs, batches, log):
  """XLA host gather vs NumPy gather, and the donated XLA host scatter, for one batch's rows of
  one layer (the rows of that layer in the first table chunk, which XLA reads as one array)."""
  import jax
  from v4jax import compat
  from v4jax.memory import rows as rows_lib
  from v4jax.memory.host_tables import _xla_host_gather
  store, l = tabs.store, tabs.layers[0]
  uniq, _, n = rows_lib.unique_rows(batches[0][f'engram_rows_{l}'], tabs.u_max)
  out, stats = {'rows': n}, collections.defaultdict(list)

  def timed(f, reps=3):
    f()
    t = time.perf_counter()
    for _ in range(reps):
      f()
    return 1e3 * (time.perf_counter() - t) / reps

  g = uniq[:n].astype(np.int64) + store.base[l]
  g = g[g < store.chunk]
  out['rows_in_first_chunk'] = int(g.size)
  dst = np.empty((g.size,), store.void[0].dtype)
  out['gather_numpy_ms'] = timed(lambda: np.take(store.void[0], g, out=dst, mode='clip'))
  try:
    idx = jax.device_put(g.astype(np.int32), store.sh)
    out['gather_xla_ms'] = timed(lambda: jax.block_until_ready(_xla_host_gather(store.chunks[0],
                                                                                idx)))
  except Exception as e:  # noqa: BLE001
    out['gather_xla_error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
  sel = {l: (uniq[:n], 0)}
  to_dev = lambda a: jax.device_put(a, tabs.row_sharding)
  rows_dev = rows_lib.join_rows(*(part[l] for part in store.gather(
      sel, {'theta': to_dev, 'moments': to_dev}, stats)))
  out['writeback_numpy_ms'] = timed(    # DMA + scatter of the same rows
      lambda: store.write(sel, store.fetch(sel, {l: rows_dev}, stats), stats))
  try:   # the donated XLA host scatter on a table of the same shape (our table stays intact)
    sh = store.sh
    t = jax.device_put(np.zeros((tabs.rows[l], 3, tabs.width), np.float32), sh)
    new_h = jax.device_put(np.asarray(jax.device_get(rows_dev)), sh)
    idx_h = jax.device_put(uniq, sh)
    fn = jax.jit(lambda t, i, u: compat.on_host(
        lambda t, i, u: t.at[i].set(u, mode='promise_in_bounds'))(t, i, u), donate_argnums=0)
    t = fn(t, idx_h, new_h).block_until_ready()
    s = time.perf_counter()
    t = fn(t, idx_h, new_h).block_until_ready()
    out['xla_host_scatter_ms'] = 1e3 * (time.perf_counter() - s)
    out['xla_host_scatter_table_gib'] = t.nbytes / GIB
    del t
  except Exception as e:  # noqa: BLE001
    out['xla_host_scatter_error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
  log(f'  extras: {out}')
  return out


_ADAM_KERNELS = {}


def _probe_kernels():
  """numba kernels of the host-side Adam design, compiled once: theta of the rows into a
  staging array, and SPEC §6.4's row Adam in place (as rows.lazy_adam_rows: rows with an
  all-zero gradient or a non-finite step keep their bits)."""
  if not _ADAM_KERNELS:
    try:
      from numba import njit
    except ImportError as e:
      raise ToolError('--host-adam-probe needs numba (pip install numba)') from e

    # Plain loops (per-row slices or temporaries allocate in numba), and numpy's error model:
    # numba's default checks every division for zero, which took 2.5x as long on this CPU.
    @njit(nogil=True, cache=False, error_model='numpy')
    def gather_theta(tab, rows, out):
      for i in range(rows.shape[0]):
        r = rows[i]
        for h in range(out.shape[1]):
          out[i, h] = tab[r, 0, h]

    @njit(nogil=True, cache=False, error_model='numpy')
    def adam(tab, rows, g, lr, b1, b2, eps, c1, c2, finite):
      one = lr / lr                                     # 1 in float32
      for i in range(rows.shape[0]):
        touched = False
        for h in range(g.shape[1]):
          touched = touched or g[i, h] != 0
        if not (finite and touched):
          continue
        r = rows[i]
        for h in range(g.shape[1]):
          gi = g[i, h]
          m = b1 * tab[r, 1, h] + (one - b1) * gi
          v = b2 * tab[r, 2, h] + (one - b2) * gi * gi
          tab[r, 0, h] += -lr * (m / c1) / (np.sqrt(v / c2) + eps)
          tab[r, 1, h] = m
          tab[r, 2, h] = v
    _ADAM_KERNELS.update(gather_theta=gather_theta, adam=adam)
  return _ADAM_KERNELS


def host_adam_probe(store, sel, rng, count=10) -> dict:
  """{probe_theta_gather_ms, probe_adam_ms}: the host-side Adam design's update over the same
  rows as the step's gather + write-back, on the store's thread pool: theta gathered into a
  staging array (what its H2D would carry), then Adam applied in place from random row
  gradients (what its D2H would bring). Timed for the floor comparison only; the tables' values
  change as a real update would change them."""
  k = _probe_kernels()
  width = store.width
  f32 = np.float32
  hp = (f32(1e-3), f32(0.9), f32(0.95), f32(1e-8), f32(1 - 0.9 ** (count + 1)),
        f32(1 - 0.95 ** (count + 1)), True)
  grads = {l: rng.standard_normal((len(ids), width), dtype=np.float32)
           for l, (ids, _) in sel.items()}
  theta = {l: np.empty((len(ids), width), np.float32) for l, (ids, _) in sel.items()}
  tasks = store._row_tasks(sel)  # pylint: disable=protected-access
  local = lambda c, g, lo, hi: (g[lo:hi] - c * store.chunk).astype(np.int64)
  out = {}
  for name, fn in (('probe_theta_gather_ms', lambda l, c, g, off, lo, hi: k['gather_theta'](
      store.views[c], local(c, g, lo, hi), theta[l][off + lo:off + hi])),
                   ('probe_adam_ms', lambda l, c, g, off, lo, hi: k['adam'](
      store.views[c], local(c, g, lo, hi), grads[l][off + lo:off + hi], *hp))):
    t0 = time.perf_counter()
    store._run(fn, tasks)  # pylint: disable=protected-access
    out[name] = 1e3 * (time.perf_counter() - t0)
  return out


def bench_update(args, log, report, save):
  """--update-only: the host tables' sparse update with no model (any backend). Per size: U
  random rows per layer (2 layers), gathered (theta/m/v to the device) and written back in
  place, --steps times; floor = 2 x rows x 3 x d_h x 4 bytes at the measured bandwidth."""
  import jax
  from jax.sharding import Mesh
  from v4jax.memory import rows as rows_lib
  from v4jax.memory.host_tables import HostTables
  cfg = bench_config(args)
  cfg.engram.layer_ids = (0, 1)
  cfg.data.update(global_batch=1, seq_len=args.rows)
  cfg.engram.update(max_ngram=2, heads_per_ngram=1, d_mem=64)   # one 64-wide head: U_max = rows
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  rng = np.random.default_rng(0)
  for gib in args.sizes:
    R = max(args.rows + 1, int(gib * GIB / (2 * 64 * 4)))
    tabs = HostTables(cfg, {0: R, 1: R}, mesh, init=False, threads=args.threads or None)
    for v in getattr(tabs.store, 'views', ()):   # fault every page in (pinned memory is resident)
      v.fill(0.0)
    if 'host_bandwidth_gbs' not in report:
      mib = args.bw_mib or (512 if jax.default_backend() == 'cpu' else 2048)
      report['host_bandwidth_gbs'] = measure_bandwidth(tabs._pool, mib) / 1e9  # pylint: disable=protected-access
      log(f'host bandwidth {report["host_bandwidth_gbs"]:.1f} GB/s ({tabs.threads} threads)')
    times = collections.defaultdict(list)
    to_dev = lambda a, sh=tabs.row_sharding: jax.device_put(a, sh)
    place = {'theta': to_dev, 'moments': to_dev}
    for i in range(args.warmup + args.steps):
      sel, n = {}, {}
      for l in (0, 1):
        u, _, k = rows_lib.unique_rows(rng.integers(0, R, (1, args.rows, 1)), args.rows)
        sel[l], n[l] = (u[:k], 0), k
      st = collections.defaultdict(list)
      theta, moments = tabs.store.gather(sel, place, st)
      rows = {l: rows_lib.join_rows(theta[l], moments[l]) for l in theta}
      tabs.store.write(sel, tabs.store.fetch(sel, rows, st), st)
      if i >= args.warmup:
        for key, v in st.items():
          times[key].append(v[0])
      if args.host_adam_probe:
        probe = host_adam_probe(tabs.store, sel, rng)
        if i >= args.warmup:
          for key, v in probe.items():
            times[key].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = 1e3 * 2 * sum(n.values()) * 3 * 64 * 4 / (report['host_bandwidth_gbs'] * 1e9)
    upd = med['gather_ms'] + med['scatter_ms']
    res = dict(size_gib=gib, chunks=len(tabs.store.chunks), rows_per_step=sum(n.values()), **med,
               update_ms=upd, floor_ms=floor, update_over_floor=upd / floor)
    if args.host_adam_probe:
      probe_ms = med['probe_theta_gather_ms'] + med['probe_adam_ms']
      res.update(probe_update_ms=probe_ms, probe_over_floor=probe_ms / floor)
    report['update_only'].append(res)
    log(f'  {gib} GiB tables: {json.dumps(res)}')
    tabs.close()
    del tabs
    gc.collect()
    save()
  return 0


def _plan(sizes, hbm_sizes):
  """(size, memory kind) in the order that answers the goals first, each pair HBM before host (the
  HBM store is one buffer of 3x the table: it needs a device pool that no earlier phase has broken
  up): the HBM sizes above the overhead pair's, largest first; then the overhead pair at the
  largest HBM size below the maximum (8 GiB by default); the smallest host-only size above
  it (16 GiB: the >= 48 GiB point); the other host-only sizes, descending (main skips one once a
  larger host run trained); then the smaller sizes."""
  below = [s for s in sizes if s in hbm_sizes and s < max(sizes)]
  first = max(below) if below else max(sizes)
  big = sorted((s for s in sizes if s > first and s in hbm_sizes), reverse=True)
  out = [(s, k) for s in big for k in ('device', 'pinned_host')]
  out += ([(first, 'device')] if first in hbm_sizes else []) + [(first, 'pinned_host')]
  probes = sorted(s for s in sizes if s > first and s not in hbm_sizes)
  out += [(s, 'pinned_host') for s in probes[:1]]
  out += [(s, 'pinned_host') for s in probes[1:][::-1]]
  out += [(s, k) for s in sorted(sizes, reverse=True) if s < first
          for k in ('pinned_host', 'device') if k == 'pinned_host' or s in hbm_sizes]
  return out


def main():
  args = _parse()
  default = '0.008,0.002' if args.smoke or args.update_only else '32,24,16,8,1'
  args.sizes = sorted((float(s) for s in (args.sizes_gib or default).split(',')), reverse=True)
  hbm = args.hbm_sizes_gib
  if hbm is None:
    hbm = ','.join(map(str, args.sizes)) if args.smoke else '32,8,1'
  args.hbm_sizes = {float(s) for s in hbm.split(',') if s.strip()} & set(args.sizes)
  _setup_env(args, args.sizes)
  probe = None if args.update_only else start_probe()
  import signal

  import jax
  t_start = time.perf_counter()
  report = {'meta': {'jax': jax.__version__, 'device': str(jax.devices()[0].device_kind),
                     'backend': jax.default_backend(), 'cpus': os.cpu_count(),
                     'host_memory_limit_gb': os.environ.get('XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB'),
                     'date': datetime.date.today().isoformat(), 'args': vars(args)},
            'phases': [], 'errors': [], 'update_only': []}
  ctx = {'width': None}

  def log(msg):
    print(f'[{time.perf_counter() - t_start:7.1f}s] {msg}', flush=True)

  def save():
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1, default=str)

  def on_signal(signum, _):
    report['errors'].append(f'stopped by signal {signum} at {time.perf_counter() - t_start:.0f} s')
    try:
      summarize(report, ctx['width'], log)
    finally:
      save()
      os._exit(128 + signum)        # host threads may be mid-copy; the report is written
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, on_signal)
  if args.update_only:
    return bench_update(args, log, report, save)

  from v4jax.trainer import Trainer
  cfg = bench_config(args)
  # The trainer starts with small HBM tables (the host view is not proven yet); every phase swaps
  # in its own tables, so the compiled step is the same for all of them.
  import functools
  from v4jax.memory import host_tables
  init = host_tables.HostTables.__init__
  host_tables.HostTables.__init__ = functools.partialmethod(init, memory_kind='device')
  tr = Trainer(cfg, os.path.join('/tmp', f'bench_engram_{os.getpid()}'))
  host_tables.HostTables.__init__ = init
  log(f'trainer built: {cfg.model.n_layers} layers, engram {cfg.engram.layer_ids}, '
      f'batch {cfg.data.global_batch}x{cfg.data.seq_len}, U_max {tr.tables.u_max}')
  pool = tr.tables._pool  # pylint: disable=protected-access
  bw = measure_bandwidth(pool, args.bw_mib or (64 if args.smoke else 2048))
  report['host_bandwidth_gbs'] = bw / 1e9
  log(f'host memory bandwidth (read+write, {tr.tables.threads} threads): {bw / 1e9:.1f} GB/s')
  rng = np.random.default_rng(0)
  b, t, V = cfg.data.global_batch, cfg.data.seq_len, cfg.model.vocab_size
  if args.tokens == 'random':
    draw = lambda: rng.integers(0, V, (b, t)).astype(np.int32)
    toks = [(draw(), draw()) for _ in range(4)]
  else:
    toks = [(x['tokens'], x['targets']) for x in (next(tr.train_iter) for _ in range(4))]
  host_ok, probe_msg = probe_result(probe)
  report['host_view_probe'] = {'ok': host_ok, 'message': probe_msg}
  log(f'host view probe: {host_ok} ({probe_msg})')
  if not host_ok:
    report['errors'].append(f'host views unavailable: {probe_msg}; HBM phases only')
  save()

  # Time estimates for --budget-s, refined by every phase that ran.
  est = {'setup_s_per_gib': 1.0, 'step_s': None, 'compile_s': 150.0 if not args.smoke else 30.0}
  trained = []                                   # host sizes that trained
  for gib, kind in _plan(args.sizes, args.hbm_sizes):
    if kind == 'pinned_host' and not host_ok:
      continue
    if kind == 'pinned_host' and gib not in args.hbm_sizes and any(s > gib for s in trained):
      continue          # a probe for the largest size that a larger trained run already answers
    n = args.warmup + args.steps
    need = (3 * gib * est['setup_s_per_gib'] if kind == 'pinned_host' else 5.0) + \
        (n * est['step_s'] if est['step_s'] else est['compile_s'] + 2.0 * n)
    left = args.budget_s - (time.perf_counter() - t_start) if args.budget_s else float('inf')
    if need > left and (est['step_s'] or left <= 0):   # the first phase (the compile) always runs
      report['errors'].append(f'skipped {gib} GiB {kind}: needs ~{need:.0f} s, {left:.0f} s of '
                              '--budget-s left')
      log(f'  {report["errors"][-1]}')
      continue
    log(f'phase: {gib} GiB tables in {kind}')
    try:
      cfg_s, spec, rows = _size_cfg(cfg, gib)
      res, tabs = run_phase(tr, cfg_s, rows, kind, _batches(cfg_s, spec, toks), args, log)
      ctx['width'] = tabs.width
      res.update(size_gib=gib, table_bytes=sum(rows.values()) * tabs.width * 4)
      if kind == 'pinned_host':
        trained.append(gib)
        est['setup_s_per_gib'] = max(res['setup_s'] / (3 * gib), 0.05)
      est['step_s'] = 1.25 * res['step_ms_mean'] / 1e3
      if kind == 'pinned_host' and gib == min(args.sizes):
        res['extras'] = extras(tabs, _batches(cfg_s, spec, toks[:1]), log)
      report['phases'].append(res)
      log(f'  {json.dumps({k: v for k, v in res.items() if k != "extras"}, default=str)}')
    except Exception as e:  # noqa: BLE001 - recorded; the next phase may still run
      first = str(e).splitlines()[0][:300] if str(e) else ''
      msg = f'{gib} GiB {kind}: {type(e).__name__}: {first}'
      report['errors'].append(msg)
      log(f'  FAILED {msg}')
      print(traceback.format_exc(), file=sys.stderr, flush=True)   # where, for the log
      if tr.tables is not None:          # free what the failed phase allocated
        try:
          tr.tables.close()              # re-raises the failed phase's queued write-back, if any
        except Exception:  # noqa: BLE001 - the same failure, recorded above
          pass
        tr.tables = None
      gc.collect()
    save()
  summarize(report, ctx['width'], log)
  save()
  if tr.tables is not None:
    tr.tables.close()
  return 0


def summarize(report, width, log):
  bw = report.get('host_bandwidth_gbs', 0) * 1e9
  by = {(p['size_gib'], p['memory_kind']): p for p in report['phases']}
  rows = []
  for (gib, kind), p in sorted(by.items(), reverse=True):
    if kind != 'pinned_host':
      continue
    hbm = by.get((gib, 'device'))
    upd_ms = p['gather_ms'] + p['scatter_ms']
    floor_ms = 1e3 * 2 * p['rows_per_step'] * 3 * (width or 0) * 4 / bw if bw else 0.0
    rows.append({'size_gib': gib, 'host_plus_moments_gib': 3 * p['table_bytes'] / GIB,
                 'host_step_ms': p['step_ms'], 'hbm_step_ms': hbm['step_ms'] if hbm else None,
                 'overhead': (p['step_ms'] / hbm['step_ms'] - 1) if hbm else None,
                 'rows_per_step': p['rows_per_step'], 'update_ms': upd_ms,
                 'dma_ms': p['h2d_ms'] + p['d2h_ms'], 'floor_ms': floor_ms,
                 'update_over_floor': upd_ms / floor_ms if floor_ms else None})
  report['summary'] = rows
  report['largest_trained_gib'] = max((r['host_plus_moments_gib'] for r in rows), default=0.0)
  hdr = ('table GiB', 'host+mom GiB', 'host ms', 'HBM ms', 'overhead', 'rows/step', 'update ms',
         'floor ms', 'x floor', 'DMA ms')
  log(' | '.join(hdr))
  f = lambda v, fmt: '-' if v is None else format(v, fmt)
  for r in rows:
    log(' | '.join([f(r['size_gib'], 'g'), f(r['host_plus_moments_gib'], '.3g'),
                    f(r['host_step_ms'], '.1f'), f(r['hbm_step_ms'], '.1f'),
                    f(None if r['overhead'] is None else 100 * r['overhead'], '+.1f') + '%',
                    f(r['rows_per_step'], '.0f'), f(r['update_ms'], '.1f'), f(r['floor_ms'], '.1f'),
                    f(r['update_over_floor'], '.2f'), f(r['dma_ms'], '.1f')]))
  log(f'largest table + moments trained in host memory: {report["largest_trained_gib"]:.3g} GiB; '
      f'host bandwidth {bw / 1e9:.1f} GB/s')


if __name__ == '__main__':
  from v4jax.cli import run_tool
  run_tool('bench_engram', main)
