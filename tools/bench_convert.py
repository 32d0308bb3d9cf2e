#!/usr/bin/env python3
"""Benchmark the safetensors export against a plain file copy of the same checkpoint.

  python tools/bench_convert.py --scratch /tmp/bench --out bench_convert.json [--layers 3]
      [--uncompressed] [--no-ocdbt]

1. A child process writes a synthetic v4jax checkpoint (random weights, not trained; every
   component on, V3 vocabulary, D=2048, 32 experts; about 5 GB of fp32 parameters with
   --layers 3) through Orbax, in the layout the trainer writes (`state` with params/rest, and
   `meta`; no optimizer state, which the export never reads): an OCDBT store, zstd-compressed,
   as Orbax does by default; --uncompressed and --no-ocdbt as the trainer's
   `checkpoint.compression=none` and `checkpoint.use_ocdbt=False` write it.
2. Times `cp -r` of the checkpoint step directory, tools/convert_to_safetensors.py --dtype fp32
   and --dtype bf16, and `cp -r` again, each in a child process ending with a `sync`, so both
   sides pay for their writes reaching the disk. This process never imports jax and stays
   small, so wait4() gives each child's own peak RSS and CPU time.
3. Reports throughput as checkpoint bytes on disk per second (the export also writes the MTP
   copies of the embedding and head, which HF layouts carry), the export/copy throughput ratio
   (goal >= 0.5) and the export's peak RSS (goal <= 2 GB + the largest tensor), with the load
   average around the runs, as JSON to --out. The scratch directory is deleted unless --keep.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(layers: int):
  from v4jax.config import default_config, validate  # pylint: disable=import-outside-toplevel
  c = default_config()
  c.model.update(vocab_size=129280, d_model=2048, n_layers=layers, n_dense_layers=1, d_ff=8192,
                 n_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64,
                 v_head_dim=128)
  c.moe.update(num_experts=32, d_expert=1024, top_k=4, n_groups=4, topk_groups=2, num_shared=1)
  c.dsa.update(enabled=True, n_heads=8, head_dim=128, topk=64)
  c.mhc.streams = 4
  c.engram.update(enabled=True, layer_ids=(min(1, layers - 1),), max_ngram=3, heads_per_ngram=4,
                  d_mem=512, base_rows=100_000, pad_id=2)
  c.mtp.depth = 1
  return validate(c)


def write_checkpoint(workdir: str, layers: int, compress: bool = True, ocdbt: bool = True) -> dict:
  """Random weights in every tensor of the bench model, saved through v4jax.checkpoint as the
  trainer would with checkpoint.compression zstd / none and checkpoint.use_ocdbt."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from v4jax import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from v4jax.data.engram_hash import make_hash_spec  # pylint: disable=import-outside-toplevel
  from v4jax.model.transformer import Transformer  # pylint: disable=import-outside-toplevel
  cfg = bench_config(layers)
  spec = make_hash_spec(cfg)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0),
                                             engram_rows_per_layer=dict(spec.total_rows)))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves((params, rest))]
  # One random pool as large as the largest tensor; every tensor is a view of it, so memory
  # stays near the largest tensor while Orbax writes the whole checkpoint.
  pool = np.random.default_rng(0).standard_normal(max(sizes), np.float32) * np.float32(0.006)
  fill = lambda t: jax.tree.map(lambda x: pool[:int(np.prod(x.shape))].reshape(x.shape), t)
  state = {'step': np.zeros((), np.int32), 'params': fill(params), 'rest': fill(rest)}
  cfg.checkpoint.update(compression='zstd' if compress else 'none', use_ocdbt=ocdbt,
                        async_save=False)
  mngr = ckpt.manager(workdir, cfg)
  meta = {'config': ckpt.config_json(cfg), 'engram_hash': spec.to_json()}
  mngr.save(0, args=ocp.args.Composite(state=ckpt.tree_save(state),
                                       meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  mngr.close()
  return {'params': sum(sizes), 'param_bytes': 4 * sum(sizes),
          'largest_tensor_bytes': 4 * max(sizes), 'tensors': len(sizes)}


def du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed(cmd: list[str]) -> dict:
  """Wall seconds (including a final sync), CPU seconds and peak RSS of the child running cmd."""
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    os.sync()
    sec = time.perf_counter() - t
    out.seek(0)
    err.seek(0)
    if proc.returncode:
      raise SystemExit(f'bench_convert.py: error: {" ".join(cmd)} failed: {err.read().decode().strip()}')
    return {'seconds': round(sec, 2), 'cpu_seconds': round(usage.ru_utime + usage.ru_stime, 2),
            'peak_rss_bytes': usage.ru_maxrss * 1024, 'stdout': out.read().decode()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--scratch', required=True, help='new scratch directory (needs ~3.5x the checkpoint)')
  p.add_argument('--out', required=True, help='JSON results file')
  p.add_argument('--layers', type=int, default=3, help='main layers (3: ~5 GB of fp32 params)')
  p.add_argument('--keep', action='store_true', help='keep the scratch directory')
  p.add_argument('--uncompressed', action='store_true',
                 help='write the checkpoint without zstd (checkpoint.compression=none)')
  p.add_argument('--no-ocdbt', action='store_true',
                 help='one file per array instead of an OCDBT store (checkpoint.use_ocdbt=False)')
  p.add_argument('--write-checkpoint', metavar='WORKDIR', help=argparse.SUPPRESS)   # child mode
  a = p.parse_args(argv)
  if a.write_checkpoint:
    print(json.dumps(write_checkpoint(a.write_checkpoint, a.layers, not a.uncompressed,
                                      not a.no_ocdbt)))
    return 0
  os.makedirs(a.scratch, exist_ok=False)
  try:
    work = os.path.join(a.scratch, 'run')
    py, me = sys.executable, os.path.abspath(__file__)
    w = timed([py, me, '--scratch', a.scratch, '--out', a.out, '--layers', str(a.layers),
               '--write-checkpoint', work] + (['--uncompressed'] if a.uncompressed else [])
              + (['--no-ocdbt'] if a.no_ocdbt else []))
    info = json.loads(w['stdout'].strip().splitlines()[-1])
    print(f'wrote the synthetic checkpoint in {w["seconds"]:.0f} s', file=sys.stderr)
    step_dir = os.path.join(work, 'checkpoints', '0')
    on_disk = du(step_dir)
    load_before = os.getloadavg()[0]
    runs = {}
    for name, target, cmd in [
        ('copy_1', 'copy_1', ['cp', '-r', step_dir]),
        ('export_fp32', 'fp32', [py, 'tools/convert_to_safetensors.py', '--workdir', work,
                                 '--dtype', 'fp32', '--out']),
        ('export_bf16', 'bf16', [py, 'tools/convert_to_safetensors.py', '--workdir', work,
                                 '--dtype', 'bf16', '--out']),
        ('copy_2', 'copy_2', ['cp', '-r', step_dir])]:
      dst = os.path.join(a.scratch, target)
      r = timed(cmd + [dst])
      r.pop('stdout')
      r.update(bytes_written=du(dst), throughput_GBps=round(on_disk / r['seconds'] / 1e9, 3))
      runs[name] = r
      print(f'{name}: {r["seconds"]:.1f} s, {r["cpu_seconds"]:.1f} CPU s, peak RSS '
            f'{r["peak_rss_bytes"] / 1e9:.2f} GB', file=sys.stderr)
      shutil.rmtree(dst)
    copy_s = min(runs['copy_1']['seconds'], runs['copy_2']['seconds'])
    goal_rss = 2e9 + info['largest_tensor_bytes']
    peak = max(runs['export_fp32']['peak_rss_bytes'], runs['export_bf16']['peak_rss_bytes'])
    result = {
        'figure': 'safetensors export vs plain copy of the same checkpoint',
        'command': 'python tools/bench_convert.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
        'device': f'{os.cpu_count()} CPU cores, '
                  f'{os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30:.0f} GiB RAM',
        'jax_version': importlib.metadata.version('jax'), 'date': time.strftime('%Y-%m-%d'),
        'load_average_1min': [round(load_before, 1), round(os.getloadavg()[0], 1)],
        'checkpoint': {**info, 'bytes_on_disk': on_disk, 'layers': a.layers,
                       'compression': 'none' if a.uncompressed else 'zstd',
                       'use_ocdbt': not a.no_ocdbt}, 'runs': runs,
        'export_fp32_over_copy_throughput': round(copy_s / runs['export_fp32']['seconds'], 3),
        'export_bf16_over_copy_throughput': round(copy_s / runs['export_bf16']['seconds'], 3),
        'peak_rss_goal_bytes': int(goal_rss),
        'goals_met': {'throughput_ge_50pct_of_copy': copy_s / runs['export_fp32']['seconds'] >= 0.5,
                      'peak_rss_le_2GB_plus_largest_tensor': peak <= goal_rss},
    }
    with open(a.out, 'w', encoding='utf-8') as fh:
      json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))
  finally:
    if not a.keep:
      shutil.rmtree(a.scratch, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
