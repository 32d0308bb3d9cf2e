"""tools/bench_mhc.py --smoke runs on any backend; its Sinkhorn formulations (the Pallas kernel in
interpret mode among them) agree with the model's in values and gradients, and the streams'
mixing custom VJPs agree with autodiff of the plain forms."""
from helpers import run_tool_smoke


def test_bench_mhc_smoke(tmp_path):
  rows = run_tool_smoke(tmp_path, 'bench_mhc', '--sinkhorn_iters', '3', '--block_m', '8,16')['rows']
  names = [x['name'] for x in rows]
  assert names == ['loop', 'sinkhorn', 'pallas', 'pallas', 'unrolled_reduce', 'unrolled_adds',
                   'mixing_reference', 'mixing', 'site', 'site_pallas'], names
  assert [x['block_m'] for x in rows if x['name'] == 'pallas'] == [8, 16]
  assert all(x['ms'] > 0 for x in rows)
  # fp32, 3 iterations of the same math in different orders: agree to 1e-6 (values, gradients)
  sk = [x for x in rows if not x['name'].startswith(('site', 'mixing'))]
  assert all(x['max_abs_diff'] < 1e-6 and x['max_abs_grad_diff'] < 1e-6 for x in sk), rows
  # bf16 streams: the stream gradient within one bf16 ulp of the largest (each contribution is
  # rounded once), the fp32 coefficient gradients to fp32 sums of bf16 products
  mix = next(x for x in rows if x['name'] == 'mixing')['max_rel_grad_diff']
  assert mix[0] <= 2 ** -7 and max(mix[1:]) < 1e-3, mix
