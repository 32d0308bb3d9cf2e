"""Device-side math for Engram tables kept outside the model (SPEC §6.3 backward, §6.4).

Dims: B batch, T positions, J table heads per layer, H row width d_h, U unique rows of the step's
global batch (padded to the static U_max = global_batch * T * J), S = 3 row slots (theta, m, v),
P slots of the per-process parts (several processes: one per batch shard of the mesh).

Per step the host hands the device, per Engram layer, the step's unique rows (`theta_UH`, fp32),
their optimizer moments apart (`moments_U2H`: the forward and backward need only theta, so the
step copies the moments to the device only for the optimizer at its end) and each position's
index into the rows (`inv_BTJ`). The model sees `expand_rows(theta_UH, inv_BTJ)`; its backward
sums the duplicate references of a row in a fixed order (sort, then a segmented tree scan), so
the row gradient does not depend on scatter atomics. `lazy_adam_rows` then updates exactly the
rows with a non-zero gradient, as `optim.lazy_adam` does for a device table.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from v4jax import compat

__all__ = ['unique_rows', 'merge_unique_rows', 'patch_map', 'expand_rows', 'embeddings',
           'assemble_rows', 'step_rows', 'patch_rows', 'join_rows', 'lazy_adam_rows']

_F32 = jnp.float32


# ---- host side (numpy) ----------------------------------------------------------------------
def unique_rows(rows_BTJ: np.ndarray, u_max: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(uniq [u_max] int32 sorted, padded with its last row; inv [B,T,J] int32; U).

  One sort of (row, position) keys: rows in the high bits, so equal rows sit together and each
  carries its position for the inverse. When every head's rows lie above the previous head's (the
  Engram hash adds each head's table offset), each head's keys sort apart (J short sorts, and the
  concatenation is already globally sorted)."""
  J = rows_BTJ.shape[-1]
  cols_JN = rows_BTJ.reshape(-1, J).T.astype(np.int64)
  N = cols_JN.shape[1]
  per_head = J > 1 and N > 0 and bool(np.all(cols_JN.max(1)[:-1] < cols_JN.min(1)[1:]))
  keys = cols_JN if per_head else cols_JN.reshape(1, -1)
  width = keys.shape[1]
  bits = max(int(width - 1).bit_length(), 1)
  keys = (keys << bits) | np.arange(width, dtype=np.int64)
  keys.sort(axis=1)
  r = (keys >> bits).reshape(-1)
  first = np.empty(r.shape, bool)
  first[:1] = True
  np.not_equal(r[1:], r[:-1], out=first[1:])
  gid = np.cumsum(first, dtype=np.int32)
  gid -= 1
  pos = (keys & ((1 << bits) - 1)) + (np.arange(keys.shape[0]) * width)[:, None]
  inv = np.empty(r.shape, np.int32)
  inv[pos.reshape(-1)] = gid                     # positions in [J, N] order
  uniq = r[first].astype(np.int32)
  return _padded(uniq, u_max), inv.reshape(J, N).T.reshape(rows_BTJ.shape), uniq.shape[0]


def _padded(uniq: np.ndarray, u_max: int) -> np.ndarray:
  """Sorted unique rows as [u_max] int32, padded with the last row (0 when empty)."""
  n = uniq.shape[0]
  if n > u_max:
    raise ValueError(f'{n} unique Engram rows exceed U_max={u_max}')
  out = np.empty((u_max,), np.int32)
  out[:n] = uniq
  out[n:] = uniq[-1] if n else 0
  return out


def merge_unique_rows(parts: list[np.ndarray], rows_BTJ: np.ndarray,
                      u_max: int) -> tuple[np.ndarray, np.ndarray, int]:
  """unique_rows of the global batch from every process's sorted unique rows (`parts`), with the
  inv of this process's own batch rows_BTJ: every process gets the same uniq."""
  uniq = np.unique(np.concatenate(parts)) if parts else np.zeros((0,), np.int32)
  inv = np.searchsorted(uniq, rows_BTJ.reshape(-1)).reshape(rows_BTJ.shape).astype(np.int32)
  return _padded(uniq, u_max), inv, uniq.shape[0]


def patch_map(uniq: np.ndarray, n: int, prev_uniq: np.ndarray | None, prev_n: int) -> np.ndarray:
  """src [u_max] int32: where each of this step's rows sits among the previous step's rows
  (-1 if absent), so the device can patch in the previous step's updated values."""
  src = np.full(uniq.shape, -1, np.int32)
  if prev_uniq is None or not n or not prev_n:
    return src
  pos = np.minimum(np.searchsorted(prev_uniq[:prev_n], uniq[:n]), prev_n - 1)
  src[:n] = np.where(prev_uniq[pos] == uniq[:n], pos, -1)
  return src


# ---- device side ----------------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _expand(theta_UH, inv_N, n_rows):
  del n_rows
  return jnp.take(theta_UH, inv_N, axis=0, mode='clip')


def _expand_fwd(theta_UH, inv_N, n_rows):
  return _expand(theta_UH, inv_N, n_rows), inv_N


def _segmented_add(a, b):
  fa, va = a
  fb, vb = b
  return fa | fb, jnp.where(fb[..., None], vb, va + vb)


