"""The assembled Transformer (SPEC §8, §9): switching each component off gives exactly the
baseline, the config-only parameter count matches the model, and the golden one-step metrics of
the tiny config.

Switch-off tests build the model with and without the component, copy every shared variable by
path (the component's own parameters are the only extra ones) and compare losses for EXACT
equality: the same fp32 operations run in the same order, so not even rounding may differ.
Inputs are fresh random byte tokens; every model is small_tiny (2 layers, T = 32, so DSA runs
its sparse top-8 path) with all other components on, except MTP where it is not the subject (and
mHC and Engram in the gradient test): fewer blocks keep the compile time, which dominates this
file, near 40 s of CPU.
"""
import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import load_preset, small_tiny
from v4jax.config import validate
from v4jax.data.engram_hash import hash_rows, make_hash_spec
from v4jax.flops import param_counts
from v4jax.model.layers import KEPT_MATMUL
from v4jax.model.moe import MoE
from v4jax.model.transformer import Block, BlockInputs, Transformer
from v4jax.trainer import Trainer, engram_setup

B, T = 2, 32


def _model(cfg, seed=0):
  cfg = validate(cfg)
  _, rows = engram_setup(cfg, None)
  return Transformer(cfg, rngs=nnx.Rngs(params=seed), engram_rows_per_layer=rows)


def _batch(cfg, seed):
  """Random byte tokens, next-token targets, full loss mask, Engram rows for every listed layer
  (hashed from the tokens whether or not the model uses them)."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, 256, (B, T + 1), dtype=np.int32)
  batch = {'tokens': toks[:, :T], 'targets': toks[:, 1:],
           'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
           'segment_ids': np.ones((B, T), np.int32), 'loss_mask': np.ones((B, T), np.float32)}
  c = cfg.copy_and_resolve_references()
  c.engram.enabled = True
  for lid, r in hash_rows(make_hash_spec(c), batch['tokens']).items():
    batch[f'engram_rows_{lid}'] = r
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _flat(model):
  return {'.'.join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}


def _copy_shared(src, dst, extra_in_dst=(), extra_in_src=()):
  """dst's variables := src's at the same path. Paths only one side has must contain one of the
  named path parts (the switched component), so nothing else is silently left uncopied."""
  s, d = _flat(src), _flat(dst)
  for only, parts, who in ((set(d) - set(s), extra_in_dst, 'dst'),
                           (set(s) - set(d), extra_in_src, 'src')):
    stray = [p for p in only if not any(part in p.split('.') for part in parts)]
    assert not stray, f'variables only in {who}: {sorted(stray)[:5]}'
  for path in set(s) & set(d):
    assert s[path].shape == d[path].shape, path
    d[path].set_value(s[path].get_value())
  return set(d) - set(s)


def _loss_fn(model, batch, mtp_weight=0.3):
  """jitted (total, metrics), grads over the model's Params."""
  gdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(p):
    return nnx.merge(gdef, p, rest)(batch, mtp_weight)
  return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


def _forward(model, batch, mtp_weight=0.3):
  """Metrics of the jitted forward pass."""
  gdef, state = nnx.split(model)
  return jax.jit(lambda st: nnx.merge(gdef, st)(batch, mtp_weight)[1])(state)


def _grads(g):
  return {'.'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}


def _eq(a, b):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dsa_dense_stage_is_the_baseline():
  """dsa.enabled with stage='dense' builds an indexer that never runs: every loss equals dsa
  off exactly and the indexer loss is 0."""
  base_cfg = small_tiny(**{'dsa.enabled': False, 'dsa.stage': 'dense', 'mtp.depth': 0})
  base = _model(base_cfg)
  dsa = _model(small_tiny(**{'dsa.stage': 'dense', 'mtp.depth': 0}), seed=1)
  extra = _copy_shared(base, dsa, extra_in_dst=('indexer',))
  assert extra and all('indexer' in p for p in extra)
  batch = _batch(base_cfg, 0)
  m0, m1 = _forward(base, batch), _forward(dsa, batch)
  for k in ('loss', 'bal_loss', 'indexer_loss'):
    _eq(m1[k], m0[k])
  _eq(m1['indexer_loss'], 0.0)


