"""The Mosaic-GPU masked flash attention (kernels/attention/mgpu.py, kernels.attention=pallas_mgpu).

On a Hopper GPU: values and gradients of the forward, dq and dk/dv kernels against the jnp
oracle `reference.dense_attention` (fp32 on the same bf16 inputs), at shapes with T not a
multiple of the 128-row CTA tile, qk width 192 = 3 x 64 beside value width 128, top-k sets with
-1 slots, sets larger than the causal prefix, a row attending only to itself and a row with no
key at all. Tolerances, relative to the largest magnitude of the expected array: 2e-2 for o and
the gradients (p and the gradients' operands are rounded to bf16 for the WGMMAs), lse 2e-3
absolute. jax's GPU interpreter runs neither the kernels' transposed WGMMA operands nor their
register loads in WGMMA layouts, so on the CPU these tests check what tracing shows: which
kernels run, that block remat keeps the forward's outputs, and the fallbacks and errors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.kernels.attention import causal_attention, forward_kernel_saveable, gpu, mgpu
from v4jax.kernels.attention import resolve_impl
from v4jax.kernels.attention.reference import dense_attention
from v4jax.kernels.blockwise import pack_mask
from v4jax.kernels.grouped_matmul import resolve_impl as gmm_impl

SCALE = 192 ** -0.5
ALL = ('fwd', 'dq', 'dkv')


def _hopper():
  return jax.default_backend() == 'gpu' and gmm_impl('auto', jnp.bfloat16) == 'mgpu'


def _inputs(seed, B, T, H, K, V, slots):
  rs = np.random.RandomState(seed)
  q, k = (jnp.asarray(rs.randn(B, T, H, K), jnp.bfloat16) for _ in range(2))
  v, do = (jnp.asarray(rs.randn(B, T, H, V), jnp.bfloat16) for _ in range(2))
  idx = np.full((B, T, slots), -1, np.int32)
  for b in range(B):
    for t in range(T):
      pick = rs.permutation(t + 1)[:slots - 2]      # up to slots - 2 keys: -1 slots everywhere
      idx[b, t, :len(pick)] = pick
      idx[b, t] = rs.permutation(idx[b, t])
  idx[0, T // 2] = -1
  idx[0, T // 2, 0] = T // 2                         # only itself
  idx[-1, T - 3] = -1                                # no key at all
  return q, k, v, do, jnp.asarray(idx)


def _grad_jaxpr_kernels(mosaic, seg=None, dtype=jnp.bfloat16):
  """Names of the attention kernels in the gradient's jaxpr (traced on any backend)."""
  B, T, H = 1, 128, 2
  q = jnp.ones((B, T, H, 64), dtype)
  words = pack_mask(jnp.zeros((B, T, 4), jnp.int32), T)
  f = lambda q: jnp.sum(gpu.causal_attention(q, q, q, 0.1, seg, select_words_BTW=words,
                                             mgpu=mosaic)[0].astype(jnp.float32))
  names = []

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name in ('pallas_call', 'mpmd_map'):
        n = e.params.get('name_and_src_info', e.params.get('name'))
        names.append(f'{e.primitive.name}:{getattr(n, "name", n)}')
      for p in e.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns'):
            walk(inner)
  walk(jax.make_jaxpr(jax.grad(f))(q).jaxpr)
  return sorted(names)


@pytest.mark.skipif(not _hopper(), reason='Mosaic-GPU kernels: a Hopper GPU (H100/H200) only')
@pytest.mark.parametrize('shape', [(1, 256, 2, 192, 128, 64), (2, 200, 3, 192, 128, 300),
                                   (1, 300, 1, 64, 64, 16)])
def test_values_and_gradients_match_reference_on_hopper(shape):
  B, T, H, K, V, slots = shape
  q, k, v, do, idx = _inputs(sum(shape), B, T, H, K, V, slots)
  words = pack_mask(idx, T)
  run = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: gpu.causal_attention(
      q, k, v, SCALE, select_words_BTW=words, mgpu=ALL), q, k, v))
  (o, lse), vjp = run(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  # The oracle's keyless row attends to itself instead (its o would be NaN) and gets a zero
  # cotangent: that row then adds nothing to any gradient, as the kernels' keyless row.
  idx_ref = idx.at[-1, T - 3, 0].set(T - 3)
  (want_o, want_lse), ref_vjp = jax.vjp(
      lambda q, k, v: dense_attention(q, k, v, SCALE, select_BTK=idx_ref), *f32)
  live = np.ones((B, T), bool)
  live[-1, T - 3] = False
  o, want_o = np.asarray(o, np.float64), np.asarray(want_o, np.float64)
  scale_o = np.abs(want_o[live]).max()
  assert np.abs(o[live] - want_o[live]).max() < 2e-2 * scale_o
  np.testing.assert_allclose(np.asarray(lse)[live], np.asarray(want_lse)[live], atol=2e-3)
  assert np.all(o[-1, T - 3] == 0) and np.all(np.asarray(lse)[-1, T - 3] == -np.inf)
  np.testing.assert_allclose(o[0, T // 2], np.asarray(v[0, T // 2], np.float64), atol=1e-2)
  grads = vjp((do, jnp.zeros_like(lse)))
  dof = jnp.where(jnp.asarray(live)[:, :, None, None], do.astype(jnp.float32), 0.0)
  want = ref_vjp((dof, jnp.zeros_like(want_lse)))
  for g, w in zip(grads, want):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.all(np.isfinite(g))
    assert np.abs(g - w).max() < 2e-2 * np.abs(w).max()


@pytest.mark.skipif(not _hopper(), reason='Mosaic-GPU kernels: a Hopper GPU (H100/H200) only')
def test_layer_scan_gradient_compiles_each_mosaic_kernel_once():
  """In a remat'd lax.scan over layers (the model's form, block remat keeping the forward's
  outputs) the compiled gradient holds each Mosaic kernel once: the forward in the forward loop,
  dq and dk/dv in the backward one. Without mgpu.forward's barrier XLA's dynamic-slice fusion
  cloned the forward into the stacking of its saved outputs (4 kernels, the forward run twice
  per layer)."""
  L, B, T, H, K = 2, 1, 256, 2, 64
  rs = np.random.RandomState(7)
  w = jnp.asarray(rs.randn(L, K, K) / 8, jnp.bfloat16)
  x, v = (jnp.asarray(rs.randn(B, T, H, K), jnp.bfloat16) for _ in range(2))
  words = pack_mask(jnp.asarray(rs.randint(-1, T, (B, T, 16)), jnp.int32), T)

  def layer(h, w):
    o, _ = gpu.causal_attention(jnp.einsum('bthk,kj->bthj', h, w), h, v, SCALE,
                                select_words_BTW=words, mgpu=ALL)
    return h + o, None
  step = jax.checkpoint(layer, policy=forward_kernel_saveable)
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jax.lax.scan(step, x, w)[0].astype(jnp.float32))))
  hlo = grad.lower(w, x).compile().as_text()
  assert hlo.count('custom_call_target="mosaic_gpu') == 3
  assert np.all(np.isfinite(np.asarray(grad(w, x), np.float32)))


