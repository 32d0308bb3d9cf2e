"""Engram tables in host memory (SPEC §6.3 backward, §6.4): the row math against NumPy oracles,
the prefetch/patch/write-back pipeline against a dense NumPy lazy Adam, and host vs device table
modes of the Trainer over 20 steps, with a checkpoint restored onto another mesh."""
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from helpers import ROOT, small_tiny
from v4jax import compat
from v4jax.config import ConfigError
from v4jax.memory import rows as rows_lib
from v4jax.memory.host_tables import HostTables, Lookahead, pinned_bytes, pinned_pool_gib, row_dims
from v4jax.optim import path_str
from v4jax.trainer import Trainer

B1, B2, EPS = 0.9, 0.95, 1e-8


def _np_lazy_adam(th, m, v, G, count, lr):
  """SPEC §6.4 on dense arrays: rows with a non-zero summed gradient are updated."""
  th, m, v = th.copy(), m.copy(), v.copy()
  r = np.nonzero(np.any(G != 0, axis=1))[0]
  c = count + 1
  m[r] = B1 * m[r] + (1 - B1) * G[r]
  v[r] = B2 * v[r] + (1 - B2) * G[r] ** 2
  th[r] -= lr * (m[r] / (1 - B1 ** c)) / (np.sqrt(v[r] / (1 - B2 ** c)) + EPS)
  return th, m, v


def test_expand_rows_backward_sums_duplicates():
  rng = np.random.default_rng(0)
  rows = rng.integers(0, 7, size=(2, 9, 3)).astype(np.int32)      # heavy duplication
  uniq, inv, n = rows_lib.unique_rows(rows, 2 * 9 * 3)
  np.testing.assert_array_equal(uniq[:n][inv], rows)
  theta = rng.standard_normal((uniq.shape[0], 4)).astype(np.float32)
  w = rng.standard_normal((2, 9, 3, 4)).astype(np.float32)
  loss = lambda t: jnp.sum(jnp.tanh(rows_lib.expand_rows(t, jnp.asarray(inv))) * w)
  got = np.asarray(jax.grad(loss)(jnp.asarray(theta)))
  want = np.zeros_like(theta)
  np.add.at(want, inv.reshape(-1), ((1 - np.tanh(theta[inv]) ** 2) * w).reshape(-1, 4))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)      # fp32 sums of <= 54 terms
  assert not np.any(got[n:])                                       # padding gets no gradient


@pytest.mark.parametrize('head_ranges', [True, False])
def test_unique_rows_matches_numpy_unique(head_ranges):
  """Per-head sorts (each head's rows above the previous head's, as the hash's offsets make them)
  and the one-sort path both give np.unique's rows and inverse."""
  rng = np.random.default_rng()
  rows = rng.integers(0, 50, size=(3, 17, 4)).astype(np.int32)
  if head_ranges:
    rows += np.arange(4, dtype=np.int32) * 50
  u_max = rows.size + 5
  uniq, inv, n = rows_lib.unique_rows(rows, u_max)
  want_u, want_inv = np.unique(rows, return_inverse=True)
  assert n == want_u.shape[0] and uniq.dtype == np.int32 and inv.dtype == np.int32
  np.testing.assert_array_equal(uniq[:n], want_u)
  np.testing.assert_array_equal(uniq[n:], want_u[-1])                  # padding repeats the last
  np.testing.assert_array_equal(inv, want_inv.reshape(rows.shape))


