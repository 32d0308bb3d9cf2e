"""tools/hlo_report.py: the data-movement ops of an HLO module and their bytes.

Oracle: a hand-written after-optimizations module whose every instruction's category and bytes
are known (shapes chosen so each count is distinct), then a real dump of a scanned function on
this CPU (jax's zero fill of the scan's stacked output must be found in the entry)."""
import json
import os
import subprocess
import sys
import textwrap

from helpers import load_tool

hlo_report = load_tool('hlo_report')
main, report, shape_bytes = hlo_report.main, hlo_report.report, hlo_report.shape_bytes

MODULE = textwrap.dedent('''\
    HloModule jit__step, entry_computation_layout={(f32[4,8]{1,0})->f32[4,8]{1,0}}

    %fused_broadcast.1 () -> bf16[3,5,7] {
      %constant_1 = bf16[] constant(0)
      ROOT %broadcast.2 = bf16[3,5,7]{2,1,0} broadcast(%constant_1), dimensions={}
    }

    %fused_dus.3 (param_0.1: f32[6,4,8], param_1.2: f32[1,4,8], param_2.3: s32[]) -> f32[6,4,8] {
      %param_0.1 = f32[6,4,8]{2,1,0} parameter(0)
      %param_1.2 = f32[1,4,8]{2,1,0} parameter(1)
      %param_2.3 = s32[] parameter(2)
      %constant_4 = s32[] constant(0)
      ROOT %dynamic-update-slice.5 = f32[6,4,8]{2,1,0} dynamic-update-slice(%param_0.1, %param_1.2, %param_2.3, %constant_4, %constant_4)
    }

    %fused_ds.6 (param_0.7: bf16[6,16,2], param_1.8: s32[]) -> bf16[1,16,2] {
      %param_0.7 = bf16[6,16,2]{2,1,0} parameter(0)
      %param_1.8 = s32[] parameter(1)
      %constant_9 = s32[] constant(0)
      ROOT %dynamic-slice.10 = bf16[1,16,2]{2,1,0} dynamic-slice(%param_0.7, %param_1.8, %constant_9, %constant_9), dynamic_slice_sizes={1,16,2}
    }

    %fused_ds.34 (param_0.36: bf16[6,16,2], param_1.37: s32[]) -> bf16[1,16,2] {
      %param_0.36 = bf16[6,16,2]{2,1,0} parameter(0)
      %param_1.37 = s32[] parameter(1)
      %constant_38 = s32[] constant(0)
      ROOT %dynamic-slice.39 = bf16[1,16,2]{2,1,0} dynamic-slice(%param_0.36, %param_1.37, %constant_38, %constant_38), dynamic_slice_sizes={1,16,2}
    }

    %fused_add.11 (param_0.12: f32[4,8]) -> f32[4,8] {
      %param_0.12 = f32[4,8]{1,0} parameter(0)
      ROOT %add.13 = f32[4,8]{1,0} add(%param_0.12, %param_0.12)
    }

    %body.14 (arg.15: (s32[], f32[6,4,8], bf16[6,16,2])) -> (s32[], f32[6,4,8], bf16[6,16,2]) {
      %arg.15 = (s32[], f32[6,4,8]{2,1,0}, bf16[6,16,2]{2,1,0}) parameter(0)
      %i.16 = s32[] get-tuple-element(%arg.15), index=0
      %buf.17 = f32[6,4,8]{2,1,0} get-tuple-element(%arg.15), index=1
      %xs.18 = bf16[6,16,2]{2,1,0} get-tuple-element(%arg.15), index=2
      %loop_dynamic_slice_fusion.19 = bf16[1,16,2]{2,1,0} fusion(%xs.18, %i.16), kind=kLoop, calls=%fused_ds.6, metadata={op_name="jit(_step)/while/body/dynamic_slice"}
      %upd.20 = f32[1,4,8]{2,1,0} parameter(1)
      %loop_dynamic_update_slice_fusion.21 = f32[6,4,8]{2,1,0} fusion(%buf.17, %upd.20, %i.16), kind=kLoop, calls=%fused_dus.3
      %copy.22 = bf16[9,9]{1,0} copy(%xs.18)
      %fusion-start.33 = ((bf16[6,16,2]{2,1,0}, s32[]), bf16[1,16,2]{2,1,0}, u32[]) fusion-start(%xs.18, %i.16), kind=kLoop, calls=%fused_ds.34
      %fusion-done.35 = bf16[1,16,2]{2,1,0} fusion-done(%fusion-start.33)
      ROOT %tuple.23 = (s32[], f32[6,4,8]{2,1,0}, bf16[6,16,2]{2,1,0}) tuple(%i.16, %loop_dynamic_update_slice_fusion.21, %xs.18)
    }

    ENTRY %main.24 (x.25: f32[4,8]) -> f32[4,8] {
      %x.25 = f32[4,8]{1,0} parameter(0)
      %loop_broadcast_fusion.26 = bf16[3,5,7]{2,1,0} fusion(), kind=kLoop, calls=%fused_broadcast.1, metadata={op_name="jit(_step)/broadcast_in_dim"}
      %empty.27 = f32[6,4,8]{2,1,0} custom-call(), custom_call_target="AllocateBuffer"
      %transpose.28 = f32[8,4]{0,1} transpose(%x.25), dimensions={1,0}
      %loop_add_fusion.29 = f32[4,8]{1,0} fusion(%x.25), kind=kLoop, calls=%fused_add.11
      %loop.40 = (s32[], f32[6,4,8]{2,1,0}, bf16[6,16,2]{2,1,0}) while(%init.41), condition=%cond.42, body=%body.14, backend_config={"known_trip_count":{"n":"6"}}
      %constant_30 = f32[] constant(1)
      %broadcast.31 = f32[2,2]{1,0} broadcast(%constant_30), dimensions={}
      ROOT %copy.32 = f32[4,8]{1,0} copy(%loop_add_fusion.29)
    }
    ''')


