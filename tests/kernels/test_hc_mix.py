"""hc_mix seam: the Triton kernels (interpret mode) against plain jnp autodiff oracles.

Oracles: `read_in_reference` / `write_back_reference` (plain jnp, autodiff), a plain normed mix
(x fn at HIGHEST precision times rsqrt(mean(x^2) + eps), autodiff) and from it a plain
mix_read_in (the SPEC's sigmoid gate, then the read-in in fp32), on fresh random inputs.
Shapes leave a partial token block and a partial feature chunk (22 tokens in blocks of 8, D = 40
in chunks of 16), or only the latter, tile exactly, and take N = 3 (C = 15 padded to 16) as well
as N = 4.

Tolerances, as a fraction of the oracle's largest magnitude: fp32 results 1e-5 (the same fp32
math summed in another order); bf16 results 2^-7 (both round an fp32 value once to bf16: one
ulp). The normed mix's products are exact for bf16 streams (fn split in three bf16 parts), so mu
and dfn meet the fp32 oracle at 1e-5 too; dx is bf16 (2^-7). A transposed comb, a dropped
stream, an unmasked tail chunk (interpret mode fills what lies past an array with NaN) or a
two-part fn split in the forward (~1e-4 off) each fail these bounds. The interpret-mode tests of
the normed mix run on CPU only: on a GPU, interpret mode compiles the kernel body with XLA:GPU,
which drops the fp32 -> bf16 -> fp32 round trips of the kernel's fn split (excess precision
allowed), so mu came out ~2^-9 off there; the compiled-kernel tests at the end cover the GPU.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from v4jax.kernels import hc_mix
from v4jax.kernels.hc_mix import gpu
from v4jax.parallel import rules

EPS = 1e-6
# (B, T, N, D, block_m, block_d): tails in tokens and features; whole blocks; N = 3. (A tail in
# features alone was a fourth case: the first case's feature tail covers it, -11 s of CI.)
CASES = [(2, 11, 4, 40, 8, 16), (2, 8, 4, 32, 8, 16), (1, 7, 3, 24, 4, 16)]
MIX_CASES = [(2, 11, 4, 40, 16, 32), (1, 9, 3, 24, 16, 16)]   # K = 160 / 72: partial chunks


_CPU_INTERPRET = pytest.mark.skipif(
    jax.default_backend() == 'gpu', reason='interpret mode on a GPU compiles the kernel body with '
    'XLA:GPU, which drops the fn split\'s bf16 round trips; the compiled tests cover the GPU')


def _close(got, want, tol):
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def _tol(dtype):
  return 2.0 ** -7 if dtype == jnp.bfloat16 else 1e-5


def _inputs(B, T, N, D, dtype, seed):
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return dict(X=jnp.asarray(rng.normal(size=(B, T, N, D)), dtype),
              y=jnp.asarray(rng.normal(size=(B, T, D)), dtype),
              pre=f32(rng.uniform(0.1, 1.0, (B, T, N))),
              post=f32(rng.uniform(0.1, 2.0, (B, T, N))),
              comb=f32(rng.dirichlet(np.ones(N), size=(B, T, N))),
              gu=jnp.asarray(rng.normal(size=(B, T, D)), dtype),
              gX=jnp.asarray(rng.normal(size=(B, T, N, D)), dtype))


def _check_vjp(fn, oracle, args, g, tol):
  """Values and every input's cotangent of fn against the oracle's; dtypes match."""
  got, got_vjp = jax.vjp(fn, *args)
  want, want_vjp = jax.vjp(oracle, *args)
  assert got.dtype == want.dtype
  _close(got, want, tol)
  for a, b in zip(got_vjp(g), want_vjp(g)):
    assert a.dtype == b.dtype
    _close(a, b, _tol(a.dtype) if a.dtype == jnp.bfloat16 else tol)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32], ids=['bf16', 'f32'])
@pytest.mark.parametrize('B,T,N,D,bm,bd', CASES)
def test_read_in_and_write_back_match_autodiff_oracles(B, T, N, D, bm, bd, dtype):
  v = _inputs(B, T, N, D, dtype, seed=B * 100 + T + N)
  blocks = dict(block_m=bm, block_d=bd)
  tol = _tol(dtype)
  _check_vjp(jax.jit(lambda X, p: gpu.read_in(X, p, blocks=blocks, interpret=True)),
             hc_mix.read_in_reference, (v['X'], v['pre']), v['gu'], tol)
  _check_vjp(jax.jit(lambda *a: gpu.write_back(*a, blocks=blocks, interpret=True)),
             hc_mix.write_back_reference, (v['X'], v['y'], v['post'], v['comb']), v['gX'], tol)


def plain_normed_mix(X, fn):
  """mu = (x fn) rsqrt(mean(x^2) + eps) in fp32 at HIGHEST precision (autodiff)."""
  B, T, N, D = X.shape
  x = X.reshape(B, T, N * D).astype(jnp.float32)
  a = jnp.einsum('btk,kc->btc', x, fn, precision=jax.lax.Precision.HIGHEST)
  return a * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS)


@_CPU_INTERPRET
@pytest.mark.parametrize('B,T,N,D,bm,bd', MIX_CASES)
def test_normed_mix_matches_fp32_oracle(B, T, N, D, bm, bd):
  rng = np.random.default_rng(N * 10 + D)
  X = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.bfloat16)
  fn = jnp.asarray(rng.normal(0, 0.05, (N * D, (2 + N) * N)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(B, T, (2 + N) * N)), jnp.float32)
  f = jax.jit(lambda X, fn: gpu.normed_mix(X, fn, EPS, blocks=dict(block_m=bm, block_d=bd),
                                           interpret=True))
  _check_vjp(f, plain_normed_mix, (X, fn), g, 1e-5)


def plain_mix_read_in(X, fn, scale, base):
  """(mu, u, X) in fp32: plain_normed_mix, pre = sigmoid(scale mu[:N] + base) + eps (SPEC §5
  step 2), u = sum_m pre_m X_m; X handed on unchanged (autodiff)."""
  mu = plain_normed_mix(X, fn)
  pre = jax.nn.sigmoid(scale * mu[..., :X.shape[2]] + base) + EPS
  return mu, jnp.einsum('btm,btmd->btd', pre, X, precision=jax.lax.Precision.HIGHEST), X


# (B, T, N, D, C, block_m, block_d): a site (C = (2+N)N) with tails in tokens and features, the
# HyperHead's C = N, whole blocks with N = 3
MIX_READ_CASES = [(2, 11, 4, 40, 24, 16, 16), (1, 9, 4, 24, 4, 16, 16), (2, 8, 3, 32, 15, 16, 32)]


@pytest.mark.parametrize('pass_streams', [True, False], ids=['pass', 'nopass'])
@pytest.mark.parametrize('B,T,N,D,C,bm,bd', MIX_READ_CASES)
def test_mix_read_in_matches_fp32_oracle(B, T, N, D, C, bm, bd, pass_streams):
  """The fused op against the fp32 oracle fed the same bf16 stream values: mu at 1e-5 (exact
  products), u and dX at 2^-7 (rounded once to bf16), dfn, dscale, dbase at 1e-4 (fp32 sums of
  exact products). Random cotangents on mu (its pre columns too), u and the handed-on streams,
  whose cotangent the dX kernel adds: a dropped dXw, a gate derivative without the chain through
  mu, or the read-in's term with the wrong stream's pre each fail."""
  rng = np.random.default_rng(B * 1000 + T * 10 + C)
  X = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.bfloat16)
  fn = jnp.asarray(rng.normal(0, 0.1, (N * D, C)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5), jnp.float32)
  base = jnp.asarray(rng.normal(0, 1.0, (N,)), jnp.float32)
  g_mu = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
  g_u = jnp.asarray(rng.normal(size=(B, T, D)), jnp.bfloat16)
  g_X = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.bfloat16)

  f = jax.jit(lambda *a: gpu.mix_read_in(*a, EPS, EPS, pass_streams=pass_streams,
                                         blocks=dict(block_m=bm, block_d=bd), interpret=True))
  got, vjp = jax.vjp(f, X, fn, scale, base)
  want, want_vjp = jax.vjp(plain_mix_read_in, X.astype(jnp.float32), fn, scale, base)
  assert len(got) == (3 if pass_streams else 2)
  assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.bfloat16
  _close(got[0], want[0], 1e-5)
  _close(got[1], want[1], 2.0 ** -7)
  if pass_streams:
    assert got[2] is X or np.array_equal(got[2], X)
  cts = (g_mu, g_u, g_X) if pass_streams else (g_mu, g_u)
  dX, dfn, dscale, dbase = vjp(cts)
  w = want_vjp((g_mu, g_u.astype(jnp.float32),
                g_X.astype(jnp.float32) if pass_streams else jnp.zeros(X.shape, jnp.float32)))
  assert dX.dtype == jnp.bfloat16 and dfn.dtype == dscale.dtype == dbase.dtype == jnp.float32
  _close(dX, w[0], 2.0 ** -7)
  for a, b in zip((dfn, dscale, dbase), w[1:]):
    _close(a, b, 1e-4)


@pytest.mark.parametrize('impl', ['pallas', 'reference'])
def test_mix_read_in_under_the_remat_barrier_keeps_its_gemm_by_name(impl, capsys):
  """Under block remat with model.remat_dot_barrier (layers.kept_matmuls_behind_barrier while
  the block traces), the op's coefficient GEMM, which runs in a custom-VJP forward that jax
  traces outside the block, is kept by the name KEPT_MATMUL instead of as a dot, with the same
  values and gradients bit for bit. Saved residuals as jax reports them."""
  from v4jax.model.layers import KEPT_MATMUL, kept_matmuls_behind_barrier
  rng = np.random.default_rng(7)
  B, T, N, D, C = 2, 24, 4, 32, (2 + 4) * 4
  X = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.bfloat16)
  fn = jnp.asarray(rng.normal(0, 0.1, (N * D, C)), jnp.float32)
  scale, base = jnp.float32(0.8), jnp.asarray(rng.normal(size=(N,)), jnp.float32)
  w_mu = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
  cp = jax.checkpoint_policies
  policy = cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                      cp.save_only_these_names(KEPT_MATMUL))

  def loss(barrier, X, fn):
    def block(X, fn):
      with kept_matmuls_behind_barrier() if barrier else contextlib.nullcontext():
        mu, u = hc_mix.mix_read_in(X, fn, scale, base, EPS, EPS, 'split', impl=impl)
      return jnp.sum(mu * w_mu) + jnp.sum(u.astype(jnp.float32) ** 2)
    return jax.checkpoint(block, policy=policy)(X, fn)

  got = {}
  for barrier in (False, True):    # pallas: the Triton kernels in interpret mode on CPU
    f = functools.partial(loss, barrier)
    jax.ad_checkpoint.print_saved_residuals(f, X, fn)
    out = capsys.readouterr().out
    got[barrier] = (out.count('output of dot_general'), out.count(f"named '{KEPT_MATMUL}'"),
                    jax.value_and_grad(f, argnums=(0, 1))(X, fn))
  assert got[False][:2] == (1, 0) and got[True][:2] == (0, 1), (got[False][:2], got[True][:2])
  for a, b in zip(jax.tree.leaves(got[False][2]), jax.tree.leaves(got[True][2])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 devices (the CPU suite fakes them)')
def test_seam_per_device_on_mesh_and_dtype_dispatch():
  """impl='pallas' through the seam, per device on a batch-sharded 8-device mesh: a site's values
  and gradients as the model computes them (mix_read_in handing its streams to the write-back),
  and the normed mix and read-in as separate ops (fn and the gate parameters replicated: their
  gradients sum every device's tokens), as the reference impl's
  within 2^-6 of the largest magnitude (bf16 roundings chain: u, then y u, then the output and the
  cotangents back; observed 0.6-1.0%); fp32 streams keep the normed mix on the reference (the
  same values)."""
  B, T, N, D = 8, 3, 4, 16
  v = _inputs(B, T, N, D, jnp.bfloat16, seed=5)
  fn = jnp.asarray(np.random.default_rng(6).normal(0, 0.05, (N * D, (2 + N) * N)), jnp.float32)
  gate = jnp.asarray(np.random.default_rng(7).normal(0, 1.0, (1 + N,)), jnp.float32)

  def site(impl):
    def loss(X, fn, y, gate):
      # the model's site: the fused op, the write-back on the streams it hands on
      mu, u, Xw = hc_mix.mix_read_in(X, fn, gate[0], gate[1:], EPS, EPS, 'split',
                                     pass_streams=True, impl=impl)
      post = 2 * jax.nn.sigmoid(mu[..., N:2 * N])
      comb = jax.nn.softmax(mu[..., 2 * N:].reshape(B, T, N, N), axis=-2)
      out = hc_mix.write_back(Xw, y * u, post, comb, impl=impl)
      # the normed mix and the read-in as separate ops
      mu2 = hc_mix.normed_mix(X, fn, EPS, 'split', impl=impl)
      u2 = hc_mix.read_in(X, jax.nn.sigmoid(mu2[..., :N]), impl=impl)
      value = jnp.sum(jnp.sin(out.astype(jnp.float32))) + jnp.sum(jnp.cos(u2.astype(jnp.float32)))
      return value, out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1, 1),
              ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
  with rules.activate(mesh, 'fsdp'), jax.set_mesh(mesh):
    (_, out), grads = site('pallas')(v['X'], fn, v['y'], gate)
  (_, out_ref), grads_ref = site('reference')(v['X'], fn, v['y'], gate)
  _close(out, out_ref, 2.0 ** -6)
  for a, b in zip(grads, grads_ref):
    assert a.dtype == b.dtype
    _close(a, b, 2.0 ** -6)
  X32 = v['X'].astype(jnp.float32)
  np.testing.assert_array_equal(hc_mix.normed_mix(X32, fn, EPS, 'highest', impl='pallas'),
                                hc_mix.normed_mix(X32, fn, EPS, 'highest', impl='reference'))


def test_bad_arguments_raise():
  X = jnp.zeros((1, 4, 4, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match='config.kernels.hc_mix'):
    hc_mix.read_in(X, jnp.ones((1, 4, 4)), impl='triton')
  with pytest.raises(ValueError, match='block_m=12'):
    gpu.read_in(X, jnp.ones((1, 4, 4)), blocks=dict(block_m=12))
  with pytest.raises(ValueError, match='block_d=8 must be a power of two >= 16'):
    gpu.normed_mix(X, jnp.ones((64, 24)), EPS, blocks=dict(block_d=8))
  with pytest.raises(ValueError, match='bf16'):
    gpu.normed_mix(X.astype(jnp.float32), jnp.ones((64, 24)), EPS)
  with pytest.raises(ValueError, match='bf16'):
    gpu.mix_read_in(X.astype(jnp.float32), jnp.ones((64, 24)), 1.0, jnp.ones(4), EPS, EPS)



_GPU_ONLY = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='compiled Triton kernels '
                               'need a GPU; CPU covers the same code in interpret mode above')
# bench_h200's widths (N = 4, D = 1536), bf16, default tilings, 300 tokens (a partial block)
GPU_SHAPE = (2, 150, 4, 1536)


@_GPU_ONLY
def test_compiled_read_in_and_write_back_on_gpu_match_oracles():
  """Compiled for the GPU: values and cotangents of read-in and write-back against the autodiff
  oracles within the interpret-mode bound for bf16 (2^-7). Passed on the H200 (sixteenth
  session)."""
  v = _inputs(*GPU_SHAPE, jnp.bfloat16, seed=21)
  _check_vjp(jax.jit(gpu.read_in), hc_mix.read_in_reference, (v['X'], v['pre']), v['gu'],
             2.0 ** -7)
  _check_vjp(jax.jit(gpu.write_back), hc_mix.write_back_reference,
             (v['X'], v['y'], v['post'], v['comb']), v['gX'], 2.0 ** -7)


@_GPU_ONLY
def test_compiled_normed_mix_on_gpu_matches_fp32_oracle():
  """Compiled for the GPU: the normed mix's mu and cotangents against the fp32 HIGHEST oracle
  (1e-5 of the largest magnitude, as in interpret mode)."""
  B, T, N, D = GPU_SHAPE
  X = _inputs(*GPU_SHAPE, jnp.bfloat16, seed=21)['X']
  fn = jnp.asarray(np.random.default_rng(22).normal(0, 0.05, (N * D, (2 + N) * N)), jnp.float32)
  gmu = jnp.asarray(np.random.default_rng(23).normal(size=(B, T, (2 + N) * N)), jnp.float32)
  _check_vjp(jax.jit(lambda X, fn: gpu.normed_mix(X, fn, EPS)), plain_normed_mix, (X, fn), gmu,
             1e-5)


@_GPU_ONLY
def test_compiled_mix_read_in_on_gpu_matches_fp32_oracle():
  """Compiled for the GPU, at the default tilings: the fused op's values and cotangents (streams
  handed on) against the fp32 oracle, with the interpret-mode bounds. Passed on the H200
  (twenty-first session, 551926a)."""
  B, T, N, D = GPU_SHAPE
  C = (2 + N) * N
  rng = np.random.default_rng(24)
  X = _inputs(*GPU_SHAPE, jnp.bfloat16, seed=25)['X']
  fn = jnp.asarray(rng.normal(0, 0.05, (N * D, C)), jnp.float32)
  scale, base = jnp.float32(1.2), jnp.asarray(rng.normal(size=(N,)), jnp.float32)
  cts = (jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32),
         jnp.asarray(rng.normal(size=(B, T, D)), jnp.bfloat16),
         jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.bfloat16))
  got, vjp = jax.vjp(jax.jit(lambda *a: gpu.mix_read_in(*a, EPS, EPS, pass_streams=True)),
                     X, fn, scale, base)
  want, want_vjp = jax.vjp(plain_mix_read_in, X.astype(jnp.float32), fn, scale, base)
  _close(got[0], want[0], 1e-5)
  _close(got[1], want[1], 2.0 ** -7)
  grads, want_grads = vjp(cts), want_vjp(tuple(c.astype(jnp.float32) for c in cts))
  _close(grads[0], want_grads[0], 2.0 ** -7)
  for a, b in zip(grads[1:], want_grads[1:]):
    _close(a, b, 1e-4)
