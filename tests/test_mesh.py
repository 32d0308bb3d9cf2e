"""Mesh construction and logical-axis rules."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from v4jax.config import ConfigError, default_config
from v4jax.parallel.mesh import make_mesh, resolve_axis_sizes
from v4jax.parallel.rules import RULES, logical_to_spec


def test_rest_axis_is_filled():
  c = default_config().mesh
  c.data, c.fsdp, c.expert = 2, -1, 2
  mesh = make_mesh(c)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'expert': 2, 'tensor': 1}


def test_sizes_that_do_not_divide_name_the_product():
  with pytest.raises(ConfigError, match=r'product 3\) do not divide the 8 devices'):
    resolve_axis_sizes({'data': 3, 'fsdp': -1, 'expert': 1, 'tensor': 1}, 8, 'config.mesh')
  with pytest.raises(ConfigError, match='multiply to 4, not the 8 devices'):
    resolve_axis_sizes({'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 1}, 8, 'config.mesh')


def test_rules_map_and_skip_indivisible():
  c = default_config().mesh
  c.data, c.fsdp, c.expert, c.tensor = 1, 4, 2, 1
  mesh = make_mesh(c)
  ep = RULES['fsdp_ep']
  assert logical_to_spec(('exp', 'embed', 'mlp_moe'), ep, mesh, (8, 64, 32)) == P('expert', 'fsdp', None)
  # 5 experts do not divide over expert=2 -> replicated; embed then takes fsdp x expert.
  assert logical_to_spec(('exp', 'embed', 'mlp_moe'), ep, mesh, (5, 64, 32)) == \
      P(None, ('fsdp', 'expert'), None)
  assert logical_to_spec(('batch', None), ep, mesh, (8, 3)) == P(('fsdp', 'expert'), None)
  assert len(jax.devices()) == 8
