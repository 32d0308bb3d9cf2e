"""Independent MLA / indexer / top-k / KL oracles written from SPEC §1-§3 (not from v4jax).

Every function takes `xp` (numpy for float64 values, jax.numpy for gradients) and a plain
parameter dict shaped like the module's (`nnx.to_pure_dict`). Attention is the textbook MHA form
with an explicit [B,T,H,S] softmax; RoPE is written pair by pair from the SPEC formulas.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def theta(d_r, base=10000.0):
  return base ** (-np.arange(0, d_r, 2, dtype=np.float64) / d_r)


def rope_interleaved(xp, a, pos, th):
  """a'[2i] = a[2i]cos - a[2i+1]sin, a'[2i+1] = a[2i]sin + a[2i+1]cos, angle pos*theta_i."""
  ang = pos[..., None] * th                                     # [B,T,R/2]
  ang = ang.reshape(ang.shape[:2] + (1,) * (a.ndim - 3) + ang.shape[-1:])
  c, s = xp.cos(ang), xp.sin(ang)
  a0, a1 = a[..., 0::2], a[..., 1::2]
  out = xp.stack([a0 * c - a1 * s, a0 * s + a1 * c], axis=-1)
  return out.reshape(a.shape)


def rope_half(xp, a, pos, th):
  """Pairs (a[i], a[i+R/2]); output [rotated firsts | rotated seconds]."""
  h = a.shape[-1] // 2
  ang = pos[..., None] * th
  ang = ang.reshape(ang.shape[:2] + (1,) * (a.ndim - 3) + ang.shape[-1:])
  c, s = xp.cos(ang), xp.sin(ang)
  a0, a1 = a[..., :h], a[..., h:]
  return xp.concatenate([a0 * c - a1 * s, a0 * s + a1 * c], axis=-1)


def rms(xp, x, g, eps=1e-6):
  return g * x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)


def layer_norm(xp, x, g, b, eps=1e-6):
  mu = xp.mean(x, axis=-1, keepdims=True)
  var = xp.mean((x - mu) ** 2, axis=-1, keepdims=True)
  return g * (x - mu) / xp.sqrt(var + eps) + b


def allowed(T, seg=None, B=1):
  """[B,T,S] bool: s <= t and (if seg) same segment."""
  m = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
  if seg is not None:
    m = m & (seg[:, :, None] == seg[:, None, :])
  return m


def masked_softmax(xp, z, mask):
  z = xp.where(mask, z, -np.inf)
  z = z - xp.max(z, axis=-1, keepdims=True)
  e = xp.where(mask, xp.exp(z), 0.0)
  return e / xp.sum(e, axis=-1, keepdims=True)


def mla(xp, P, x, pos, d, tau, mask):
  """Returns (out [B,T,D], A [B,T,H,S] attention probs, c_q [B,T,r_q]). d: dict of dims."""
  dn, dr, C = d['dn'], d['dr'], d['C']
  th = theta(dr)
  c_q = rms(xp, x @ P['wq_a'], P['q_norm']['scale'])
  q = xp.einsum('btr,rhk->bthk', c_q, P['wq_b'])
  q_n, q_r = q[..., :dn], rope_interleaved(xp, q[..., dn:], pos, th)
  a = x @ P['wkv_a']
  c_kv = rms(xp, a[..., :C], P['kv_norm']['scale'])
  k_r = rope_interleaved(xp, a[..., C:], pos, th)
  kvb = xp.einsum('bsc,chk->bshk', c_kv, P['wkv_b'])
  k_n, v = kvb[..., :dn], kvb[..., dn:]
  logits = tau * (xp.einsum('bthn,bshn->bths', q_n, k_n) + xp.einsum('bthp,bsp->bths', q_r, k_r))
  A = masked_softmax(xp, logits, mask[:, :, None, :])
  o = xp.einsum('bths,bshv->bthv', A, v)
  return xp.einsum('bthv,hvd->btd', o, P['wo']), A, c_q


def indexer_scores(xp, Pi, x, c_q, pos, d):
  """I [B,T,S] (unmasked) = sum_j w_j d_I^-1/2 ReLU(Q_j . k_s), w = x Wp H_I^-1/2."""
  dr, HI, dI = d['dr'], d['HI'], d['dI']
  th = theta(dr)
  Q = xp.einsum('btr,rjk->btjk', c_q, Pi['wq_b'])
  Q = xp.concatenate([rope_half(xp, Q[..., :dr], pos, th), Q[..., dr:]], axis=-1)
  k = layer_norm(xp, x @ Pi['wk'], Pi['k_norm']['scale'], Pi['k_norm']['bias'])
  k = xp.concatenate([rope_half(xp, k[..., :dr], pos, th), k[..., dr:]], axis=-1)
  w = (x @ Pi['weights_proj']) * HI ** -0.5
  dots = xp.einsum('btjk,bsk->btjs', Q, k)
  return xp.einsum('btj,btjs->bts', w, dI ** -0.5 * xp.maximum(dots, 0.0)), w


def topk(I, K, mask):
  """Per token: the min(K, #allowed) largest allowed scores, ties to the smaller s; -1 padded."""
  B, T, S = I.shape
  idx = -np.ones((B, T, K), np.int64)
  for b in range(B):
    for t in range(T):
      cand = [s for s in range(S) if mask[b, t, s]]
      order = sorted(cand, key=lambda s: (-I[b, t, s], s))[:K]
      idx[b, t, :len(order)] = order
  return idx


def idx_to_mask(idx, S):
  B, T, K = idx.shape
  m = np.zeros((B, T, S), bool)
  for b in range(B):
    for t in range(T):
      for s in idx[b, t]:
        if s >= 0:
          m[b, t, s] = True
  return m


def kl_rows(xp, p, I, support):
  """KL(p || softmax_support(I)) per row with 0 log 0 = 0."""
  logq = xp.log(masked_softmax(xp, I, support) + (~support))   # log 1 = 0 off the support
  pl = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1.0)), 0.0)
  return xp.sum(xp.where(support, pl - p * logq, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnames=('dims', 'tau'))
def mla_grads(P, x, pos, mask, r, *, dims, tau):
  """fp32 jax.grad of sum(mla(...) * r) wrt (P, x); dims as a tuple of items (hashable).
  Masks are arguments, so one compile serves every test with these shapes."""
  def loss(P, x):
    return jnp.sum(mla(jnp, P, x, pos, dict(dims), tau, mask)[0] * r)
  return jax.grad(loss, argnums=(0, 1))(P, x)


@functools.partial(jax.jit, static_argnames=('dims',))
def indexer_kl_grads(Pi, x, c_q, pos, p, support, valid, *, dims):
  """fp32 jax.grad wrt the indexer params of sum over valid t of KL(p_t || softmax(I_t))."""
  def loss(Pi):
    I, _ = indexer_scores(jnp, Pi, x, c_q, pos, dict(dims))
    return jnp.sum(jnp.where(valid, kl_rows(jnp, p, I, support), 0.0))
  return jax.grad(loss)(Pi)
