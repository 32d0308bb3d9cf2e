"""Expert-parallel MoE (v4jax/parallel/expert.py) on the fake 8-device CPU mesh.

Reference: the same MoE module on one device with no mesh (its local path is tested against a
numpy oracle in tests/model/test_moe.py). Checked: outputs, aux, and gradients w.r.t. x and every
parameter, for several expert-parallel degrees, both exchanges, and an expert x tensor layout;
the dropped-slot count of undersized buffers against a numpy count of what cannot fit, and the
output against a numpy SwiGLU oracle with exactly those slots removed.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import default_config
from v4jax.model.moe import MoE, route
from v4jax.parallel import expert
from v4jax.parallel import rules as rules_lib
from v4jax.parallel.mesh import make_mesh

B, T, D, E, K, F = 8, 16, 64, 8, 2, 32
# fp32; only summation order differs across shards: 1e-5 relative, plus 1e-5 of the leaf's
# largest magnitude for elements near zero (gradients reach O(10))
RTOL = 1e-5


def _cfg(**moe):
  c = default_config()
  c.model.d_model = D
  c.model.init_std = 0.1
  c.moe.update(num_experts=E, num_shared=1, top_k=K, d_expert=F, n_groups=4, topk_groups=2)
  c.moe.update(**moe)
  return c


def _model(cfg, bias):
  m = MoE(cfg, rngs=nnx.Rngs(0))
  m.router.bias[...] = jnp.asarray(bias, jnp.float32)
  return m


def _inputs():
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.randn(B, T, D), jnp.float32)
  v = np.ones((B, T), bool)
  v[3, 10:] = False
  return x, jnp.asarray(v)


def _run(model, x, valid, mesh=None, preset=None):
  """(y, aux, grads w.r.t. (x, params)) of sum(y * r) + bal_loss, under an optional mesh."""
  gdef, params, rest = nnx.split(model, nnx.Param, ...)
  r = jnp.asarray(np.random.RandomState(2).randn(B, T, D), jnp.float32)

  def loss(x, params):
    y, aux = nnx.merge(gdef, params, rest)(x, valid)
    return jnp.sum(y * r) + aux['bal_loss'], (y, aux)

  def run():
    (_, (y, aux)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
    return jax.device_get((y, aux, g))
  if mesh is None:
    return run()
  with rules_lib.activate(mesh, preset):
    return run()


def _mesh(devices=None, **sizes):
  c = default_config().mesh
  c.update(data=1, fsdp=1, expert=1, tensor=1)
  c.update(**sizes)
  return make_mesh(c, devices)


def _close(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    v = np.asarray(v)
    np.testing.assert_allclose(np.asarray(u), v, rtol=RTOL, atol=RTOL * np.abs(v).max())


@pytest.fixture(scope='module')
def single():
  bias = 0.02 * np.random.RandomState(3).randn(E)
  x, valid = _inputs()
  return bias, x, valid, _run(_model(_cfg(), bias), x, valid)


def _ragged_emulated(monkeypatch):
  """XLA:CPU lacks ragged-all-to-all: stand in the padded version with worst-case chunks."""
  def fake(operand, output, *args, axis_name):
    return expert.padded_ragged_all_to_all(operand, output, *args, axis_name=axis_name,
                                           cap=operand.shape[0])
  monkeypatch.setattr(jax.lax, 'ragged_all_to_all', fake)


@pytest.mark.parametrize('sizes,exchange,cf', [
    (dict(fsdp=4, expert=2), 'padded', 0.0),      # worst-case chunks: dropless
    (dict(data=2, expert=4), 'padded', 3.0),      # fixed capacity (24 of 32 rows), no drops here
    (dict(expert=8), 'ragged', 0.0),              # ragged path (emulated on CPU)
    (dict(fsdp=2, expert=4), 'ragged', 2.0),      # ragged path with a sized receive buffer
])
def test_ep_matches_single_device(single, monkeypatch, sizes, exchange, cf):
  bias, x, valid, (y1, aux1, g1) = single
  if exchange == 'ragged':
    _ragged_emulated(monkeypatch)
  model = _model(_cfg(ep_exchange=exchange, ep_capacity_factor=cf), bias)
  y, aux, g = _run(model, x, valid, _mesh(**sizes), 'fsdp_ep')
  assert float(aux['dropped']) == 0.0
  _close((y, aux['bal_loss'], aux['expert_counts']), (y1, aux1['bal_loss'], aux1['expert_counts']))
  _close(g, g1)


def test_ep_with_tensor_parallel_experts(single):
  """Experts over `expert`, their F dim over `tensor` (partial sums psum'd)."""
  bias, x, valid, (y1, aux1, g1) = single
  preset = {**rules_lib.RULES['fsdp_tp'], 'exp': 'expert', 'act_exp': 'expert'}
  y, aux, g = _run(_model(_cfg(), bias), x, valid, _mesh(fsdp=2, expert=2, tensor=2), preset)
  _close(y, y1)
  _close(g, g1)


def test_ep_slot_sums_through_the_gather_sum_kernel(single):
  """kernels.gather_sum='pallas' (interpret mode on CPU) runs the MoE's slot sums per device
  inside expert parallelism's shard_map and matches the single-device reference path."""
  bias, x, valid, (y1, aux1, g1) = single
  cfg = _cfg(ep_exchange='padded')
  cfg.kernels.gather_sum = 'pallas'
  y, aux, g = _run(_model(cfg, bias), x, valid, _mesh(fsdp=4, expert=2), 'fsdp_ep')
  _close(y, y1)
  _close(g, g1)


def _swiglu_oracle(m, x_AD, sel_AK, g_AK, keep_AK):
  """numpy: sum over kept slots of g * W_d(silu(x W_g) * x W_u), float64."""
  wg, wu, wd = (np.asarray(w[...], np.float64) for w in (m.experts.w_gate, m.experts.w_up,
                                                         m.experts.w_down))
  x = np.asarray(x_AD, np.float64)
  y = np.zeros_like(x)
  for a in range(x.shape[0]):
    for k in range(sel_AK.shape[1]):
      if keep_AK[a, k]:
        e = sel_AK[a, k]
        h = x[a] @ wg[e]
        y[a] += g_AK[a, k] * ((h / (1 + np.exp(-h)) * (x[a] @ wu[e])) @ wd[e])
  return y


def test_undersized_buffers_report_and_zero_dropped_slots():
  """ep=4 over tokens sharded 8 ways; chunk cap = round_up(ceil(0.5 * 32 / 4), 8) = 8 rows per
  (src, dst) pair. Heavily skewed routing overflows it; numpy counts what cannot fit."""
  bias = np.zeros(E)
  bias[:2] = 5.0                                   # almost every token picks experts 0 and 1
  cfg = _cfg(ep_exchange='padded', ep_capacity_factor=0.5, num_shared=0)
  m = _model(cfg, bias)
  x, valid = _inputs()
  mesh = _mesh(fsdp=2, expert=4)
  with rules_lib.activate(mesh, 'fsdp_ep'):
    y, aux = jax.jit(lambda x: m(x, valid))(x)
  # numpy: each device's slots in (token, k) order, stable-sorted by expert, split by owner
  A = B * T
  x_AD = np.asarray(x).reshape(A, D)
  _, sel, g = route(m.router.logits(jnp.asarray(x_AD)), jnp.asarray(bias, jnp.float32), top_k=K,
                    n_groups=4, topk_groups=2, route_scale=cfg.moe.route_scale)
  sel, g = np.asarray(sel), np.asarray(g)
  keep = np.ones((A, K), bool)
  per_dev, cap, L = A // 8, 8, E // 4
  for d in range(8):
    slots = [(a, k) for a in range(d * per_dev, (d + 1) * per_dev) for k in range(K)]
    slots.sort(key=lambda s: sel[s])             # stable: token order within an expert
    taken = np.zeros(4, int)
    for a, k in slots:
      dst = sel[a, k] // L
      taken[dst] += 1
      keep[a, k] = taken[dst] <= cap
  valid_A = np.asarray(valid).reshape(A)
  want_dropped = int(np.sum(~keep & valid_A[:, None]))
  assert want_dropped > 0
  assert float(aux['dropped']) == want_dropped
  want = _swiglu_oracle(m, x_AD, sel, g, keep)
  # fp32 kernel vs float64 oracle, outputs O(1)
  np.testing.assert_allclose(np.asarray(y).reshape(A, D), want, rtol=1e-4, atol=1e-5)


def test_megablox_runs_per_device_without_expert_axis():
  """Experts replicated (fsdp preset) but a Pallas grouped matmul: the shard_map path with no
  exchange (Mosaic kernels cannot be auto-partitioned)."""
  x, valid = _inputs()
  bias = 0.02 * np.random.RandomState(3).randn(E)
  cfg = _cfg()
  cfg.kernels.grouped_matmul = 'megablox'
  m = _model(cfg, bias)
  want = jax.jit(lambda x: m(x, valid)[0])(x)
  mesh = _mesh(jax.devices()[:2], fsdp=2)      # 2 devices: TPU interpret mode is slow
  with rules_lib.activate(mesh, 'fsdp'):
    assert expert.plan(n_experts=E, d_expert=F, impl='megablox', dtype=jnp.float32).ep == 1
    got = jax.jit(lambda x: m(x, valid)[0])(x)
  _close(got, want)
