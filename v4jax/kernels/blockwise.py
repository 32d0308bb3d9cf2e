"""Query-block helpers shared by the attention/indexer references and the model.

Dims: B batch, T query positions, S key positions.

`map_query_blocks` runs a per-block function over query rows with `lax.map` under
`jax.checkpoint`, so neither the forward nor the saved residuals ever hold a [B,T,...,S]
tensor for all T at once: only one block of rows is live.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

MASK_BITS = 32          # keys per word of a packed top-k set (pack_mask)


def allowed_mask(q_offset, t_len: int, s_len: int, segment_ids_q_BT=None,
                 segment_ids_k_BS=None) -> jax.Array:
  """Bool [B|1, t_len, s_len]: key s is allowed for query row q_offset+t (s <= t, same segment)."""
  t = q_offset + jnp.arange(t_len)
  mask = (jnp.arange(s_len)[None, :] <= t[:, None])[None]
  if segment_ids_q_BT is not None:
    mask = mask & (segment_ids_q_BT[:, :, None] == segment_ids_k_BS[:, None, :])
  return mask


def selection_mask(idx_BTK: jax.Array, s_len: int) -> jax.Array:
  """Bool [B,T,s_len]: key s is in query t's top-k set (idx_BTK, -1 = empty slot)."""
  B, T, _ = idx_BTK.shape
  cols = jnp.where(idx_BTK >= 0, idx_BTK, s_len)                  # empty slots -> a spare column
  b = jnp.arange(B)[:, None, None]
  t = jnp.arange(T)[None, :, None]
  return jnp.zeros((B, T, s_len + 1), bool).at[b, t, cols].set(True)[..., :s_len]


def pack_mask(idx_BTK: jax.Array, s_len: int) -> jax.Array:
  """uint32 [B,T,ceil(s_len/32)]: bit s % 32 of word s // 32 is set iff key s is in query t's
  top-k set (idx_BTK, -1 = empty slot; repeated indices allowed): the masked attention kernel's
  form of the set (the GPU top-k kernel writes it directly)."""
  B, T, _ = idx_BTK.shape
  W = -(-s_len // MASK_BITS)
  sel_BTS = jnp.pad(selection_mask(idx_BTK, s_len), ((0, 0), (0, 0), (0, W * MASK_BITS - s_len)))
  bits = jnp.left_shift(jnp.uint32(1), jnp.arange(MASK_BITS, dtype=jnp.uint32))
  return jnp.sum(sel_BTS.reshape(B, T, W, MASK_BITS).astype(jnp.uint32) * bits, axis=-1,
                 dtype=jnp.uint32)


def map_query_blocks(fn: Callable, block: int, *xs):
  """Applies fn(q_offset, *x_blocks) over blocks of `block` query rows and joins the outputs.

  Each x in xs is [B,T,...] (or None, passed through as None). fn returns a pytree of [B,Tq,...]
  arrays. T is padded up to a multiple of `block` by repeating the last row (so padded rows stay
  well-defined); padded output rows are dropped. block <= 0 or >= T means one block.
  """
  present = [x for x in xs if x is not None]
  T = present[0].shape[1]
  if block <= 0 or block >= T:
    return fn(0, *xs)
  n = -(-T // block)

  def body(args):
    return fn(args[0], *args[1:])

  out = jax.lax.map(jax.checkpoint(body), (jnp.arange(n) * block,) +
                    tuple(None if x is None else split_blocks(x, block) for x in xs))
  return jax.tree.map(lambda o: join_blocks(o, T), out)


def split_blocks(x: jax.Array, block: int, fill=None) -> jax.Array:
  """[B,T,...] -> [n,B,block,...] blocks of query rows; T is padded up to n*block with `fill`
  (None: the last row repeated, so padded rows stay well-defined)."""
  B, T = x.shape[:2]
  n = -(-T // block)
  pads = [(0, 0), (0, n * block - T)] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pads, mode='edge') if fill is None else jnp.pad(x, pads, constant_values=fill)
  return jnp.swapaxes(x.reshape((B, n, block) + x.shape[2:]), 0, 1)


def join_blocks(x: jax.Array, T: int) -> jax.Array:
  """Inverse of split_blocks: [n,B,block,...] -> [B,T,...] without the padded rows."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])[:, :T]
