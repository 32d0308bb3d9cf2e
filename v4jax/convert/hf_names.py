"""HF safetensors names, layouts and config.json keys for v4jax tensors (SPEC §11), both ways.

This is the one place that knows how a v4jax tensor maps to the DeepSeek-V3/V3.2 HF layout (and
the names SPEC §11 proposes for mHC and Engram). The exporter and the importer both use it.

A v4jax tensor (path `blocks/1/attn/wq_b` or `engram/1/value_proj/kernel` in the `params` or
`rest` collection; the Engram module of layer i sits beside its block) maps to one HF
tensor, or to several when it is split along its first axis (`ffn/experts/*` into one tensor per
expert `{i}`, Engram per-stream tensors into one per stream). Each HF piece is the v4jax piece
through a layout transform (v4jax kernels are [in, out], HF weights are [out, in]):

  id     same array
  T      2-D transpose
  T_in   [a, b, c] -> [a, b*c] -> transpose = [b*c, a]   (wq_b, wkv_b, indexer.wq_b)
  T_out  [a, b, c] -> [a*b, c] -> transpose = [c, a*b]   (wo)
  conv   [w, C] -> [C, 1, w]                              (Engram depthwise conv)

A scanned model (model.scan_layers) stores a run of layers as one tensor with a leading L dim at
`blocks/{first}-{last}/...`; `unstack` gives its per-layer view (`blocks/{i}/...`), which is what
`layout` names. The importer writes such a tensor one layer at a time.

MTP depth k (0-based) lives at HF layer index L + k and also carries copies of the embedding and
of the head (`embed_tokens`, `shared_head.head`); the exporter writes them, the importer checks
they equal the main tensors. Engram hash constants are not parameters: `hash_tensors` gives them
as int64 tensors and `hash_spec_from_tensors` reads them back.
"""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

__all__ = ['Entry', 'layout', 'to_hf', 'from_hf', 'hf_shape', 'components_of_hf', 'hash_tensors',
           'hash_tensor_names', 'hash_spec_from_tensors', 'hf_config', 'config_mismatches',
           'COMPONENTS', 'LOOKUP_NAME', 'stack_members', 'unstack', 'unstack_reader_arrays']

COMPONENTS = ('indexer', 'mhc', 'engram', 'mtp')

