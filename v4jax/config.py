"""Typed, nested run configuration: defaults, presets and validation.

Every field has a default here; `configs/*.py` presets override a few and return the result of
`get_config()`. ml_collections' ConfigDict keeps each field's type, so a command-line override of
the wrong type fails at parse time; `validate` checks ranges and cross-field rules before anything
compiles and raises `ConfigError` with one line naming the field and what was expected.
"""
from __future__ import annotations

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config field is out of range; the message names the field and the expectation."""


def default_config() -> ConfigDict:
  c = ConfigDict()

  c.model = ConfigDict(dict(
      vocab_size=258,          # byte tokenizer: 256 bytes + <eos> + <pad>
      d_model=64,
      n_layers=4,
      n_dense_layers=1,        # L_d: leading layers with a dense FFN
      d_ff=128,
      n_heads=4,
      q_lora_rank=32,
      kv_lora_rank=32,
      qk_nope_dim=16,
      qk_rope_dim=8,
      v_head_dim=16,
      init_std=0.006,          # sigma_0 (SPEC §0); HF's 0.02 is not DeepSeek's value
      norm_eps=1e-6,
      dtype='float32',         # compute dtype: float32 | bfloat16
      param_dtype='float32',   # master weights
      remat='block',           # none | block | full
      remat_save=(),           # block remat: named values kept besides its defaults, from
                               # REMAT_SAVE_NAMES (moe_dispatch: the rows sorted by expert;
                               # moe_gemms: the experts' gate and up outputs; mla_ckv:
                               # the normed latent kv and its rope key; mhc_coeffs: each mHC
                               # site's post and comb)
      remat_recompute=(),      # block remat: weight matmuls recomputed in the backward instead of
                               # kept, from REMAT_RECOMPUTE_NAMES (mla_up: MLA's up-projections
                               # from the q and kv latents; indexer_q: the DSA indexer's queries;
                               # ffn_in: the dense and shared-expert FFNs' gate and up): memory
                               # for remat_save, at a GEMM each
      remat_dot_barrier=False,  # block remat: the weight matmuls it keeps leave the dot through an
                               # optimization barrier and are kept by name (GPU: stops XLA's
                               # dynamic-slice fusion from running each kept GEMM twice in a
                               # layer scan; layers.kept_matmuls_behind_barrier)
      scan_layers=False,       # build each run of identical blocks as one stacked module run by
                               # lax.scan (params get a leading 'layers' dim): compile time and
                               # HLO size stop growing with depth (docs/architecture.md)
      logits_chunk=0,          # cross entropy in chunks of this many positions; 0 = one chunk
      attn_query_block=512,    # query rows per block in dense attention (and the dense KL); 0 = one block
  ))
  c.rope = ConfigDict(dict(
      base=10000.0,
      yarn_mode='off',         # off | on | auto (SPEC §1)
      yarn_factor=40.0,
      original_max_len=4096,
      beta_fast=32.0,
      beta_slow=1.0,
      mscale=1.0,
      mscale_all_dim=1.0,
  ))
  c.moe = ConfigDict(dict(
      enabled=True,
      num_experts=8,           # N_r
      num_shared=1,            # N_s
      top_k=2,                 # K_r
      d_expert=32,             # d_e
      n_groups=4,              # G_e
      topk_groups=2,           # M_g
      route_scale=2.5,         # rho
      bias_update_rate=1e-3,   # gamma
      bias_update_stop_frac=0.966,  # gamma = 0 for the final ~3.4% of steps
      bal_loss_alpha=1e-4,
      bal_indicator='selected',  # selected | unbiased_topk
      dispatch='dropless',     # dropless | capacity
      capacity_factor=1.25,
      # expert parallelism (v4jax/parallel/expert.py; dropless dispatch on a mesh whose rules
      # shard 'exp'): exchange auto (ragged_all_to_all; padded all_to_all on CPU) | ragged | padded
      ep_exchange='auto',
      ep_capacity_factor=0.0,  # exchange buffers: 0 = worst case (never drops); f = f x balanced load
  ))
  c.dsa = ConfigDict(dict(
      enabled=False,
      stage='dense',           # dense | warmup | sparse (SPEC §3 training stages)
      n_heads=2,               # H_I
      head_dim=16,             # d_I
      topk=8,                  # K
      min_seq_len=0,           # below or at this T attention stays dense (T <= K always dense)
      loss_weight=1.0,         # lambda_I
      warmup_lr=1e-3,
      warmup_lr_warmup_steps=50,
      query_block=512,         # query rows per gather block in the sparse path
      hadamard=False,
      sparse_attention='gather',  # gather: the K selected latent rows per token (sparse MLA
                                  # kernels); masked: dense attention restricted to the selected
                                  # keys by a mask (cuDNN on GPU; fewer FLOPs at short T)
  ))
  c.mhc = ConfigDict(dict(
      streams=1,               # n; 1 = mHC off (exact plain residual)
      sinkhorn_iters=20,
      eps=1e-6,
      bias_init='zero',        # zero | identity
      fn_init_std=0.006,
      alpha_init=0.01,
      head='hyper',            # hyper | sum | first
      tf32=False,              # coefficient GEMM x.fn in TF32 (DeepSeek's speed mode) instead of fp32 HIGHEST
  ))
  c.engram = ConfigDict(dict(
      enabled=False,
      layer_ids=(1,),          # 0-based block indices
      max_ngram=3,             # N: orders 2..N
      heads_per_ngram=2,       # K_e
      d_mem=32,
      base_rows=101,           # R_n (same for every order)
      conv_kernel=4,           # w
      conv_dilation=0,         # delta; 0 = max_ngram
      use_short_conv=True,
      pad_id=257,              # tokenizer pad id (compressed through the lookup)
      seed=0,
      table_memory='device',   # device | host
      host_gather='numpy',     # host tables: numpy (threads, zero-copy view) | xla (compute_on)
      host_chunk_mib=2048,     # host tables: rows held in pinned buffers of at most this size (the
                               # GPU pinned pool grows in power-of-two regions; small chunks fit it)
      donate_rows=True,        # host tables: the step donates the last step's new rows (one row
                               # buffer set, not two; the step then waits for their write-back
                               # DMA); False keeps both live (docs/engram_host_tables.md)
      late_moments=True,       # host tables: the step copies its rows' Adam moments to the device
                               # for the optimizer at its end, apart from theta (2/3 of the rows'
                               # bytes not live through the backward); False: at its start, with
                               # theta (for A/B)
      rows_ahead=(),           # host tables, one device: parts of the step's rows ('theta',
                               # 'moments') DMA'd to the device while the previous step runs
                               # (device memory for one more set) instead of copied in by the step
      table_optimizer='lazy_adam',  # lazy_adam | dense_adam
      table_init_std=0.006,
      lr_mult=5.0,
      proj_bias=True,
      norm_eps=1e-6,
      conv_norm_eps=1e-5,
  ))
  c.mtp = ConfigDict(dict(
      depth=0,                 # D_mtp; 0 = off
      loss_weight=0.3,
      loss_weight_late=0.1,
      late_frac=0.68,          # fraction of steps after which loss_weight_late applies
  ))
  c.kernels = ConfigDict(dict(
      impl='auto',             # auto | reference | pallas (per-op seams)
      grouped_matmul='auto',   # auto | ragged_dot | mgpu | megablox
      attention='auto',        # dense attention: auto | reference | cudnn (flash, GPU) | pallas
                               # (Triton flash, top-k set as bits; interpret mode on CPU) |
                               # pallas_mgpu (pallas as Mosaic-GPU kernels: Hopper) |
                               # tpu_flash (jax's Pallas TPU flash kernels; no top-k set)
      sinkhorn='auto',         # mHC Sinkhorn: auto (pallas on GPU) | reference | pallas (Triton;
                               # interpret mode on CPU)
      hc_mix='auto',           # mHC stream passes (normed mix, read-in, write-back): auto (pallas
                               # on GPU) | reference (jnp custom VJPs) | pallas (Triton; interpret
                               # mode on CPU)
      xent='auto',             # chunked LM-head loss, each chunk's loss and logits gradient: auto
                               # (pallas on GPU unless the vocabulary is sharded) | reference
                               # (jnp) | pallas (one Triton kernel; interpret mode on CPU)
      gather_sum='reference',  # the MoE's slot sums (combine, dispatch backward): reference (jnp
                               # gather then fp32 sum) | pallas (one Triton kernel; interpret
                               # mode on CPU) | auto (pallas on GPU); reference: the kernel
                               # lost to XLA's fused pass on the H200 (performance.md row 83)
      kl_teacher='auto',       # DSA's masked-form KL teacher on GPU: auto (pallas_mgpu on Hopper,
                               # else pallas) | pallas (Triton tiles) | pallas_mgpu (Mosaic-GPU
                               # tiles: Hopper only; performance.md row 92)
      kl_key_group=3,          # the Mosaic teacher's key tiles per CTA (0: each CTA runs all
                               # its query rows' tiles up to the diagonal; n: the grid also
                               # splits them into groups of n, evening out the causal wave;
                               # 3: -17% kernel time at bench_h200's shape, performance.md row 93)
      student_dq='auto',       # DSA's KL student backward on GPU, dq/dw: dense (live [T,S] tiles)
                               # | gather (each token's K selected keys) | auto (by T, S and K:
                               # gather from ~8K tokens; kernels/indexer/gpu.resolve_dq_form)
  ))
  c.mesh = ConfigDict(dict(
      data=1, fsdp=-1, expert=1, tensor=1,      # ICI sizes; -1 = the rest
      dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1,
      rules='fsdp',            # fsdp | fsdp_ep | fsdp_tp
  ))
  c.data = ConfigDict(dict(
      source='builtin',        # builtin | array_record | synthetic (random ids, for benchmarks)
      path='',                 # ArrayRecord directory (tools/prepare_data.py output)
      tokenizer='byte',        # builtin source: 'byte' or a tokenizer.json path (ArrayRecord: its manifest decides)
      seq_len=128,
      global_batch=16,
      respect_doc_boundaries=False,
      shuffle_seed=0,
      val_fraction=0.02,
      num_workers=0,
      max_docs=0,              # builtin corpus: 0 = all files
  ))
  c.optim = ConfigDict(dict(
      lr=3e-3,
      warmup_steps=20,
      schedule='cosine',       # cosine | constant
      min_lr_ratio=0.1,
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1,
      moment_dtype='float32',  # AdamW moments of the main and indexer groups: float32 (SPEC §9)
                               # | bfloat16 (DeepSeek-V3's recipe: half the optimizer memory)
      clip_norm=1.0,
      indexer_clip_norm=1.0,
  ))
  c.train = ConfigDict(dict(
      steps=200,
      seed=0,
      log_every=10,
      eval_every=100,
      eval_steps=4,
      grad_accum=1,
      cast_params_once=True,   # weights used only as one bf16 cast: cast once per step, not per
                               # use (bit-identical gradients; v4jax/cast_once.py)
      scan_outputs='zeros',    # lax.scan's stacked outputs: zeros (jax's fill) | empty
                               # (uninitialised on GPU/TPU: no zero fill of the layer scans'
                               # saved activations; v4jax/compat.set_scan_outputs)
      compilation_cache_dir='~/.cache/v4jax/xla',  # v4jax.train: JAX's persistent compilation
                               # cache (a rerun loads the compiled init and step); '' = off;
                               # JAX_COMPILATION_CACHE_DIR in the environment wins
  ))
  c.checkpoint = ConfigDict(dict(
      enabled=True,
      every=100,
      max_to_keep=3,
      async_save=True,
      use_ocdbt=True,          # one OCDBT store per item (Orbax's default); False: a file per array
      compression='zstd',      # zstd | none: none + use_ocdbt=False is what exports read fastest
  ))
  c.log = ConfigDict(dict(
      tensorboard=True,
      progress=True,
  ))
  return c


_CHOICES = {
    'model.dtype': ('float32', 'bfloat16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'optim.moment_dtype': ('float32', 'bfloat16'),
    'train.scan_outputs': ('zeros', 'empty'),
    'model.remat': ('none', 'block', 'full'),
    'rope.yarn_mode': ('off', 'on', 'auto'),
    'moe.bal_indicator': ('selected', 'unbiased_topk'),
    'moe.dispatch': ('dropless', 'capacity'),
    'moe.ep_exchange': ('auto', 'ragged', 'padded'),
    'dsa.stage': ('dense', 'warmup', 'sparse'),
    'dsa.sparse_attention': ('gather', 'masked'),
    'mhc.bias_init': ('zero', 'identity'),
    'mhc.head': ('hyper', 'sum', 'first'),
    'engram.table_memory': ('device', 'host'),
    'engram.host_gather': ('numpy', 'xla'),
    'engram.table_optimizer': ('lazy_adam', 'dense_adam'),
    'kernels.impl': ('auto', 'reference', 'pallas'),
    'kernels.attention': ('auto', 'reference', 'cudnn', 'pallas', 'pallas_mgpu', 'tpu_flash'),
    'kernels.sinkhorn': ('auto', 'reference', 'pallas'),
    'kernels.hc_mix': ('auto', 'reference', 'pallas'),      # mHC's normed mix, read-in, write-back
    'kernels.xent': ('auto', 'reference', 'pallas'),
    'kernels.gather_sum': ('auto', 'reference', 'pallas'),
    'kernels.student_dq': ('auto', 'dense', 'gather'),
    'kernels.kl_teacher': ('auto', 'pallas', 'pallas_mgpu'),
    'kernels.grouped_matmul': ('auto', 'ragged_dot', 'mgpu', 'megablox'),
    'mesh.rules': ('fsdp', 'fsdp_ep', 'fsdp_tp'),
    'data.source': ('builtin', 'array_record', 'synthetic'),
    'optim.schedule': ('cosine', 'constant'),
    'checkpoint.compression': ('zstd', 'none'),
}


def _get(c: ConfigDict, path: str):
  for part in path.split('.'):
    c = c[part]
  return c


def _fail(path, value, expected):
  raise ConfigError(f'config.{path}={value!r} {expected}')


def host_tables(c: ConfigDict) -> bool:
  """Engram on with its tables in host memory (outside the model and its train state)."""
  return bool(c.engram.enabled and c.engram.table_memory == 'host')


# Named values that model.remat_save can keep under block remat (model/moe.py tags them).
REMAT_SAVE_NAMES = ('moe_dispatch', 'moe_gemms', 'mla_ckv', 'mhc_coeffs')
# Weight matmuls that model.remat_recompute can leave to the backward (layers.matmul saveable).
REMAT_RECOMPUTE_NAMES = ('mla_up', 'indexer_q', 'ffn_in')
# The parts of a step's host-table rows that engram.rows_ahead can move before the step.
ROW_PARTS = ('theta', 'moments')


def validate(c: ConfigDict) -> ConfigDict:
  """Checks ranges and cross-field rules; raises ConfigError naming the first bad field."""
  for path, allowed in _CHOICES.items():
    v = _get(c, path)
    if v not in allowed:
      _fail(path, v, f'is not one of {allowed}')
  positive = ['model.vocab_size', 'model.d_model', 'model.n_layers', 'model.d_ff',
              'model.n_heads', 'model.q_lora_rank', 'model.kv_lora_rank', 'model.qk_nope_dim',
              'model.qk_rope_dim', 'model.v_head_dim', 'data.seq_len', 'data.global_batch',
              'train.steps', 'train.log_every', 'train.grad_accum', 'mhc.streams',
              'mhc.sinkhorn_iters', 'checkpoint.every', 'checkpoint.max_to_keep']
  for path in positive:
    v = _get(c, path)
    if not isinstance(v, int) or v <= 0:
      _fail(path, v, 'must be a positive integer')
  for path in ['model.init_std', 'model.norm_eps', 'optim.lr', 'optim.eps', 'rope.base']:
    if not _get(c, path) > 0:
      _fail(path, _get(c, path), 'must be > 0')
  m = c.model
  for path, names in (('model.remat_save', REMAT_SAVE_NAMES),
                      ('model.remat_recompute', REMAT_RECOMPUTE_NAMES),
                      ('engram.rows_ahead', ROW_PARTS)):
    if not isinstance(_get(c, path), tuple) or not set(_get(c, path)) <= set(names):
      _fail(path, _get(c, path), f'must be a tuple of names from {names}')
  for path in ['model.scan_layers', 'model.remat_dot_barrier', 'train.cast_params_once',
               'engram.donate_rows', 'engram.late_moments']:
    if not isinstance(_get(c, path), bool):
      _fail(path, _get(c, path), 'must be True or False')
  if m.remat_dot_barrier and m.remat != 'block':
    _fail('model.remat_dot_barrier', m.remat_dot_barrier,
          f"applies to block remat only (model.remat is '{m.remat}')")
  if not isinstance(c.kernels.kl_key_group, int) or c.kernels.kl_key_group < 0:
    _fail('kernels.kl_key_group', c.kernels.kl_key_group,
          'must be an integer >= 0 (0 = all key tiles up to the diagonal)')
  if m.attn_query_block < 0:
    _fail('model.attn_query_block', m.attn_query_block, 'must be >= 0 (0 = one block)')
  if m.qk_rope_dim % 2:
    _fail('model.qk_rope_dim', m.qk_rope_dim, 'must be even (RoPE rotates pairs)')
  if not 0 <= m.n_dense_layers <= m.n_layers:
    _fail('model.n_dense_layers', m.n_dense_layers, f'must be in [0, model.n_layers={m.n_layers}]')
  for path in ['optim.b1', 'optim.b2']:
    if not 0 <= _get(c, path) < 1:
      _fail(path, _get(c, path), 'must be in [0, 1)')
  if not 0 <= c.optim.min_lr_ratio <= 1:
    _fail('optim.min_lr_ratio', c.optim.min_lr_ratio, 'must be in [0, 1]')
  if c.optim.warmup_steps < 0:
    _fail('optim.warmup_steps', c.optim.warmup_steps, 'must be >= 0')
  if c.optim.clip_norm <= 0 or c.optim.indexer_clip_norm <= 0:
    _fail('optim.clip_norm', c.optim.clip_norm, 'and optim.indexer_clip_norm must be > 0')
  if c.rope.yarn_mode != 'off' and c.rope.yarn_factor < 1:
    _fail('rope.yarn_factor', c.rope.yarn_factor, 'must be >= 1 when YaRN is used')

  e = c.moe
  if e.enabled and m.n_dense_layers < m.n_layers:
    if e.num_experts <= 0:
      _fail('moe.num_experts', e.num_experts, 'must be a positive integer')
    if not 1 <= e.top_k <= e.num_experts:
      _fail('moe.top_k', e.top_k, f'must be in [1, moe.num_experts={e.num_experts}]')
    if e.d_expert <= 0:
      _fail('moe.d_expert', e.d_expert, 'must be a positive integer')
    if e.num_shared < 0:
      _fail('moe.num_shared', e.num_shared, 'must be >= 0')
    if e.n_groups <= 0 or e.num_experts % e.n_groups:
      _fail('moe.n_groups', e.n_groups, f'must divide moe.num_experts={e.num_experts}')
    if not 1 <= e.topk_groups <= e.n_groups:
      _fail('moe.topk_groups', e.topk_groups, f'must be in [1, moe.n_groups={e.n_groups}]')
    per_group = e.num_experts // e.n_groups
    if e.n_groups > 1 and per_group < 2:
      _fail('moe.n_groups', e.n_groups, 'leaves fewer than 2 experts per group (group score sums the top 2)')
    if e.n_groups > 1 and e.topk_groups * per_group < e.top_k:
      _fail('moe.topk_groups', e.topk_groups,
            f'keeps {e.topk_groups * per_group} experts, fewer than moe.top_k={e.top_k}')
    if e.capacity_factor <= 0:
      _fail('moe.capacity_factor', e.capacity_factor, 'must be > 0')
    if e.ep_capacity_factor < 0:
      _fail('moe.ep_capacity_factor', e.ep_capacity_factor, 'must be >= 0 (0 = worst-case buffers)')

  d = c.dsa
  if d.enabled:
    if d.n_heads <= 0 or d.topk <= 0:
      _fail('dsa.topk' if d.topk <= 0 else 'dsa.n_heads', d.topk if d.topk <= 0 else d.n_heads,
            'must be a positive integer')
    if d.head_dim <= m.qk_rope_dim:
      _fail('dsa.head_dim', d.head_dim, f'must be > model.qk_rope_dim={m.qk_rope_dim}')
    if d.query_block <= 0:
      _fail('dsa.query_block', d.query_block, 'must be a positive integer')
  elif d.stage != 'dense':
    _fail('dsa.stage', d.stage, "needs dsa.enabled=True (or set dsa.stage='dense')")

  h = c.mhc
  if h.streams > 1 and h.alpha_init <= 0:
    _fail('mhc.alpha_init', h.alpha_init, 'must be > 0')

  g = c.engram
  if g.enabled:
    if not g.layer_ids:
      _fail('engram.layer_ids', g.layer_ids, 'must name at least one layer when engram.enabled')
    for lid in g.layer_ids:
      if not 0 <= lid < m.n_layers:
        _fail('engram.layer_ids', g.layer_ids, f'must lie in [0, model.n_layers={m.n_layers})')
    if len(set(g.layer_ids)) != len(g.layer_ids):
      _fail('engram.layer_ids', g.layer_ids, 'must not repeat a layer')
    if g.max_ngram < 2:
      _fail('engram.max_ngram', g.max_ngram, 'must be >= 2 (orders 2..N)')
    j = (g.max_ngram - 1) * g.heads_per_ngram
    if g.heads_per_ngram <= 0 or g.d_mem % j:
      _fail('engram.d_mem', g.d_mem, f'must be divisible by (max_ngram-1)*heads_per_ngram={j}')
    if g.base_rows < 2:
      _fail('engram.base_rows', g.base_rows, 'must be >= 2')
    if not 0 <= g.pad_id < m.vocab_size:
      _fail('engram.pad_id', g.pad_id, f'must be a token id in [0, model.vocab_size={m.vocab_size})')
    if g.use_short_conv and g.conv_kernel <= 0:
      _fail('engram.conv_kernel', g.conv_kernel, 'must be a positive integer')
    if g.lr_mult <= 0:
      _fail('engram.lr_mult', g.lr_mult, 'must be > 0')
    if g.host_chunk_mib <= 0:
      _fail('engram.host_chunk_mib', g.host_chunk_mib, 'must be > 0')

  if c.mtp.depth < 0:
    _fail('mtp.depth', c.mtp.depth, 'must be >= 0')
  if c.mtp.depth >= c.data.seq_len:
    _fail('mtp.depth', c.mtp.depth, f'must be < data.seq_len={c.data.seq_len}')

  for ax in ('data', 'fsdp', 'expert', 'tensor'):
    v = c.mesh[ax]
    if v != -1 and v <= 0:
      _fail(f'mesh.{ax}', v, 'must be a positive integer or -1 (the rest)')
    if c.mesh[f'dcn_{ax}'] <= 0:
      _fail(f'mesh.dcn_{ax}', c.mesh[f'dcn_{ax}'], 'must be a positive integer')
  if sum(c.mesh[a] == -1 for a in ('data', 'fsdp', 'expert', 'tensor')) > 1:
    _fail('mesh', 'several -1', 'may use -1 for at most one axis')

  if c.data.source == 'array_record' and not c.data.path:
    _fail('data.path', c.data.path, "must name a directory when data.source='array_record'")
  if not 0 < c.data.val_fraction < 1:
    _fail('data.val_fraction', c.data.val_fraction, 'must be in (0, 1)')
  if c.data.global_batch % c.train.grad_accum:
    _fail('train.grad_accum', c.train.grad_accum,
          f'must divide data.global_batch={c.data.global_batch}')
  return c


def get_config() -> ConfigDict:
  """The default preset (same as configs/tiny.py without the V4 components)."""
  return default_config()


def load_config_file(path: str, relative_to: str | None = None, variant: str | None = None):
  """`get_config()` of a preset file (presets are files, not a package). A relative `path` is
  taken from the directory of `relative_to` (pass `__file__` from one preset loading another);
  `variant` is passed to `get_config` when given."""
  import importlib.util
  import os
  if relative_to and not os.path.isabs(path):
    path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist')
  name = '_v4jax_preset_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant) if variant is not None else mod.get_config()