def test_dsa_indexer_at_t_le_k_leaves_main_model_unchanged():
  """Sparse stage at T <= K: attention stays dense but the indexer runs for its KL loss. The LM
  loss equals the baseline's exactly, and the main parameters' gradients of the TOTAL loss (KL
  included) equal the baseline's: the indexer's inputs and teacher are detached (SPEC §3)."""
  off = {'mtp.depth': 0, 'mhc.streams': 1, 'engram.enabled': False}   # compile time
  base_cfg = small_tiny(**{'dsa.enabled': False, 'dsa.stage': 'dense', **off})
  base = _model(base_cfg)
  dsa = _model(small_tiny(**{'dsa.topk': T, **off}), seed=1)
  extra = _copy_shared(base, dsa, extra_in_dst=('indexer',))
  batch = _batch(base_cfg, 1)
  (_, m0), g0 = _loss_fn(base, batch)
  (l1, m1), g1 = _loss_fn(dsa, batch)
  _eq(m1['loss'], m0['loss'])
  assert float(m1['indexer_loss']) > 0     # the KL is on, and differentiable ...
  g0, g1 = _grads(g0), _grads(g1)
  assert any(np.abs(g1[p]).max() > 0 for p in extra if p in g1)   # ... into the indexer only
  for path, g in g0.items():
    _eq(g1[path], g)


def test_engram_with_zero_value_projection_is_the_baseline():
  """Engram's output is gate * v + SiLU(conv(norm(gate * v))); with the value projection (kernel
  and bias) zero, v = 0 and the block input passes unchanged, whatever the table, keys and conv
  kernel hold (all random here, the conv included)."""
  base_cfg = small_tiny(**{'engram.enabled': False, 'mtp.depth': 0})
  base = _model(base_cfg)
  eng = _model(small_tiny(**{'mtp.depth': 0}), seed=1)
  extra = _copy_shared(base, eng, extra_in_dst=('engram',))
  rng = np.random.default_rng(7)
  flat = _flat(eng)
  for path in extra:
    v = flat[path]
    if 'value_proj' in path:
      v.set_value(jnp.zeros(v.shape, v.get_value().dtype))
    elif path.split('.')[-1] != 'scale':
      v.set_value(jnp.asarray(rng.normal(0, 0.3, v.shape), jnp.float32))
  assert np.abs(np.asarray(flat['engram.1.conv.kernel'])).min() > 0
  batch = _batch(base_cfg, 2)
  m0, m1 = _forward(base, batch), _forward(eng, batch)
  for k in ('loss', 'bal_loss', 'indexer_loss'):
    _eq(m1[k], m0[k])


