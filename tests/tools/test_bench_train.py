"""tools/bench_train.py on CPU (tiny model, every component on) and configs/peer_maxtext_small.py.

The peer config is checked against the MaxText run it mirrors: its parameter count (0.424B) and
its FLOPs per token, which must equal MaxText's own count (TFLOP/s divided by tokens/s from the
issue's table) within 0.1% (plain) and 0.2% (DSA: the table's figures have 3-4 digits).
"""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import bench_train  # noqa: E402
from v4jax import flops  # noqa: E402
from v4jax.cli import ToolError  # noqa: E402
from v4jax.config import validate  # noqa: E402

TINY = ['--config', os.path.join(ROOT, 'configs', 'tiny.py'), '--config.model.n_layers=2',
        '--config.data.seq_len=32', '--config.data.global_batch=8', '--config.dsa.topk=8',
        '--config.data.source=synthetic', '--config.mtp.depth=0']


def test_tiny_cpu_json(tmp_path, capsys, monkeypatch):
  # --profile appends a GPU flag to XLA_FLAGS (for a process whose backend has not started):
  # restored afterwards, so later tests' compile-cache keys and child processes do not see it.
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))
  out = tmp_path / 'bench.json'
  rep = bench_train.run(TINY + ['--steps', '2', '--warmup', '1', '--window', '1', '--profile',
                                '--profile_steps', '1', '--out', str(out), '--ptxas',
                                '--workdir', str(tmp_path / 'w'),
                                # a config override and an XLA compiler option for its compile
                                '--variant', 'dsa.sparse_attention=masked,'
                                'xla_gpu_memory_limit_slop_factor=90',
                                # cuDNN does not exist on CPU: this comparison fails, is recorded
                                '--variant', 'dsa.sparse_attention=masked,kernels.attention=cudnn'])
  on_disk = json.loads(out.read_text())
  assert on_disk['result']['step_time_s'] == pytest.approx(rep['result']['step_time_s'])
  printed = capsys.readouterr()
  err = printed.err   # progress as each phase ends: what a run cut short still shows
  for line in ('[bench_train main] init ', '[bench_train main] trace+lower ',
               '[bench_train main] steps 2/2: '):
    assert line in err, err[-2000:]
  for k in ('config', 'overrides', 'global_batch', 'seq_len', 'device', 'result', 'profile',
            'ablations'):
    assert k in on_disk, k
  r = on_disk['result']
  for k in ('params', 'tokens_per_step', 'model_flops_per_token', 'init_s', 'trace_lower_s',
            'compile_s', 'first_step_s', 'step_time_s', 'step_time_median_s', 'tokens_per_s',
            'tflops_per_device', 'mfu', 'memory', 'xla_flops_per_step', 'final_loss', 'finite'):
    assert k in r, k
  assert on_disk['overrides']['model.n_layers'] == '2' and on_disk['global_batch'] == 8
  assert r['tokens_per_step'] == 8 * 32 and len(r['window_step_times_s']) == 2
  assert r['compile_s'] > 0 and r['first_step_s'] >= r['compile_s'] and r['step_time_s'] > 0
  assert r['tokens_per_s'] == pytest.approx(256 / r['step_time_s'])
  n_dev = jax.device_count()
  assert r['tflops_per_device'] == pytest.approx(
      r['model_flops_per_token'] * r['tokens_per_s'] / n_dev / 1e12)
  assert r['mfu'] is None and r['finite'] and np.isfinite(r['final_loss'])   # CPU: no peak
  # --ptxas: no Mosaic GPU kernel compiles on the CPU (the parser's own test: tests/test_cli.py)
  assert r['mosaic_kernels'] == []
  assert 'Mosaic GPU kernels (ptxas): 0 compiled, none spilling' in printed.out, printed.out
  v, bad = on_disk['variants']             # the same steps again with each variant's overrides
  assert bad['overrides'] == {'dsa.sparse_attention': 'masked', 'kernels.attention': 'cudnn'}
  assert bad['error'] and 'step_time_s' not in bad
  assert v['overrides'] == {'dsa.sparse_attention': 'masked'} and v['step_time_s'] > 0
  assert v['xla_options'] == {'xla_gpu_memory_limit_slop_factor': '90'}
  assert 'xla_options' not in bad
  assert v['saved_s_per_step'] == pytest.approx(r['step_time_s'] - v['step_time_s'])
  # The masked DSA form is the same math as the gather form: after 3 fp32 training steps the
  # losses agree to summation order (measured 6e-7 relative at T=64).
  assert v['finite'] and v['final_loss'] == pytest.approx(r['final_loss'], rel=1e-5)
  # --profile profiles each comparison too, from its own trace
  assert sum(v['profile']['shares'].values()) == pytest.approx(1.0)
  assert v['profile']['shares']['attention+indexer'] > 0, v['profile']['shares']
  assert 'profile' not in bad
  assert '    profile: device busy' in printed.out, printed.out   # the variant's, in the summary
  assert printed.out.count('XLA memory GB: args ') == 2, printed.out   # the main run's, v's
  p = on_disk['profile']
  assert p['below_memory_speed']          # on a CPU every data-movement op is below 3 TB/s
  assert '  below 3 TB/s (data-movement ops, time beyond it):' in printed.out, printed.out
  assert p['method'].startswith('trace'), p
  assert sum(p['shares'].values()) == pytest.approx(1.0)
  for comp in ('attention+indexer', 'moe', 'mhc', 'engram', 'optimizer', 'head+loss'):
    assert p['shares'][comp] > 0, (comp, p['shares'])
  assert p['shares']['unattributed'] < 0.2, p['shares']
  assert p['scopes_missing'] == []   # every SCOPES target still exists in v4jax
  # the step's data movement (tools/hlo_report.py): at least the entry's copies or fills
  moved = p['data_movement']
  assert moved and all(m['bytes'] >= 0 and m['ops'] > 0 for m in moved), moved
  assert {m['category'] for m in moved} <= set(bench_train.hlo_report.CATEGORIES)
  assert all(m['runs'] >= 1 and m['bytes_per_step'] == m['bytes'] * m['runs'] for m in moved)
  # with comparisons, each measurement ran in its own process (the main one too)
  assert on_disk['isolate'] == 'process' and on_disk['device']['count'] == jax.device_count()


