"""Shared helpers for the command-line tools in tools/: one-line errors, progress bars and output
directories that appear whole or not at all.

A tool raises `ToolError` for bad input; `run_tool` prints it as one line (`<tool>: error: ...`)
and exits with status 2, like argparse does for a bad flag. Long work reports progress through
`progress(...)`: tqdm when it is installed and stderr is a terminal, else a plain line on stderr
at most every few seconds (log files stay short).
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Callable, Iterator


def claim_gpu_memory(pinned_gib: int = 0):
  """A training or benchmark process owns its GPU: XLA's allocator may take 98% of it rather than
  JAX's default 75%, and XLA's scheduler and rematerialization may plan up to 97% of what that
  leaves after the step's arguments (`--xla_gpu_memory_limit_slop_factor`; XLA's default is 95).
  bench-1B's step plans 134.4 GiB: at 0.97 and 95% XLA's limit was 132.1 GiB, so it
  rematerialized and ran 5,248 ms per step; at 0.98 and 97% the limit is 134.8 GiB and the same
  machine ran 5,087 ms (docs/performance.md row 48). pinned_gib: the pinned host pool Engram's
  host tables need (`memory.host_tables.pinned_pool_gib`), set as the GPU client's cap
  `XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB` when above its default of 64. Not more than needed: the
  pool pins whole regions as it grows, the last clipped to the cap, so a loose cap pins RAM that
  the process then lacks (the H200 killed a run that capped it at 90% of RAM). The environment
  still wins. Call before jax starts its backend."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.98')
  if pinned_gib > 64:
    os.environ.setdefault('XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB', str(int(pinned_gib)))
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_gpu_memory_limit_slop_factor' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_gpu_memory_limit_slop_factor=97'.strip()


