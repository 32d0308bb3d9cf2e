"""Safetensors export and import (tools/convert_to_safetensors.py, tools/import_safetensors.py).

- Layout oracle: each HF tensor is checked element by element against SPEC §11 (index loops in
  numpy, not the module's transforms), and the transforms invert.
- Round trip: train tiny (every component) 2 steps -> export -> import -> every tensor and the
  logits on a fixed batch are bit-identical for fp32; for bf16 every tensor equals the numpy
  bf16 rounding of the original (matrices) or the original (fp32-kept tensors).
- DeepSeek-V3 layout: a source without mHC/Engram/indexer tensors and with FP8 blocks imports
  with --fresh; without it one error lists what is missing.
- Bad sources: missing/extra/mis-shaped tensors, a bad MTP copy, a malformed header and a
  truncated file each give one error line naming the tensor/file, and nothing is written.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from helpers import ROOT, small_tiny
from v4jax.cli import ToolError
from v4jax.convert import hf_names
from v4jax.convert.ckpt_reader import CheckpointReader
from v4jax.convert.export import export
from v4jax.convert.importer import dequantize_fp8, import_checkpoint
from v4jax.convert.safetensors_io import SafetensorsDir, ShardWriter, NAMES
from v4jax.data.engram_hash import hash_rows
from v4jax.model.transformer import BlockInputs, Transformer
from v4jax.optim import path_str
from v4jax.trainer import Trainer, engram_setup

# The overrides that turn configs/tiny.py into helpers.small_tiny() on the CLI.
CLI_CONFIG = ['--config', os.path.join(ROOT, 'configs/tiny.py'), '--config.model.n_layers=2',
              '--config.dsa.topk=8', '--config.data.seq_len=32', '--config.data.global_batch=8',
              '--config.data.max_docs=24', '--config.train.steps=6',
              '--config.checkpoint.async_save=False', '--config.log.tensorboard=False']


def _cfg():
  return small_tiny()     # the trainer tests' config: compiles are shared through the cache


def _run(args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('run'))
  tr = Trainer(_cfg(), wd)
  for _ in range(2):
    assert np.isfinite(float(tr.step(next(tr.train_iter))['loss']))
  tr.save(force=True)
  tr.mngr.wait_until_finished()
  return wd


@pytest.fixture(scope='module')
def fp32_export(trained, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('x') / 'fp32')
  r = _run(['tools/convert_to_safetensors.py', '--workdir', trained, '--out', out,
            '--dtype', 'fp32', '--max-shard-size', '300KB'])
  assert r.returncode == 0, r.stderr
  return out


def _arrays(workdir):
  r = CheckpointReader(workdir)
  return r, {k: r.read(k) for k in r.arrays}


@pytest.fixture(scope='module')
def forward():
  """logits(arrays, batch) and the MTP-inclusive loss for {(collection, path): array}."""
  cfg = _cfg()
  spec, rows = engram_setup(cfg, None)
  gd, p_abs, r_abs = nnx.split(nnx.eval_shape(
      lambda: Transformer(cfg, rngs=nnx.Rngs(params=0), engram_rows_per_layer=rows)), nnx.Param, ...)

  def fill(coll, tree, arrays):
    def one(path, _):
      k = path_str(path)
      return jnp.asarray(arrays[(coll, k[:-len('/value')] if k.endswith('/value') else k)])
    return jax.tree_util.tree_map_with_path(one, tree)

  @jax.jit
  def fwd(p, r, batch):
    m = nnx.merge(gd, p, r)
    inp = BlockInputs(batch['positions'], None, batch['loss_mask'] > 0,
                      {l: batch[f'engram_rows_{l}'] for l in cfg.engram.layer_ids})
    X, _ = m.trunk(batch['tokens'], inp)
    return jnp.einsum('btd,dv->btv', m.norm(m.head_reduce(X)), m.head[...]), m(batch, 0.3)[0]

  rng = np.random.default_rng(7)
  B, T = 2, cfg.data.seq_len
  tok = rng.integers(0, cfg.model.vocab_size, (B, T)).astype(np.int32)
  batch = {'tokens': tok, 'targets': np.roll(tok, -1, 1),
           'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
           'segment_ids': np.ones((B, T), np.int32), 'loss_mask': np.ones((B, T), np.float32)}
  for layer, rows_ in hash_rows(spec, tok).items():
    batch[f'engram_rows_{layer}'] = rows_
  return lambda arrays: [np.asarray(v) for v in fwd(fill('params', p_abs, arrays),
                                                     fill('rest', r_abs, arrays), batch)]


# ---- layout oracle (SPEC §11, element by element) -------------------------------------------

def test_layout_matches_spec_elementwise():
  rng = np.random.default_rng(0)
  r, H, d, D = 3, 2, 5, 4
  wq_b = rng.standard_normal((r, H, d))
  hf = hf_names.to_hf('T_in', wq_b)           # q_b_proj [H*d_qk, r_q], per head rows [nope|rope]
  wo = rng.standard_normal((H, d, D))
  o = hf_names.to_hf('T_out', wo)             # o_proj [D, H*d_v]
  conv = rng.standard_normal((4, 6))          # [w, nD] -> [nD, 1, w]
  c = hf_names.to_hf('conv', conv)
  for h in range(H):
    for j in range(d):
      for i in range(r):
        assert hf[h * d + j, i] == wq_b[i, h, j]
      for k in range(D):
        assert o[k, h * d + j] == wo[h, j, k]
  for ch in range(6):
    for tap in range(4):
      assert c[ch, 0, tap] == conv[tap, ch]
  for kind, x in (('id', rng.standard_normal((3, 4))), ('T', rng.standard_normal((3, 4))),
                  ('T_in', wq_b), ('T_out', wo), ('conv', conv)):
    y = hf_names.to_hf(kind, x)
    assert y.shape == hf_names.hf_shape(kind, x.shape)
    np.testing.assert_array_equal(hf_names.from_hf(kind, np.ascontiguousarray(y), x.shape), x)


def test_layout_names_and_splits():
  cfg = _cfg()
  shapes = {('params', 'blocks/1/ffn/experts/w_gate'): (8, 64, 32),
            ('params', 'engram/1/key_proj/kernel'): (4, 32, 64),
            ('params', 'mtp/0/block/attn/wq_a'): (64, 32), ('params', 'embed'): (258, 64),
            ('params', 'head'): (64, 258), ('params', 'mtp/0/eh_proj'): (128, 64),
            ('rest', 'blocks/1/ffn/router/bias'): (8,)}
  by = {e.path: e for e in hf_names.layout(cfg.model.n_layers, shapes)}
  e = by['blocks/1/ffn/experts/w_gate']
  assert e.hf == tuple(f'model.layers.1.mlp.experts.{i}.gate_proj.weight' for i in range(8))
  assert e.hf_piece_shape == (32, 64)
  assert by['engram/1/key_proj/kernel'].hf[3] == 'model.layers.1.engram.key_projs.3.weight'
  assert by['mtp/0/block/attn/wq_a'].hf == ('model.layers.2.self_attn.q_a_proj.weight',)
  assert by['mtp/0/eh_proj'].hf_piece_shape == (64, 128)     # [D, 2D], columns [emb | hidden]
  assert by['embed'].copies == ('model.layers.2.embed_tokens.weight',)
  assert by['head'].copies == ('model.layers.2.shared_head.head.weight',)
  assert by['blocks/1/ffn/router/bias'].hf == ('model.layers.1.mlp.gate.e_score_correction_bias',)
  assert by['blocks/1/ffn/router/bias'].keep_fp32 and not by['head'].keep_fp32
  with pytest.raises(ValueError, match='blocks/0/new_thing'):
    hf_names.layout(2, {('params', 'blocks/0/new_thing'): (3,)})


def test_dequantize_fp8_blocks_with_ragged_edges():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((300, 200)).astype(ml_dtypes.float8_e4m3fn)
  s = rng.uniform(0.5, 2, (3, 2)).astype(np.float32)
  want = np.empty((300, 200), np.float32)
  for i in range(300):
    for j in range(200):
      want[i, j] = float(w[i, j]) * s[i // 128, j // 128]
  np.testing.assert_array_equal(dequantize_fp8(w, s, (128, 128)), want)


# ---- round trip -----------------------------------------------------------------------------

def test_export_files(trained, fp32_export):
  files = sorted(f for f in os.listdir(fp32_export) if f.endswith('.safetensors'))
  assert len(files) > 1 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  index = json.load(open(os.path.join(fp32_export, 'model.safetensors.index.json')))
  from safetensors import safe_open
  seen = {}
  for f in files:
    with safe_open(os.path.join(fp32_export, f), 'np') as fh:    # the reference reader
      for k in fh.keys():
        seen[k] = fh.get_tensor(k)
        assert index['weight_map'][k] == f
  assert set(seen) == set(index['weight_map'])
  assert index['metadata']['total_size'] == sum(v.nbytes for v in seen.values())
  r, arrays = _arrays(trained)
  np.testing.assert_array_equal(seen['model.layers.2.embed_tokens.weight'], arrays[('params', 'embed')])
  np.testing.assert_array_equal(seen['lm_head.weight'], arrays[('params', 'head')].T)
  np.testing.assert_array_equal(seen['model.layers.1.engram.hash_multipliers'],
                                np.asarray(r.hash_spec.multipliers[0]))
  assert seen['model.engram_compressed_lookup'].dtype == np.int64
  cfg = json.load(open(os.path.join(fp32_export, 'config.json')))
  assert cfg['hc_mult'] == 4 and cfg['index_topk'] == 8 and cfg['num_nextn_predict_layers'] == 1
  assert cfg['engram']['layer_ids'] == [1] and cfg['engram']['engram_vocab_size'] == [101, 101]
  assert cfg['v4jax']['step'] == 2


def test_round_trip_fp32_bit_exact(trained, fp32_export, forward, tmp_path):
  wd = str(tmp_path / 'imported')
  r = _run(['tools/import_safetensors.py', '--src', fp32_export, '--workdir', wd, *CLI_CONFIG])
  assert r.returncode == 0, r.stderr
  r0, a0 = _arrays(trained)
  r1, a1 = _arrays(wd)
  assert r1.step == 0 and set(a0) == set(a1)
  for k in a0:
    np.testing.assert_array_equal(a1[k], a0[k], err_msg=str(k))
  assert r1.hash_spec == r0.hash_spec
  (l0, s0), (l1, s1) = forward(a0), forward(a1)
  np.testing.assert_array_equal(l1, l0)
  assert s1 == s0


def test_round_trip_bf16(trained, forward, tmp_path):
  out, wd = str(tmp_path / 'bf16'), str(tmp_path / 'imported')
  export(trained, out, dtype='bf16')
  st = SafetensorsDir(out)
  assert st.dtype('model.layers.1.mlp.experts.0.up_proj.weight') == 'BF16'
  assert st.dtype('model.layers.0.attn_hc.fn') == 'F32'
  import_checkpoint(out, _cfg(), wd, step=5)
  r0, a0 = _arrays(trained)
  r1, a1 = _arrays(wd)
  assert r1.step == 5
  for e in hf_names.layout(2, r0.shapes()):
    x = a0[(e.collection, e.path)]
    want = x if e.keep_fp32 else x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(a1[(e.collection, e.path)], want, err_msg=e.path)
  (l0, _), (l1, _) = forward(a0), forward(a1)
  # Weights carry a relative rounding error <= 2^-9. Through the network a position's logits
  # move by ~1.5e-3 of the largest logit, except where the rounding flips a discrete choice
  # (DSA top-k keys, MoE top-k experts): there up to ~6e-2. Bounds: the median position within
  # 4e-3 (one bf16 ulp, 2^-8) and 80% of positions within 1e-2.
  per_pos = np.abs(l1 - l0).max(-1) / np.abs(l0).max()
  assert np.median(per_pos) <= 4e-3 and np.mean(per_pos <= 1e-2) >= 0.8, per_pos
  assert not np.array_equal(l1, l0)


def test_host_memory_engram_tables_both_ways(fp32_export, tmp_path):
  """engram.table_memory=host keeps the tables in their own checkpoint item: importing into it
  and exporting from it give back the same tensors."""
  wd, out = str(tmp_path / 'host'), str(tmp_path / 'again')
  import_checkpoint(fp32_export, small_tiny(**{'engram.table_memory': 'host'}), wd)
  assert os.path.isdir(os.path.join(wd, 'checkpoints', '0', 'host_tables'))
  export(wd, out, dtype='fp32')
  a, b = SafetensorsDir(fp32_export), SafetensorsDir(out)
  assert sorted(a.names) == sorted(b.names)
  for n in a.names:
    np.testing.assert_array_equal(b.read(n), a.read(n), err_msg=n)


# ---- DeepSeek-V3 layout, FP8, fresh components ----------------------------------------------

def _write_source(path, tensors: dict, config: dict | None):
  os.makedirs(path, exist_ok=True)
  plan = [(k, NAMES[v.dtype], v.shape) for k, v in tensors.items()]
  w = ShardWriter(os.path.join(path, 'model.safetensors'), plan)
  for k, v in tensors.items():
    w.write(k, v)
  w.close()
  if config is not None:
    json.dump(config, open(os.path.join(path, 'config.json'), 'w'))


def _source(fp32_export):
  st = SafetensorsDir(fp32_export)
  return {n: st.read(n) for n in st.names}, json.load(open(os.path.join(fp32_export, 'config.json')))


def _quantize(w):
  """FP8 E4M3 blocks of 128x128 with one fp32 scale each (DeepSeek-V3's weight_scale_inv)."""
  s = np.empty((math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128)), np.float32)
  q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
      s[i, j] = np.abs(blk).max() / 448.0
      q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (blk / s[i, j]).astype(ml_dtypes.float8_e4m3fn)
  return q, s