def test_instrumentation_is_undone():
  """--profile's named scopes wrap the model's entry points only inside `instrument`: after it
  the model classes hold their own methods again."""
  from v4jax.model.mla import MLA
  own = MLA.__call__
  with bench_train.instrument() as missing:
    assert missing == [] and MLA.__call__ is not own
  assert MLA.__call__ is own and not hasattr(MLA.__call__, '__wrapped__')


def test_aot_step_compiles_with_the_variants_xla_options():
  """AotStep hands its compiler options to XLA's compile: an unknown option fails there, a
  known one compiles the same function (the step's values unchanged)."""
  f = jax.jit(lambda x: jnp.sin(x) @ x.T)
  x = jnp.asarray(np.random.RandomState(0).randn(8, 8), jnp.float32)
  want = np.sin(np.asarray(x, np.float64)) @ np.asarray(x, np.float64).T
  got = bench_train.AotStep(f, {'xla_gpu_memory_limit_slop_factor': '90'})(x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(Exception, match='xla_no_such_option'):
    bench_train.AotStep(f, {'xla_no_such_option': '1'})(x)
  assert bench_train._split_variant({'model.remat': 'full', 'xla_gpu_foo': '1'}) == (
      {'model.remat': 'full'}, {'xla_gpu_foo': '1'})
  # XLA rejects the string 'false' for a bool option; the variant's text becomes a bool.
  _, opts = bench_train._split_variant({'xla_cpu_enable_fast_math': 'false'})
  assert opts == {'xla_cpu_enable_fast_math': False}
  got = bench_train.AotStep(f, opts)(x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_overrides_and_bad_flags():
  args, ov = bench_train.parse_args(TINY + ['--steps', '4', '--config.engram.layer_ids=(0, 1)',
                                            '--config.mhc.tf32=true', '--config.optim.lr=1'])
  cfg = bench_train.bench_config(args, ov)
  assert cfg.model.n_layers == 2 and cfg.engram.layer_ids == (0, 1) and cfg.mhc.tf32 is True
  assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
  assert not cfg.checkpoint.enabled and cfg.data.source == 'synthetic'
  validate(cfg)
  with pytest.raises(ToolError, match='no such config field'):
    bench_train.bench_config(*bench_train.parse_args(TINY + ['--config.model.nope=1']))
  with pytest.raises(ToolError, match='expected a bool'):
    bench_train.bench_config(*bench_train.parse_args(TINY + ['--config.mhc.tf32=maybe']))
  with pytest.raises(ToolError, match='expected int'):
    bench_train.bench_config(*bench_train.parse_args(TINY + ['--config.model.d_model=1.5']))
  with pytest.raises(ToolError, match='unknown argument'):
    bench_train.parse_args(TINY + ['--stepz', '3'])
  with pytest.raises(ToolError, match='--ablate'):
    bench_train.parse_args(TINY + ['--ablate', 'moe'])
  args, _ = bench_train.parse_args(TINY + ['--variant', 'engram.layer_ids=(0, 1),model.remat=full',
                                           '--variant', 'dsa.sparse_attention=masked'])
  assert args.variant == [{'engram.layer_ids': '(0, 1)', 'model.remat': 'full'},
                          {'dsa.sparse_attention': 'masked'}]
  with pytest.raises(ToolError, match='--variant'):
    bench_train.parse_args(TINY + ['--variant', 'masked'])
  with pytest.raises(ToolError, match='model.n_heads'):    # checked before anything compiles
    bench_train.run(TINY + ['--variant', 'model.n_heads=0'])
  with pytest.raises(ToolError, match='no such config file'):
    bench_train.load_config('configs/nope.py')


def test_trace_attribution(tmp_path):
  """A function with two scoped parts, traced and attributed: both get time, and every kernel
  lands in the component its scope names. (No relative-timing assertion: on a shared 2-core
  CPU the two parts' measured times swapped order in one CI run.)"""
  @jax.jit
  def f(x):
    with jax.named_scope('v4_model'):
      with jax.named_scope('v4_attn'):
        a = jnp.tanh(x @ x)
      with jax.named_scope('v4_moe'):        # 3 matmuls to attn's 1: timing noise stays small
        b = (jnp.sin(a @ x) @ x) @ x
    return b.sum() + x.mean()
  x = jax.random.normal(jax.random.PRNGKey(0), (384, 384))
  hlo = f.lower(x).compile().as_text()
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      f(x).block_until_ready()
  p = bench_train.analyse_trace(str(tmp_path), hlo, steps=2, wall_s=1.0)
  s = p['shares']
  assert sum(s.values()) == pytest.approx(1.0)
  assert s['attention+indexer'] > 0 and s['moe'] > 0, s
  assert p['module'] == 'jit_f' and p['top_ops']
  g = p['top_op_groups']      # ops summed per op_name: every op lands in exactly one group
  assert sum(r['s_per_step'] for r in g) == pytest.approx(p['op_time_s_per_step'], rel=1e-6)
  assert sum(r['ops'] for r in g) >= len(g) and any('v4_moe' in r['op_name'] for r in g)
  busy = p['busy_s_per_step']     # the busy time split among the components
  assert sum(busy.values()) == pytest.approx(p['device_busy_s_per_step'], rel=1e-6)
  assert busy['moe'] > 0 and busy['attention+indexer'] > 0
  for r in g:
    if 'v4_moe' in r['op_name']:
      assert r['component'] == 'moe', r
    elif 'v4_attn' in r['op_name']:
      assert r['component'] == 'attention+indexer', r
  # bytes per step from the HLO shapes and the ops' runs: every group of a real op has some,
  # and the data-movement view ranks whole-data groups by time beyond MEMORY_SPEED
  assert all(r['bytes_per_step'] > 0 and r['gb_per_s'] > 0 for r in g), g
  slow = p['below_memory_speed']
  assert slow and [r['excess_s_per_step'] for r in slow] == sorted(
      (r['excess_s_per_step'] for r in slow), reverse=True)
  for r in slow:
    assert r['excess_s_per_step'] == pytest.approx(
        r['s_per_step'] - r['bytes_per_step'] / bench_train.MEMORY_SPEED)
    assert r['gb_per_s'] == pytest.approx(r['bytes_per_step'] / r['s_per_step'] / 1e9)
  by = p['top_op_groups_by_component']   # the same groups, per component, costliest first
  assert by['moe'] and all(r in g for r in [dict(component='moe', **x) for x in by['moe']])
  assert [x['s_per_step'] for x in by['moe']] == sorted((x['s_per_step'] for x in by['moe']),
                                                        reverse=True)


def test_self_times():
  ev = lambda s, d: (None, float(s), float(d), {})
  got = [t for _, t in bench_train._self_times([ev(0, 10), ev(2, 3), ev(6, 2), ev(20, 5)])]
  assert got == [5, 3, 2, 5]


def test_busy_split():
  """Overlapping ops share each instant; on one line the nested (innermost) event takes it;
  the parts sum to the busy time (the interval union), gaps count for nothing."""
  timed = [(0., 10., 'moe', 0), (2., 5., 'mhc', 0), (4., 8., 'host_transfer', 1),
           (12., 13., 'optimizer', 1)]
  got = bench_train._busy_split(timed)
  assert got == pytest.approx({'moe': 2 + 1.5 + 2, 'mhc': 2 + 0.5, 'host_transfer': 0.5 + 1.5,
                               'optimizer': 1.0})
  assert sum(got.values()) == pytest.approx(bench_train._union_ns([t[:2] for t in timed]))


def _peer(variant):
  path = os.path.join(ROOT, 'configs', 'peer_maxtext_small.py')
  spec = importlib.util.spec_from_file_location('_peer_cfg', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return validate(mod.get_config(variant))


def test_peer_config_matches_maxtext():
  from v4jax.model.transformer import Transformer
  c = _peer('plain')
  model = nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(params=0)))
  _, params, _ = nnx.split(model, nnx.Param, ...)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert round(n / 1e9, 3) == 0.424                                  # issue: 0.424B parameters
  assert c.moe.n_groups == 1 and c.data.source == 'synthetic' and c.data.global_batch == 8
  # MaxText's own count: TFLOP/s / tokens/s (issue table, one H200)
  assert flops.flops_per_token(c).model_train_per_token == pytest.approx(129.7e12 / 108_518,
                                                                         rel=1e-3)
  d = _peer('dsa')
  assert (d.dsa.enabled, d.dsa.stage, d.dsa.n_heads, d.dsa.head_dim, d.dsa.topk) == \
      (True, 'sparse', 16, 64, 256)
  assert flops.flops_per_token(d).model_train_per_token == pytest.approx(71.6e12 / 61_167,
                                                                         rel=2e-3)
  f = _peer('full')
  assert f.mhc.streams == 4 and f.engram.layer_ids == (1, 4) and f.engram.table_memory == 'host'
  from v4jax.model.transformer import layer_groups
  assert layer_groups(f) == [(0, 1), (1, 4), (4, 6)]    # scanned: two MoE stacks, one per Engram
  with pytest.raises(ValueError, match='variant'):
    _peer('huge')