# Within a block: v4jax suffix -> (HF suffix, transform, split over axis 0, keep fp32 in bf16 export).
# `{i}` in an HF name is the index along the split axis.
_BLOCK = {
    'attn_norm/scale': ('input_layernorm.weight', 'id'),
    'ffn_norm/scale': ('post_attention_layernorm.weight', 'id'),
    'attn/wq_a': ('self_attn.q_a_proj.weight', 'T'),
    'attn/q_norm/scale': ('self_attn.q_a_layernorm.weight', 'id'),
    'attn/wq_b': ('self_attn.q_b_proj.weight', 'T_in'),
    'attn/wkv_a': ('self_attn.kv_a_proj_with_mqa.weight', 'T'),
    'attn/kv_norm/scale': ('self_attn.kv_a_layernorm.weight', 'id'),
    'attn/wkv_b': ('self_attn.kv_b_proj.weight', 'T_in'),
    'attn/wo': ('self_attn.o_proj.weight', 'T_out'),
    'attn/indexer/wq_b': ('self_attn.indexer.wq_b.weight', 'T_in'),
    'attn/indexer/wk': ('self_attn.indexer.wk.weight', 'T'),
    'attn/indexer/k_norm/scale': ('self_attn.indexer.k_norm.weight', 'id'),
    'attn/indexer/k_norm/bias': ('self_attn.indexer.k_norm.bias', 'id'),
    'attn/indexer/weights_proj': ('self_attn.indexer.weights_proj.weight', 'T'),
    'ffn/w_gate': ('mlp.gate_proj.weight', 'T'),
    'ffn/w_up': ('mlp.up_proj.weight', 'T'),
    'ffn/w_down': ('mlp.down_proj.weight', 'T'),
    'ffn/router/kernel': ('mlp.gate.weight', 'T'),
    'ffn/router/bias': ('mlp.gate.e_score_correction_bias', 'id'),
    'ffn/experts/w_gate': ('mlp.experts.{i}.gate_proj.weight', 'T', True),
    'ffn/experts/w_up': ('mlp.experts.{i}.up_proj.weight', 'T', True),
    'ffn/experts/w_down': ('mlp.experts.{i}.down_proj.weight', 'T', True),
    'ffn/shared/w_gate': ('mlp.shared_experts.gate_proj.weight', 'T'),
    'ffn/shared/w_up': ('mlp.shared_experts.up_proj.weight', 'T'),
    'ffn/shared/w_down': ('mlp.shared_experts.down_proj.weight', 'T'),
    'hc_attn/fn': ('attn_hc.fn', 'T', False, True),
    'hc_attn/base': ('attn_hc.base', 'id'),
    'hc_attn/scale': ('attn_hc.scale', 'id'),
    'hc_ffn/fn': ('ffn_hc.fn', 'T', False, True),
    'hc_ffn/base': ('ffn_hc.base', 'id'),
    'hc_ffn/scale': ('ffn_hc.scale', 'id'),
    'engram/table': ('engram.multi_head_embedding.embedding.weight', 'id'),
    'engram/value_proj/kernel': ('engram.value_proj.weight', 'T'),
    'engram/value_proj/bias': ('engram.value_proj.bias', 'id'),
    'engram/key_proj/kernel': ('engram.key_projs.{i}.weight', 'T', True),
    'engram/key_proj/bias': ('engram.key_projs.{i}.bias', 'id', True),
    'engram/k_norm/scale': ('engram.norm1.{i}.weight', 'id', True),
    'engram/q_norm/scale': ('engram.norm2.{i}.weight', 'id', True),
    'engram/conv/kernel': ('engram.short_conv.conv.weight', 'conv'),
    'engram/conv_norm/scale': ('engram.short_conv.norms.{i}.weight', 'id', True),
}
# Directly under an MTP depth (its block goes through _BLOCK under the same layer prefix).
_MTP = {
    'enorm/scale': ('enorm.weight', 'id'),
    'hnorm/scale': ('hnorm.weight', 'id'),
    'eh_proj': ('eh_proj.weight', 'T'),
    'norm/scale': ('shared_head.norm.weight', 'id'),
    'head_reduce/hyper/fn': ('hc_head.hc_fn', 'T', False, True),
    'head_reduce/hyper/base': ('hc_head.hc_base', 'id'),
    'head_reduce/hyper/scale': ('hc_head.hc_scale', 'id'),
}
_TOP = {
    'embed': ('model.embed_tokens.weight', 'id'),
    'head': ('lm_head.weight', 'T'),
    'norm/scale': ('model.norm.weight', 'id'),
    'head_reduce/hyper/fn': ('model.hc_head.hc_fn', 'T', False, True),
    'head_reduce/hyper/base': ('model.hc_head.hc_base', 'id'),
    'head_reduce/hyper/scale': ('model.hc_head.hc_scale', 'id'),
}
_MTP_COPIES = {'embed': 'embed_tokens.weight', 'head': 'shared_head.head.weight'}
LOOKUP_NAME = 'model.engram_compressed_lookup'


@dataclasses.dataclass(frozen=True)
class Entry:
  """One v4jax tensor and its HF tensor(s)."""
  collection: str                 # 'params' | 'rest'
  path: str                       # v4jax path inside the collection, '/'-joined
  shape: tuple[int, ...]          # v4jax shape
  hf: tuple[str, ...]             # HF names, one per piece (several = split along axis 0)
  kind: str                       # layout transform of each piece (module docstring)
  split: bool                     # pieces are x[0], x[1], ... along axis 0
  keep_fp32: bool                 # stays fp32 in a bf16 export (norms, biases, mHC)
  copies: tuple[str, ...] = ()    # further HF names holding the same data (MTP layer copies)

  @property
  def piece_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.split else self.shape

  @property
  def hf_piece_shape(self) -> tuple[int, ...]:
    return hf_shape(self.kind, self.piece_shape)

  @property
  def components(self) -> frozenset[str]:
    """Optional components this tensor belongs to, of COMPONENTS (empty: the core model)."""
    p = self.path
    return _components(indexer='/indexer/' in p, engram='/engram/' in f'/{p}',
                       mhc=re.search(r'(^|/)(hc_attn|hc_ffn|head_reduce)/', p) is not None,
                       mtp=p.startswith('mtp/'))


