"""The V4 decoder: embedding -> n mHC streams -> blocks -> stream reduction -> norm -> head, + MTP.

Dims: B batch, T positions, N mHC streams (SPEC's n), D model dim, V vocabulary, L layers.

Layer i (SPEC §8): [Engram injection if i is listed] -> HC(attn_norm -> MLA/DSA)
-> HC(ffn_norm -> dense FFN or MoE). With `mhc.streams == 1` an HC site is the plain pre-norm
residual X + F(X). The streams are always carried as X_BTND (N = 1 without mHC).

The Engram modules live beside the blocks, at `engram/{i}`, so that an Engram layer's block has the
structure of its neighbours. With `model.scan_layers`, each run of >= 2 consecutive blocks of one
structure (`layer_groups`; a run never continues across an Engram layer, which starts a new one)
is a single Block whose variables carry a leading L dim (logical axis 'layers'), stored under
`blocks/{first}-{last}` and run by `lax.scan`; other blocks stay at `blocks/{i}`. Each distinct
block body is traced and compiled once, so fewer runs compile faster.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.kernels.attention import forward_kernel_saveable
from v4jax.model.layers import (KEPT_MATMUL, RMSNorm, constrain, dtype_of, flush_draws,
                                 kept_matmuls_behind_barrier, matmul, param)
from v4jax.model.loss import cross_entropy_sum
from v4jax.model.mla import MLA
from v4jax.model.moe import DenseFFN, MoE

ACT_BTND = ('batch', 'seq', 'streams', 'act_embed')
MHC_DIAGNOSTICS = ('mhc_fwd_gain', 'mhc_bwd_gain', 'mhc_col_residual', 'mhc_row_residual')


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockInputs:
  """Per-step inputs every block sees (a pytree: it passes through nnx.remat)."""
  positions_BT: jax.Array
  segment_ids_BT: jax.Array | None   # None: attention may cross documents (SPEC §13 #7)
  valid_BT: jax.Array                # tokens whose loss counts
  engram_rows: dict[int, jax.Array] | None = None   # layer id -> rows [B,T,J]
  engram_emb: dict[int, jax.Array] | None = None    # layer id -> gathered e [B,T,M] (host tables)


class Block(nnx.Module):
  """One decoder block (attention and FFN sites); `is_mtp` blocks always use MoE."""

  def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs, is_mtp: bool = False):
    m = cfg.model
    self.layer_idx = layer_idx
    self.n_streams = cfg.mhc.streams
    self.attn_norm = RMSNorm(m.d_model, m.norm_eps)
    self.attn = MLA(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(m.d_model, m.norm_eps)
    use_moe = cfg.moe.enabled and (is_mtp or layer_idx >= m.n_dense_layers)
    self.ffn = MoE(cfg, rngs=rngs) if use_moe else DenseFFN(cfg, m.d_ff, rngs=rngs)
    if self.n_streams > 1:
      from v4jax.model.mhc import HCSite
      self.hc_attn = HCSite(cfg, 2 * layer_idx, rngs=rngs)
      self.hc_ffn = HCSite(cfg, 2 * layer_idx + 1, rngs=rngs)

  def _site(self, hc, X_BTND, f):
    if self.n_streams == 1:
      y_BTD, aux = f(X_BTND[:, :, 0])
      return X_BTND + y_BTD[:, :, None].astype(X_BTND.dtype), aux
    return hc(X_BTND, f)

  def __call__(self, X_BTND: jax.Array, inp: BlockInputs):
    aux: dict[str, Any] = {}

    def attn(u_BTD):
      return self.attn(self.attn_norm(u_BTD), inp.positions_BT, inp.segment_ids_BT, inp.valid_BT)

    def ffn(u_BTD):
      h_BTD = self.ffn_norm(u_BTD)
      if isinstance(self.ffn, MoE):
        return self.ffn(h_BTD, inp.valid_BT)
      return self.ffn(h_BTD), {}

    for site, f in (('attn', attn), ('ffn', ffn)):
      X_BTND, a = self._site(getattr(self, f'hc_{site}', None), X_BTND, f)
      aux.update({(f'{site}_{k}' if k.startswith('mhc_') else k): v for k, v in a.items()})
    return constrain(X_BTND, ACT_BTND), aux


BLOCK_SAVED_NAMES = ('indexer_topk', 'attn_lse', 'dsa_teacher', 'dsa_student', 'moe_route',
                     'moe_out')


def _checkpoint(cfg, fn):
  """fn under jax.checkpoint with the policy of cfg.model.remat (fn itself for 'none')."""
  if cfg.model.remat == 'none':
    return fn
  cp = jax.checkpoint_policies
  policy = {
      # weight matmuls, the attention forward kernel's outputs (o and its lse: the backward
      # kernel's inputs; cuDNN or Pallas) and the DSA tensors that are costly to redo and small
      # to keep ([B,T,K] per layer): the top-k set, the attention lse, the KL teacher and student;
      # the MoE's routing (selection, slot order, balance counts: a few bytes per token-slot) and
      # its output (mHC's write-back needs it; recomputing it costs the down GEMM);
      # and the names in model.remat_save
      # (under model.remat_dot_barrier, layers.matmul's products by their name KEPT_MATMUL)
      'block': cp.save_from_both_policies(
          cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                     cp.save_only_these_names(*BLOCK_SAVED_NAMES, KEPT_MATMUL,
                                                              *cfg.model.remat_save)),
          forward_kernel_saveable),
      'full': cp.nothing_saveable,
  }[cfg.model.remat]
  if cfg.model.remat_dot_barrier:
    def body(*args):
      with kept_matmuls_behind_barrier():
        return fn(*args)
  else:
    body = fn
  return jax.checkpoint(body, policy=policy, static_argnums=(0,))


def _remat(cfg, fn):
  if cfg.model.remat == 'none':
    return fn
  # jax.checkpoint over a pure function of the block's state: nnx.remat would write the state
  # back afterwards, which fails for the non-differentiated RouterBias inside value_and_grad.
  pure = _checkpoint(cfg, lambda gdef, state, X, i: fn(nnx.merge(gdef, state), X, i))
  return lambda blk, X, i: pure(*nnx.split(blk), X, i)


def _engram_inject(eng, X_BTND: jax.Array, inp: BlockInputs) -> jax.Array:
  """X + Engram(X): from the host-gathered memory vector, else from this layer's table rows."""
  lid = eng.layer_id
  y = eng.mix(X_BTND, inp.engram_emb[lid]) if inp.engram_emb else \
      eng(X_BTND, inp.engram_rows[lid])
  return X_BTND + y.astype(X_BTND.dtype)


