#!/usr/bin/env python3
"""Export a v4jax Orbax checkpoint as HF-style sharded safetensors.

  python tools/convert_to_safetensors.py --workdir runs/a --out export/a [--step N] [--dtype bf16|fp32]

Reads <workdir>/checkpoints/<step> (default: the newest complete step) and writes to --out:
  model-00001-of-0000N.safetensors ...   the tensors, DeepSeek-V3/V3.2 names and [out, in] layout
  model.safetensors.index.json           tensor name -> shard file
  config.json                            DeepSeek-V3.2 keys + hc_* (mHC) + `engram` + `v4jax`
                                         (the run's full config and step)

Names follow SPEC.md §11 (v4jax/convert/hf_names.py): HF's where HF has them, the proposed
`attn_hc`/`ffn_hc`/`hc_head` names for mHC and `engram.*` for Engram, whose frozen hash constants
(multipliers, table sizes, offsets, the compressed-id lookup) are exported as int64 tensors. The
MTP depth k sits at layer index L+k with copies of the embedding and head. --dtype bf16 (default)
writes matrices in bf16 and keeps norms, biases and mHC tensors in fp32; fp32 writes everything
in fp32 (an exact copy of the master weights). Optimizer state is not exported.

Memory stays near the largest single tensor: each tensor is read, written, and dropped. The
output appears under --out only when complete.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from v4jax.cli import run_tool  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='the training run directory (holds checkpoints/)')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: the newest)')
  p.add_argument('--out', required=True, help='output directory (must be new or empty)')
  p.add_argument('--dtype', choices=('bf16', 'fp32'), default='bf16', help='weight dtype (default bf16)')
  p.add_argument('--max-shard-size', default='5GB', help='largest shard file, e.g. 5GB, 500MB (default 5GB)')
  p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  a = p.parse_args(argv)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.ERROR)     # Orbax's INFO/WARNING chatter
  from v4jax.convert.export import export, parse_size  # pylint: disable=import-outside-toplevel
  s = export(a.workdir, a.out, step=a.step, dtype=a.dtype, max_shard_bytes=parse_size(a.max_shard_size),
             overwrite=a.overwrite)
  print(f'exported step {s["step"]}: {s["tensors"]} tensors, {s["bytes"] / 1e9:.3f} GB in '
        f'{s["shards"]} shard(s) -> {a.out}')
  return 0


if __name__ == '__main__':
  run_tool('convert_to_safetensors.py', main)