def test_v3_layout_fp8_with_fresh_components(trained, fp32_export, tmp_path):
  tensors, config = _source(fp32_export)
  v3 = {k: v for k, v in tensors.items() if not hf_names.components_of_hf(k, 2) - {'mtp'}}
  for k in ('hc_mult', 'hc_sinkhorn_iters', 'hc_eps', 'engram', 'index_topk'):
    config.pop(k)
  fp8 = ['model.layers.1.mlp.experts.3.down_proj.weight', 'model.layers.0.self_attn.q_a_proj.weight']
  for k in fp8:
    v3[k], v3[k[:-len('weight')] + 'weight_scale_inv'] = _quantize(v3[k])
  src, wd = str(tmp_path / 'v3'), str(tmp_path / 'run')
  _write_source(src, v3, config)
  with pytest.raises(ToolError) as e:
    import_checkpoint(src, _cfg(), wd)
  msg = str(e.value)
  assert 'missing' in msg and 'attn_hc.fn' in msg and '--fresh engram,indexer,mhc' in msg
  assert not os.path.exists(wd)

  import_checkpoint(src, _cfg(), wd, fresh=['mhc', 'engram', 'indexer'])
  _, a0 = _arrays(trained)
  _, a1 = _arrays(wd)
  for k, path in zip(fp8, ['blocks/1/ffn/experts/w_down', 'blocks/0/attn/wq_a']):
    want = dequantize_fp8(v3[k], v3[k[:-len('weight')] + 'weight_scale_inv'], (128, 128)).T
    got = a1[('params', path)][3] if 'experts' in path else a1[('params', path)]
    np.testing.assert_array_equal(got, want)
  for path in ('blocks/1/attn/wq_a', 'head', 'mtp/0/eh_proj', 'blocks/1/ffn/experts/w_up'):
    np.testing.assert_array_equal(a1[('params', path)], a0[('params', path)])
  # fresh: the initial values (mHC alpha 0.01, zero-initialised Engram conv), not the trained ones
  p = lambda path: ('params', path)
  np.testing.assert_array_equal(a1[p('blocks/0/hc_attn/scale')], np.full(3, 0.01, np.float32))
  assert not np.any(a1[p('engram/1/conv/kernel')])
  assert not np.array_equal(a1[p('blocks/0/attn/indexer/wk')], a0[p('blocks/0/attn/indexer/wk')])