def layer_groups(cfg) -> list[tuple[int, int]]:
  """[start, stop) layer runs, one module each: with model.scan_layers every maximal run of
  consecutive blocks of one structure (dense FFN or MoE) that no Engram layer interrupts (an
  Engram layer may only start a run: its injection comes before its block), else one run per
  layer."""
  m = cfg.model
  if not m.scan_layers:
    return [(i, i + 1) for i in range(m.n_layers)]
  engram = set(cfg.engram.layer_ids) if cfg.engram.enabled else set()
  is_moe = lambda i: cfg.moe.enabled and i >= m.n_dense_layers
  out = []
  for i in range(m.n_layers):
    if out and i not in engram and is_moe(i) == is_moe(out[-1][0]):
      out[-1] = (out[-1][0], i + 1)
    else:
      out.append((i, i + 1))
  return out


def group_key(start: int, stop: int) -> str:
  """The `blocks` key of a layer run: 'i' for one layer, 'first-last' for a stack."""
  return str(start) if stop - start == 1 else f'{start}-{stop - 1}'


def stack_blocks(blocks: list[Block]) -> Block:
  """One Block whose variables are the blocks' variables stacked on a new leading 'layers' dim.

  The blocks differ only in their values (mHC `base` init depends on the site index, which is
  why the stack is built from separately constructed blocks), so one graph serves them all.
  """
  gdefs, states = zip(*(nnx.split(b) for b in blocks))
  shapes = [jax.tree.map(lambda v: (v.shape, v.dtype), s) for s in states]
  if any(s != shapes[0] for s in shapes[1:]):
    raise ValueError(f'stack_blocks: blocks {[b.layer_idx for b in blocks]} differ in structure')
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  for v in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = v.get_metadata().get('logical_axes', (None,) * (v.ndim - 1))
    v.set_metadata('logical_axes', ('layers',) + tuple(axes))
  return nnx.merge(gdefs[0], stacked)


def scan_blocks(cfg, stack: Block, X_BTND: jax.Array, inp: BlockInputs):
  """Runs a stacked Block over its L layers with lax.scan (remat policy on the body); returns
  (X, per-layer aux dicts in layer order)."""
  gdef, state = nnx.split(stack)
  layer = _checkpoint(cfg, lambda g, st, X, i: nnx.merge(g, st)(X, i))
  X_BTND, aux = jax.lax.scan(lambda X, st: layer(gdef, st, X, inp), X_BTND, state)
  n = jax.tree.leaves(state)[0].shape[0]
  return X_BTND, [jax.tree.map(lambda a, l=l: a[l], aux) for l in range(n)]


