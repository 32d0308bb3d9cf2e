"""v4jax.cli: use_compilation_cache (train.compilation_cache_dir: where the persistent XLA cache
goes, and that a compile lands there), claim_gpu_memory's environment defaults, and the train
entry point's config check before it sizes the pinned pool."""
import os
import subprocess
import sys

from helpers import ROOT
from v4jax.cli import claim_gpu_memory, use_compilation_cache


def test_environment_wins_and_empty_is_off(monkeypatch):
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/some/env/dir')
  assert use_compilation_cache('~/elsewhere') == '/some/env/dir'
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  assert use_compilation_cache('') is None


def _fresh_process(code: str, drop: str, **env) -> str:
  """Runs `code` in a new CPU-only Python with the repo importable and the environment variable
  `drop` unset; its stdout."""
  env = dict({k: v for k, v in os.environ.items() if k != drop}, PYTHONPATH=ROOT,
             JAX_PLATFORMS='cpu', **env)
  r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return r.stdout


def test_compiled_program_is_written_to_the_cache(tmp_path):
  """A fresh process with the cache at tmp/~x (user expansion included) writes its compile there."""
  out = _fresh_process('import jax, jax.numpy as jnp\n'
                       'from v4jax.cli import use_compilation_cache\n'
                       'print(use_compilation_cache("~/xla"))\n'
                       'jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)\n'
                       'jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()\n',
                       'JAX_COMPILATION_CACHE_DIR', HOME=str(tmp_path))
  assert out.split()[-1] == str(tmp_path / 'xla')
  assert os.listdir(tmp_path / 'xla'), 'no cache entry written'


def test_claim_gpu_memory_sets_defaults_and_keeps_the_environment(monkeypatch):
  monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
  monkeypatch.delenv('XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_enable_triton_gemm=false')
  claim_gpu_memory(64)          # no more than the GPU client's default cap: left alone
  assert os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.98'
  assert 'XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB' not in os.environ
  claim_gpu_memory(105)
  assert os.environ['XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB'] == '105'
  assert os.environ['XLA_FLAGS'] == ('--xla_gpu_enable_triton_gemm=false '
                                     '--xla_gpu_memory_limit_slop_factor=97')
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.9')
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_memory_limit_slop_factor=90')
  monkeypatch.setenv('XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB', '80')
  claim_gpu_memory(105)
  assert os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9'
  assert os.environ['XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB'] == '80'
  assert os.environ['XLA_FLAGS'] == '--xla_gpu_memory_limit_slop_factor=90'


def test_claimed_flags_start_jax():
  """XLA parses every flag in XLA_FLAGS at start-up and aborts on one it does not know: the GPU
  flag claim_gpu_memory adds must start a CPU-only jax too (the README's train command)."""
  out = _fresh_process('import os\n'
                       'from v4jax.cli import claim_gpu_memory\n'
                       'claim_gpu_memory()\n'
                       'import jax, jax.numpy as jnp\n'
                       'print(float(jnp.arange(4.0).sum()), os.environ["XLA_FLAGS"])\n',
                       'XLA_FLAGS')
  assert out.split() == ['6.0', '--xla_gpu_memory_limit_slop_factor=97']


def test_train_names_a_bad_config_field_before_sizing_host_tables(tmp_path):
  """`python -m v4jax.train` checks the config before it sizes the pinned pool for Engram's host
  tables from it (which divides by fields the check bounds): a bad field is one usage line, no
  traceback, and no workdir is made."""
  work = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'v4jax.train', '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
       '--config.engram.enabled=True', '--config.engram.table_memory=host',
       '--config.engram.max_ngram=1', '--workdir', str(work)],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert 'config.engram.max_ngram=1 must be >= 2' in proc.stderr, proc.stderr[-2000:]
  assert not work.exists()