# ---- errors ---------------------------------------------------------------------------------

def _bad(kind, tensors):
  t = dict(tensors)
  if kind == 'missing':
    del t['model.layers.1.self_attn.kv_b_proj.weight']
  elif kind == 'extra':
    t['model.layers.0.mlp.bogus.weight'] = np.zeros((2, 2), np.float32)
  elif kind == 'shape':
    t['model.layers.0.self_attn.q_a_proj.weight'] = t['model.layers.0.self_attn.q_a_proj.weight'].T.copy()
  elif kind == 'copy':
    t['model.layers.2.embed_tokens.weight'] = t['model.layers.2.embed_tokens.weight'] + 1
  return t


@pytest.mark.parametrize('kind,needle', [
    ('missing', 'missing (1): model.layers.1.self_attn.kv_b_proj.weight'),
    ('extra', 'unexpected (1): model.layers.0.mlp.bogus.weight'),
    ('shape', 'wrong shape (1): model.layers.0.self_attn.q_a_proj.weight [64, 32] (expected [32, 64])'),
    ('copy', 'bad MTP copy (1): model.layers.2.embed_tokens.weight differs'),
])
def test_bad_tensors_one_error_nothing_written(fp32_export, tmp_path, kind, needle):
  tensors, config = _source(fp32_export)
  src, wd = str(tmp_path / 'src'), str(tmp_path / 'run')
  _write_source(src, _bad(kind, tensors), config)
  with pytest.raises(ToolError) as e:
    import_checkpoint(src, _cfg(), wd)
  assert needle in str(e.value) and '\n' not in str(e.value)
  assert os.listdir(tmp_path) == ['src']


