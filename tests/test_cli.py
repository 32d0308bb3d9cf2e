"""v4jax.cli: use_compilation_cache (train.compilation_cache_dir: where the persistent XLA cache
goes, and that a compile lands there), claim_gpu_memory's environment defaults, the train
entry point's config check before it sizes the pinned pool, and ptxas' kernel report (parsed
from the H200's own output; captured at the file-descriptor level)."""
import os
import subprocess
import sys

from helpers import ROOT
from v4jax import cli
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


# ptxas' report as Mosaic GPU printed it on the H200 (MOSAIC_GPU_DUMP_PTXAS=1; twenty-ninth
# session): a kernel without spills, then one that spilled and serialized its WGMMAs.
PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'entry_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for entry_mosaic_gpu_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem
ptxas info    : Compile time = 220.080 ms
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function 'dkv_entry_mosaic_gpu_kernel'
ptxas warning : Registers are spilled to local memory in function 'dkv_entry_mosaic_gpu_kernel', 928 bytes spill stores, 1032 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'dkv_entry_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for dkv_entry_mosaic_gpu_kernel
    504 bytes stack frame, 928 bytes spill stores, 1032 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 504 bytes cumulative stack size, 1 bytes smem
"""


def test_parse_ptxas_reports_registers_spills_and_losses():
  fwd, dkv = cli.parse_ptxas('fwd 1.4 ms\n' + PTXAS_SAMPLE)
  assert fwd == {'kernel': 'entry_mosaic_gpu_kernel', 'registers': 168, 'stack_bytes': 0,
                 'spill_store_bytes': 0, 'spill_load_bytes': 0, 'performance_loss': []}
  assert (dkv['kernel'], dkv['registers'], dkv['stack_bytes'], dkv['spill_store_bytes'],
          dkv['spill_load_bytes']) == ('dkv_entry_mosaic_gpu_kernel', 168, 504, 928, 1032)
  assert dkv['performance_loss'] == ['wgmma.mma_async instructions are serialized due to '
                                     'insufficient register resources']
  assert cli.parse_ptxas('no compiler output') == []


def test_ptxas_report_captures_both_descriptors_and_gives_them_back(capfd, monkeypatch):
  """What the compiler's C++ side writes to fd 1 or 2 inside the block is parsed and then
  written to the same stream; the environment variable is set inside only."""
  monkeypatch.delenv('MOSAIC_GPU_DUMP_PTXAS', raising=False)
  head, tail = PTXAS_SAMPLE.split("ptxas info    : (C7512)")
  with cli.ptxas_report() as kernels:
    assert os.environ['MOSAIC_GPU_DUMP_PTXAS'] == '1'
    os.write(1, head.encode())
    os.write(2, ('ptxas info    : (C7512)' + tail).encode())
    assert kernels == []
  assert 'MOSAIC_GPU_DUMP_PTXAS' not in os.environ
  assert [k['kernel'] for k in kernels] == ['entry_mosaic_gpu_kernel',
                                            'dkv_entry_mosaic_gpu_kernel']
  assert kernels[1]['spill_store_bytes'] == 928 and kernels[1]['performance_loss']
  out, err = capfd.readouterr()
  assert head in out and tail in err
  with cli.ptxas_report(enabled=False) as none:
    assert 'MOSAIC_GPU_DUMP_PTXAS' not in os.environ
  assert none == []