def _components(**on: bool) -> frozenset[str]:
  return frozenset(c for c in COMPONENTS if on[c])


def hf_shape(kind: str, shape) -> tuple[int, ...]:
  s = tuple(int(v) for v in shape)
  if kind == 'id':
    return s
  if kind == 'T' and len(s) == 2:
    return (s[1], s[0])
  if kind == 'T_in' and len(s) == 3:
    return (s[1] * s[2], s[0])
  if kind == 'T_out' and len(s) == 3:
    return (s[2], s[0] * s[1])
  if kind == 'conv' and len(s) == 2:
    return (s[1], 1, s[0])
  raise ValueError(f'layout {kind!r} does not apply to shape {list(s)}')


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  """v4jax piece -> HF array; a view of x (no copy) for a C-contiguous x."""
  if kind == 'id':
    return x
  if kind == 'T':
    return x.T
  if kind == 'T_in':
    return x.reshape(x.shape[0], -1).T
  if kind == 'T_out':
    return x.reshape(-1, x.shape[-1]).T
  if kind == 'conv':
    return x.T[:, None, :]
  raise ValueError(f'unknown layout {kind!r}')


def from_hf(kind: str, y: np.ndarray, shape) -> np.ndarray:
  """HF array -> v4jax piece of `shape` (the inverse of to_hf)."""
  shape = tuple(shape)
  if kind == 'id':
    return y.reshape(shape)
  if kind in ('T', 'T_in', 'T_out'):
    return y.T.reshape(shape)
  if kind == 'conv':
    return y[:, 0, :].T
  raise ValueError(f'unknown layout {kind!r}')


def _entry(collection, path, shape, hf_name, spec, copies=()) -> Entry:
  kind, split, fp32 = spec[1], (spec[2] if len(spec) > 2 else False), (spec[3] if len(spec) > 3 else False)
  if split:
    names = tuple(hf_name.format(i=i) for i in range(shape[0]))
  else:
    names = (hf_name,)
  piece = shape[1:] if split else shape
  keep = fp32 or len(hf_shape(kind, piece)) <= 1
  return Entry(collection, path, tuple(shape), names, kind, split, keep, tuple(copies))


_STACKED = re.compile(r'blocks/(\d+)-(\d+)/(.+)$')


def stack_members(key: tuple[str, str]) -> list[tuple[str, str]] | None:
  """The per-layer keys (collection, 'blocks/{i}/...') of a scanned run's stacked tensor
  (collection, 'blocks/{first}-{last}/...') in layer order; None for any other key."""
  coll, path = key
  m = _STACKED.match(path)
  if not m:
    return None
  return [(coll, f'blocks/{i}/{m.group(3)}') for i in range(int(m.group(1)), int(m.group(2)) + 1)]


def unstack(tensors: dict, take=lambda shape, i: tuple(shape)[1:]) -> dict:
  """Per-layer view of {(collection, path): value}: each stacked key becomes its members, with
  value take(value, i) for the i-th layer of the stack (default: a shape less its L dim)."""
  out = {}
  for key, v in tensors.items():
    members = stack_members(key)
    out.update({key: v} if members is None else {k: take(v, i) for i, k in enumerate(members)})
  return out


def unstack_reader_arrays(arrays: dict) -> dict:
  """`unstack` for CheckpointReader.arrays {key: (shape, dtype, name, item dir, index)}: layer i
  of a stack reads index i of axis 0 (TensorStore reads that slice only)."""
  return unstack(arrays, lambda v, i: (tuple(v[0])[1:], v[1], v[2], v[3], (i,) + tuple(v[4])))


def _layer_key(e: Entry):
  m = re.match(r'model\.layers\.(\d+)\.', e.hf[0])
  return (1, int(m.group(1))) if m else ((0, 0) if 'embed_tokens' in e.hf[0] else (2, 0))