class StreamHead(nnx.Module):
  """Reduces N streams to one hidden state (mHC HyperHead; identity when N = 1)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.n_streams = cfg.mhc.streams
    if self.n_streams > 1:
      from v4jax.model.mhc import HyperHead
      self.hyper = HyperHead(cfg, rngs=rngs)

  def __call__(self, X_BTND):
    return X_BTND[:, :, 0] if self.n_streams == 1 else self.hyper(X_BTND)


class MTPModule(nnx.Module):
  """One MTP depth (SPEC §7): [enorm(emb of x_{t+k}) ; hnorm(X)] @ eh_proj -> block -> head."""

  def __init__(self, cfg, depth: int, *, rngs: nnx.Rngs):
    m = cfg.model
    self.enorm = RMSNorm(m.d_model, m.norm_eps)
    self.hnorm = RMSNorm(m.d_model, m.norm_eps)
    self.eh_proj = param(rngs, (2 * m.d_model, m.d_model), (None, 'embed'), m.init_std)
    self.block = Block(cfg, m.n_layers + depth, rngs=rngs, is_mtp=True)
    self.head_reduce = StreamHead(cfg, rngs=rngs)
    self.norm = RMSNorm(m.d_model, m.norm_eps)


class Transformer(nnx.Module):
  """The full network. `engram_rows_per_layer` gives each Engram layer's table size R_l."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, engram_rows_per_layer: dict[int, int] | None = None):
    m = cfg.model
    self.cfg = cfg
    self.dtype = dtype_of(m.dtype)
    self.embed = param(rngs, (m.vocab_size, m.d_model), ('vocab', 'embed'), m.init_std)
    engram = engram_rows_per_layer if cfg.engram.enabled else {}
    if cfg.engram.enabled and set(engram) != set(cfg.engram.layer_ids):
      raise ValueError(f'engram_rows_per_layer has layers {sorted(engram)}, '
                       f'config.engram.layer_ids={tuple(cfg.engram.layer_ids)}')
    blocks, engrams = [], {}
    for i in range(m.n_layers):
      blocks.append(Block(cfg, i, rngs=rngs))
      if i in engram:
        from v4jax.model.engram import Engram
        engrams[str(i)] = Engram(cfg, i, engram[i], rngs=rngs)
    if engrams:
      self.engram = nnx.Dict(engrams)
    flush_draws()   # under layers.batched_draws: the stacks below read the blocks' values
    if m.scan_layers:
      self.blocks = nnx.Dict({group_key(a, b): stack_blocks(blocks[a:b]) if b - a > 1 else blocks[a]
                              for a, b in layer_groups(cfg)})
    else:
      self.blocks = nnx.List(blocks)
    self.head_reduce = StreamHead(cfg, rngs=rngs)
    self.norm = RMSNorm(m.d_model, m.norm_eps)
    self.head = param(rngs, (m.d_model, m.vocab_size), ('embed', 'vocab'), m.init_std)
    self.mtp = nnx.List([MTPModule(cfg, k, rngs=rngs) for k in range(cfg.mtp.depth)])

  def main_blocks(self) -> list[tuple[int, int, Block]]:
    """(start, stop, block) per layer run in forward order; a run of > 1 layer is a stack."""
    if not self.cfg.model.scan_layers:
      return [(i, i + 1, b) for i, b in enumerate(self.blocks)]
    return [(a, b, self.blocks[group_key(a, b)]) for a, b in layer_groups(self.cfg)]

  def moe_layers(self) -> list[MoE]:
    """MoE layers in forward order (main blocks, then MTP blocks): the order of expert counts.
    A scanned run's MoE stands for its L layers (router.bias [L,E])."""
    blocks = [b for _, _, b in self.main_blocks()] + [m.block for m in self.mtp]
    return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

  def embed_tokens(self, tokens_BT):
    return jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.dtype)

  def trunk(self, tokens_BT, inp: BlockInputs):
    """Embedding through the last block: final streams X_L [B,T,N,D] and per-layer aux."""
    n = self.cfg.mhc.streams
    e_BTD = self.embed_tokens(tokens_BT)
    X_BTND = constrain(jnp.broadcast_to(e_BTD[:, :, None], e_BTD.shape[:2] + (n,) + e_BTD.shape[2:]),
                       ACT_BTND)
    auxes = []
    step = _remat(self.cfg, lambda blk, X, i: blk(X, i))
    inject = _remat(self.cfg, _engram_inject)
    for start, stop, blk in self.main_blocks():
      if self.cfg.engram.enabled and start in self.cfg.engram.layer_ids:
        X_BTND = inject(self.engram[str(start)], X_BTND, inp)
      if stop - start > 1:
        X_BTND, aux = scan_blocks(self.cfg, blk, X_BTND, inp)
        auxes += aux
      else:
        X_BTND, aux = step(blk, X_BTND, inp)
        auxes.append(aux)
    return X_BTND, auxes

  def __call__(self, batch: dict[str, jax.Array], mtp_weight: float | jax.Array = 0.0):
    """Losses for one batch; returns (total_loss, metrics). Losses follow SPEC §9."""
    cfg = self.cfg
    tokens_BT, targets_BT = batch['tokens'], batch['targets']
    weight_BT = batch['loss_mask'].astype(jnp.float32)   # 0 on padding; a NaN here poisons the loss
    valid_BT = weight_BT > 0
    seg = batch['segment_ids'] if cfg.data.respect_doc_boundaries else None
    rows = emb = None
    if cfg.engram.enabled and f'engram_emb_{cfg.engram.layer_ids[0]}' in batch:
      emb = {lid: batch[f'engram_emb_{lid}'] for lid in cfg.engram.layer_ids}
    elif cfg.engram.enabled:
      rows = {lid: batch[f'engram_rows_{lid}'] for lid in cfg.engram.layer_ids}
    inp = BlockInputs(batch['positions'], seg, valid_BT, rows, emb)
    n_valid = jnp.maximum(jnp.sum(weight_BT), 1.0)

    X_BTND, auxes = self.trunk(tokens_BT, inp)
    h_BTD = self.norm(self.head_reduce(X_BTND))
    lm_sum = cross_entropy_sum(h_BTD, self.head[...], targets_BT, weight_BT, self.dtype,
                               cfg.model.logits_chunk, cfg.kernels.xent)
    lm = lm_sum / n_valid

    mtp_losses = []
    X_prev = X_BTND
    for k, mod in enumerate(self.mtp, start=1):
      ids_BT = jnp.roll(tokens_BT, -k, axis=1)
      tgt_BT = jnp.roll(targets_BT, -k, axis=1)
      T = tokens_BT.shape[1]
      w_BT = jnp.roll(weight_BT, -k, axis=1) * (jnp.arange(T) < T - k)[None]
      ok_BT = w_BT > 0
      e_BTD = mod.enorm(self.embed_tokens(ids_BT))
      e_BTND = jnp.broadcast_to(e_BTD[:, :, None], X_prev.shape)
      z = jnp.concatenate([e_BTND, mod.hnorm(X_prev)], axis=-1)
      Z_BTND = matmul('btnf,fd->btnd', z, mod.eh_proj[...], self.dtype)
      mtp_inp = dataclasses.replace(inp, valid_BT=ok_BT, engram_rows=None, engram_emb=None)
      X_prev, aux = _remat(cfg, lambda blk, X, i: blk(X, i))(mod.block, Z_BTND, mtp_inp)
      auxes.append(aux)
      hk_BTD = mod.norm(mod.head_reduce(X_prev))
      n_k = jnp.maximum(jnp.sum(w_BT), 1.0)
      mtp_losses.append(cross_entropy_sum(hk_BTD, self.head[...], tgt_BT, w_BT, self.dtype,
                                          cfg.model.logits_chunk, cfg.kernels.xent) / n_k)
    mtp = sum(mtp_losses) / len(mtp_losses) if mtp_losses else jnp.zeros((), jnp.float32)

    bal = sum((a['bal_loss'] for a in auxes if 'bal_loss' in a), jnp.zeros((), jnp.float32))
    kl = sum((a['indexer_kl'] for a in auxes if 'indexer_kl' in a), jnp.zeros((), jnp.float32))
    idx_loss = cfg.dsa.loss_weight * kl / n_valid
    total = lm + mtp_weight * mtp + bal + idx_loss
    counts = [a['expert_counts'] for a in auxes if 'expert_counts' in a]
    metrics = {
        'loss': lm, 'mtp_loss': mtp, 'bal_loss': bal, 'indexer_loss': idx_loss,
        'n_valid': n_valid,
        'expert_counts': jnp.stack(counts) if counts else jnp.zeros((0,), jnp.float32),
        'dropped': sum((a['dropped'] for a in auxes if 'dropped' in a), jnp.zeros((), jnp.float32)),
    }
    for key in MHC_DIAGNOSTICS:   # worst site of the network, per diagnostic
      vals = [a[f'{s}_{key}'] for a in auxes for s in ('attn', 'ffn') if f'{s}_{key}' in a]
      if vals:
        metrics[key] = jnp.max(jnp.stack(vals))
    return total, metrics