def test_mosaic_kernels_replace_the_triton_ones_in_the_gradient():
  """mgpu names the kernels that run as Mosaic-GPU kernels; segment ids (the Mosaic kernels
  read only the words) and fp32 inputs (WGMMA takes 2-byte ones) keep all three Triton."""
  triton = ['pallas_call:masked_attention_bwd_dkv', 'pallas_call:masked_attention_bwd_dq',
            'pallas_call:masked_attention_fwd']
  assert _grad_jaxpr_kernels(()) == triton
  assert _grad_jaxpr_kernels(ALL) == ['mpmd_map:dkv_entry', 'mpmd_map:dq_entry',
                                      'mpmd_map:entry']
  assert _grad_jaxpr_kernels(('fwd', 'dq')) == ['mpmd_map:dq_entry', 'mpmd_map:entry',
                                                triton[0]]
  assert _grad_jaxpr_kernels(ALL, seg=jnp.ones((1, 128), jnp.int32)) == triton
  assert _grad_jaxpr_kernels(ALL, dtype=jnp.float32) == triton


def test_block_remat_keeps_the_mosaic_forward_outputs(capsys):
  """forward_kernel_saveable (block remat's kernel term) saves o and lse of the Mosaic forward
  by their checkpoint name, so the backward does not run the forward again."""
  B, T, H = 1, 128, 2
  q = jnp.ones((B, T, H, 64), jnp.bfloat16)
  words = pack_mask(jnp.zeros((B, T, 4), jnp.int32), T)
  f = lambda q: jnp.sum(gpu.causal_attention(q * 2, q, q, 0.1, select_words_BTW=words,
                                             mgpu=ALL)[0].astype(jnp.float32))
  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(f, policy=forward_kernel_saveable), q)
  saved = capsys.readouterr().out.splitlines()
  named = [line for line in saved if f"named '{mgpu.FWD_NAME}'" in line]
  assert len(named) == 2, saved          # o and lse


def test_seam_and_errors():
  q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
  assert resolve_impl('pallas_mgpu', q, q, masked=True) == 'pallas_mgpu'
  with pytest.raises(ValueError, match="mgpu=.*'fwd', 'dq', 'dkv'"):
    gpu.causal_attention(q, q, q, 0.1, mgpu=('bwd',))
  with pytest.raises(ValueError, match='block_kv=96 must be a multiple of 64'):
    mgpu.forward(q, q, q, pack_mask(jnp.zeros((1, 64, 1), jnp.int32), 64), 0.1, block_kv=96)
  with pytest.raises(ValueError, match='per-head k/v'):
    causal_attention(q, q[:, :, 0], q[:, :, 0], 0.1, impl='pallas_mgpu')


@pytest.mark.skipif(not _hopper(), reason='Mosaic-GPU kernels: a Hopper GPU (H100/H200) only')
@pytest.mark.parametrize('T,stages', [(200, 2), (333, 3)])
def test_dkv_stages_match_reference_on_hopper(T, stages):
  """dk/dv's two warpgroups (one accumulator each, p^T handed over through a 2-slot ring) at
  2 and 3 pipeline stages: the oracle's gradients (tolerance as above) at T not a multiple of
  the tiles, -1 slots and a row attending only to itself."""
  B, H, K, V = 2, 2, 192, 128
  q, k, v, do, idx = _inputs(T + stages, B, T, H, K, V, 40)
  idx = idx.at[-1, T - 3, 0].set(T - 3)               # every row has a key
  words = pack_mask(idx, T)
  o, lse = mgpu.forward(q, k, v, words, SCALE)
  got = mgpu.backward(q, k, v, words, o, lse, do, SCALE, kernels=('dkv',), stages=stages)[1:]
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  _, ref_vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, SCALE, select_BTK=idx), *f32)
  want = ref_vjp((do.astype(jnp.float32), jnp.zeros((B, T, H), jnp.float32)))[1:]
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.abs(g - w).max() < 2e-2 * np.abs(w).max()
