"""Golden PartitionSpecs: every preset's sharding of every tiny-config variable, against a
checked-in file, so a rules or model change that moves a parameter's sharding shows up in review.

Regenerate after an intended change:
  V4JAX_REGEN_GOLDEN=1 python -m pytest -q tests/parallel/test_rules_golden.py
"""
import json
import os

import jax
import pytest
from flax import nnx

from helpers import load_preset
from v4jax.model.transformer import Transformer
from v4jax.parallel.mesh import make_mesh
from v4jax.parallel.rules import RULES
from v4jax.trainer import engram_setup, var_shardings

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden_specs.json')
MESHES = {   # 8 fake devices
    'fsdp': dict(data=1, fsdp=4, expert=2, tensor=1),
    'fsdp_ep': dict(data=1, fsdp=4, expert=2, tensor=1),
    'fsdp_tp': dict(data=1, fsdp=4, expert=1, tensor=2),
}


def _specs(preset: str) -> dict:
  cfg = load_preset('tiny')
  cfg.mesh.update(rules=preset, **MESHES[preset])
  _, rows = engram_setup(cfg, None)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0),
                                             engram_rows_per_layer=rows))
  state = nnx.state(model)
  shardings = var_shardings(state, make_mesh(cfg.mesh), RULES[preset])
  is_var = lambda x: isinstance(x, nnx.Variable)
  out = {}
  for (path, v), s in zip(jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0],
                          jax.tree.leaves(shardings, is_leaf=is_var)):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    out[name] = f'{tuple(v.value.shape)} {s.value.spec}'
  return out


def _current() -> dict:
  return {p: {'mesh': MESHES[p], 'specs': _specs(p)} for p in RULES}


def test_presets_match_golden_file():
  got = _current()
  if os.environ.get('V4JAX_REGEN_GOLDEN'):
    with open(GOLDEN, 'w') as f:
      json.dump(got, f, indent=1, sort_keys=True)
      f.write('\n')
  if not os.path.exists(GOLDEN):
    pytest.fail(f'{GOLDEN} is missing: run with V4JAX_REGEN_GOLDEN=1 to create it')
  want = json.load(open(GOLDEN))
  assert sorted(got) == sorted(want), 'presets differ from the golden file'
  for preset in want:
    g, w = got[preset]['specs'], want[preset]['specs']
    missing, extra = sorted(set(w) - set(g)), sorted(set(g) - set(w))
    changed = {k: (w[k], g[k]) for k in sorted(set(g) & set(w)) if g[k] != w[k]}
    assert not (missing or extra or changed), (
        f'{preset}: missing {missing[:5]}, new {extra[:5]}, changed (golden, now) '
        f'{dict(list(changed.items())[:5])}; regenerate with V4JAX_REGEN_GOLDEN=1 if intended')
