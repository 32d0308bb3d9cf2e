"""Config validation: each bad field gives one line naming the field and the expectation."""
import pytest

from v4jax.config import ConfigError, default_config, validate


def _tiny():
  from helpers import load_preset
  return load_preset('tiny')


BAD = [
    ('model.n_heads', 0, 'config.model.n_heads=0 must be a positive integer'),
    ('model.dtype', 'float16', "config.model.dtype='float16' is not one of"),
    ('model.qk_rope_dim', 7, 'config.model.qk_rope_dim=7 must be even'),
    ('model.n_dense_layers', 9, 'config.model.n_dense_layers=9 must be in [0, model.n_layers=4]'),
    ('moe.top_k', 9, 'config.moe.top_k=9 must be in [1, moe.num_experts=8]'),
    ('moe.n_groups', 3, 'config.moe.n_groups=3 must divide moe.num_experts=8'),
    ('moe.topk_groups', 5, 'config.moe.topk_groups=5 must be in [1, moe.n_groups=4]'),
    ('dsa.stage', 'sparse2', "config.dsa.stage='sparse2' is not one of"),
    ('dsa.sparse_attention', 'mask', "config.dsa.sparse_attention='mask' is not one of"),
    ('dsa.head_dim', 8, 'config.dsa.head_dim=8 must be > model.qk_rope_dim=8'),
    ('engram.layer_ids', (7,), 'config.engram.layer_ids=(7,) must lie in [0, model.n_layers=4)'),
    ('engram.d_mem', 30, 'config.engram.d_mem=30 must be divisible by'),
    ('mhc.streams', 0, 'config.mhc.streams=0 must be a positive integer'),
    ('mesh.fsdp', 0, 'config.mesh.fsdp=0 must be a positive integer or -1'),
    ('optim.b2', 1.0, 'config.optim.b2=1.0 must be in [0, 1)'),
    ('train.grad_accum', 3, 'config.train.grad_accum=3 must divide data.global_batch=16'),
    ('data.val_fraction', 0.0, 'config.data.val_fraction=0.0 must be in (0, 1)'),
    ('mesh.rules', 'tp', "config.mesh.rules='tp' is not one of"),
    ('model.remat_save', ('moe_out',), "config.model.remat_save=('moe_out',) must be a tuple of "
     "names from ('moe_dispatch', 'moe_gemms', 'mla_ckv', 'mhc_coeffs')"),
    ('model.remat_recompute', ('moe_gemms',), "config.model.remat_recompute=('moe_gemms',) must "
     "be a tuple of names from ('mla_up', 'indexer_q', 'ffn_in')"),
    ('model.remat_dot_barrier', True, "config.model.remat_dot_barrier=True applies to block "
     "remat only (model.remat is 'none')"),
    ('engram.rows_ahead', ('m',), "config.engram.rows_ahead=('m',) must be a tuple of names from "
     "('theta', 'moments')"),
    ('optim.moment_dtype', 'float16', "config.optim.moment_dtype='float16' is not one of"),
    ('kernels.hc_mix', 'triton', "config.kernels.hc_mix='triton' is not one of"),
    ('kernels.kl_key_group', -1, 'config.kernels.kl_key_group=-1 must be an integer >= 0'),
]


@pytest.mark.parametrize('path,value,msg', BAD, ids=[b[0] for b in BAD])
def test_bad_field_one_line_error(path, value, msg):
  c = _tiny()
  section, field = path.split('.')
  c[section][field] = value
  with pytest.raises(ConfigError) as e:
    validate(c)
  text = str(e.value)
  assert msg in text, text
  assert '\n' not in text


def test_defaults_and_tiny_validate():
  validate(default_config())
  validate(_tiny())


def test_override_wrong_type_is_rejected():
  c = default_config()
  with pytest.raises(TypeError):
    c.model.n_heads = 'four'
