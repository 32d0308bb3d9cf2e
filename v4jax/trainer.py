"""Trainer: sharded state init, one jitted train step, eval, checkpoints, metrics, preemption.

State (a pytree, created already sharded by `jax.jit(init, out_shardings=...)`):
  step, params (nnx.State of Params, fp32 master), rest (non-trainable variables: router biases),
  opt (optax state), skipped (count of updates skipped for a non-finite loss or gradient).
The train step is one jitted function with the state donated: micro-batch gradient accumulation,
per-group clipping, optimizer, non-finite guard, then the aux-loss-free router-bias update from the
step's global expert counts (outside the gradient, SPEC §4).
"""
from __future__ import annotations

import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from v4jax import checkpoint as ckpt
from v4jax import compat
from v4jax.cast_once import cast_mask
from v4jax import flops as flops_lib
from v4jax import kernels
from v4jax.config import ConfigError, host_tables, validate
from v4jax.metrics import MetricWriter
from v4jax.model.layers import batched_draws, dtype_of
from v4jax.model.moe import update_router_bias
from v4jax.model.transformer import Transformer
from v4jax.memory.rows import join_rows, lazy_adam_rows, patch_rows, step_rows
from v4jax.optim import clip_grads, make_optimizer, path_str, schedule
from v4jax.parallel import rules as rules_lib
from v4jax.parallel.mesh import make_mesh

is_var = lambda x: isinstance(x, nnx.Variable)


def engram_setup(cfg, meta: dict | None):
  """The frozen Engram hash constants: from the checkpoint when resuming, else built once."""
  if not cfg.engram.enabled:
    return None, None
  from v4jax.data.engram_hash import EngramHashSpec, make_hash_spec
  spec = (EngramHashSpec.from_json(meta['engram_hash']) if meta and meta.get('engram_hash')
          else make_hash_spec(cfg))
  return spec, {lid: int(spec.rows_in_layer(lid)) for lid in cfg.engram.layer_ids}


def var_shardings(tree, mesh, rules):
  """NamedShardings for a State of Variables from their `logical_axes` metadata."""
  def one(v):
    shape = v.get_value().shape
    axes = v.get_metadata().get('logical_axes', (None,) * len(shape))
    return v.replace(value=rules_lib.named_sharding(mesh, axes, rules, shape))
  return jax.tree.map(one, tree, is_leaf=is_var)


def opt_shardings(opt_shapes, param_shardings, mesh):
  """Optimizer leaves that mirror a parameter take its sharding (matched by path suffix)."""
  by_path = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  rep = NamedSharding(mesh, P())

  def one(path, leaf):
    parts = path_str(path).split('/')
    for i in range(len(parts)):
      s = by_path.get('/'.join(parts[i:]))
      if s is not None and len(s.spec) <= leaf.ndim:
        return s
    return rep
  return jax.tree_util.tree_map_with_path(one, opt_shapes)