@pytest.mark.parametrize('layer', [0, 1])     # dense FFN block, MoE block
def test_single_stream_block_is_plain_pre_norm_residual(layer):
  """mhc.streams = 1: Block == x + attn(attn_norm(x)), then h + ffn(ffn_norm(h)), computed here
  from the block's own submodules (SPEC §8); both sides jitted, compared exactly."""
  cfg = validate(small_tiny(**{'mhc.streams': 1, 'engram.enabled': False}))
  blk = Block(cfg, layer, rngs=nnx.Rngs(params=3))
  assert not hasattr(blk, 'hc_attn') and not hasattr(blk, 'hc_ffn')
  rng = np.random.default_rng(10 + layer)
  x = jnp.asarray(rng.normal(0, 1, (B, T, cfg.model.d_model)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid = jnp.ones((B, T), bool)

  def by_block(x):
    return blk(x[:, :, None], BlockInputs(pos, None, valid))[0][:, :, 0]

  def by_hand(x):
    h = x + blk.attn(blk.attn_norm(x), pos, None, valid)[0]
    u = blk.ffn_norm(h)
    return h + (blk.ffn(u, valid)[0] if isinstance(blk.ffn, MoE) else blk.ffn(u))

  _eq(jax.jit(by_block)(x), jax.jit(by_hand)(x))


def test_mtp_depth_one_lm_loss_is_depth_zero_loss():
  """The MTP module reads the trunk's final streams but feeds nothing back: the 'loss' metric
  (LM part) of depth 1 equals depth 0's for the same trunk parameters."""
  cfg1 = small_tiny()
  mtp = _model(cfg1)
  plain = _model(small_tiny(**{'mtp.depth': 0}), seed=1)
  _copy_shared(mtp, plain, extra_in_src=('mtp',))
  batch = _batch(cfg1, 3)
  m1, m0 = _forward(mtp, batch), _forward(plain, batch)
  _eq(m1['loss'], m0['loss'])
  assert float(m1['mtp_loss']) > 0 and float(m0['mtp_loss']) == 0.0


@pytest.mark.parametrize('name', ['tiny', 'ablations/baseline', 'ablations/dsa', 'ablations/mhc',
                                  'ablations/engram', 'ablations/full'])
def test_param_counts_match_model(name):
  """v4jax.flops.param_counts (config only) == the Params of the built model; the Engram
  ablation is iso-parameter with the baseline (within 0.1%)."""
  cfg = load_preset(name)
  model = nnx.eval_shape(lambda: _model(cfg))
  flat = _flat(model)
  n = sum(math.prod(v.shape) for p, v in flat.items() if isinstance(v, nnx.Param))
  pc = param_counts(cfg)
  assert pc.total == n
  tables = sum(math.prod(v.shape) for p, v in flat.items() if 'table' in p.split('.'))
  assert pc.engram_tables == tables
  if name == 'ablations/engram':
    base = param_counts(load_preset('ablations/baseline')).total
    assert abs(pc.total - base) <= 1e-3 * base


def test_tiny_golden_one_step_and_loss_falls(tmp_path):
  """Tiny config (all components on): at init the LM and MTP losses are ln V (sigma0 = 0.006
  makes logits ~N(0, 0.05^2), so loss = ln V + O(1e-3); tolerance 0.05), the auxiliary losses
  are small, the step is finite; 5 more steps on the same batch lower the loss."""
  cfg = small_tiny(**{'checkpoint.enabled': False, 'optim.schedule': 'constant',
                      'optim.warmup_steps': 0})
  tr = Trainer(cfg, str(tmp_path), devices=jax.devices()[:1])
  batch = next(tr.train_iter)
  s = jax.device_get(tr.step(batch))
  ln_v = math.log(cfg.model.vocab_size)
  assert abs(float(s['loss']) - ln_v) < 0.05, (float(s['loss']), ln_v)
  assert abs(float(s['mtp_loss']) - ln_v) < 0.05, (float(s['mtp_loss']), ln_v)
  # Balance loss: alpha * E * sum_i f_i P_i with f, P near uniform -> about alpha per MoE layer
  # (1 main + 1 MTP here); the indexer KL of an untrained indexer is small but positive.
  assert 0 < float(s['bal_loss']) < 10 * cfg.moe.bal_loss_alpha * 2
  assert 0 < float(s['indexer_loss']) < 1.0
  assert bool(s['finite']) and int(s['skipped']) == 0
  assert 0 < float(s['grad_norm']) < 100 and float(s['indexer_grad_norm']) > 0
  losses = [float(s['loss'])] + [float(tr.step(batch)['loss']) for _ in range(5)]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.1, losses


def _saved_residuals(cfg, capsys):
  """(the model's loss on a 2-row batch as a function of its params, the params, jax's report of
  the residuals its gradient saves)."""
  model = _model(cfg)
  batch = _batch(cfg, 2)
  gdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p: nnx.merge(gdef, p, rest)(batch, 0.0)[0]
  jax.ad_checkpoint.print_saved_residuals(loss, params)
  return loss, params, capsys.readouterr().out


@pytest.mark.parametrize('sparse_attention', ['gather', 'masked'])
def test_block_remat_keeps_the_dsa_tensors(capsys, sparse_attention):
  """model.remat='block' saves the sparse stage's top-k set, KL teacher and student (one [B,T,K]
  each per layer) instead of recomputing the indexer, the teacher and (masked form) the sparse
  attention forward behind its lse in the backward; 'full' saves none of them. The top-k set is
  kept in int16 (T < 2^15), no int32 copy beside it. Saved residuals as jax reports them."""
  off = {'mtp.depth': 0, 'mhc.streams': 1, 'engram.enabled': False,
         'dsa.sparse_attention': sparse_attention}
  names = ('indexer_topk', 'dsa_teacher', 'dsa_student')
  for remat, kept in (('block', names), ('full', ())):
    cfg = small_tiny(**{'model.remat': remat, **off})
    _, _, out = _saved_residuals(cfg, capsys)
    for n in names:
      saved = out.count(f"named '{n}'")
      assert saved == (cfg.model.n_layers if n in kept else 0), (remat, n, out)
    topk = [ln for ln in out.splitlines() if "named 'indexer_topk'" in ln]
    assert all(ln.startswith('i16[') for ln in topk), topk


def test_remat_save_keeps_the_moe_rows_and_gemm_outputs(capsys):
  """model.remat_save=('moe_dispatch', 'moe_gemms') keeps, per MoE layer, the rows sorted by
  expert and the gate and up grouped-GEMM outputs (not dots, so block remat would rerun them in
  the backward); without it none are saved. The down projection's output is never needed: the
  gates scale its input rows. Saved residuals as jax reports them, and the grouped matmuls in the
  gradient's jaxpr per MoE layer: 3 forward + 6 backward (dx, dw), plus 2 in the remat forward
  when nothing is kept. With mHC's streams on, its write-back differentiates its post
  coefficients against the MoE output, which block remat keeps ('moe_out') for that reason."""
  off = {'mtp.depth': 0, 'mhc.streams': 4, 'engram.enabled': False}
  runs = {}
  for save in ((), ('moe_dispatch', 'moe_gemms')):
    cfg = small_tiny(**{'model.remat': 'block', 'model.remat_save': save, **off})
    n_moe = cfg.model.n_layers - cfg.model.n_dense_layers
    loss, params, out = _saved_residuals(cfg, capsys)
    counts = {n: out.count(f"named '{n}'") for n in ('moe_dispatch', 'moe_gemms')}
    assert counts == ({'moe_dispatch': n_moe, 'moe_gemms': 2 * n_moe} if save else
                      {'moe_dispatch': 0, 'moe_gemms': 0}), (save, counts)
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    runs[save] = text.count('ragged_dot_general')
  assert n_moe > 0 and runs == {(): 11 * n_moe, ('moe_dispatch', 'moe_gemms'): 9 * n_moe}, runs


def test_block_remat_keeps_the_moe_routing(capsys):
  """Block remat keeps the MoE's routing by default (name 'moe_route': the selected experts, the
  slots' expert order, its inverse, the group sizes and the balance loss's counts, all a few
  bytes per token-slot) and its output ('moe_out', [B,T,D]), so the gradient reruns no top-k
  and no sort of the forward; 'full' keeps none and reruns them. Counted in the jaxprs of the
  loss and of its gradient."""
  off = {'mtp.depth': 0, 'mhc.streams': 4, 'engram.enabled': False, 'dsa.enabled': False,
         'dsa.stage': 'dense'}
  for remat in ('block', 'full'):
    cfg = small_tiny(**{'model.remat': remat, **off})
    n_moe = cfg.model.n_layers - cfg.model.n_dense_layers
    loss, params, out = _saved_residuals(cfg, capsys)
    saved = {n: out.count(f"named '{n}'") for n in ('moe_route', 'moe_out')}
    assert saved == ({'moe_route': 5 * n_moe, 'moe_out': n_moe} if remat == 'block' else
                     {'moe_route': 0, 'moe_out': 0}), (remat, saved)
    fwd, grad = (str(jax.make_jaxpr(f)(params)) for f in (loss, jax.grad(loss)))
    for op in ('top_k', 'sort'):
      n_f, n_g = (len(re.findall(rf'\b{op}\[', t)) for t in (fwd, grad))
      assert n_f >= n_moe and n_g == (n_f if remat == 'block' else 2 * n_f), (remat, op, n_f, n_g)


def test_remat_recompute_leaves_the_named_matmuls_to_the_backward(capsys):
  """model.remat_recompute=('mla_up', 'indexer_q', 'ffn_in'): block remat no longer keeps MLA's
  up-projected q and k/v, the indexer's queries (one of each per layer), or the FFNs' gate and up
  outputs (two per layer: the dense layer's and the shared experts'); nothing else changes, and
  the gradient's jaxpr runs those matmuls again (as unit-batch dots). Saved residuals as jax
  reports them. (That the loss and gradients stay the default's is checked on the 8-device mesh
  against one device: tests/parallel/test_parity.py, fsdp_tp.)"""
  off = {'mtp.depth': 0, 'mhc.streams': 4, 'engram.enabled': False,
         'dsa.sparse_attention': 'masked', 'model.remat': 'block'}
  names = ('mla_up', 'indexer_q', 'ffn_in')
  runs = {}
  for rec in ((), names):
    cfg = small_tiny(**{'model.remat_recompute': rec, **off})
    loss, params, out = _saved_residuals(cfg, capsys)
    dots = collections.Counter(ln.split()[0] for ln in out.splitlines()
                               if 'output of dot_general' in ln)
    runs[rec] = (dots, str(jax.make_jaxpr(jax.grad(loss))(params)).count('([0], [0]))'))
  m, e, d = cfg.model, cfg.moe, cfg.dsa
  per_layer = [f'f32[{B},{T},{m.n_heads},{m.qk_nope_dim + m.qk_rope_dim}]',
               f'f32[{B},{T},{m.n_heads},{m.qk_nope_dim + m.v_head_dim}]',
               f'f32[{B},{T},{d.n_heads},{d.head_dim}]']
  dense, moe = m.n_dense_layers, m.n_layers - m.n_dense_layers
  removed = collections.Counter({s: m.n_layers for s in per_layer})
  removed[f'f32[{B},{T},{m.d_ff}]'] += 2 * dense
  removed[f'f32[{B},{T},{e.num_shared * e.d_expert}]'] += 2 * moe
  (d0, b0), (d1, b1) = runs[()], runs[names]
  assert dense > 0 and moe > 0 and d0 - d1 == removed and not d1 - d0, (d0, d1)
  assert b1 >= b0 + sum(removed.values()), (b0, b1)


def test_remat_dot_barrier_keeps_the_same_matmuls_by_name(capsys):
  """model.remat_dot_barrier: block remat keeps the same weight-matmul outputs, one for one, now
  by the name KEPT_MATMUL after an optimization barrier instead of as dots (products with batch
  dimensions, which it never keeps, stay as they are), in a layer scan; with mHC its coefficient
  GEMMs too, whose custom-VJP forward jax traces outside the block. The only dots still kept are
  outside the blocks: the LM head's and the HyperHead's normed mix. Saved residuals as jax
  reports them; the values are layers.matmul's test (tests/model/test_layers.py)."""
  streams = 4
  off = {'mtp.depth': 0, 'engram.enabled': False, 'mhc.streams': streams, 'model.remat': 'block',
         'model.scan_layers': True, 'model.n_layers': 3, 'kernels.hc_mix': 'reference'}
  runs = {}
  for barrier in (False, True):
    cfg = small_tiny(**{'model.remat_dot_barrier': barrier, **off})
    _, _, out = _saved_residuals(cfg, capsys)
    lines = out.splitlines()
    runs[barrier] = [collections.Counter(ln.split()[0] for ln in lines if key in ln)
                     for key in ('output of dot_general', f"named '{KEPT_MATMUL}'")]
  (d0, n0), (d1, n1) = runs[False], runs[True]
  assert not n0 and n1 and d0 - d1 == n1 and not d1 - d0, (d0, d1, n1)
  T, V = cfg.data.seq_len, cfg.model.vocab_size
  outside = {f'f32[2,{T},{V}]': 1, f'f32[{2 * T},{streams}]': 1}
  assert d1 == outside, (d1, outside)


def test_remat_save_keeps_the_mhc_coefficients(capsys):
  """model.remat_save=('mhc_coeffs',) keeps each mHC site's post and comb (two sites per block;
  pre is internal to the fused normed mix and read-in): the gradient then no longer reruns the
  Sinkhorn iterations of the forward."""
  off = {'mtp.depth': 0, 'engram.enabled': False, 'dsa.enabled': False, 'dsa.stage': 'dense'}
  sinkhorns = {}
  for save in ((), ('mhc_coeffs',)):
    cfg = small_tiny(**{'model.remat': 'block', 'model.remat_save': save,
                        'kernels.sinkhorn': 'reference', **off})
    assert cfg.mhc.streams > 1
    loss, params, out = _saved_residuals(cfg, capsys)
    saved = out.count("named 'mhc_coeffs'")
    assert saved == (2 * 2 * cfg.model.n_layers if save else 0), (save, saved)
    # the reference Sinkhorn's iterations: a fori_loop, a scan of length iters - 1 in the jaxpr
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    sinkhorns[save] = len(re.findall(rf'length={cfg.mhc.sinkhorn_iters - 1}\b', text))
  # per site: forward, remat forward, and the custom VJP's recompute + transpose; kept: no remat
  sites = 2 * cfg.model.n_layers
  assert sinkhorns == {(): 4 * sites, ('mhc_coeffs',): 3 * sites}, sinkhorns
