"""Pallas grouped matmuls (megablox on TPU, Mosaic-GPU ragged_dot on Hopper) against a numpy
per-group oracle: values and gradients (custom VJPs), empty groups, rows past the groups.

On CPU megablox runs in TPU interpret mode. The Mosaic-GPU forward kernel runs under jax's GPU
interpret mode (a private jax module; skipped if it moved), but its transposed kernels (dx, dw)
do not interpret, so the mgpu gradient test needs a Hopper GPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.kernels.grouped_matmul import grouped_matmul, resolve_impl


def _oracle(x, w, sizes, r):
  """y, and the gradients of sum(y * r) w.r.t. x and w (float64)."""
  x, w, r = (np.asarray(a, np.float64) for a in (x, w, r))
  seg = np.repeat(np.arange(len(sizes)), sizes)
  n = len(seg)
  y = np.zeros((x.shape[0], w.shape[2]))
  y[:n] = np.einsum('mk,mkn->mn', x[:n], w[seg])
  gx = np.zeros_like(x)
  gx[:n] = np.einsum('mn,mkn->mk', r[:n], w[seg])
  gw = np.zeros_like(w)
  np.add.at(gw, seg, np.einsum('mk,mn->mkn', x[:n], r[:n]))
  return y, gx, gw


def _run(impl, x, w, sizes, r, **kw):
  f = lambda x, w: grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), impl=impl, **kw)
  y = jax.jit(f)(x, w)
  gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * r), argnums=(0, 1)))(x, w)
  return y, gx, gw


NOT_ON_GPU = pytest.mark.skipif(jax.default_backend() == 'gpu',
                                reason='megablox is a TPU kernel (interpret mode on CPU)')


@NOT_ON_GPU
def test_megablox_interpret_matches_oracle_and_ragged_dot():
  rs = np.random.RandomState(0)
  sizes = np.array([5, 0, 9, 6], np.int32)      # an empty group; 20 of 22 rows used (M % 8 != 0)
  x = jnp.asarray(rs.randn(22, 16), jnp.float32)
  w = jnp.asarray(rs.randn(4, 16, 24), jnp.float32)
  r = jnp.asarray(rs.randn(22, 24), jnp.float32)
  got = _run('megablox', x, w, sizes, r)
  ref = _run('ragged_dot', x, w, sizes, r)
  want = _oracle(x, w, sizes, r)
  for g, rr, o in zip(got, ref, want):
    # fp32 products over K <= 22: 1e-5 relative to the oracle and to lax.ragged_dot
    np.testing.assert_allclose(np.asarray(g), o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(rr), rtol=1e-5, atol=1e-5)


@NOT_ON_GPU
def test_megablox_all_rows_grouped_equals_masked_call():
  """Group sizes summing to M (the dropless dispatch): skipping the row mask changes nothing."""
  rs = np.random.RandomState(4)
  sizes = np.array([7, 0, 11, 6], np.int32)     # 24 rows, all grouped
  x = jnp.asarray(rs.randn(24, 16), jnp.float32)
  w = jnp.asarray(rs.randn(4, 16, 24), jnp.float32)
  r = jnp.asarray(rs.randn(24, 24), jnp.float32)
  got = _run('megablox', x, w, sizes, r, all_rows_grouped=True)
  masked = _run('megablox', x, w, sizes, r)
  for g, m, o in zip(got, masked, _oracle(x, w, sizes, r)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(m))
    np.testing.assert_allclose(np.asarray(g), o, rtol=1e-5, atol=1e-5)


@NOT_ON_GPU
def test_megablox_bf16_accumulates_in_fp32():
  rs = np.random.RandomState(1)
  sizes = np.array([8, 8], np.int32)
  x = jnp.asarray(rs.randn(16, 64), jnp.bfloat16)
  w = jnp.asarray(rs.randn(2, 64, 8), jnp.bfloat16)
  y = grouped_matmul(x, w, jnp.asarray(sizes), impl='megablox')
  assert y.dtype == jnp.float32
  want = _oracle(x, w, sizes, np.zeros((16, 8)))[0]
  # exact bf16 products, fp32 sums of 64 terms
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)


def _gpu_interpret(monkeypatch):
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    from jax.experimental.pallas import mosaic_gpu as plgpu
  except ImportError as e:  # private module: skip rather than fail if jax moves it
    pytest.skip(f'jax GPU interpret mode not importable: {e}')
  kernel = plgpu.kernel
  monkeypatch.setattr(plgpu, 'kernel', lambda *a, **k: kernel(*a, **k, interpret=InterpretGPUParams()))
  monkeypatch.setenv('V4JAX_TARGET_PLATFORM', 'gpu')


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='interpret test (CPU only)')
def test_mgpu_forward_in_gpu_interpret_mode(monkeypatch):
  _gpu_interpret(monkeypatch)
  rs = np.random.RandomState(2)
  sizes = np.array([60, 0, 130, 40], np.int32)   # 230 of 250 rows; M, N not tile multiples
  x = jnp.asarray(rs.randn(250, 64), jnp.bfloat16)
  w = jnp.asarray(rs.randn(4, 64, 72), jnp.bfloat16)
  y = grouped_matmul(x, w, jnp.asarray(sizes), impl='mgpu')
  assert y.dtype == jnp.float32 and y.shape == (250, 72)
  want = _oracle(x, w, sizes, np.zeros((250, 72)))[0]
  # the kernel stores bf16 (fp32 accumulation rounded once): 2^-8 relative plus tiny absolute
  np.testing.assert_allclose(np.asarray(y), want, rtol=8e-3, atol=1e-2)
  assert np.all(np.asarray(y[230:]) == 0)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='interpret test (CPU only)')
def test_mgpu_forward_all_rows_grouped_in_gpu_interpret_mode(monkeypatch):
  _gpu_interpret(monkeypatch)
  rs = np.random.RandomState(5)
  sizes = np.array([70, 0, 100, 80], np.int32)   # all 250 rows grouped: no row mask
  x = jnp.asarray(rs.randn(250, 64), jnp.bfloat16)
  w = jnp.asarray(rs.randn(4, 64, 72), jnp.bfloat16)
  y = grouped_matmul(x, w, jnp.asarray(sizes), impl='mgpu', all_rows_grouped=True)
  want = _oracle(x, w, sizes, np.zeros((250, 72)))[0]
  np.testing.assert_allclose(np.asarray(y), want, rtol=8e-3, atol=1e-2)   # as above
  np.testing.assert_array_equal(
      np.asarray(y), np.asarray(grouped_matmul(x, w, jnp.asarray(sizes), impl='mgpu')))


def _tile_table_np(sizes, M, bm):
  """Per group in order, per block_m block its rows touch: (group, block, offset, count)."""
  out, start = [], 0
  for g, n in enumerate(sizes):
    for r in range(start, start + n):
      if out and out[-1][0] == g and out[-1][1] == r // bm:
        out[-1][3] += 1
      else:
        out.append([g, r // bm, r % bm, 1])
    start += n
  return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ws_tile_table_matches_numpy(seed):
  from v4jax.kernels.grouped_matmul.mgpu_ws import tile_table
  rs = np.random.RandomState(seed)
  G, bm = 9, 16
  sizes = rs.randint(0, 40, G).astype(np.int32)
  sizes[rs.randint(G)] = 0
  M = -(-int(sizes.sum() + rs.randint(0, 20)) // bm) * bm
  tab = np.asarray(tile_table(jnp.asarray(sizes), M, bm))
  want = _tile_table_np(sizes, M, bm)
  assert tab.shape == (4, M // bm + G - 1)
  np.testing.assert_array_equal(tab[:, :len(want)].T, np.array(want))
  assert np.all(tab[3, len(want):] == 0)


def test_mgpu_tiling_errors_name_the_entry(monkeypatch):
  from v4jax.kernels.grouped_matmul import mgpu
  monkeypatch.setattr(mgpu, 'TUNED', {('dw', 64, 32): mgpu.Tiles(consumers=2),
                                      ('fwd', 64, 32): mgpu.Tiles(consumers=3)})
  for kernel in ('dw', 'fwd'):
    with pytest.raises(ValueError, match=rf"\('{kernel}', 64, 32\): consumers="):
      mgpu.tiles_for(kernel, 64, 32)
  assert mgpu.tiles_for('fwd', 64, 64) == mgpu.DEFAULT_TILES
  monkeypatch.setattr(mgpu, 'TUNED', {('fwd', 64, 32): mgpu.Tiles(in_flight=1),
                                      ('fwd_t', 64, 32): mgpu.Tiles(consumers=2, cluster=4)})
  for kernel, bad in (('fwd', 'in_flight=1, cluster=1'), ('fwd_t', 'in_flight=0, cluster=4')):
    with pytest.raises(ValueError, match=rf"\('{kernel}', 64, 32\): {bad}; expected consumers=2"):
      mgpu.tiles_for(kernel, 64, 32)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='interpret test (CPU only)')
def test_ws_kernel_in_gpu_interpret_mode(monkeypatch):
  """v4jax's warp-specialized kernel (a memory and two compute warpgroups; 2 SMs on a CPU):
  groups that share a block, an empty group, three K steps and several N tiles, with one WGMMA
  group left running across K steps (in_flight=1: the slots released a step late; the kernel
  without it runs in the grouped_matmul test below). Its transpose_rhs form (dx) and its 2-CTA
  clusters run only on the GPU test below: jax's GPU interpreter has no transposed WGMMA operand
  and no cluster barriers."""
  _gpu_interpret(monkeypatch)
  from v4jax.kernels.grouped_matmul.mgpu_ws import ragged_dot_ws
  rs = np.random.RandomState(8)
  sizes = np.array([60, 0, 130, 40], np.int32)   # 230 of 256 rows
  x = jnp.asarray(rs.randn(256, 192), jnp.bfloat16)   # 3 K steps
  w = jnp.asarray(rs.randn(4, 192, 256) / 8, jnp.bfloat16)
  y = ragged_dot_ws(x, w, jnp.asarray(sizes), block_m=64, block_n=64, block_k=64, stages=2,
                    in_flight=1)
  want = _oracle(x, w, sizes, np.zeros((256, 256)))[0]
  # bf16 store of an fp32 accumulation: 2^-8 relative plus a small absolute term
  np.testing.assert_allclose(np.asarray(y[:230], np.float64), want[:230], rtol=8e-3, atol=1e-2)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='interpret test (CPU only)')
def test_mgpu_forward_through_ws_kernel_in_gpu_interpret_mode(monkeypatch):
  """grouped_matmul impl=mgpu with a consumers=2 tiling: K, N and M padded to the kernel's
  multiples (N = 150 to 256 = 2 * block_n, not block_n), rows past the groups zeroed, y equal
  to the oracle."""
  _gpu_interpret(monkeypatch)
  from v4jax.kernels.grouped_matmul import mgpu
  monkeypatch.setattr(mgpu, 'DEFAULT_TILES', mgpu.Tiles(64, 64, 64, 2, 4, 2))
  monkeypatch.setattr(mgpu, 'TUNED', {})
  rs = np.random.RandomState(9)
  sizes = np.array([90, 0, 70, 70], np.int32)   # 230 of 250 rows
  x = jnp.asarray(rs.randn(250, 100), jnp.bfloat16)
  w = jnp.asarray(rs.randn(4, 100, 150) / 8, jnp.bfloat16)
  y = grouped_matmul(x, w, jnp.asarray(sizes), impl='mgpu')
  assert y.shape == (250, 150)
  want = _oracle(x, w, sizes, np.zeros((250, 150)))[0]
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=8e-3, atol=1e-2)   # as above
  assert np.all(np.asarray(y[230:]) == 0)


def _is_hopper():
  return jax.default_backend() == 'gpu' and resolve_impl('auto', jnp.bfloat16) == 'mgpu'


@pytest.mark.skipif(not _is_hopper(), reason='the Mosaic-GPU kernels (dx, dw transposed) need a '
                    'Hopper GPU (H100/H200); CPU covers the forward in interpret mode')
@pytest.mark.parametrize('M,K,N,grouped', [(1024, 256, 384, False), (1000, 200, 136, False),
                                            (1000, 200, 136, True)])
@pytest.mark.parametrize('ws', [{}, {'consumers': 2},
                                {'consumers': 2, 'in_flight': 1, 'cluster': 2}])
def test_mgpu_values_and_grads_on_hopper(M, K, N, grouped, ws, monkeypatch):
  """grouped: every row in a group (all_rows_grouped=True, no row mask); else 24 rows past.
  consumers=2: y and dx through v4jax's warp-specialized kernel (dw always runs jax's), also
  with one WGMMA group in flight and 2-CTA clusters sharing the x tile (N padded to 4 x 128)."""
  from v4jax.kernels.grouped_matmul import mgpu
  monkeypatch.setattr(mgpu, 'TUNED', {})
  default_tiles = mgpu.tiles_for
  monkeypatch.setattr(mgpu, 'tiles_for', lambda kernel, k, n: (
      default_tiles(kernel, k, n) if kernel == 'dw' else mgpu.Tiles(**ws)))
  rs = np.random.RandomState(3)
  n = M if grouped else M - 24
  sizes = np.bincount(rs.randint(0, 8, n), minlength=8).astype(np.int32)
  sizes[3] = 0
  sizes[0] += n - sizes.sum()
  x = jnp.asarray(rs.randn(M, K), jnp.bfloat16)
  w = jnp.asarray(rs.randn(8, K, N) / np.sqrt(K), jnp.bfloat16)
  r = jnp.asarray(rs.randn(M, N), jnp.bfloat16)
  got = _run('mgpu', x, w, sizes, r, all_rows_grouped=grouped)
  want = _oracle(x, w, sizes, r)
  for name, g, o in zip(('y', 'dx', 'dw'), got, want):
    scale = np.abs(o).max()
    # bf16 storage of fp32 accumulations: within 1% of the largest magnitude
    err = np.abs(np.asarray(g, np.float64) - o).max() / scale
    assert err < 1e-2, (name, err)