def test_malformed_and_truncated_files(fp32_export, tmp_path):
  src = tmp_path / 'src'
  shutil.copytree(fp32_export, src)
  shard = sorted(p for p in os.listdir(src) if p.endswith('.safetensors'))[1]
  path = str(src / shard)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:-100])
  with pytest.raises(ToolError, match=rf'{shard}: truncated: tensor .* needs data bytes'):
    import_checkpoint(str(src), _cfg(), str(tmp_path / 'run'))
  open(path, 'wb').write(len(data).to_bytes(8, 'little') + data[8:])
  with pytest.raises(ToolError, match=rf'{shard}: not a valid safetensors file \(header length'):
    SafetensorsDir(str(src))
  open(path, 'wb').write((20).to_bytes(8, 'little') + b'{"a": [1, 2' + b' ' * 20)
  with pytest.raises(ToolError, match=rf'{shard}: not a valid safetensors file \(header is not JSON'):
    SafetensorsDir(str(src))
  assert not os.path.exists(tmp_path / 'run')


def test_cli_errors_are_one_line(fp32_export, tmp_path):
  tensors, config = _source(fp32_export)
  src = str(tmp_path / 'src')
  _write_source(src, _bad('missing', tensors), config)
  r = _run(['tools/import_safetensors.py', '--src', src, '--workdir', str(tmp_path / 'run'), *CLI_CONFIG])
  assert r.returncode == 2 and r.stderr.strip().count('\n') == 0, r.stderr
  assert r.stderr.startswith('import_safetensors.py: error: ') and 'kv_b_proj' in r.stderr
  r = _run(['tools/convert_to_safetensors.py', '--workdir', str(tmp_path), '--out', str(tmp_path / 'o')])
  assert r.returncode == 2 and r.stderr.strip() == (
      f"convert_to_safetensors.py: error: --workdir '{tmp_path}' has no checkpoints/ directory")