def test_shape_bytes():
  assert shape_bytes('bf16[3,5,7]{2,1,0}') == 210
  assert shape_bytes('(s32[], f32[6,4,8]{2,1,0}, pred[3])') == 4 + 768 + 3
  assert shape_bytes('f32[]') == 4


def test_every_category_and_its_bytes():
  got = {(r.category, r.computation, r.name, r.bytes) for r in report(MODULE)}
  assert {r.runs for r in report(MODULE) if r.computation == 'body.14'} == {6}   # trip count
  assert {r.runs for r in report(MODULE) if r.computation == 'main.24'} == {1}
  assert got == {
      ('fill', 'main.24', 'loop_broadcast_fusion.26', 3 * 5 * 7 * 2),
      ('fill', 'main.24', 'broadcast.31', 2 * 2 * 4),
      ('uninitialised', 'main.24', 'empty.27', 0),
      ('transpose', 'main.24', 'transpose.28', 8 * 4 * 4),
      ('copy', 'main.24', 'copy.32', 4 * 8 * 4),
      ('dynamic-slice', 'body.14', 'loop_dynamic_slice_fusion.19', 16 * 2 * 2),
      ('dynamic-update-slice', 'body.14', 'loop_dynamic_update_slice_fusion.21', 4 * 8 * 4),
      ('copy', 'body.14', 'copy.22', 9 * 9 * 2),
      ('dynamic-slice', 'body.14', 'fusion-done.35', 16 * 2 * 2),    # async: once, at its done
  }                                  # the add fusion and the fused computations are not listed
  assert {r.category for r in report(MODULE)} == set(hlo_report.CATEGORIES)
  assert [r.bytes for r in report(MODULE)] == sorted((r.bytes for r in report(MODULE)),
                                                      reverse=True)
  sums = {(t['category'], t['computation']): t for t in hlo_report.totals(report(MODULE))}
  assert sums[('dynamic-slice', 'body.14')]['ops'] == 2
  assert sums[('dynamic-slice', 'body.14')]['bytes_per_step'] == 6 * 2 * 16 * 2 * 2
  assert sums[('fill', 'main.24')]['bytes_per_step'] == 3 * 5 * 7 * 2 + 2 * 2 * 4
  assert hlo_report.per_step(list(sums.values()))['copy'] == 6 * 9 * 9 * 2 + 4 * 8 * 4


def test_cli_on_a_real_cpu_dump(tmp_path):
  """A scanned function dumped on this CPU: jax's zero fill of the stacked output (f32[6,4,8],
  768 bytes) appears as a fill, and the JSON report is written."""
  dump = tmp_path / 'dump'
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp
      def f(x, w):
        def body(c, w_l):
          c = jnp.tanh(c * w_l)
          return c, c
        return jax.lax.scan(body, x, w)[1]
      jax.jit(f)(jnp.ones((4, 8)), jnp.full((6, 4, 8), 0.5)).block_until_ready()
      ''')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_dump_to={dump} --xla_dump_hlo_as_text')
  subprocess.run([sys.executable, '-c', code], check=True, env=env, timeout=120)
  out = tmp_path / 'r.json'
  rep = main([str(dump), '--module', 'jit_f', '--out', str(out)])
  assert json.loads(out.read_text())['file'] == rep['file']
  fills = [t for t in rep['totals'] if t['category'] == 'fill']
  assert any(t['bytes'] >= 6 * 4 * 8 * 4 for t in fills), rep['totals']


def test_instruction_bytes():
  """What each unfused instruction reads and writes: its result plus its array operands (a
  tuple passed whole counts nothing; `%t#k` its element k); fused computations are not listed."""
  got = hlo_report.instruction_bytes(MODULE)
  assert got['loop_add_fusion.29'] == ('fusion', 'kLoop', 2 * 4 * 8 * 4)
  assert got['transpose.28'] == ('transpose', '', 2 * 8 * 4 * 4)
  assert got['loop_dynamic_slice_fusion.19'].bytes == 16 * 2 * 2 + 6 * 16 * 2 * 2 + 4
  assert got['i.16'].bytes == 4                      # get-tuple-element of a tuple: the result
  assert 'add.13' not in got and 'dynamic-slice.10' not in got
  elements = textwrap.dedent('''\
      HloModule m

      %fused_r (a: f32[4,8], b: bf16[16]) -> f32[4] {
        %a = f32[4,8]{1,0} parameter(0)
        %b = bf16[16]{0} parameter(1)
        %c = f32[] constant(0)
        ROOT %r = f32[4]{0} reduce(%a, %c), dimensions={1}, to_apply=%add
      }

      ENTRY %main (p: (f32[4,8], bf16[16])) -> f32[4] {
        %p = (f32[4,8]{1,0}, /*index=1*/bf16[16]{0}) parameter(0)
        ROOT %input_reduce_fusion.1 = f32[4]{0} fusion(%p#0, %p#1), kind=kInput, calls=%fused_r
      }
      ''')
  got = hlo_report.instruction_bytes(elements)
  assert got['input_reduce_fusion.1'] == ('fusion', 'kInput', 4 * 4 + 4 * 8 * 4 + 16 * 2)
  assert got['p'].bytes == 4 * 8 * 4 + 16 * 2 and 'r' not in got
