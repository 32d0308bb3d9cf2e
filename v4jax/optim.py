"""Optimizer: parameter groups, per-group clipping, schedules (SPEC §9).

Groups, chosen by parameter path:
  main     all trainable weights except the indexer and the Engram tables: AdamW, wd on >=2-D
           weights except norms/biases/mHC base & scale; clipped with the table row grads by one
           global norm (optim.clip_norm).
  indexer  DSA indexer weights: own global-norm clip (optim.indexer_clip_norm), AdamW; warm-up
           stage uses dsa.warmup_lr.
  table    Engram tables: Adam at engram.lr_mult x the schedule, wd 0, the main clip factor;
           `lazy_adam` leaves rows with no gradient bit-identical (moments included).
  frozen   by stage: DSA warm-up trains only the indexer; the dense stage never runs it.
The router bias is not an nnx.Param, so it is never here (SPEC §4).
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

GROUPS = ('main', 'indexer', 'table', 'frozen')


def path_str(path) -> str:
  parts = []
  for k in path:
    k = getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))
    parts.append(str(k))
  return '/'.join(parts)


def label_of(path: str, ndim: int, cfg) -> str:
  is_indexer = '/indexer/' in f'/{path}/'
  is_table = '/engram/' in f'/{path}/' and path.split('/')[-1] == 'table'
  if cfg.dsa.stage == 'warmup':
    return 'indexer' if is_indexer else 'frozen'
  if is_indexer:
    return 'frozen' if cfg.dsa.stage == 'dense' else 'indexer'
  if is_table:
    return 'table'
  return 'main'


def _strip_value(path) -> str:
  s = path_str(path)
  return s[:-len('/value')] if s.endswith('/value') else s


def labels(params, cfg):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: label_of(_strip_value(p), x.ndim, cfg), params)


def decay_mask(params):
  """Weight decay on >=2-D weights except the Engram tables and mHC coefficients' base/scale
  (a scanned run of blocks, `blocks/{first}-{last}/...`, counts its per-layer dims)."""
  def mask(p, x):
    s = _strip_value(p)
    leaf = s.split('/')[-1]
    ndim = x.ndim - bool(re.match(r'blocks/\d+-\d+/', s))
    return ndim >= 2 and leaf not in ('table', 'base', 'scale', 'bias')
  return jax.tree_util.tree_map_with_path(mask, params)


def schedule(cfg, peak: float):
  o, steps = cfg.optim, cfg.train.steps
  warm = min(o.warmup_steps, max(steps - 1, 0))
  if o.schedule == 'constant':
    return optax.linear_schedule(0.0, peak, max(warm, 1)) if warm else optax.constant_schedule(peak)
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warm, 1), max(steps, max(warm, 1) + 1),
                                            end_value=peak * o.min_lr_ratio)


def warmup_indexer_schedule(cfg):
  d = cfg.dsa
  return optax.join_schedules([optax.linear_schedule(0.0, d.warmup_lr, max(d.warmup_lr_warmup_steps, 1)),
                               optax.constant_schedule(d.warmup_lr)], [d.warmup_lr_warmup_steps])


class AdamState(NamedTuple):
  """The Adam transforms' state (lazy_adam, scale_by_adam_stored): step count, moments."""
  count: jax.Array
  mu: Any
  nu: Any