def use_compilation_cache(path: str) -> str | None:
  """Turns on JAX's persistent compilation cache at `path` (train.compilation_cache_dir; '' =
  off), so that a restarted or repeated run loads its compiled init and train step instead of
  compiling them again. JAX_COMPILATION_CACHE_DIR in the environment wins (JAX reads it itself).
  Returns the directory in use, or None. Call before the first compile."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  if not path:
    return None
  import jax
  path = os.path.expanduser(path)
  jax.config.update('jax_compilation_cache_dir', path)
  return path


class ToolError(Exception):
  """Bad input to a tool; the message is one line naming the file/tensor/flag and the problem."""


def run_tool(name: str, main: Callable[[], int | None]) -> None:
  """Runs `main`; a ToolError (or a missing file) becomes one line on stderr and exit code 2."""
  try:
    rc = main()
  except (ToolError, FileNotFoundError) as e:
    msg = str(e).strip().replace('\n', ' ')
    print(f'{name}: error: {msg}', file=sys.stderr, flush=True)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f'{name}: interrupted; nothing was written', file=sys.stderr, flush=True)
    sys.exit(130)
  sys.exit(rc or 0)


class _PlainProgress:
  """A tqdm-like counter printing `desc: done/total unit (pct) rate` to stderr every `every` s."""

  def __init__(self, total, desc, unit, every=5.0):
    self.total, self.desc, self.unit, self.every = total, desc, unit, every
    self.n, self.t0 = 0, time.time()
    self.t_last = self.t0           # the first line comes after `every` seconds
    self.printed = False

  def _fmt(self, v):
    if self.unit != 'B':
      return f'{v:,.0f}'
    for u in ('B', 'KB', 'MB', 'GB', 'TB'):
      if abs(v) < 1000 or u == 'TB':
        return f'{v:.1f} {u}' if u != 'B' else f'{v:.0f} B'
      v /= 1000.0
    return str(v)

  def _print(self):
    dt = max(time.time() - self.t0, 1e-9)
    pct = f' ({100.0 * self.n / self.total:.0f}%)' if self.total else ''
    tot = f'/{self._fmt(self.total)}' if self.total else ''
    rate = self._fmt(self.n / dt) + ('/s' if self.unit == 'B' else f' {self.unit}/s')
    print(f'{self.desc}: {self._fmt(self.n)}{tot}{pct} {rate}', file=sys.stderr, flush=True)
    self.printed = True

  def update(self, n=1):
    self.n += n
    now = time.time()
    if now - self.t_last >= self.every:
      self.t_last = now
      self._print()

  def close(self, failed=False):
    if self.printed and not failed:   # short work prints nothing
      self._print()


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str = 'B', enabled: bool = True):
  """A progress bar over `total` units (bytes when unit='B'); yields an object with update(n)."""
  if not enabled:
    bar = _PlainProgress(total, desc, unit, every=float('inf'))
  elif sys.stderr.isatty():
    try:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1000,
                 file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
    except ImportError:
      bar = _PlainProgress(total, desc, unit, every=1.0)
  else:
    bar = _PlainProgress(total, desc, unit)
  try:
    yield bar
  except BaseException:
    if isinstance(bar, _PlainProgress):
      bar.close(failed=True)
    else:
      bar.close()
    raise
  bar.close()


def check_output_dir(out: str, overwrite: bool | None, what: str = 'output directory') -> None:
  """Refuses a non-empty `out` unless overwrite (checked before any work starts); None: the
  tool has no --overwrite flag."""
  if os.path.exists(out):
    if not os.path.isdir(out):
      raise ToolError(f'{what} {out!r} exists and is not a directory')
    if os.listdir(out) and not overwrite:
      hint = ' (pass --overwrite to replace it)' if overwrite is not None else ' (give a new one)'
      raise ToolError(f'{what} {out!r} is not empty{hint}')


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a fresh temporary directory next to `out`; on success it replaces `out` by rename,
  on any error it is deleted, so `out` never holds a half-written result."""
  check_output_dir(out, overwrite)
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + '.tmp-', dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)     # mkdtemp makes it private; the result should not be
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(out):
    old = tempfile.mkdtemp(prefix=os.path.basename(out) + '.old-', dir=parent)
    os.rename(out, os.path.join(old, 'x'))
  os.rename(tmp, out)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def paired_seconds(f: Callable, f_args: tuple, ref: Callable, ref_args: tuple,
                   iters: int, reps: int = 1) -> tuple[list[float], list[float]]:
  """Wall seconds per call of f and of a reference ref over `iters` rounds, each round timing
  both back to back (the order alternates), after one untimed call of each. A ratio taken per
  round cancels drift that two separate timing loops would not: on the H200 the same dense GEMM
  ran 10-15% apart between loops of one process (docs/benchmarks.md, tenth measurement).
  reps: calls dispatched back to back per timed block (one wait at its end), so that sub-ms
  kernels are not timed with a host round trip each (the eleventh measurement's single-call
  rounds put the same dense GEMM at 0.58-0.87 ms)."""
  import jax
  jax.block_until_ready(f(*f_args))
  jax.block_until_ready(ref(*ref_args))
  tf, tr = [], []
  for i in range(iters):
    if i % 2:
      tr.append(_block_seconds(ref, ref_args, reps))
      tf.append(_block_seconds(f, f_args, reps))
    else:
      tf.append(_block_seconds(f, f_args, reps))
      tr.append(_block_seconds(ref, ref_args, reps))
  return tf, tr


def _block_seconds(f: Callable, args: tuple, reps: int) -> float:
  """Wall seconds per call of `reps` calls of f(*args) dispatched back to back, one wait."""
  import jax
  t0 = time.perf_counter()
  for _ in range(reps - 1):
    f(*args)
  jax.block_until_ready(f(*args))
  return (time.perf_counter() - t0) / reps


def median_seconds(f: Callable, *args, iters: int, reps: int = 1) -> float:
  """Median wall seconds per call of f(*args) over `iters` timed blocks of `reps` back-to-back
  calls after one untimed (compile) call, each block waited on with jax.block_until_ready: the
  timing loop of the tools/bench_*.py scripts."""
  import jax
  import numpy as np
  jax.block_until_ready(f(*args))
  return float(np.median([_block_seconds(f, args, reps) for _ in range(iters)]))


