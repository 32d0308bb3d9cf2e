"""MLA (SPEC §2) against a plain MHA oracle written from the spec (tests/model/attn_oracle.py).

Weights are re-drawn at 1/sqrt(fan_in) (norm scales 1 +- 0.2) so logits and outputs are O(1).
Values: float64 numpy oracle vs the fp32 module, rtol/atol 1e-5. Gradients: jax.grad of the same
oracle in fp32 jnp vs nnx.grad of the module, rtol 1e-4 / atol 1e-5·max|g| (different fp32
summation orders through softmax and RMSNorm backward). bf16: MHA vs MQA within 3e-2·max|out|.
Tiny dims: D=64, H=4, r_q=32, r_kv=32, d_n=16, d_r=8, d_v=16, T=32, B=2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn_oracle as orc
from v4jax.config import default_config
from v4jax.model.mla import MLA
from v4jax.model.rope import rope_inv_freq

B, T, D, H, RQ, RKV, DN, DR, DV = 2, 32, 64, 4, 32, 32, 16, 8, 16
DIMS = dict(dn=DN, dr=DR, C=RKV, HI=2, dI=16)
TAU = (DN + DR) ** -0.5


def make_cfg(block=0, **dsa):
  c = default_config()
  c.model.update(d_model=D, n_heads=H, q_lora_rank=RQ, kv_lora_rank=RKV, qk_nope_dim=DN,
                 qk_rope_dim=DR, v_head_dim=DV, attn_query_block=block)
  c.dsa.update(n_heads=2, head_dim=16, **dsa)
  return c


def randomize(model, seed=0):
  """Re-draws every param (matrices 1/sqrt(fan_in), scales 1+-0.2, biases +-0.2); returns a
  float64 numpy copy as a pure dict for the oracle."""
  r = np.random.RandomState(seed)
  state = nnx.state(model, nnx.Param)

  def draw(path, v):
    name = str(path[-1].key)
    if name == 'scale':
      a = 1 + 0.2 * r.randn(*v.shape)
    elif name == 'bias':
      a = 0.2 * r.randn(*v.shape)
    else:
      fan_in = v.shape[0] * (v.shape[1] if name == 'wo' else 1)
      a = r.randn(*v.shape) / np.sqrt(fan_in)
    return a

  pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pure))
  nnx.update(model, state)
  return jax.tree.map(lambda a: np.asarray(a, np.float32).astype(np.float64), pure)


def inputs(seed=1, segments=False):
  r = np.random.RandomState(seed)
  x = r.randn(B, T, D)
  pos = np.arange(T)[None] + np.array([[0], [7]])
  seg = np.sort(r.randint(0, 3, size=(B, T)), axis=1) if segments else None
  return x, pos, seg


def j(a, dtype=jnp.float32):
  return None if a is None else jnp.asarray(a, dtype if a.dtype.kind == 'f' else jnp.int32)


@nnx.jit
def call(m, x, pos, seg):
  return m(x, pos, seg)


def test_dense_matches_oracle_unblocked():
  m = MLA(make_cfg(0), rngs=nnx.Rngs(0))
  P = randomize(m)
  x, pos, _ = inputs()
  out, aux = call(m, j(x), j(pos), None)
  want, _, _ = orc.mla(np, P, x, pos, DIMS, TAU, orc.allowed(T, None, B))
  assert aux == {}
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def _assert_grads_close(got, want, rtol=1e-4, atol_frac=1e-5):
  flat_g = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  for path, g in flat_g:
    w = np.asarray(flat_w[path])
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol_frac * np.abs(w).max(),
                               err_msg=jax.tree_util.keystr(path))


def test_blocked_segmented_values_and_grads_match_oracle():
  """Query blocks of 12 (T=32 is padded to 36) with a document mask: values and gradients."""
  m = MLA(make_cfg(12), rngs=nnx.Rngs(0))
  P = randomize(m)
  x, pos, seg = inputs(segments=True)
  r = jnp.asarray(np.random.RandomState(5).randn(B, T, D), jnp.float32)
  mask = orc.allowed(T, seg, B)

  @nnx.jit
  def module_out_and_grads(m, x):
    def loss(m, x):
      out = m(x, j(pos), j(seg))[0]
      return jnp.sum(out * r), out
    return nnx.grad(loss, argnums=(0, 1), has_aux=True)(m, x)

  (gm, gx), out = module_out_and_grads(m, j(x))
  want, _, _ = orc.mla(np, P, x, pos, DIMS, TAU, mask)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
  P32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), P)
  wp, wx = orc.mla_grads(P32, j(x), j(pos), mask, r, dims=tuple(DIMS.items()), tau=TAU)
  _assert_grads_close(nnx.to_pure_dict(gm), wp)
  _assert_grads_close(gx, wx)


@pytest.mark.parametrize('dtype,tol', [('float32', 1e-5), ('bfloat16', 3e-2)])
def test_mha_equals_mqa(dtype, tol):
  c = make_cfg(8)
  c.model.dtype = dtype
  m = MLA(c, rngs=nnx.Rngs(0))
  randomize(m)
  x, pos, seg = inputs(segments=True)

  @nnx.jit
  def both(m, x):
    p = m.project(x, j(pos))
    return m.attend_dense(p, j(seg), 'mha'), m.attend_dense(p, j(seg), 'mqa')

  (o1, l1), (o2, l2) = both(m, j(x, c.model.dtype == 'bfloat16' and jnp.bfloat16 or jnp.float32))
  o1, o2 = np.asarray(o1, np.float32), np.asarray(o2, np.float32)
  scale = np.abs(o1).max()
  np.testing.assert_allclose(o1, o2, atol=tol * scale, rtol=0)
  np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), atol=tol * 10, rtol=0)


def test_yarn_on_uses_m_squared_and_yarn_frequencies():
  c = make_cfg(0)
  c.rope.update(yarn_mode='on', yarn_factor=40.0, original_max_len=16)
  m = MLA(c, rngs=nnx.Rngs(0))
  mscale = 0.1 * np.log(40.0) + 1
  assert m.scale == pytest.approx(TAU * mscale ** 2, rel=1e-12)
  P = randomize(m)
  x, pos, _ = inputs()
  out, _ = call(m, j(x), j(pos), None)
  th = np.asarray(rope_inv_freq(c), np.float64)
  old = orc.theta
  orc.theta = lambda d_r, base=10000.0: th
  try:
    want, _, _ = orc.mla(np, P, x, pos, DIMS, TAU * mscale ** 2, orc.allowed(T, None, B))
  finally:
    orc.theta = old
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_params_shapes_and_logical_axes():
  m = MLA(make_cfg(0, enabled=True), rngs=nnx.Rngs(0))
  want = {
      'wq_a': ((D, RQ), ('embed', 'q_lora')),
      'wq_b': ((RQ, H, DN + DR), ('q_lora', 'heads', 'head_dim')),
      'wkv_a': ((D, RKV + DR), ('embed', 'kv_lora')),
      'wkv_b': ((RKV, H, DN + DV), ('kv_lora', 'heads', 'head_dim')),
      'wo': ((H, DV, D), ('heads', 'head_dim', 'embed')),
  }
  for name, (shape, axes) in want.items():
    p = getattr(m, name)
    assert p.shape == shape and p.logical_axes == axes, name
    assert 0.004 < float(jnp.std(p[...])) < 0.008, name    # N(0, 0.006)
  assert m.q_norm.scale.shape == (RQ,) and m.kv_norm.scale.shape == (RKV,)
  assert MLA(make_cfg(0), rngs=nnx.Rngs(0)).indexer is None


def test_bad_inputs_raise():
  m = MLA(make_cfg(0), rngs=nnx.Rngs(0))
  x, pos, _ = inputs()
  with pytest.raises(ValueError, match='x_BTD'):
    m(j(x[..., :8]), j(pos))
  with pytest.raises(ValueError, match='positions_BT'):
    m(j(x), j(pos[:, :5]))