def layout(n_layers: int, tensors: dict[tuple[str, str], tuple[int, ...]]) -> list[Entry]:
  """Entries for the v4jax tensors {(collection, path): shape}, in HF order (embedding, layers,
  MTP layers, final norm and head). Raises ValueError listing every path without an HF name."""
  out, unknown = [], []
  mtp_layers = sorted({int(p.split('/')[1]) for _, p in tensors if p.startswith('mtp/')})
  for (coll, path), shape in tensors.items():
    m_blk = re.match(r'(blocks|engram)/(\d+)/(.+)$', path)   # a layer's block or Engram module
    m_mtp_blk = re.match(r'mtp/(\d+)/block/(.+)$', path)
    m_mtp = re.match(r'mtp/(\d+)/(.+)$', path)
    sub = m_blk and (m_blk.group(3) if m_blk.group(1) == 'blocks' else f'engram/{m_blk.group(3)}')
    if sub in _BLOCK:
      spec = _BLOCK[sub]
      out.append(_entry(coll, path, shape, f'model.layers.{m_blk.group(2)}.{spec[0]}', spec))
    elif m_mtp_blk and m_mtp_blk.group(2) in _BLOCK:
      spec = _BLOCK[m_mtp_blk.group(2)]
      i = n_layers + int(m_mtp_blk.group(1))
      out.append(_entry(coll, path, shape, f'model.layers.{i}.{spec[0]}', spec))
    elif m_mtp and not m_mtp_blk and m_mtp.group(2) in _MTP:
      spec = _MTP[m_mtp.group(2)]
      i = n_layers + int(m_mtp.group(1))
      out.append(_entry(coll, path, shape, f'model.layers.{i}.{spec[0]}', spec))
    elif path in _TOP:
      spec = _TOP[path]
      copies = [f'model.layers.{n_layers + k}.{_MTP_COPIES[path]}' for k in mtp_layers] \
          if path in _MTP_COPIES else []
      out.append(_entry(coll, path, shape, spec[0], spec, copies))
    else:
      unknown.append(f'{coll}/{path}')
  if unknown:
    hint = '; unstack a scanned model\'s blocks/{first}-{last} tensors first (hf_names.unstack)' \
        if any(_STACKED.match(u.split('/', 1)[1]) for u in unknown) else ''
    raise ValueError(f'no HF name for v4jax tensor(s): {", ".join(sorted(unknown))} '
                     f'(add them to v4jax/convert/hf_names.py{hint})')
  return sorted(out, key=lambda e: (_layer_key(e), e.hf[0]))


def components_of_hf(name: str, n_layers: int) -> frozenset[str]:
  """The optional components an HF tensor name belongs to (see Entry.components)."""
  m = re.match(r'model\.layers\.(\d+)\.', name)
  return _components(indexer='.indexer.' in name, engram='.engram' in name,
                     mhc=re.search(r'(^|\.)(attn_hc|ffn_hc|hc_head)\.', name) is not None,
                     mtp=bool(m) and int(m.group(1)) >= n_layers)


# ---- Engram hash constants ----------------------------------------------------------------

def _engram_prefix(layer: int) -> str:
  return f'model.layers.{layer}.engram.'


def hash_tensors(spec) -> dict[str, np.ndarray]:
  """The frozen Engram hash artefact as int64 tensors (SPEC §11 names)."""
  out = {LOOKUP_NAME: np.asarray(spec.lookup, np.int64)}
  for li, layer in enumerate(spec.layer_ids):
    p = _engram_prefix(layer)
    out[p + 'hash_multipliers'] = np.asarray(spec.multipliers[li], np.int64)
    out[p + 'table_sizes'] = np.asarray(spec.table_sizes[li], np.int64)
    out[p + 'multi_head_embedding.offsets'] = np.asarray(spec.offsets[li], np.int64)
  return out


def hash_tensor_names(layer_ids) -> list[str]:
  names = [LOOKUP_NAME]
  for layer in layer_ids:
    p = _engram_prefix(layer)
    names += [p + 'hash_multipliers', p + 'table_sizes', p + 'multi_head_embedding.offsets']
  return names