class Trainer:
  def __init__(self, cfg, workdir: str, *, devices=None):
    self.cfg = validate(cfg)
    self.workdir = workdir
    compat.set_scan_outputs(cfg.train.scan_outputs)   # read when the step is lowered
    kernels.preload()   # before any trace: one jit cache key per step (v4jax/kernels/__init__.py)
    self.mesh = make_mesh(cfg.mesh, devices)
    self.rules = rules_lib.RULES[cfg.mesh.rules]
    self.mngr = ckpt.manager(workdir, cfg) if cfg.checkpoint.enabled else None
    latest = self.mngr.latest_step() if self.mngr else None
    meta = ckpt.restore_meta(self.mngr, latest) if latest is not None else None
    self.hash_spec, rows = engram_setup(cfg, meta)
    self._check_batch()
    self.tables = None   # Engram tables in host memory (v4jax.memory.host_tables), else in params
    if host_tables(cfg):
      from v4jax.memory.host_tables import HostTables
      self.tables = HostTables(cfg, rows, self.mesh, init=latest is None)

    def build(seed):
      with batched_draws():   # one normal draw per parameter shape: a smaller init to compile
        return Transformer(cfg, rngs=nnx.Rngs(params=seed), engram_rows_per_layer=rows)

    abs_model = nnx.eval_shape(lambda: build(0))
    self.graphdef, abs_params, abs_rest = nnx.split(abs_model, nnx.Param, ...)
    self.tx = make_optimizer(cfg, abs_params)
    p_sh = var_shardings(abs_params, self.mesh, self.rules)
    r_sh = var_shardings(abs_rest, self.mesh, self.rules)
    opt_shapes = jax.eval_shape(self.tx.init, abs_params)
    rep = NamedSharding(self.mesh, P())
    self.state_shardings = {'step': rep, 'params': p_sh, 'rest': r_sh,
                            'opt': opt_shardings(opt_shapes, p_sh, self.mesh), 'skipped': rep}

    def init(seed):
      _, params, rest = nnx.split(build(seed), nnx.Param, ...)
      return {'step': jnp.zeros((), jnp.int32), 'params': params, 'rest': rest,
              'opt': self.tx.init(params), 'skipped': jnp.zeros((), jnp.int32)}

    self._init = jax.jit(init, static_argnums=0, out_shardings=self.state_shardings)
    self.train_iter, self.eval_ds = self._make_data()
    if self.tables is not None:   # the next batch's rows are gathered while this step runs
      from v4jax.memory.host_tables import Lookahead
      self.train_iter = Lookahead(self.train_iter)
    if latest is not None:
      abstract = ckpt.abstract_of(jax.eval_shape(lambda: init(cfg.train.seed)), self.state_shardings)
      self.state = ckpt.restore(self.mngr, latest, abstract, self.train_iter)
      if self.tables is not None:
        self.tables.load(ckpt.restore_host_tables(self.mngr, latest, self.tables.abstract()))
      print(f'resumed from {self.mngr.directory}/{latest}', flush=True)
    else:
      self.state = self._init(cfg.train.seed)
    self._train_step = self.jit_step()
    self._eval_step = jax.jit(self._eval)
    self._stop = False

  # ---- data -------------------------------------------------------------------------------
  def _batch_axes_size(self):
    return math.prod(self.mesh.shape[a] for a in rules_lib.BATCH)

  def _check_batch(self):
    b, a = self.cfg.data.global_batch, self.cfg.train.grad_accum
    n = self._batch_axes_size()
    if (b // a) % n:
      raise ConfigError(f'config.data.global_batch={b} gives micro-batches of {b // a} sequences, '
                        f'not divisible by the batch mesh axes data*fsdp*expert={n}')
    if b % jax.process_count():
      raise ConfigError(f'config.data.global_batch={b} is not divisible by the '
                        f'{jax.process_count()} processes')

  def _make_data(self):
    from v4jax.data.pipeline import make_dataset
    kw = dict(hash_spec=self.hash_spec, process_index=jax.process_index(),
              process_count=jax.process_count())
    return iter(make_dataset(self.cfg, 'train', **kw)), make_dataset(self.cfg, 'validation', **kw)

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global arrays sharded over the batch axes."""
    out = {}
    for k, v in batch.items():
      spec = rules_lib.logical_to_spec(('batch',) + (None,) * (v.ndim - 1), self.rules)
      out[k] = jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), v)
    return out

  # ---- step -------------------------------------------------------------------------------
  def _loss(self, params, rest, batch, mtp_weight, theta=None):
    """theta: host-table mode's gathered rows {layer: [U,H]}, expanded by batch['engram_inv_*']."""
    with rules_lib.activate(self.mesh, self.rules):
      model = nnx.merge(self.graphdef, params, rest)
      if theta is not None:
        from v4jax.memory.rows import embeddings
        batch = dict(batch, **embeddings(theta, batch, model.dtype))
      return model(batch, mtp_weight)

  def _cast_once(self, params, rest, batch, mtp_weight, theta, need_shape: bool):
    """(params with the leaves that the loss only casts to the compute dtype cast here, once per
    step (train.cast_params_once; v4jax/cast_once.py), the shapes of the loss's (loss, metrics)
    if need_shape, else None). The cast leaves' gradients come out in that dtype, bit-identical
    to the fp32 leaves' gradients, and are accumulated in fp32. The shapes come from the same
    forward trace: tracing the whole gradient for them took ~40% of the step's trace."""
    loss = lambda p: self._loss(p, rest, batch, mtp_weight, theta)
    if not self.cfg.train.cast_params_once:
      return params, (jax.eval_shape(loss, params) if need_shape else None)
    dt = dtype_of(self.cfg.model.dtype)
    mask, shape = cast_mask(loss, params, dt, return_shape=True)
    return jax.tree.map(lambda p, m: p.astype(dt) if m else p, params, mask), shape

  def jit_step(self):
    """`_step` under jit: the state donated, and with host tables and `engram.donate_rows` also
    `prev` (the last step's new Engram rows); host tables also return the new rows, replicated.
    tools/aot_compile.py lowers the same for a TPU topology."""
    host = host_tables(self.cfg)
    donate = (0, 3) if host and self.cfg.engram.donate_rows else (0,)
    rows_out = (NamedSharding(self.mesh, P()),) if host else ()
    return jax.jit(self._step, donate_argnums=donate,
                   out_shardings=(self.state_shardings, None) + rows_out)

  def _mtp_weight(self, step):
    m = self.cfg.mtp
    return jnp.where(step < int(m.late_frac * self.cfg.train.steps), m.loss_weight, m.loss_weight_late)

  def _step(self, state, batch, eng=None, prev=None):
    """eng (host tables): {'theta','moments','src'} per layer (memory/host_tables.py) and prev,
    the last step's new rows (donated with the state: XLA writes this step's new rows, which the
    step then also returns, into their buffers)."""
    cfg = self.cfg
    params, rest, step = state['params'], state['rest'], state['step']
    mtp_w = self._mtp_weight(step)
    theta = None if eng is None else {l: patch_rows(r, eng['src'][l], prev[l][:, 0])
                                      for l, r in step_rows(eng, 'theta').items()}
    if eng is not None and not cfg.engram.late_moments:     # A/B: the moments at the start too
      theta, moments = jax.lax.optimization_barrier((theta, step_rows(eng, 'moments')))
    grad_fn = jax.value_and_grad(self._loss, argnums=(0, 4), has_aux=True)
    A = cfg.train.grad_accum
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    diff_params, loss_shape = self._cast_once(params, rest, first, mtp_w, theta, need_shape=A > 1)
    if A == 1:
      (_, metrics), grads = grad_fn(diff_params, rest, batch, mtp_w, theta)
      grads = (jax.tree.map(lambda g, p: g.astype(p.dtype), grads[0], params), grads[1])
    else:
      def body(acc, mb):
        (_, m), g = grad_fn(diff_params, rest, mb, mtp_w, theta)
        return jax.tree.map(jnp.add, acc, (g, m)), None    # fp32 accumulators (zero below)
      zero = jax.tree.map(jnp.zeros_like, ((params, theta), loss_shape[1]))
      (grads, metrics), _ = jax.lax.scan(body, zero, micro)
      grads = jax.tree.map(lambda g: g / A, grads)
      metrics = {k: (v if k in ('expert_counts', 'n_valid', 'dropped') else v / A)
                 for k, v in metrics.items()}
    (grads, g_theta), norms = clip_grads(grads, cfg)   # Engram row grads count in the main norm
    updates, new_opt = self.tx.update(grads, state['opt'], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(norms['grad_norm']) & \
        jnp.isfinite(norms['indexer_grad_norm'])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_params, new_opt = keep(new_params, params), keep(new_opt, state['opt'])
    new_rest = self._update_biases(new_params, rest, metrics, step, finite)
    out = {'step': step + 1, 'params': new_params, 'rest': new_rest, 'opt': new_opt,
           'skipped': state['skipped'] + (~finite).astype(jnp.int32)}
    counts = metrics['expert_counts']
    load = (jnp.max(counts, axis=-1) / jnp.maximum(jnp.mean(counts, axis=-1), 1e-9)).mean() \
        if counts.size else jnp.zeros(())
    scalars = {k: v for k, v in metrics.items() if k != 'expert_counts'}
    scalars.update(norms, lr=schedule(cfg, cfg.optim.lr)(step), skipped=out['skipped'],
                   finite=finite, expert_load_max_over_mean=load)
    if eng is None:
      return out, scalars
    if cfg.engram.late_moments:      # first used here: XLA copies them in for the optimizer
      moments = step_rows(eng, 'moments')
    o, count = cfg.optim, step - state['skipped']   # = optim.lazy_adam's count of applied updates
    lr = schedule(cfg, o.lr * cfg.engram.lr_mult)(count)
    return out, scalars, {
        l: lazy_adam_rows(join_rows(theta[l], patch_rows(moments[l], eng['src'][l],
                                                         prev[l][:, 1:])),
                          g_theta[l], count, lr, o.b1, o.b2, o.eps, finite) for l in theta}

  def _update_biases(self, params, rest, metrics, step, finite):
    cfg = self.cfg
    counts = metrics['expert_counts']
    if not counts.size:
      return rest
    stop = int(cfg.moe.bias_update_stop_frac * cfg.train.steps)
    on = (step < stop) & finite & (cfg.dsa.stage != 'warmup')
    gamma = jnp.where(on, cfg.moe.bias_update_rate, 0.0)
    model = nnx.merge(self.graphdef, params, rest)
    update = jax.vmap(update_router_bias, (0, 0, None, 0, None))
    i = 0
    for moe in model.moe_layers():  # each layer's own token count (the MTP block masks more)
      b = moe.router.bias[...]     # [E], or [L,E] for a scanned run of L layers
      b_LE = b.reshape(-1, b.shape[-1])
      c_LE = counts[i:i + b_LE.shape[0]]
      new_LE = update(b_LE, c_LE, cfg.moe.top_k, jnp.sum(c_LE, -1) / cfg.moe.top_k, gamma)
      moe.router.bias[...] = new_LE.reshape(b.shape)
      i += b_LE.shape[0]
    assert i == counts.shape[0], (i, counts.shape)
    return nnx.split(model, nnx.Param, ...)[2]

  def _eval(self, state, batch, eng=None):
    theta = None if eng is None else step_rows(eng, 'theta')
    _, m = self._loss(state['params'], state['rest'], batch, 0.0, theta)
    return m['loss'] * m['n_valid'], m['n_valid']

  # ---- loop -------------------------------------------------------------------------------
  def step(self, batch_np) -> dict:
    if self.tables is None:
      self.state, scalars = self._train_step(self.state, self.to_global(batch_np))
      return scalars
    batch_np, eng = self.tables.begin(batch_np, getattr(self.train_iter, 'peek', None))
    prev = eng.pop('prev')
    self.state, scalars, new_rows = self._train_step(self.state, self.to_global(batch_np), eng,
                                                     prev)
    self.tables.end(new_rows)
    return scalars

  def evaluate(self) -> float:
    tot, n = 0.0, 0.0
    it = iter(self.eval_ds)
    for _ in range(self.cfg.train.eval_steps):
      b = next(it)
      if self.tables is None:
        s, c = self._eval_step(self.state, self.to_global(b))
      else:
        b, eng = self.tables.eval_inputs(b)
        s, c = self._eval_step(self.state, self.to_global(b), eng)
      tot, n = tot + float(s), n + float(c)
    return tot / max(n, 1.0)

  def _meta(self):
    return {'config': ckpt.config_json(self.cfg),
            'engram_hash': self.hash_spec.to_json() if self.hash_spec is not None else None}

  def save(self, force=False):
    if self.mngr is None:
      return
    host = self.tables.state_for_save() if self.tables is not None else None
    ckpt.save(self.mngr, int(self.state['step']), self.state, self.train_iter, self._meta(), force,
              host_tables=host)

  def _on_sigterm(self, *_):
    self._stop = True

  def run(self) -> list[float]:
    """Trains to `train.steps`; returns the per-step losses it ran (for tests and tools)."""
    cfg = self.cfg
    writer = MetricWriter(self.workdir, cfg.log.tensorboard, cfg.log.progress,
                          enabled=jax.process_index() == 0, total_steps=cfg.train.steps)
    try:
      signal.signal(signal.SIGTERM, self._on_sigterm)
    except ValueError:  # not the main thread
      pass
    fl = flops_lib.flops_per_token(cfg)
    tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
    peak = flops_lib.peak_tflops_for(jax.devices()[0])
    n_dev = jax.device_count()
    losses: list[float] = []
    step = int(self.state['step'])
    t_last, s_last = time.time(), step
    while step < cfg.train.steps and not self._stop:
      scalars = self.step(next(self.train_iter))
      step += 1
      losses.append(scalars['loss'])   # fetched at the end: no host sync per step
      if step % cfg.train.log_every == 0 or step == cfg.train.steps:
        row = {k: float(v) for k, v in jax.device_get(scalars).items()}   # waits for the step
        dt = time.time() - t_last
        tps = tokens_per_step * (step - s_last) / max(dt, 1e-9)
        tflops = fl.model_train_per_token * tps / n_dev / 1e12
        row.update(tokens_per_sec=tps, tflops_per_device=tflops,
                   mfu=(tflops / peak) if peak else None)
        writer.write(step, row)
        t_last, s_last = time.time(), step
      if cfg.train.eval_every and step % cfg.train.eval_every == 0:
        writer.write(step, {'eval_loss': self.evaluate()})
        t_last = time.time()   # eval time is not training throughput
      if self.mngr and step % cfg.checkpoint.every == 0:
        self.save()
    if self.mngr:   # on preemption or at the end, make sure the last step is saved
      self.mngr.wait_until_finished()
      if self.mngr.latest_step() != step:
        self.save(force=True)
        self.mngr.wait_until_finished()
    writer.close()
    return [float(x) for x in losses]
