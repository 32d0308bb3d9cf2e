"""tools/bench_mhc.py --smoke runs on any backend; its Sinkhorn formulations (the Pallas kernel in
interpret mode among them) agree with the model's in values and gradients, the streams' mixing
custom VJPs and hc_mix kernels (interpret mode) agree with autodiff of the plain forms, and each
hc_mix op's kernels with its reference."""
from helpers import run_tool_smoke


def test_bench_mhc_smoke(tmp_path):
  rows = run_tool_smoke(tmp_path, 'bench_mhc', '--sinkhorn_iters', '3', '--block_m', '8,16',
                        '--hc_bwd', '--hc_bwd_chain', '2')['rows']
  names = [x['name'] for x in rows]
  hc = [f'hc_{op}' for op in ('read_in', 'write_back', 'normed_mix', 'mix_read_in')
        for _ in range(4)]
  assert names == ['loop', 'sinkhorn', 'pallas', 'pallas', 'unrolled_reduce', 'unrolled_adds',
                   'mixing_reference', 'mixing', 'mixing_pallas', *hc, 'hc_mix_read_in_dx',
                   'hc_mix_read_in_dots', 'site', 'site_hc_pallas',
                   'site_pallas', 'site_pallas_hc_pallas'], names
  assert [x['block_m'] for x in rows if x['name'] == 'pallas'] == [8, 16]
  assert all(x['ms'] > 0 for x in rows)
  # fp32, 3 iterations of the same math in different orders: agree to 1e-6 (values, gradients)
  sk = [x for x in rows if not x['name'].startswith(('site', 'mixing', 'hc_'))]
  assert all(x['max_abs_diff'] < 1e-6 and x['max_abs_grad_diff'] < 1e-6 for x in sk), rows
  # bf16 streams: the stream gradient within one bf16 ulp of the largest (each contribution is
  # rounded once), the fp32 coefficient gradients to fp32 sums of bf16 products
  for name in ('mixing', 'mixing_pallas'):
    mix = next(x for x in rows if x['name'] == name)['max_rel_grad_diff']
    assert mix[0] <= 2 ** -7 and max(mix[1:]) < 1e-3, (name, mix)
  # hc_mix ops, pallas vs reference: bf16 outputs and stream cotangents within one ulp of the
  # largest, fp32 ones closer; 'fwd' and 'fwd+bwd' rows for each impl, tilings recorded
  ops = [x for x in rows if x['name'].startswith('hc_') and x['pass_'] != 'bwd']
  assert [(x['impl'], x['pass_']) for x in ops[:4]] == [
      ('reference', 'fwd'), ('reference', 'fwd+bwd'), ('pallas', 'fwd'), ('pallas', 'fwd+bwd')]
  assert all(x['max_rel_diff'] <= 2 ** -7 and x['gbps'] > 0 for x in ops), ops
  assert all(x['block_m'] >= 1 for x in ops if x['impl'] == 'pallas')
  # --hc_bwd: mix_read_in's backward kernels at their default tilings, capped at the smoke
  # shape's 32 tokens (dX: 128 -> 32; the dots keep the read-in's 4)
  bwd = {x['name']: x for x in rows if x['pass_'] == 'bwd'}
  assert bwd['hc_mix_read_in_dx']['block_m'] == 32 and bwd['hc_mix_read_in_dots']['block_m'] == 4
  assert all(x['gbps'] > 0 for x in bwd.values())
