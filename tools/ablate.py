#!/usr/bin/env python3
"""Train a set of configs for N steps each, then plot their loss curves and tabulate them.

  python tools/ablate.py --configs configs/ablations/*.py --steps 100 --workdir runs/ablate \\
      [--config.train.eval_every=25 ...] [--force] [--out PNG] [--table MD]

Each config FILE runs as its own subprocess, one after another,
  python -m v4jax.train --config FILE --workdir WORKDIR/<name> --config.train.steps=N [overrides]
with <name> the file's base name (so names must be distinct) and the `--config.*` overrides
applied to every run. The child's output goes to WORKDIR/<name>/train.log and the settings of the
run to WORKDIR/<name>/ablate.json.

A run whose metrics.jsonl already reaches step N with the same settings is skipped; an unfinished
one is started again and resumes from its last checkpoint; one made with other settings is an
error unless --force, which deletes WORKDIR/<name> and trains from scratch. A failed run is
reported (with the end of its log) and the others still run; the exit status is then 1.

At the end tools/plot_runs.py draws every finished run into --out (default
WORKDIR/ablations.png) and prints the Markdown table (also written to --table, default
WORKDIR/ablations.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import plot_runs  # noqa: E402


class AblateError(RuntimeError):
  """Bad arguments or a run directory in an unexpected state; the message says which."""


def last_train_step(run_dir: str) -> int:
  """Largest step with a train row in run_dir/metrics.jsonl (0 if none or no file)."""
  try:
    train, _ = plot_runs.read_metrics(run_dir)
  except plot_runs.RunError:
    return 0
  return max(train)


def train_command(config: str, run_dir: str, steps: int, overrides: list[str]) -> list[str]:
  return [sys.executable, '-m', 'v4jax.train', '--config', config, '--workdir', run_dir,
          f'--config.train.steps={steps}', *overrides]


def plan(configs: list[str], workdir: str, steps: int, overrides: list[str], force: bool):
  """[(name, run_dir, settings, action)] with action 'run', 'resume' or 'skip'; checks first,
  so that a bad argument fails before anything trains."""
  if steps <= 0:
    raise AblateError(f'--steps={steps} must be a positive integer')
  if not configs:
    raise AblateError('--configs names no files')
  names = {}
  for c in configs:
    if not os.path.isfile(c):
      raise AblateError(f'--configs: {c} is not a file')
    if not c.endswith('.py'):
      raise AblateError(f'--configs: {c} is not a config .py file')
    name = os.path.basename(c)[:-3]
    if name in names:
      raise AblateError(f'--configs: {names[name]} and {c} would share the run directory '
                        f'{os.path.join(workdir, name)}')
    names[name] = c
  bad = [o for o in overrides if not o.startswith('--config.') or '=' not in o]
  if bad:
    raise AblateError(f'unknown arguments {bad}: only --config.<field>=<value> overrides pass '
                      'through to v4jax.train')
  out = []
  for name, c in names.items():
    run_dir = os.path.join(workdir, name)
    settings = {'config': os.path.abspath(c), 'steps': steps, 'overrides': overrides}
    action = 'run'
    meta = os.path.join(run_dir, 'ablate.json')
    if force or not os.path.exists(run_dir):
      pass
    elif os.path.isfile(meta):
      with open(meta, encoding='utf-8') as f:
        old = json.load(f)
      if old != settings:
        raise AblateError(f'{run_dir} was trained with other settings ({meta}: {old}); use '
                          '--force to delete it and start again, or another --workdir')
      action = 'skip' if last_train_step(run_dir) >= steps else 'resume'
    elif os.listdir(run_dir):
      raise AblateError(f'{run_dir} exists but was not made by tools/ablate.py (no ablate.json); '
                        'use --force to delete it, or another --workdir')
    out.append((name, run_dir, settings, action))
  return out


def run_one(name: str, run_dir: str, settings: dict, action: str, force: bool) -> bool:
  if action == 'skip':
    print(f'[{name}] complete ({run_dir}, {settings["steps"]} steps): skipped', flush=True)
    return True
  if force and os.path.exists(run_dir):
    shutil.rmtree(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, 'ablate.json'), 'w', encoding='utf-8') as f:
    json.dump(settings, f, indent=1)
  cmd = train_command(settings['config'], run_dir, settings['steps'], settings['overrides'])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  log = os.path.join(run_dir, 'train.log')
  print(f'[{name}] {action}: {" ".join(cmd)}\n[{name}] log: {log}', flush=True)
  t0 = time.time()
  with open(log, 'a', encoding='utf-8') as f:
    rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
  dt = time.time() - t0
  if rc != 0 or last_train_step(run_dir) < settings['steps']:
    with open(log, encoding='utf-8', errors='replace') as f:
      tail = ''.join(f.readlines()[-15:])
    print(f'[{name}] FAILED (exit {rc}, {dt:.0f} s, last step {last_train_step(run_dir)}); end '
          f'of {log}:\n{tail}', file=sys.stderr, flush=True)
    return False
  print(f'[{name}] done in {dt:.0f} s', flush=True)
  return True


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--configs', nargs='+', required=True, metavar='FILE', help='config .py files')
  p.add_argument('--steps', type=int, required=True, help='training steps per run')
  p.add_argument('--workdir', required=True, help='parent directory of the run directories')
  p.add_argument('--force', action='store_true', help='delete existing runs and train again')
  p.add_argument('--out', help='PNG (default WORKDIR/ablations.png)')
  p.add_argument('--table', help='Markdown table (default WORKDIR/ablations.md)')
  p.add_argument('--smooth', type=float, default=0.6, help='train-loss EMA weight, in [0, 1)')
  args, overrides = p.parse_known_args(argv)
  try:
    runs = plan(args.configs, args.workdir, args.steps, overrides, args.force)
    ok = [run_dir for name, run_dir, settings, action in runs
          if run_one(name, run_dir, settings, action, args.force)]
    if not ok:
      raise AblateError('no run finished: nothing to plot')
    out = args.out or os.path.join(args.workdir, 'ablations.png')
    table_path = args.table or os.path.join(args.workdir, 'ablations.md')
    print(plot_runs.main(ok, out, table_path, args.smooth))
    print(f'plot: {out}\ntable: {table_path}')
  except (AblateError, plot_runs.RunError, ValueError) as e:
    print(f'ablate: {e}', file=sys.stderr)
    return 2
  return 0 if len(ok) == len(runs) else 1


if __name__ == '__main__':
  sys.exit(main())