def lazy_adam(lr, b1, b2, eps) -> optax.GradientTransformation:
  """Row-wise Adam: rows whose gradient is all zero keep their moments and values (SPEC §6.4);
  bias correction uses the global step."""
  def init(params):
    z = jax.tree.map(jnp.zeros_like, params)
    return AdamState(jnp.zeros((), jnp.int32), z, jax.tree.map(jnp.zeros_like, params))

  def update(g, state, params=None):
    count = state.count + 1
    lr_t = lr(state.count) if callable(lr) else lr

    c = count.astype(jnp.float32)
    touched = lambda g: jnp.any(g != 0, axis=tuple(range(1, g.ndim)), keepdims=True)
    mu = jax.tree.map(lambda g, m: jnp.where(touched(g), b1 * m + (1 - b1) * g, m), g, state.mu)
    nu = jax.tree.map(lambda g, v: jnp.where(touched(g), b2 * v + (1 - b2) * g * g, v), g, state.nu)
    upd = jax.tree.map(
        lambda g, m, v: jnp.where(touched(g), -lr_t * (m / (1 - b1 ** c))
                                  / (jnp.sqrt(v / (1 - b2 ** c)) + eps), 0.0), g, mu, nu)
    return upd, AdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def scale_by_adam_stored(b1, b2, eps, moment_dtype) -> optax.GradientTransformation:
  """Adam's scaling with both moments stored in `moment_dtype` (DeepSeek-V3 keeps them in bf16:
  half the optimizer memory). Each step upcasts them to fp32, updates, takes the direction from
  the fp32 moments and rounds them back for storage, as optax does for its mu_dtype."""
  f32 = jnp.float32

  def init(params):
    z = lambda p: jnp.zeros(p.shape, moment_dtype)
    return AdamState(jnp.zeros((), jnp.int32), jax.tree.map(z, params), jax.tree.map(z, params))

  def update(g, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c = count.astype(f32)
    mu = jax.tree.map(lambda g, m: b1 * m.astype(f32) + (1 - b1) * g.astype(f32), g, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * v.astype(f32) + (1 - b2) * jnp.square(g.astype(f32)),
                      g, state.nu)
    upd = jax.tree.map(lambda g, m, v: ((m / (1 - b1 ** c)) / (jnp.sqrt(v / (1 - b2 ** c)) + eps))
                       .astype(g.dtype), g, mu, nu)
    store = lambda t: jax.tree.map(lambda x: x.astype(moment_dtype), t)
    return upd, AdamState(count, store(mu), store(nu))

  return optax.GradientTransformation(init, update)


def adamw(lr, cfg) -> optax.GradientTransformation:
  """AdamW of the main and indexer groups: optax's with fp32 moments (SPEC §9), or with the
  moments stored in optim.moment_dtype (bfloat16: DeepSeek-V3's recipe)."""
  o = cfg.optim
  if o.moment_dtype == 'float32':
    return optax.adamw(lr, o.b1, o.b2, o.eps, weight_decay=o.weight_decay, mask=decay_mask)
  return optax.chain(scale_by_adam_stored(o.b1, o.b2, o.eps, jnp.dtype(o.moment_dtype)),
                     optax.add_decayed_weights(o.weight_decay, decay_mask),
                     optax.scale_by_learning_rate(lr))


def make_optimizer(cfg, params) -> optax.GradientTransformation:
  """The multi-group optimizer for `params` (an nnx.State of Params). Clipping happens in
  `clip_grads`, before this transform, because the main and table groups share one norm."""
  o = cfg.optim
  main_lr = schedule(cfg, o.lr)
  idx_lr = warmup_indexer_schedule(cfg) if cfg.dsa.stage == 'warmup' else main_lr
  table_lr = schedule(cfg, o.lr * cfg.engram.lr_mult)
  if cfg.engram.table_optimizer == 'lazy_adam':
    table_tx = lazy_adam(table_lr, o.b1, o.b2, o.eps)
  else:
    table_tx = optax.adam(table_lr, o.b1, o.b2, o.eps)
  txs = {
      'main': adamw(main_lr, cfg),
      'indexer': adamw(idx_lr, cfg),
      'table': table_tx,
      'frozen': optax.set_to_zero(),
  }
  return optax.multi_transform(txs, labels(params, cfg))


def global_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_grads(grads, cfg):
  """Per-group global-norm clipping; returns (clipped grads, {'grad_norm', 'indexer_grad_norm'})."""
  lab = labels(grads, cfg)
  pick = lambda names: jax.tree.map(lambda g, l: g if l in names else jnp.zeros_like(g), grads, lab)
  main_norm = global_norm(pick(('main', 'table')))
  idx_norm = global_norm(pick(('indexer',)))
  f_main = jnp.minimum(1.0, cfg.optim.clip_norm / (main_norm + 1e-6))
  f_idx = jnp.minimum(1.0, cfg.optim.indexer_clip_norm / (idx_norm + 1e-6))
  scale = {'main': f_main, 'table': f_main, 'indexer': f_idx, 'frozen': jnp.zeros(())}
  clipped = jax.tree.map(lambda g, l: g * scale[l].astype(g.dtype), grads, lab)
  return clipped, {'grad_norm': main_norm, 'indexer_grad_norm': idx_norm}
