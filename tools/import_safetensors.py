#!/usr/bin/env python3
"""Import HF-style safetensors into a new v4jax run directory that training resumes from.

  python tools/import_safetensors.py --src export/a --config configs/tiny.py --workdir runs/b \\
      [--config.<section>.<field>=<value> ...] [--step 0] [--fresh indexer,mhc,engram,mtp] [--drop mtp]
  python -m v4jax.train --config configs/tiny.py --workdir runs/b      # resumes from the import

--src holds *.safetensors files (through model.safetensors.index.json when present) and
optionally a config.json. Two layouts are read: this project's export
(tools/convert_to_safetensors.py) and DeepSeek-V3/V3.2 checkpoints, including FP8 ones (each
F8_E4M3 `X.weight` is multiplied by its 128x128-block `X.weight_scale_inv`). --config is the
run's config, exactly as training takes it (same overrides); the checkpoint gets a fresh
optimizer state at --step (default 0).

Every tensor the config's model needs must be in --src with the right shape and every tensor of
--src must be used; otherwise one error lists all missing, unexpected and mis-shaped tensors and
nothing is written. Components a checkpoint lacks can be initialised freshly instead
(--fresh: e.g. mhc,engram for a DeepSeek-V3.2 checkpoint with mHC n>1 and Engram on; indexer for
DeepSeek-V3), and source components the config turns off can be ignored (--drop: e.g. mtp with
mtp.depth=0, indexer with dsa.enabled=False). The workdir must be new or empty; it appears only
when the checkpoint is complete.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Preset file, e.g. configs/tiny.py.',
                                          lock_config=True)
_SRC = flags.DEFINE_string('src', None, 'Directory with *.safetensors (and config.json).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'New run directory to write the checkpoint into.')
_STEP = flags.DEFINE_integer('step', 0, 'Step number of the written checkpoint.')
_FRESH = flags.DEFINE_list('fresh', [], 'Components that may be absent from --src and stay freshly '
                           'initialised: indexer, mhc, engram, mtp.')
_DROP = flags.DEFINE_list('drop', [], 'Components of --src to ignore: indexer, mhc, engram, mtp.')
flags.mark_flags_as_required(['config', 'src', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.ERROR)     # Orbax's INFO/WARNING chatter
  from v4jax.cli import ToolError  # pylint: disable=import-outside-toplevel
  from v4jax.convert.importer import import_checkpoint  # pylint: disable=import-outside-toplevel
  try:
    s = import_checkpoint(_SRC.value, _CONFIG.value, _WORKDIR.value, step=_STEP.value,
                          fresh=_FRESH.value, drop=_DROP.value)
  except (ToolError, FileNotFoundError) as e:
    print(f'import_safetensors.py: error: {str(e).strip()}', file=sys.stderr, flush=True)
    sys.exit(2)
  fresh = f'; fresh: {len(s["fresh"])} tensors' if s['fresh'] else ''
  print(f'imported {s["imported"]} tensors ({s["params"]:,} values){fresh} -> '
        f'{_WORKDIR.value}/checkpoints/{s["step"]}')


if __name__ == '__main__':
  app.run(main)
