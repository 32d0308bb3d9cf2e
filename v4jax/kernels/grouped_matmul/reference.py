"""Reference grouped matmul: `jax.lax.ragged_dot`, correct on every backend (slow on GPU).

Rows of `x_MK` are contiguous by group: rows [off_g, off_g + group_sizes_G[g]) multiply
`w_GKN[g]`. Rows past sum(group_sizes_G) come out zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(x_MK: jax.Array, w_GKN: jax.Array, group_sizes_G: jax.Array, *,
                   preferred_element_type=jnp.float32) -> jax.Array:
  return jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G.astype(jnp.int32),
                            preferred_element_type=preferred_element_type)