def test_lazy_adam_rows_matches_numpy_and_keeps_untouched_bits():
  rng = np.random.default_rng(1)
  rows = rng.standard_normal((6, 3, 5)).astype(np.float32)
  rows[:, 2] = np.abs(rows[:, 2])
  g = rng.standard_normal((6, 5)).astype(np.float32)
  g[[1, 4]] = 0.0
  lr, count = 0.01, 3
  new = np.asarray(rows_lib.lazy_adam_rows(jnp.asarray(rows), jnp.asarray(g), jnp.int32(count),
                                           lr, B1, B2, EPS, jnp.bool_(True)))
  th, m, v = _np_lazy_adam(rows[:, 0], rows[:, 1], rows[:, 2], g, count, lr)
  np.testing.assert_allclose(new[:, 0], th, rtol=1e-6, atol=1e-7)   # fp32 vs fp64 NumPy
  np.testing.assert_allclose(new[:, 1], m, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(new[:, 2], v, rtol=1e-6, atol=1e-8)
  np.testing.assert_array_equal(new[[1, 4]], rows[[1, 4]])
  skipped = rows_lib.lazy_adam_rows(jnp.asarray(rows), jnp.asarray(g), jnp.int32(count), lr, B1,
                                    B2, EPS, jnp.bool_(False))
  np.testing.assert_array_equal(np.asarray(skipped), rows)


class _ListIter:
  """A checkpointable iterator over a list (stands in for the Grain iterator)."""

  def __init__(self, items):
    self.items, self.i = items, 0

  def __next__(self):
    self.i += 1
    return self.items[self.i - 1]

  def get_state(self):
    return {'i': self.i}

  def set_state(self, s):
    self.i = s['i']


def test_lookahead_state_is_that_of_the_last_batch_returned():
  it = Lookahead(_ListIter(list(range(10))))
  assert next(it) == 0 and it.peek() == 1
  state = it.get_state()
  assert json.loads(state) == {'i': 1} and next(it) == 1 and next(it) == 2
  it.set_state(state)
  assert next(it) == 1


def _pipeline_cfg(gather='numpy', ahead=()):
  c = small_tiny(**{'engram.base_rows': 53, 'engram.host_gather': gather,
                    'engram.rows_ahead': ahead})
  c.engram.layer_ids = (0, 1)
  c.data.update(global_batch=2, seq_len=6)
  return c


@pytest.mark.parametrize('memory_kind,gather,chunk_rows,ahead', [
    ('pinned_host', 'numpy', None, ()), ('pinned_host', 'numpy', 37, ()),
    ('pinned_host', 'xla', None, ()), ('device', 'numpy', None, ()),
    ('pinned_host', 'numpy', None, ('theta',)), ('pinned_host', 'numpy', 37, ('theta', 'moments'))])
def test_pipeline_matches_dense_lazy_adam(memory_kind, gather, chunk_rows, ahead):
  """Prefetch of step s+1 before the write-back of step s, device patching, in-place write-back,
  two layers in one row space (one buffer, or 37-row chunks that split both layers and hold rows
  of both), parts of the rows DMA'd ahead of the step or staged for it (`engram.rows_ahead`):
  the tables equal a dense NumPy lazy Adam over the same steps (loss 0.5*sum(w*theta[row]^2), so
  each step's gradient depends on the rows the previous step wrote)."""
  cfg = _pipeline_cfg(gather, ahead)
  R = {0: 4 * 53 + 20, 1: 4 * 61 + 3}
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  tabs = HostTables(cfg, R, mesh, memory_kind=memory_kind, threads=2, chunk_rows=chunk_rows)
  if chunk_rows:
    assert len(tabs.store.chunks) == -(-sum(R.values()) // chunk_rows)
  staged = memory_kind == 'pinned_host' and gather == 'numpy'    # one device: the step copies
  want = tuple('pinned_host' if staged and p not in ahead else 'device'
               for p in ('theta', 'moments'))
  J, H = 4, tabs.width
  rng = np.random.default_rng(2)
  batches = []
  for s in range(7):
    b = {'w': rng.standard_normal((2, 6, J, H)).astype(np.float32)}
    for l in R:
      rows = rng.integers(0, 12 if s % 2 else R[l], size=(2, 6, J)).astype(np.int32)  # duplicates
      rows[0, 0] = 5                            # row 5 in every step: patched from the last step
      b[f'engram_rows_{l}'] = rows
    batches.append(b)
  lrs = [0.02 * (s + 1) for s in range(len(batches))]

  @jax.jit
  def step(eng, inv, w, count, lr):
    out = {}
    theta = rows_lib.step_rows(eng, 'theta')     # pinned staging rows move to the device here
    moments = rows_lib.step_rows(eng, 'moments')
    for l in R:
      th = rows_lib.patch_rows(theta[l], eng['src'][l], eng['prev'][l][:, 0])
      mv = rows_lib.patch_rows(moments[l], eng['src'][l], eng['prev'][l][:, 1:])
      f = lambda t, l=l: 0.5 * jnp.sum(w * rows_lib.expand_rows(t, inv[l]) ** 2)
      out[l] = rows_lib.lazy_adam_rows(rows_lib.join_rows(th, mv), jax.grad(f)(th), count, lr,
                                       B1, B2, EPS, jnp.bool_(True))
    return out

  slots0 = {l: tabs.slots(l) for l in R}
  ref = {l: (slots0[l][:, 0].astype(np.float64), slots0[l][:, 1] * 0.0, slots0[l][:, 2] * 0.0)
         for l in R}
  it = Lookahead(_ListIter(batches))
  for s in range(len(batches)):
    b = next(it)
    dev_b, eng = tabs.begin(b, it.peek if s + 1 < len(batches) else None)
    assert {(eng['theta'][l].sharding.memory_kind, eng['moments'][l].sharding.memory_kind)
            for l in R} == {want}
    inv = {l: jnp.asarray(dev_b[f'engram_inv_{l}']) for l in R}
    new = step(eng, inv, jnp.asarray(b['w']), jnp.int32(s), lrs[s])
    tabs.end(new)
    for l in R:
      th, m, v = ref[l]
      r = b[f'engram_rows_{l}']
      G = np.zeros_like(th)
      np.add.at(G, r.reshape(-1), (b['w'] * th[r]).reshape(-1, H))
      ref[l] = _np_lazy_adam(th, m, v, G, s, lrs[s])
  for l in R:
    got, (th, m, v) = tabs.slots(l), ref[l]
    np.testing.assert_allclose(got[:, 0], th, rtol=1e-5, atol=1e-6)   # fp32 device vs fp64 oracle
    np.testing.assert_allclose(got[:, 1], m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[:, 2], v, rtol=1e-5, atol=1e-9)
    untouched = np.setdiff1d(np.arange(R[l]), np.concatenate([b[f'engram_rows_{l}'].ravel()
                                                              for b in batches]))
    assert untouched.size > 0
    np.testing.assert_array_equal(got[untouched], slots0[l][untouched])
  saved = {k: np.array(v) for k, v in tabs.state_for_save().items()}
  tabs.load({k: v[::-1].copy() for k, v in saved.items()})   # reversed: every chunk piece moves
  for l in R:
    np.testing.assert_array_equal(tabs.slots(l), saved[f'layer_{l}'][::-1])
  tabs.close()


def test_pinned_pool_size_is_what_the_store_allocates():
  """The pinned pool cap (`pinned_pool_gib`, what claim_gpu_memory sets) counts the store's own
  buffers: its chunks (tables and moments) and two staging sets, plus two sets of fetched new
  rows as large as the staging sets; the cap adds the pool's last-region slack."""
  from v4jax.data.engram_hash import make_hash_spec
  cfg = _pipeline_cfg()
  cfg.engram.update(enabled=True, table_memory='host')
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  tabs = HostTables(cfg, make_hash_spec(cfg).total_rows, mesh, threads=2, chunk_rows=37,
                    init=False)
  chunks = sum(a.nbytes for a in tabs.store.chunks)
  stages = sum(a.nbytes for st in tabs.store.stages for pair in st.values() for a in pair)
  tabs.close()
  assert pinned_bytes(cfg) == chunks + 2 * stages
  # the cap: those bytes and at least 6.5 GiB of slack, in whole GiB (so under 1 GiB more)
  for table_gib, held in ((None, chunks + 2 * stages), (32, 96 * 2**30 + 2 * stages)):
    gib = pinned_pool_gib(cfg, table_gib)
    assert held / 2**30 + 6.5 <= gib < held / 2**30 + 7.5, (table_gib, gib)
  cfg.engram.table_memory = 'device'
  assert pinned_bytes(cfg) == pinned_pool_gib(cfg) == 0


def test_missing_host_memory_names_the_device_fallback():
  fake = types.SimpleNamespace(platform='tpu', id=0,
                               addressable_memories=lambda: [types.SimpleNamespace(kind='device')])
  with pytest.raises(compat.HostMemoryError, match="table_memory='device'"):
    compat.require_memory_kind(fake, 'pinned_host')


def test_several_processes_refuse_the_xla_gather(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  with pytest.raises(NotImplementedError, match="2 processes.*host_gather=numpy"):
    HostTables(_pipeline_cfg('xla'), {0: 300, 1: 300}, mesh)


def test_merge_and_assemble_rows_of_several_processes():
  """The several-process pieces against NumPy: the global unique rows from per-process unique
  rows, each process's inv into them, and the bit-exact assembly of the owners' segments."""
  rng = np.random.default_rng(3)
  local = [rng.integers(0, 40, size=(2, 5, 3)).astype(np.int32) for _ in range(3)]
  want = np.unique(np.concatenate([r.ravel() for r in local]))
  for r in local:
    uniq, inv, n = rows_lib.merge_unique_rows([np.unique(x) for x in local], r, 90)
    np.testing.assert_array_equal(uniq[:n], want)
    np.testing.assert_array_equal(uniq[:n][inv], r)
  U, H = 11, 4
  full = rng.standard_normal((U, 3, H)).astype(np.float32)
  full[3, 1, 2] = -0.0                                       # must arrive with its sign bit
  bounds = np.array([[0, 4], [0, 0], [4, 4], [4, 9], [9, 11]], np.int32)  # slot 1: not a first
  parts = rng.standard_normal((5, U, 3, H)).astype(np.float32)            # slot; 2: owns none
  for k, (a, b) in enumerate(bounds):
    parts[k, a:b] = full[a:b]
  got = np.asarray(rows_lib.assemble_rows(jnp.asarray(parts), jnp.asarray(bounds)))
  np.testing.assert_array_equal(got.view(np.uint32), full.view(np.uint32))   # bit-exact


def test_dense_adam_is_rejected_for_host_tables():
  cfg = _pipeline_cfg()
  cfg.engram.table_optimizer = 'dense_adam'
  mesh = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  with pytest.raises(ConfigError, match="table_memory='device'"):
    HostTables(cfg, {1: 300}, mesh)


# ---- Trainer: host vs device table modes -------------------------------------------------------
STEPS = 20


def _is_table(path: str) -> bool:
  """A device-mode Engram table's leaf path (engram/{layer}/table, '/value' for the Variable)."""
  return path.startswith('engram/') and path.split('/')[2] == 'table'


def _table_leaf(state, part):
  for p, v in jax.tree_util.tree_leaves_with_path(state[part]):
    s = path_str(p)
    if 'engram' in s and 'table' in s:
      yield s, v


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  over = {'engram.base_rows': 1009}        # 4 tables of ~1K rows: some rows stay untouched
  dev = Trainer(small_tiny(**over, **{'checkpoint.enabled': False}),
                str(tmp_path_factory.mktemp('dev')))
  host_dir = str(tmp_path_factory.mktemp('host'))
  host = Trainer(small_tiny(**over, **{'engram.table_memory': 'host'}), host_dir)
  init = host.tables.slots(1)
  # Host tables draw their own N(0, std) init; give the device run the same values. Every other
  # parameter already agrees (same seed, same draw order).
  dev.state = dict(dev.state, params=jax.tree_util.tree_map_with_path(
      lambda p, x: jax.device_put(jnp.asarray(init[:, 0]), x.sharding)
      if _is_table(path_str(p)) else x, dev.state['params']))
  same_init = all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(host.state['params']),
      [x for p, x in jax.tree_util.tree_leaves_with_path(dev.state['params'])
       if not _is_table(path_str(p))]))
  losses, touched, dup, donated = {'dev': [], 'host': []}, set(), [], []
  # Full-precision fp32 dots: a GPU backend (JAX_PLATFORMS=cuda) otherwise runs them as TF32, and
  # 20 Adam steps carry that rounding past the tolerances below (a no-op on the CPU).
  with jax.default_matmul_precision('highest'):
    for s in range(STEPS):
      bd, bh = next(dev.train_iter), next(host.train_iter)
      assert np.array_equal(bd['engram_rows_1'], bh['engram_rows_1'])
      r = bh['engram_rows_1']
      touched.update(np.unique(r).tolist())
      dup.append(np.unique(r).size < r.size)
      losses['dev'].append(float(dev.step(bd)['loss']))
      prev = dict(host.tables._prev_rows)   # pylint: disable=protected-access
      losses['host'].append(float(host.step(bh)['loss']))
      donated.append(all(a.is_deleted() for a in prev.values()))
  host.save(force=True)
  return types.SimpleNamespace(dev=dev, host=host, host_dir=host_dir, init=init, losses=losses,
                               touched=np.array(sorted(touched)), dup=dup, same_init=same_init,
                               donated=donated)


def test_host_and_device_tables_train_alike(runs):
  """Same losses and table updates over 20 steps, each step donating the last step's new rows
  (`prev`) while that step's write-back DMA, queued before it, still reads them."""
  assert runs.same_init and all(runs.dup) and all(runs.donated)
  # Same math; only the summation order of duplicate-row and norm reductions differs (fp32).
  np.testing.assert_allclose(runs.losses['host'], runs.losses['dev'], rtol=2e-5)
  assert runs.losses['host'][-1] < runs.losses['host'][0]
  host = runs.host.tables.slots(1)
  (_, table), = _table_leaf(runs.dev.state, 'params')
  mu, nu = [np.asarray(v) for _, v in _table_leaf(runs.dev.state, 'opt')][:2]
  # Adam's step is ~lr_mult*lr per element whatever the gradient's size, so rounding-level
  # gradient differences can move an element by up to ~1e-4 after 20 steps; the moments of the
  # two (slightly different) trajectories agree to 1% of their largest entry.
  np.testing.assert_allclose(host[:, 0], np.asarray(table), atol=3e-4)
  np.testing.assert_allclose(host[:, 1], mu, atol=1e-2 * np.abs(mu).max())
  np.testing.assert_allclose(host[:, 2], nu, atol=1e-2 * np.abs(nu).max())
  untouched = np.setdiff1d(np.arange(host.shape[0]), runs.touched)
  assert untouched.size > 100
  np.testing.assert_array_equal(host[untouched], runs.init[untouched])     # bit-identical
  assert not np.any(host[untouched, 1:])
  np.testing.assert_array_equal(np.asarray(table)[untouched], runs.init[untouched, 0])
  assert np.all(np.any(host[runs.touched, 1] != 0, axis=1))               # touched rows moved


def test_donated_rows_become_the_new_rows():
  """engram.donate_rows: XLA writes the step's new rows into the donated last-step rows. The
  compiled step (tiny config, host tables, one CPU device) aliases exactly one [U_max, 3, H]
  fp32 set per Engram layer more than without the donation, and its peak is at least that much
  lower. DSA, the MoE and MTP are off: they do not touch the rows, and they halve the two
  compiles."""
  sys.path.insert(0, os.path.join(ROOT, 'tools'))
  import aot_compile   # pylint: disable=import-outside-toplevel
  mem = {}
  for donate in (True, False):
    cfg = small_tiny(**{'engram.table_memory': 'host', 'engram.donate_rows': donate,
                        'dsa.enabled': False, 'dsa.stage': 'dense', 'model.n_dense_layers': 2,
                        'mtp.depth': 0})
    mem[donate] = aot_compile.lower_step(cfg, jax.devices()[:1])[2].compile().memory_analysis()
  u_max, width = row_dims(cfg)
  rows = len(cfg.engram.layer_ids) * u_max * 3 * width * 4
  assert mem[True].alias_size_in_bytes - mem[False].alias_size_in_bytes == rows
  assert mem[False].peak_memory_in_bytes - mem[True].peak_memory_in_bytes >= rows


def test_one_device_copies_staged_rows_inside_the_step(runs, tmp_path):
  """On one device the step takes the pinned staging arrays and copies them to the device itself
  (two staging sets in turn): its losses follow the 8-device run, whose rows are placed before
  the step (fp32, other reduction order), and rows no batch touched keep their bits. This run
  keeps the last step's rows (`engram.donate_rows=False`; the 8-device run donates them) and
  takes the rows' moments in at the step's start (`engram.late_moments=False`; the 8-device run
  uses them only at its end). `engram.rows_ahead` is covered by the pipeline test above."""
  n = 6
  one = Trainer(small_tiny(**{'engram.base_rows': 1009, 'engram.table_memory': 'host',
                              'engram.donate_rows': False, 'engram.late_moments': False,
                              'checkpoint.enabled': False}),
                str(tmp_path), devices=jax.devices()[:1])
  assert one.tables.rows_in_step and not runs.host.tables.rows_in_step
  np.testing.assert_array_equal(one.tables.slots(1), runs.init)
  kinds, gather = [], one.tables.store.gather

  def recording_gather(*a):
    out = gather(*a)
    kinds.append(tuple(x.sharding.memory_kind for part in out for x in part.values()))
    return out
  one.tables.store.gather = recording_gather
  losses, touched = [], set()
  for _ in range(n):
    b = next(one.train_iter)
    touched.update(np.unique(b['engram_rows_1']).tolist())
    prev = dict(one.tables._prev_rows)   # pylint: disable=protected-access
    losses.append(float(one.step(b)['loss']))
    assert not any(a.is_deleted() for a in prev.values())
  assert set(kinds) == {('pinned_host', 'pinned_host')}, kinds   # (theta, moments) of layer 1
  # one device vs 8: other reduction orders, drifting over the steps; 2.1e-5 seen at step 4 with
  # the batched init draws (wrong or stale rows move the loss by ~1e-2)
  np.testing.assert_allclose(losses, runs.losses['host'][:n], rtol=5e-5)
  after = one.tables.slots(1)
  untouched = np.setdiff1d(np.arange(after.shape[0]), sorted(touched))
  np.testing.assert_array_equal(after[untouched], runs.init[untouched])
  assert np.all(np.any(after[sorted(touched), 1] != 0, axis=1))
  one.tables.close()


def test_host_tables_resume_on_another_mesh(runs):
  cfg = small_tiny(**{'engram.base_rows': 1009, 'engram.table_memory': 'host', 'mesh.data': 2,
                      'mesh.fsdp': 2, 'mesh.expert': 2, 'mesh.rules': 'fsdp_ep'})
  resumed = Trainer(cfg, runs.host_dir)
  assert int(resumed.state['step']) == STEPS and dict(resumed.mesh.shape)['data'] == 2
  np.testing.assert_array_equal(resumed.tables.slots(1), runs.host.tables.slots(1))
  batch = next(runs.host.train_iter)
  b2 = next(resumed.train_iter)
  np.testing.assert_array_equal(b2['tokens'], batch['tokens'])
  l1, l2 = float(runs.host.step(batch)['loss']), float(resumed.step(b2)['loss'])
  np.testing.assert_allclose(l2, l1, rtol=1e-5)            # fp32, other reduction order
  np.testing.assert_allclose(resumed.tables.slots(1), runs.host.tables.slots(1), atol=1e-6)


def test_restore_cuts_the_row_padding_of_a_several_process_checkpoint(tmp_path):
  """P processes save each layer as [P*ceil(R/P), 3, H] (rows past R zero); a restore into
  another process count cuts or pads to its own shape (here: one process, R rows)."""
  import orbax.checkpoint as ocp
  from v4jax import checkpoint as ckpt
  cfg = _pipeline_cfg()
  mesh = Mesh(np.asarray(jax.devices()[:2]), ('data',))
  tabs = HostTables(cfg, {0: 301, 1: 299}, mesh, threads=2, init=False)
  rng = np.random.default_rng(4)
  saved = {f'layer_{l}': rng.standard_normal((3 * -(-r // 3), 3, tabs.width)).astype(np.float32)
           for l, r in tabs.rows.items()}      # as 3 processes would save them
  mngr = ckpt.manager(str(tmp_path), cfg)
  mngr.save(1, args=ocp.args.Composite(host_tables=ckpt.tree_save(saved)))
  mngr.wait_until_finished()
  tabs.load(ckpt.restore_host_tables(mngr, 1, tabs.abstract()))
  for l, r in tabs.rows.items():
    np.testing.assert_array_equal(tabs.slots(l), saved[f'layer_{l}'][:r])
  tabs.close()


@pytest.mark.parametrize('rows, width_delta', [(290, 0), (700, 0), (301, 1)])
def test_restore_refuses_tables_of_another_size(tmp_path, rows, width_delta):
  """Saved tables with fewer rows than this run's (would be zero-padded), at least twice as many
  (more than any process-count padding) or another width: one-line error naming the layer."""
  import orbax.checkpoint as ocp
  from v4jax import checkpoint as ckpt
  cfg = _pipeline_cfg()
  mesh = Mesh(np.asarray(jax.devices()[:2]), ('data',))
  tabs = HostTables(cfg, {0: 301, 1: 299}, mesh, threads=2, init=False)
  saved = {f'layer_{l}': np.ones((rows if l == 0 else r, 3, tabs.width + width_delta), np.float32)
           for l, r in tabs.rows.items()}
  mngr = ckpt.manager(str(tmp_path), cfg)
  mngr.save(1, args=ocp.args.Composite(host_tables=ckpt.tree_save(saved)))
  mngr.wait_until_finished()
  with pytest.raises(ckpt.CheckpointError, match="host table 'layer_0'.*expected \\[301..601"):
    ckpt.restore_host_tables(mngr, 1, tabs.abstract())
  tabs.close()