def test_raw_file_checkpoint_exports_the_same_bytes(trained, fp32_export, tmp_path):
  """The trained checkpoint rewritten as checkpoint.use_ocdbt=False, compression=none (one raw
  file per array, which the export maps instead of reading) exports to byte-identical shards."""
  import shutil
  import orbax.checkpoint as ocp
  src = os.path.join(trained, 'checkpoints', '2')
  dst = os.path.join(str(tmp_path), 'checkpoints', '2')
  os.makedirs(dst)
  for item in os.listdir(src):
    if item != 'state' and os.path.isdir(os.path.join(src, item)):
      shutil.copytree(os.path.join(src, item), os.path.join(dst, item))
  state = ocp.PyTreeCheckpointer().restore(os.path.join(src, 'state'))
  ocp.PyTreeCheckpointer(use_ocdbt=False, use_compression=False).save(
      os.path.join(dst, 'state'), jax.tree.map(np.asarray, state))
  assert os.path.isfile(os.path.join(dst, 'state', 'params.embed.value', '0.0'))
  out = str(tmp_path / 'fp32')
  r = _run(['tools/convert_to_safetensors.py', '--workdir', str(tmp_path), '--out', out,
            '--dtype', 'fp32', '--max-shard-size', '300KB'])
  assert r.returncode == 0, r.stderr
  names = sorted(os.listdir(fp32_export))
  assert sorted(os.listdir(out)) == names
  for f in names:
    with open(os.path.join(fp32_export, f), 'rb') as a, open(os.path.join(out, f), 'rb') as b:
      assert a.read() == b.read(), f


@pytest.mark.parametrize('ahead,decoders', [(0, 1), (64 * 1024, 2)])
def test_export_pipeline_bounds_keep_the_bytes(trained, fp32_export, tmp_path, monkeypatch,
                                               ahead, decoders):
  """The export with an arena of only the largest tensor (each tensor waits until the one before
  it is written) or a few pages of read-ahead (the ring wraps), one or two decoder threads, 4 KB
  read windows (rows written while their tensor still decodes) and 64 KB staging buffers writes
  the same bytes as the default export."""
  import importlib
  from v4jax.convert import ckpt_reader, safetensors_io
  export_module = importlib.import_module('v4jax.convert.export')
  monkeypatch.setattr(export_module, '_AHEAD', ahead)
  monkeypatch.setattr(export_module, '_DECODERS', decoders)
  monkeypatch.setattr(export_module, '_POPULATE', 8192)
  monkeypatch.setattr(ckpt_reader, '_RANGE', 4096)
  monkeypatch.setattr(safetensors_io, '_CHUNK', 64 * 1024)
  out = str(tmp_path / 'fp32')
  export(trained, out, dtype='fp32', max_shard_bytes=300_000)
  names = sorted(os.listdir(fp32_export))
  assert sorted(os.listdir(out)) == names
  for f in names:
    with open(os.path.join(fp32_export, f), 'rb') as a, open(os.path.join(out, f), 'rb') as b:
      assert a.read() == b.read(), f
