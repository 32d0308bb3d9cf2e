"""Entry point: `python -m v4jax.train --config configs/tiny.py [--config.a.b=v] --workdir DIR`.

Running the same command again resumes from the newest checkpoint in --workdir, data iterator
included. SIGTERM (preemption) saves a checkpoint and exits 0.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Preset file, e.g. configs/tiny.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Checkpoints, metrics.jsonl, events.')
_COORD = flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0 '
                             '(auto-detected on Cloud TPU and SLURM).')
_NPROC = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  from v4jax.cli import claim_gpu_memory, use_compilation_cache
  from v4jax.config import ConfigError, validate
  from v4jax.memory.host_tables import pinned_pool_gib
  try:   # checked before the pinned pool is sized from it (and again by the Trainer)
    claim_gpu_memory(pinned_pool_gib(validate(_CONFIG.value)))
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  use_compilation_cache(_CONFIG.value.train.compilation_cache_dir)
  logging.set_verbosity(logging.WARNING)   # Orbax logs every save at INFO
  from v4jax.parallel.mesh import maybe_initialize_distributed
  maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  from v4jax.trainer import Trainer
  try:
    trainer = Trainer(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  trainer.run()


if __name__ == '__main__':
  app.run(main)