def hash_spec_from_tensors(read, cfg, engram_json: dict | None):
  """EngramHashSpec from the exported constants; read(name) -> np.ndarray. Fields HF has no
  tensor for (pad ids, seed, base rows) come from config.json's `engram` object, else cfg."""
  from v4jax.data.engram_hash import EngramHashSpec  # pylint: disable=import-outside-toplevel
  g, e = cfg.engram, engram_json or {}
  lookup = np.asarray(read(LOOKUP_NAME), np.int64)
  mults, sizes, offs = [], [], []
  for layer in g.layer_ids:
    p = _engram_prefix(layer)
    mults.append(tuple(int(v) for v in read(p + 'hash_multipliers')))
    sizes.append(tuple(int(v) for v in read(p + 'table_sizes')))
    offs.append(tuple(int(v) for v in read(p + 'multi_head_embedding.offsets')))
  base = e.get('engram_vocab_size', [g.base_rows] * (g.max_ngram - 1))
  pad = int(e.get('pad_id', g.pad_id))
  d = dict(layer_ids=tuple(int(v) for v in g.layer_ids), max_ngram=int(g.max_ngram),
           heads_per_ngram=int(g.heads_per_ngram), base_rows=tuple(int(v) for v in base),
           seed=int(e.get('seed', g.seed)), pad_id=pad,
           compressed_pad_id=int(e.get('compressed_pad_id', lookup[pad])),
           compressed_vocab_size=int(e.get('compressed_vocab_size', int(lookup.max()) + 1)),
           lookup=lookup.tolist(), multipliers=mults, table_sizes=sizes, offsets=offs)
  return EngramHashSpec.from_json(json.dumps({'format': 'v4jax.engram_hash/1', **d}))


# ---- config.json ---------------------------------------------------------------------------

def hf_config(cfg, hash_spec=None, torch_dtype: str = 'bfloat16') -> dict:
  """config.json: the DeepSeek-V3.2 keys, plus hc_* (mHC) and an `engram` object (SPEC §11)."""
  m, e, d = cfg.model, cfg.moe, cfg.dsa
  moe_on = e.enabled and m.n_dense_layers < m.n_layers
  out = {
      'architectures': ['DeepseekV32ForCausalLM' if d.enabled else 'DeepseekV3ForCausalLM'],
      'model_type': 'deepseek_v32' if d.enabled else 'deepseek_v3',
      'vocab_size': m.vocab_size, 'hidden_size': m.d_model, 'intermediate_size': m.d_ff,
      'moe_intermediate_size': e.d_expert if moe_on else 0,
      'num_hidden_layers': m.n_layers, 'num_attention_heads': m.n_heads,
      'num_key_value_heads': m.n_heads, 'q_lora_rank': m.q_lora_rank,
      'kv_lora_rank': m.kv_lora_rank, 'qk_nope_head_dim': m.qk_nope_dim,
      'qk_rope_head_dim': m.qk_rope_dim, 'v_head_dim': m.v_head_dim,
      'n_shared_experts': e.num_shared if moe_on else 0,
      'n_routed_experts': e.num_experts if moe_on else 0,
      'num_experts_per_tok': e.top_k if moe_on else 0,
      'routed_scaling_factor': e.route_scale, 'n_group': e.n_groups, 'topk_group': e.topk_groups,
      'topk_method': 'noaux_tc', 'scoring_func': 'sigmoid', 'norm_topk_prob': True,
      'first_k_dense_replace': m.n_dense_layers if moe_on else m.n_layers, 'moe_layer_freq': 1,
      'num_nextn_predict_layers': cfg.mtp.depth, 'hidden_act': 'silu',
      'max_position_embeddings': cfg.data.seq_len, 'rms_norm_eps': m.norm_eps,
      'initializer_range': m.init_std, 'rope_theta': cfg.rope.base, 'rope_scaling': None,
      'attention_bias': False, 'attention_dropout': 0.0, 'tie_word_embeddings': False,
      'use_cache': True, 'torch_dtype': torch_dtype,
  }
  r = cfg.rope
  if r.yarn_mode != 'off':
    out['rope_scaling'] = {'type': 'yarn', 'factor': r.yarn_factor,
                           'original_max_position_embeddings': r.original_max_len,
                           'beta_fast': r.beta_fast, 'beta_slow': r.beta_slow,
                           'mscale': r.mscale, 'mscale_all_dim': r.mscale_all_dim}
  if d.enabled:
    out.update(index_n_heads=d.n_heads, index_head_dim=d.head_dim, index_topk=d.topk)
  h = cfg.mhc
  out.update(hc_mult=h.streams, hc_sinkhorn_iters=h.sinkhorn_iters, hc_eps=h.eps)
  if cfg.engram.enabled and hash_spec is not None:
    g = cfg.engram
    out['engram'] = {
        'layer_ids': list(hash_spec.layer_ids), 'max_ngram_size': hash_spec.max_ngram,
        'n_head_per_ngram': hash_spec.heads_per_ngram,
        'n_embed_per_ngram': g.d_mem // (g.max_ngram - 1),
        'engram_vocab_size': list(hash_spec.base_rows), 'kernel_size': g.conv_kernel,
        'dilation': g.conv_dilation or g.max_ngram, 'pad_id': hash_spec.pad_id,
        'compressed_pad_id': hash_spec.compressed_pad_id,
        'compressed_vocab_size': hash_spec.compressed_vocab_size, 'seed': hash_spec.seed,
        'use_short_conv': g.use_short_conv}
  return out


