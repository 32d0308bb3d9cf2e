"""tools/bench_kernels.py: the --smoke run on CPU (every kernel section in Pallas interpret mode,
the opt-in attn_sweep in a run of its own, so a stale call into a kernel fails here rather than
in a GPU slot) and the DSA crossover table that the dense section ends with (computed from
synthetic rows: cuDNN needs a GPU)."""
from helpers import load_tool, run_tool_smoke


def test_bench_kernels_smoke(tmp_path):
  rep = run_tool_smoke(tmp_path, 'bench_kernels')
  # the parity checks against the XLA references pass in interpret mode
  assert rep['checks'] and all(c['ok'] for c in rep['checks']), rep['checks']
  rows = rep['results']
  assert not [x for x in rows if 'error' in x], [x for x in rows if 'error' in x]
  assert {x['section'] for x in rows} >= {'matmul', 'sweep', 'sparse', 'indexer', 'kl', 'peer'}
  assert all(x['ms'] > 0 for x in rows)


def test_bench_kernels_attn_sweep_smoke(tmp_path):
  """The opt-in attn_sweep section (kernels.attention=pallas tilings) in interpret mode: every
  candidate timed, the best Blocks per kernel kept in _DEFAULTS' form; and the opt-in attn_scan
  section (the kernels in a remat'd layer scan; the Triton form only off Hopper)."""
  rep = run_tool_smoke(tmp_path, 'bench_kernels', '--sections', 'attn_sweep,attn_scan')
  scan = [x for x in rep['results'] if x['section'] == 'attn_scan']
  assert [x['name'] for x in scan] == ['pallas_scan_fwd+bwd', 'pallas_unrolled_fwd+bwd'], scan
  assert all(x['ms_per_layer'] > 0 and x['L'] == 2 for x in scan), scan
  rows = [x for x in rep['results'] if x['section'] == 'attn_sweep']
  assert rows and all(x['ms'] > 0 for x in rows), rows
  assert {x['name'] for x in rows} == {'pallas_masked_fwd', 'pallas_masked_fwd+bwd'}
  assert all(x['bwd_ms'] > 0 for x in rows if x['name'] == 'pallas_masked_fwd+bwd'), rows
  best = rep['attn_config']['smoke']
  assert set(best) == {'fwd', 'dkv', 'dq'} and all(len(b) == 4 for b in best.values()), best
  fwd = min((x for x in rows if x['name'] == 'pallas_masked_fwd'), key=lambda x: x['ms'])
  assert best['fwd'] == fwd['fwd']


def test_crossover_compares_the_dsa_layer_with_cudnn():
  """DSA = top-k indexer + sparse MLA fwd+bwd (+ the KL teacher and student fwd+bwd where the
  kl section ran at that T) (Pallas, V3.2 shapes) against cuDNN fwd+bwd at the same T; rows of
  other shapes, impls or top-k are ignored."""
  mod = load_tool('bench_kernels')
  b = mod.Bench(smoke=True)
  k = mod.V3['K']
  rows = [  # (name, T, extra fields, ms)
      ('indexer_scores+topk', 4096, dict(impl='pallas', shapes='v3.2', K=k, radix_bits=1), 3.0),
      ('sparse_mla_fwd+bwd', 4096, dict(impl='pallas'), 40.0),
      ('cudnn_flash_fwd+bwd', 4096, {}, 20.0),
      ('indexer_scores+topk', 16384, dict(impl='pallas', shapes='v3.2', K=k, radix_bits=1), 30.0),
      ('indexer_scores+topk', 16384, dict(impl='xla_reference', shapes='v3.2', K=k), 1.0),
      ('indexer_scores+topk', 16384, dict(impl='pallas', shapes='peer', K=256, radix_bits=1), 1.0),
      ('sparse_mla_fwd+bwd', 16384, dict(impl='pallas'), 160.0),
      ('cudnn_flash_fwd+bwd', 16384, {}, 320.0),
      ('sparse_mla_fwd+bwd', 32768, dict(impl='pallas'), 320.0),    # no cuDNN row: skipped
  ]
  kl = [  # the kl section's V3.2 rows at 16384 (pallas) count; the reference's do not
      ('teacher_probs_mean', 16384, dict(impl='pallas', shapes='v3.2', K=k), 25.0),
      ('student_scores_at_fwd+bwd', 16384, dict(impl='pallas', shapes='v3.2', K=k), 15.0),
      ('student_scores_at_fwd+bwd', 16384, dict(impl='xla_reference', shapes='v3.2', K=k), 99.0),
      ('student_scores_at_fwd+bwd', 16384, dict(impl='pallas_gather_dq', shapes='v3.2', K=k),
       6.0),                       # the gather form: auto's pick at 16K, the dense form beside it
      ('teacher_probs_mean', 4096, dict(impl='pallas', shapes='bench', K=1024), 5.0),
  ]
  b.out['results'] = [dict(name=n, T=t, ms=ms, **kw) for n, t, kw, ms in rows + kl]
  b.crossover([4096, 16384, 32768])
  assert b.out['crossover'] == [
      dict(T=4096, dsa_ms=43.0, dense_cudnn_ms=20.0, dsa_faster=False, kl_included=False),
      dict(T=16384, dsa_ms=221.0, dense_cudnn_ms=320.0, dsa_faster=True, kl_included=True,
           student_dq='gather', dsa_ms_student_dq_dense=230.0)]