_PTXAS_FUNCTION = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_LOSS = re.compile(r"Potential Performance Loss: (.*) for the function '([^']+)'")


def parse_ptxas(text: str) -> list[dict]:
  """ptxas' verbose report (`-v`, as Mosaic GPU prints it with MOSAIC_GPU_DUMP_PTXAS=1) as one
  record per compiled function: kernel, registers, stack / spill-store / spill-load bytes and
  ptxas' performance-loss notes (e.g. WGMMAs serialized for want of registers)."""
  out, losses, cur = [], collections.defaultdict(list), None
  for line in text.splitlines():
    if m := _PTXAS_LOSS.search(line):
      losses[m.group(2)].append(m.group(1).strip())
    elif m := _PTXAS_FUNCTION.search(line):
      cur = {'kernel': m.group(1), 'registers': None, 'stack_bytes': 0, 'spill_store_bytes': 0,
             'spill_load_bytes': 0}
      out.append(cur)
    elif cur is not None and (m := _PTXAS_FRAME.search(line)):
      cur.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                 spill_load_bytes=int(m.group(3)))
    elif cur is not None and (m := _PTXAS_USED.search(line)):
      cur['registers'] = int(m.group(1))
      cur = None
  for r in out:
    r['performance_loss'] = losses.get(r['kernel'], [])
  return out


@contextlib.contextmanager
def ptxas_report(enabled: bool = True) -> Iterator[list]:
  """Within the block every Mosaic GPU kernel compile prints ptxas' report
  (MOSAIC_GPU_DUMP_PTXAS=1); the process's stdout and stderr (file descriptors 1 and 2, where
  the compiler's C++ side writes) go to temporary files meanwhile and are written back to their
  streams at the end, and the yielded list receives `parse_ptxas` of them. A no-op (an empty
  list) when not enabled."""
  records: list = []
  if not enabled:
    yield records
    return
  old = os.environ.get('MOSAIC_GPU_DUMP_PTXAS')
  os.environ['MOSAIC_GPU_DUMP_PTXAS'] = '1'
  streams = ((1, sys.stdout), (2, sys.stderr))
  saved = []
  try:
    for fd, stream in streams:
      stream.flush()
      tmp = tempfile.TemporaryFile()
      saved.append((fd, stream, os.dup(fd), tmp))
      os.dup2(tmp.fileno(), fd)
    yield records
  finally:
    texts = []
    for fd, stream, keep, tmp in saved:
      stream.flush()
      os.dup2(keep, fd)
      os.close(keep)
      tmp.seek(0)
      texts.append(tmp.read().decode(errors='replace'))
      tmp.close()
      stream.write(texts[-1])
      stream.flush()
    if old is None:
      os.environ.pop('MOSAIC_GPU_DUMP_PTXAS', None)
    else:
      os.environ['MOSAIC_GPU_DUMP_PTXAS'] = old
    records.extend(parse_ptxas('\n'.join(texts)))


class BenchReport:
  """A benchmark's rows with its run's metadata (jax version, device, date and the tool's own
  fields), written to `out` (if set) as {'meta', 'rows'} JSON after every `add`, so a run cut
  short keeps what it measured."""

  def __init__(self, out: str | None, **meta):
    import datetime
    import jax
    dev = jax.devices()[0]
    self.out, self.rows = out, []
    self.meta = {'jax': jax.__version__, 'device': dev.device_kind, 'platform': dev.platform,
                 'date': datetime.date.today().isoformat(), **meta}

  def add(self, *rows: dict) -> None:
    self.rows.extend(rows)
    self.save()

  def save(self) -> None:
    if self.out:
      import json
      with open(self.out, 'w') as f:
        json.dump({'meta': self.meta, 'rows': self.rows}, f, indent=1)