# config.json key -> (the config field it must equal on import, its value, component or None).
_CHECKED_KEYS = {
    'vocab_size': ('model.vocab_size', lambda c: c.model.vocab_size, None),
    'hidden_size': ('model.d_model', lambda c: c.model.d_model, None),
    'num_hidden_layers': ('model.n_layers', lambda c: c.model.n_layers, None),
    'num_attention_heads': ('model.n_heads', lambda c: c.model.n_heads, None),
    'q_lora_rank': ('model.q_lora_rank', lambda c: c.model.q_lora_rank, None),
    'kv_lora_rank': ('model.kv_lora_rank', lambda c: c.model.kv_lora_rank, None),
    'qk_nope_head_dim': ('model.qk_nope_dim', lambda c: c.model.qk_nope_dim, None),
    'qk_rope_head_dim': ('model.qk_rope_dim', lambda c: c.model.qk_rope_dim, None),
    'v_head_dim': ('model.v_head_dim', lambda c: c.model.v_head_dim, None),
    'n_routed_experts': ('moe.num_experts', lambda c: c.moe.num_experts if c.moe.enabled else 0, None),
    'num_experts_per_tok': ('moe.top_k', lambda c: c.moe.top_k if c.moe.enabled else 0, None),
    'n_group': ('moe.n_groups', lambda c: c.moe.n_groups, None),
    'topk_group': ('moe.topk_groups', lambda c: c.moe.topk_groups, None),
    'routed_scaling_factor': ('moe.route_scale', lambda c: c.moe.route_scale, None),
    'first_k_dense_replace': ('model.n_dense_layers', lambda c: c.model.n_dense_layers
                              if c.moe.enabled else c.model.n_layers, None),
    'index_n_heads': ('dsa.n_heads', lambda c: c.dsa.n_heads, 'indexer'),
    'index_head_dim': ('dsa.head_dim', lambda c: c.dsa.head_dim, 'indexer'),
    'hc_mult': ('mhc.streams', lambda c: c.mhc.streams, 'mhc'),
}


def config_mismatches(hf_cfg: dict, cfg, skip=frozenset()) -> list[str]:
  """`config.json key=X vs config.field=Y` for every checked key present in hf_cfg that
  disagrees with cfg; keys of the components in `skip` (fresh or dropped) are not checked."""
  out = []
  for key, (field, get, comp) in _CHECKED_KEYS.items():
    if hf_cfg.get(key) is None or comp in skip:
      continue
    if comp == 'indexer' and not cfg.dsa.enabled:
      continue
    have, want = hf_cfg[key], get(cfg)
    if (float(have) != float(want)) if isinstance(want, float) else have != want:
      out.append(f'config.json {key}={have} vs config.{field}={want}')
  return out