def _expand_bwd(n_rows, inv_N, g_NH):
  """Per-row sums of g over the references to that row, in a fixed (sorted, tree) order."""
  order = jnp.argsort(inv_N, stable=True)
  s_inv = inv_N[order]
  s_g = g_NH[order].astype(_F32)
  start = jnp.concatenate([jnp.ones((1,), bool), s_inv[1:] != s_inv[:-1]])
  last = jnp.concatenate([s_inv[1:] != s_inv[:-1], jnp.ones((1,), bool)])
  _, sums = jax.lax.associative_scan(_segmented_add, (start, s_g))
  dst = jnp.where(last, s_inv, n_rows)                     # n_rows: dropped
  d_theta = jnp.zeros((n_rows, g_NH.shape[-1]), _F32).at[dst].set(sums, mode='drop')
  return d_theta, None


_expand.defvjp(_expand_fwd, _expand_bwd)


def expand_rows(theta_UH: jax.Array, inv_BTJ: jax.Array) -> jax.Array:
  """[B,T,J,H] = theta_UH[inv_BTJ]; the backward returns [U,H] per-row sums, deterministically."""
  B, T, J = inv_BTJ.shape
  out = _expand(theta_UH, inv_BTJ.reshape(-1), theta_UH.shape[0])
  return out.reshape(B, T, J, theta_UH.shape[-1])


def embeddings(theta: dict, batch: dict, dtype) -> dict:
  """{'engram_emb_<l>': e [B,T,J*H]} from each layer's rows and the batch's engram_inv_<l>."""
  out = {}
  for lid, th in theta.items():
    e = expand_rows(th, batch[f'engram_inv_{lid}'])
    out[f'engram_emb_{lid}'] = e.reshape(e.shape[:2] + (-1,)).astype(dtype)
  return out


def assemble_rows(parts_PU: jax.Array, bounds_P2: jax.Array) -> jax.Array:
  """[U,...] from the processes' parts [P,U,...] (several processes, docs/engram_host_tables.md):
  slot p holds rows [lo_p, hi_p) of U (its process's owned segment; empty for all other slots)
  and anything elsewhere. The bit patterns of the owned rows are summed as integers, every other
  term is 0, so each row arrives bit-exactly from its owner (no float rounding, no -0.0 -> 0)."""
  u = jnp.arange(parts_PU.shape[1])
  own = (u[None] >= bounds_P2[:, :1]) & (u[None] < bounds_P2[:, 1:])          # [P, U]
  bits = jax.lax.bitcast_convert_type(parts_PU, jnp.uint32)
  bits = jnp.where(own.reshape(own.shape + (1,) * (bits.ndim - 2)), bits, jnp.uint32(0))
  return jax.lax.bitcast_convert_type(jnp.sum(bits, axis=0, dtype=jnp.uint32), _F32)


def step_rows(eng: dict, part: str) -> dict:
  """Each layer's gathered rows of a step's `eng` inputs on the device, `part` 'theta' ([U,H]) or
  'moments' ([U,2,H], Adam's m and v): as handed over by one process (rows in pinned host staging
  are copied to the device here, inside the step, where this value is first used; a no-op for
  device rows), or assembled from the processes' parts (`eng['bounds']` present)."""
  if 'bounds' not in eng:
    return {l: jax.device_put(r, compat.DEVICE) for l, r in eng[part].items()}
  return {l: assemble_rows(r.reshape(eng['bounds'][l].shape[0], -1, *r.shape[1:]),
                          eng['bounds'][l]) for l, r in eng[part].items()}


def patch_rows(rows_U: jax.Array, src_U: jax.Array, prev_U: jax.Array) -> jax.Array:
  """This step's gathered rows [U,...] with the previous step's updated rows patched in where
  shared (prev_U: the same slots of the last step's [U,3,H] output)."""
  take = jnp.take(prev_U, jnp.maximum(src_U, 0), axis=0)
  return jnp.where(src_U.reshape((-1,) + (1,) * (rows_U.ndim - 1)) >= 0, take, rows_U)


def join_rows(theta_UH: jax.Array, moments_U2H: jax.Array) -> jax.Array:
  """[U,3,H] rows (theta, m, v) from theta and the moments."""
  return jnp.concatenate([theta_UH[:, None], moments_U2H], axis=1)


def lazy_adam_rows(rows_US3H, g_UH, count, lr, b1: float, b2: float, eps: float, finite):
  """Row-wise Adam (SPEC §6.4) on [theta, m, v] rows: rows whose gradient is all zero (padding,
  rows that no loss reaches) and every row of a non-finite step keep their exact bits.

  count: updates applied before this one (bias correction uses count + 1); lr: this step's rate.
  """
  th, m, v = rows_US3H[:, 0], rows_US3H[:, 1], rows_US3H[:, 2]
  g = g_UH.astype(_F32)
  c = (count + 1).astype(_F32)
  touched = jnp.any(g != 0, axis=-1, keepdims=True) & finite
  mu = jnp.where(touched, b1 * m + (1 - b1) * g, m)
  nu = jnp.where(touched, b2 * v + (1 - b2) * g * g, v)
  upd = -lr * (mu / (1 - b1 ** c)) / (jnp.sqrt(nu / (1 - b2 ** c)) + eps)
  th = jnp.where(touched, th + upd, th)
  return jnp.stack([th, mu, nu], axis=1)
