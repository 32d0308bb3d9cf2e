"""Logical-axis -> mesh-axis rules, one table per parallelism preset.

Model code tags parameters and activations with logical names (`embed`, `heads`, `exp`, ...).
A preset maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated).
`activate(mesh, preset)` makes a preset current for `constrain`, which is a no-op without one,
so model code runs unchanged on one device.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded parameters),
`expert` (experts; also a batch axis outside the MoE), `tensor` (heads / FFN inner dims).
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH = ('data', 'fsdp', 'expert')

# Logical names used by the model (glossary in docs/architecture.md):
#   activations: batch, seq, act_embed, act_heads, act_mlp, act_exp
#   parameters: vocab, embed, q_lora, kv_lora, kv_rope, heads, head_dim, mlp, exp, mlp_moe,
#               indexer_heads, indexer_dim, norm, streams, hc_coeff, engram_rows, engram_dim,
#               engram_mem, conv
#   layers: the leading dim of a scanned run of blocks (model.scan_layers); never sharded
RULES: dict[str, dict[str, object]] = {
    # Everything large sharded over fsdp on its embed dim (the low-rank MLA up-projections,
    # which have none, on their rank dim); batch over every data-like axis.
    'fsdp': {
        'batch': BATCH, 'seq': None, 'act_embed': None, 'act_heads': None, 'act_mlp': None,
        'act_exp': None,
        'vocab': None, 'embed': 'fsdp', 'q_lora': 'fsdp', 'kv_lora': 'fsdp', 'kv_rope': None,
        'heads': None, 'head_dim': None, 'mlp': None, 'exp': None, 'mlp_moe': None,
        'indexer_heads': None, 'indexer_dim': None, 'norm': None, 'streams': None,
        'hc_coeff': None, 'engram_rows': 'fsdp', 'engram_dim': None, 'engram_mem': None,
        'conv': None, 'layers': None,
    },
    # Experts over `expert`; every other parameter fully sharded over fsdp x expert (the expert
    # axis is a data axis outside the MoE, so replicating dense weights over it would waste HBM).
    'fsdp_ep': {},
    # fsdp plus tensor parallelism over heads and FFN inner dims.
    'fsdp_tp': {},
}
RULES['fsdp_ep'] = {**{k: ('fsdp', 'expert') if v == 'fsdp' else v
                       for k, v in RULES['fsdp'].items()},
                    'exp': 'expert', 'act_exp': 'expert'}
RULES['fsdp_tp'] = {**RULES['fsdp'], 'heads': 'tensor', 'mlp': 'tensor', 'mlp_moe': 'tensor',
                    'indexer_heads': 'tensor', 'act_heads': 'tensor', 'act_mlp': 'tensor',
                    'vocab': 'tensor'}

_current: list[tuple[jax.sharding.Mesh, Mapping[str, object]]] = []


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, object],
                    mesh: jax.sharding.Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for a tuple of logical names. A mesh axis is used at most once, and (given
  `mesh` and `shape`) only where it divides the dim, so odd sizes fall back to replication."""
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise KeyError(f'logical axis {name!r} has no rule; known: {sorted(rules)}')
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    keep = []
    for a in mesh_axes:
      if a in used:
        continue
      if mesh is not None:
        size = mesh.shape[a]
        if size == 1:
          continue
        prod = size
        for k in keep:
          prod *= mesh.shape[k]
        if shape is not None and shape[i] % prod:
          continue
      keep.append(a)
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def named_sharding(mesh, axes, rules, shape=None, memory_kind=None) -> NamedSharding:
  s = NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))
  return s.with_memory_kind(memory_kind) if memory_kind else s


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, preset: str | Mapping[str, object]):
  """Makes (mesh, rules) current for `constrain` inside the block."""
  rules = RULES[preset] if isinstance(preset, str) else preset
  _current.append((mesh, rules))
  try:
    yield rules
  finally:
    _current.pop()


def current() -> tuple[jax.sharding.Mesh, Mapping[str, object]] | None:
  """The active (mesh, rules), or None outside `activate`."""
  return _current[-1] if _current else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op when no preset is active."""
  if not _current:
    return x
  mesh, rules = _current[-1]
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)))
