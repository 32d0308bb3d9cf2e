"""LM cross entropy (SPEC §9) against a float64 numpy oracle, values and gradients.

Fresh random hidden states, head and targets; weights include zeros (padding). fp32: values rtol
1e-6, gradients (custom VJP vs the oracle's analytic softmax - onehot, chained through the head
matmul in numpy) rtol 1e-5 / atol 1e-6·max|g|. bf16 compute: the gradient wrt the logits is
rounded to bf16 once, so the comparison there is atol 1e-2·max|g| against fp32 autodiff of the
same function.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.model.loss import cross_entropy_sum, token_nll_sum

B, T, D, V = 2, 12, 16, 37


def draw(seed):
  r = np.random.RandomState(seed)
  h = r.randn(B, T, D)
  head = r.randn(D, V) / np.sqrt(D)
  tgt = r.randint(0, V, size=(B, T))
  w = (r.rand(B, T) > 0.25).astype(np.float64)
  return h, head, tgt, w


def oracle(h, head, tgt, w):
  """(loss, dL/dh, dL/dhead) in float64 numpy."""
  logits = np.einsum('btd,dv->btv', h, head)
  m = logits.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
  tl = np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
  loss = np.sum((lse - tl) * w)
  d = (np.exp(logits - lse[..., None]) - np.eye(V)[tgt]) * w[..., None]
  return loss, np.einsum('btv,dv->btd', d, head), np.einsum('btd,btv->dv', h, d)


@pytest.mark.parametrize('chunk', [0, 4])
def test_fp32_values_and_gradients(chunk):
  h, head, tgt, w = draw(0 + chunk)
  want = oracle(h, head, tgt, w)
  f = lambda h, hd: cross_entropy_sum(h, hd, jnp.asarray(tgt), jnp.asarray(w, jnp.float32),
                                      jnp.float32, chunk)
  c = 0.37                 # the loss enters scaled: the backward's cotangent is not 1
  loss, (gh, ghead) = jax.value_and_grad(lambda *a: c * f(*a), argnums=(0, 1))(
      jnp.asarray(h, jnp.float32), jnp.asarray(head, jnp.float32))
  np.testing.assert_allclose(loss, c * want[0], rtol=1e-6)
  np.testing.assert_allclose(f(jnp.asarray(h, jnp.float32), jnp.asarray(head, jnp.float32)),
                             want[0], rtol=1e-6)    # undifferentiated: the loss-only pass
  for g, e in zip((gh, ghead), want[1:]):
    np.testing.assert_allclose(g, c * e, rtol=1e-5, atol=1e-6 * np.abs(e).max())


def test_bf16_logits_gradient_is_rounded_once():
  r = np.random.RandomState(3)
  logits = jnp.asarray(4 * r.randn(B, T, V), jnp.bfloat16)
  tgt = jnp.asarray(r.randint(0, V, size=(B, T)))
  w = jnp.asarray((r.rand(B, T) > 0.25), jnp.float32)
  g = jax.grad(token_nll_sum)(logits, tgt, w)
  assert g.dtype == jnp.bfloat16
  ref = jax.grad(lambda l: jnp.sum((jax.nn.logsumexp(l, -1) - jnp.take_along_axis(
      l, tgt[..., None], -1)[..., 0]) * w))(logits.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(g, np.float32), ref, atol=1e-2 * float(jnp.abs(ref).max()))
  np.testing.assert_array_equal(np.asarray(g, np.float32)[np.asarray(w) == 0], 0.0)


def test_bf16_chunked_values_and_gradients():
  """bf16 compute in chunks (the hand-written chunked backward): against the float64 oracle of
  the bf16-rounded inputs, loss rtol 1e-2 and gradients atol 2e-2·max|g| (bf16 logits and
  logit gradients, fp32 accumulation); the gradients keep the inputs' fp32 dtype."""
  h, head, tgt, w = draw(7)
  r16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
  want = oracle(r16(h), r16(head), tgt, w)
  f = lambda h, hd: cross_entropy_sum(h, hd, jnp.asarray(tgt), jnp.asarray(w, jnp.float32),
                                      jnp.bfloat16, 4)
  loss, grads = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(h, jnp.float32),
                                                      jnp.asarray(head, jnp.float32))
  np.testing.assert_allclose(loss, want[0], rtol=1e-2)
  for g, e in zip(grads, want[1:]):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, e, atol=2e-2 * np.abs(e).max())
