"""Benchmark the DSA Pallas kernels (sparse MLA fwd/bwd, indexer scores + top-k) on one GPU.

One command writes everything to --out (JSON; default $OUT/bench_kernels.json):

  python tools/bench_kernels.py                  # H200: checks, sweep, V3.2 + bench shapes
  python tools/bench_kernels.py --smoke          # CPU: tiny shapes, Pallas interpret mode

Sections (--sections, comma list; default all but attn_sweep and attn_scan):
  matmul   dense bf16 8192^3 matmul: the peak every kernel is quoted against (frac_dense);
  check    kernel vs jnp reference parity on the device (values, grads, top-k sets);
  sweep    sparse MLA forward and backward configurations (blocks, warps, stages of each kernel;
           backward dkv reduction 'segment' or 'atomic') at V3.2 T=4096, timed apart, best kept;
  profile  device time per kernel of the sparse MLA backward (swept configuration, V3.2 T=4096);
  sparse   sparse MLA fwd, bwd (kernels alone) and fwd+bwd, kernel and XLA reference (reference
           up to --ref-max-t), at V3.2 (swept configuration) and bench shapes (defaults);
  indexer  indexer scores-only and scores + top-k (kernel with each --radix-bits, and XLA
           reference up to T=8192) at the peer shapes (T=2048, K=256) and V3.2 shapes at --seqs
           for each K in --topks;
  kl       sparse indexer-KL pieces: teacher probabilities and student scores at idx (fwd+bwd)
           at the bench shape and the V3.2 shapes at --seqs (XLA reference up to --ref-max-t);
           the masked form's dense teacher (masked_probs_mean) over a few tilings;
  peer     configs/peer_maxtext_small.py:dsa shapes (B=8, T=2048, 16 heads, C=128+16, indexer
           16 x 64, K=256): device parity of the KL seams and radix top-k, sparse MLA fwd/bwd over
           a small block sweep, top-k, the sparse KL (model/dsa.py, both impls) and one DSA
           layer's attention core (top-k + sparse MLA + KL, fwd+bwd), kernel vs XLA reference;
  dense    cuDNN causal flash attention fwd+bwd and fwd (MLA MHA shapes), the same restricted
           to a top-K key set per query by a mask (dsa.sparse_attention=masked), the Pallas
           kernel of kernels.attention=pallas under the same set (fwd+bwd and fwd, its output
           against cuDNN's: `o_max_abs_err_vs_cudnn`; on Hopper also the Mosaic-GPU kernels of
           kernels.attention=pallas_mgpu at bench_h200's shape, their backward kernels one at
           a time too), and the DSA
           crossover: per T, one DSA layer's forward+backward (indexer scores + top-k, sparse MLA
           fwd+bwd, and with the kl section in the run the KL teacher and student fwd+bwd:
           `kl_included`, the student in the form kernels.student_dq=auto picks at T
           (`student_dq`), `dsa_ms_student_dq_<other>` with the other form)
           against cuDNN's fwd+bwd; then cuDNN's masked form against the Pallas kernel at
           bench_h200's attention shape (rows with shapes='bench');
  attn_scan (opt-in) that Pallas kernel, and on Hopper its Mosaic-GPU form, inside a remat'd
           lax.scan over 8 layers at bench_h200's micro-batch (the model's call), fwd+bwd, and
           the same layers unrolled (scan_layers=false); device time and launches per kernel;
  attn_sweep (opt-in) the tilings of that Pallas kernel (Blocks of fwd, dkv, dq) at the
           bench_h200 (B=4, H=16) and V3.2 (B=1, H=128) attention shapes (T=4096, d_qk 192,
           d_v 128, top-2048 sets), best kept; ends with `attn_config`, _DEFAULTS' form.

FLOP conventions: sparse fwd 2·H·n_valid·(C+V); sparse bwd 2·H·n_valid·(3C+2V) (recomputed
logits, dp, dq, dkv: the flash-attention 2.5x convention); indexer 2·H·D per allowed (t, s)
pair (s <= t); cuDNN causal fwd 2·H·T(T+1)/2·(d_qk+d_v) per sequence, bwd 2.5x that.
Index sets are random: for each token K distinct allowed positions, stratified over [0, t].
The check section runs before the sweep, with the default kernel configuration (both dkv
reductions). Every measurement is guarded: a failure is recorded in the JSON and the run goes on;
the JSON is rewritten after every row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from v4jax.kernels.indexer import gpu as ix_gpu  # noqa: E402
from v4jax.kernels.indexer import reference as ix_ref  # noqa: E402
from v4jax.kernels.pallas_common import is_hopper  # noqa: E402
from v4jax.kernels.sparse_attention import attention_probs_mean  # noqa: E402
from v4jax.kernels.sparse_attention import gpu as sa_gpu  # noqa: E402
from v4jax.kernels.sparse_attention import reference as sa_ref  # noqa: E402
from v4jax.model.dsa import sparse_indexer_kl  # noqa: E402

V3 = dict(B=1, H=128, C=576, V=512, K=2048, HI=64, DI=128)
BENCH = dict(B=4, H=16, C=576, V=512, K=1024, HI=16, DI=128)
PEER = dict(B=8, H=16, C=144, V=128, K=256, HI=16, DI=64)
SMOKE = dict(B=1, H=16, C=40, V=32, K=16, HI=2, DI=16)


class Bench:
  def __init__(self, smoke: bool, path: str | None = None, check_indexer: bool = True,
               topks=(2048,), radix_bits=(1,)):
    self.smoke = smoke
    self.topks, self.radix_bits = topks, radix_bits
    self.path = path
    self.check_indexer = check_indexer
    self.dtype = jnp.float32 if smoke else jnp.bfloat16
    self.out = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                    jax=jax.__version__, smoke=smoke, started=time.strftime('%Y-%m-%d %H:%M:%S'),
                    dense_matmul_tflops=None, checks=[], sweep=[], results=[], crossover=[])
    self.sa_cfg = {}   # best sparse-MLA kernel options at V3.2 shapes (sweep)
    self.jits = {}

  def save(self):
    if self.path:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      with open(self.path, 'w') as f:
        json.dump(self.out, f, indent=1, default=_plain)

  # -------------------------------------------------------------- helpers
  def timeit(self, f, *args, min_time=0.3, max_iters=20):
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < max_iters and (len(times) < 3 or time.perf_counter() < t_end):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3

  def record(self, section, name, shape, fn, flops=None):
    row = dict(section=section, name=name, **shape)
    try:
      ms = fn()
      row['ms'] = round(ms, 4)
      if flops:
        tf = flops / ms / 1e9
        row['tflops'] = round(tf, 2)
        if self.out['dense_matmul_tflops']:
          row['frac_dense'] = round(tf / self.out['dense_matmul_tflops'], 4)
    except Exception as e:  # noqa: BLE001 - keep benchmarking
      row['error'] = f'{type(e).__name__}: {str(e)[:400]}'
      traceback.print_exc(limit=2)
    self.out['results'].append(row)
    print(json.dumps(row, default=_plain), flush=True)
    self.save()
    return row

  def idx(self, B, T, K, seed=0):
    """K distinct positions <= t per token (stratified, one random phase per token; distinct
    because the stride (t+1)/K >= 1), -1 past t+1."""
    key = jax.random.key(seed)
    t = jnp.arange(T)[:, None]
    j = jnp.arange(K)[None, :]
    u = jax.random.uniform(key, (B, T, 1))
    strat = jnp.floor((j + u) * (t + 1) / K).astype(jnp.int32)
    early = jnp.broadcast_to(jnp.where(j <= t, j, -1), (B, T, K))
    return jnp.where(t + 1 >= K, strat, early).astype(jnp.int32)

  def sparse_inputs(self, s, T):
    k1, k2 = jax.random.split(jax.random.key(1))
    q = jax.random.normal(k1, (s['B'], T, s['H'], s['C']), self.dtype)
    kv = jax.random.normal(k2, (s['B'], T, s['C']), self.dtype)
    return q, kv, self.idx(s['B'], T, s['K'])

  def indexer_inputs(self, s, T):
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(k1, (s['B'], T, s['HI'], s['DI']), self.dtype)
    k = jax.random.normal(k2, (s['B'], T, s['DI']), self.dtype)
    w = jax.random.normal(k3, (s['B'], T, s['HI']), jnp.float32) * s['HI'] ** -0.5
    return q, k, w

  # -------------------------------------------------------------- sections
  def matmul(self):
    n = 512 if self.smoke else 8192
    a = jnp.ones((n, n), self.dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    row = self.record('matmul', 'dense_matmul', dict(n=n), lambda: self.timeit(f, a, a),
                      flops=2 * n ** 3)
    self.out['dense_matmul_tflops'] = row.get('tflops')
    if 'tflops' in row:
      row['frac_dense'] = 1.0

  def sparse_fns(self, s, **cfg):
    scale = s['C'] ** -0.5

    def make(op):
      fwd = jax.jit(lambda q, kv, idx: op(q, kv, idx, s['V'], scale))

      def loss(q, kv, idx):
        o, lse = op(q, kv, idx, s['V'], scale)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
      both = jax.jit(jax.grad(loss, argnums=(0, 1)))
      return fwd, both
    kern = self.cached(('kern', s, cfg), lambda: make(lambda *a: sa_gpu.sparse_mla(*a, **cfg)))
    ref = self.cached(('ref', s), lambda: make(
        lambda *a: sa_ref.sparse_mla(*a, query_block=0 if self.smoke else 1024)))
    return kern, ref

  def cached(self, key, make):
    """One jitted function per key, so that sections reuse compilations."""
    key = json.dumps(key, sort_keys=True, default=str)
    if key not in self.jits:
      self.jits[key] = make()
    return self.jits[key]

  def bwd_args(self, s, q, kv, idx, fwd=None):
    """Inputs of the backward kernels: o and lse of the kernel forward, cotangents of o and lse
    as in sparse_fns' loss."""
    f = self.cached(('fwd', s, fwd), lambda: jax.jit(
        lambda *a: sa_gpu.sparse_mla(*a, s['V'], s['C'] ** -0.5, fwd=fwd)))
    o, lse = f(q, kv, idx)
    return q, kv, idx, o, lse, jnp.ones_like(o), jnp.isfinite(lse).astype(jnp.float32)

  def bwd_fn(self, s, **cfg):
    """The backward kernels alone (jitted), as sparse_mla's VJP runs them."""
    opts = {k: v for k, v in cfg.items() if k != 'fwd'}
    return self.cached(('bwd', s, opts), lambda: jax.jit(
        lambda *a: sa_gpu.sparse_mla_backward(*a, s['V'], s['C'] ** -0.5, **opts)))

  def profile(self):
    """Where the backward's time goes: device time per kernel name and call (jax.profiler
    trace of 3 calls) for the swept configuration at V3.2 T=4096."""
    s, T = (SMOKE, 64) if self.smoke else (V3, 4096)
    q, kv, idx = self.sparse_inputs(s, T)
    f, args = self.bwd_fn(s, **self.sa_cfg), self.bwd_args(s, q, kv, idx, self.sa_cfg.get('fwd'))
    out = self.kernel_ms(f, *args)
    self.out['profile'] = dict(T=T, config=self.sa_cfg, ms_per_call=out)
    self.print_kernel_ms('profile', out)
    self.save()

  @staticmethod
  def kernel_ms(f, *args, n=3, top=12):
    """{device plane + line: [(ms, launches, kernel name)] of the `top` largest, per call of f}:
    device time per kernel name over n calls under jax.profiler.trace (empty off GPU/TPU)."""
    jax.block_until_ready(f(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
      for _ in range(n):
        jax.block_until_ready(f(*args))
    from jax.profiler import ProfileData
    pd = ProfileData.from_file(glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)[0])
    per_line = {}
    for plane in pd.planes:
      if plane.name.startswith('/device:'):
        for line in plane.lines:
          acc = per_line.setdefault(f'{plane.name} {line.name}', {})
          for ev in line.events:
            ms, calls = acc.get(ev.name, (0.0, 0))
            acc[ev.name] = (ms + ev.duration_ns / n / 1e6, calls + 1)
    return {ln: sorted(((round(ms, 3), calls / n, k[:90]) for k, (ms, calls) in ev.items()),
                       reverse=True)[:top]
            for ln, ev in per_line.items() if ev}

  @staticmethod
  def print_kernel_ms(label, out):
    for ln, evs in out.items():
      print(f'{label} {ln}: total {sum(e[0] for e in evs):.2f} ms/call (top {len(evs)} shown)')
      for ms, calls, name in evs:
        print(f'  {ms:9.3f} ms  {calls:5g}x  {name}')

  def run_check(self, row: dict, body):
    """Fills a parity-check row with body(row) (an exception is recorded in the row), keeps it,
    prints it and saves the report."""
    try:
      body(row)
    except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
      row['error'] = f'{type(e).__name__}: {str(e)[:400]}'
      traceback.print_exc(limit=2)
    self.out['checks'].append(row)
    print(json.dumps(row, default=_plain), flush=True)
    self.save()

  def check(self):
    """Parity on the device: sparse MLA values and grads (both dkv reductions), indexer top-k."""
    s = dict(SMOKE if self.smoke else dict(V3, B=1, K=256))
    T = 64 if self.smoke else 512
    q, kv, idx = self.sparse_inputs(s, T)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    for reduce in ('segment', 'atomic'):
      (kf, kb), (rf, rb) = self.sparse_fns(s, reduce=reduce)
      def body(row, kf=kf, kb=kb, rf=rf, rb=rb):
        got, want = kf(q, kv, idx), rf(f32(q), f32(kv), idx)
        gg, gw = kb(q, kv, idx), rb(f32(q), f32(kv), idx)
        rel = lambda a, b: float(jnp.max(jnp.abs(f32(a) - f32(b))) / jnp.max(jnp.abs(f32(b))))
        fin = jnp.isfinite(want[1])
        row.update(o_rel=rel(got[0], want[0]),
                   lse_rel=rel(jnp.where(fin, got[1], 0), jnp.where(fin, want[1], 0)),
                   dq_rel=rel(gg[0], gw[0]), dkv_rel=rel(gg[1], gw[1]))
        row['ok'] = all(row[k] < 3e-2 for k in ('o_rel', 'lse_rel', 'dq_rel', 'dkv_rel'))
      self.run_check(dict(section='check', name='sparse_mla', reduce=reduce, T=T, **s), body)

    if not self.check_indexer:
      return
    T = 64 if self.smoke else 1024
    qi, ki, wi = self.indexer_inputs(s, T)

    def body(row):
      idx_k, _ = jax.jit(lambda *a: ix_gpu.indexer_topk(*a, s['K'], return_scores=True))(
          qi, ki, wi)
      idx_r = ix_ref.indexer_topk(qi, ki, wi, s['K'])
      a, b = np.sort(np.asarray(idx_k), -1), np.sort(np.asarray(idx_r), -1)
      row['rows_equal_frac'] = float(np.mean(np.all(a == b, -1)))
      # Near-ties differ only by rounding: compare the reference scores of both sets.
      full = np.asarray(ix_ref.indexer_scores(qi, ki, wi))
      pick = lambda i: np.sort(np.where(i >= 0, np.take_along_axis(full, np.maximum(i, 0), -1),
                                        -np.inf), -1)
      pa, pb = pick(np.asarray(idx_k)), pick(np.asarray(idx_r))
      fin = np.isfinite(pb)
      row['score_sets_max_diff'] = float(np.max(np.abs(np.where(fin, pa - pb, 0))))
      row['same_valid_count'] = bool(np.all(np.isfinite(pa) == fin))
      row['ok'] = bool(row['same_valid_count'] and row['score_sets_max_diff'] < 1e-2 * np.max(
          np.abs(full[np.isfinite(full)])))
    self.run_check(dict(section='check', name='indexer_topk', T=T, K=s['K']), body)

  def sweep(self):
    """Forward configurations timed on the forward, backward ones on the backward kernels alone
    (they are separate kernels with separate Blocks); the fastest of each is kept."""
    s, T = (SMOKE, 64) if self.smoke else (V3, 4096)
    q, kv, idx = self.sparse_inputs(s, T)
    n_valid = int(jnp.sum(idx >= 0))
    B = lambda h, k, w, st: dict(block_h=h, block_k=k, num_warps=w, num_stages=st)
    fwd_cfgs = [B(16, 16, 4, 1)] if self.smoke else [B(64, 64, 8, 2), B(64, 32, 8, 3)]
    bwd_cfgs = [dict(dkv=B(16, 16, 4, 1), dq=B(16, 16, 4, 1)),
                dict(dkv=B(16, 16, 4, 1), dq=B(16, 16, 4, 1), reduce='atomic')] if self.smoke else [
        dict(dkv=B(32, 64, 8, 2), dq=B(64, 64, 8, 2)),                  # the defaults
        dict(dkv=B(64, 64, 8, 1), dq=B(64, 64, 8, 2)),
        dict(dkv=B(16, 64, 8, 2), dq=B(64, 32, 8, 3)),
        dict(dkv=B(32, 64, 8, 2), dq=B(64, 64, 8, 2), reduce='atomic')]
    # Shared memory (Triton 3.6 for sm_90, of 227 KiB): dkv 148 / 224 / 110 KiB, dq 152 / 76 KiB.
    fl_f = 2 * s['H'] * n_valid * (s['C'] + s['V'])
    fl_b = 2 * s['H'] * n_valid * (3 * s['C'] + 2 * s['V'])
    best = {}
    for cfg in fwd_cfgs:
      (kf, _), _ = self.sparse_fns(s, fwd=cfg)
      row = self.record('sweep', 'sparse_mla_fwd', dict(T=T, fwd=cfg),
                        lambda: self.timeit(kf, q, kv, idx), flops=fl_f)
      self.out['sweep'].append(row)
      if 'ms' in row and row['ms'] < best.get('fwd', (1e30, None))[0]:
        best['fwd'] = (row['ms'], cfg)
    args = self.bwd_args(s, q, kv, idx)
    for cfg in bwd_cfgs:
      row = self.record('sweep', 'sparse_mla_bwd', dict(T=T, **cfg),
                        lambda: self.timeit(self.bwd_fn(s, **cfg), *args), flops=fl_b)
      self.out['sweep'].append(row)
      if 'ms' in row and row['ms'] < best.get('bwd', (1e30, None))[0]:
        best['bwd'] = (row['ms'], cfg)
    del args
    if 'fwd' in best:
      self.sa_cfg['fwd'] = best['fwd'][1]
    if 'bwd' in best:
      self.sa_cfg.update(best['bwd'][1])
    self.out['sparse_config'] = self.sa_cfg

  def attn_sweep(self):
    """Tilings of kernels.attention=pallas (kernels/attention/gpu.py) at the bench_h200 and V3.2
    attention shapes, with document ids as the model passes them: each forward candidate timed
    on the forward alone; dkv candidates timed on the gradient (fwd+bwd) with the best forward
    and the default dq, then dq candidates with the best forward and dkv (the kernels are
    separate, so their times add). `bwd_ms` = fwd+bwd minus the best forward. Ends with the
    best Blocks per shape in _DEFAULTS' form (attn_config)."""
    from v4jax.kernels.attention import gpu as attn_gpu
    # cases (label, B, T, H, d_qk, d_v, K); candidates (block_m, block_n, warps, stages)
    if self.smoke:
      cases = [('smoke', 1, 64, 2, 48, 32, 16)]
      fwd_cfgs, dkv_cfgs, dq_cfgs = [(16, 32, 4, 1), (32, 64, 4, 1)], [(16, 32, 4, 1)], [
          (16, 32, 4, 1)]
    else:
      # bench: bench_h200's call (micro-batch 8, top-1024); both with document ids, as the model
      # passes them
      cases = [('bench', 8, 4096, 16, 192, 128, 1024), ('v3.2', 1, 4096, V3['H'], 192, 128, 2048)]
      # the fifteenth session's best (128, 64, 8, 3|2) and its neighbours: stages, warps, and
      # the wider/narrower block on each axis
      fwd_cfgs = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 2),
                  (128, 32, 8, 3), (256, 64, 8, 2), (64, 64, 4, 3)]
      dkv_cfgs = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (128, 32, 8, 2),
                  (256, 64, 8, 2), (64, 64, 8, 2), (64, 128, 8, 2)]
      dq_cfgs = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (128, 32, 8, 2),
                 (128, 128, 8, 2), (256, 64, 8, 2)]
    self.out['attn_config'] = {}
    for label, Bt, T, H, dqk, dv, K in cases:
      ks = jax.random.split(jax.random.key(3), 3)
      q = jax.random.normal(ks[0], (Bt, T, H, dqk), self.dtype)
      k = jax.random.normal(ks[1], (Bt, T, H, dqk), self.dtype)
      v = jax.random.normal(ks[2], (Bt, T, H, dv), self.dtype)
      idx = self.idx(Bt, T, K)
      seg = jnp.ones((Bt, T), jnp.int32)
      fl_f = 2 * Bt * H * (T * (T + 1) // 2) * (dqk + dv)   # the dense section's convention
      shape = dict(shapes=label, B=Bt, T=T, H=H, dqk=dqk, dv=dv, K=K, segment_ids=True)
      # the sets go in as an argument (not a closed-over constant): the packing is timed too
      fwd = lambda **cfg: jax.jit(lambda q, k, v, idx: attn_gpu.causal_attention(
          q, k, v, dqk ** -0.5, seg, select_BTK=idx,
          **{n: attn_gpu.Blocks(*c) for n, c in cfg.items()}))
      grad = lambda **cfg: jax.jit(jax.grad(lambda q, k, v, idx: jnp.sum(
          fwd(**cfg)(q, k, v, idx)[0].astype(jnp.float32)), argnums=(0, 1, 2)))
      best = {}

      def keep(kind, name, cfg, fn, flops):
        row = self.record('attn_sweep', name, dict(shape, **cfg), fn, flops=flops)
        if 'ms' in row and 'fwd' in best and kind != 'fwd':
          row['bwd_ms'] = round(row['ms'] - best['fwd'][0], 4)
        if 'ms' in row and row['ms'] < best.get(kind, (1e30, None))[0]:
          best[kind] = (row['ms'], cfg[kind])
      for c in fwd_cfgs:
        keep('fwd', 'pallas_masked_fwd', dict(fwd=c),
             lambda: self.timeit(fwd(fwd=c), q, k, v, idx), fl_f)
      for kind, cands in (('dkv', dkv_cfgs), ('dq', dq_cfgs)):
        for c in cands:
          cfg = {n: best[n][1] for n in ('fwd', 'dkv') if n in best and n != kind}
          cfg[kind] = c
          keep(kind, 'pallas_masked_fwd+bwd', cfg,
               lambda: self.timeit(grad(**cfg), q, k, v, idx), 3.5 * fl_f)
      self.out['attn_config'][label] = {n: best[n][1] for n in ('fwd', 'dkv', 'dq') if n in best}
      self.save()
    for label, cfg in self.out['attn_config'].items():
      print(f'attn_config {label}: _DEFAULTS = {cfg!r}', flush=True)

  def attn_scan(self):
    """The masked attention as the model runs it: inside a remat'd `lax.scan` over layers (q
    projected from the loop's carry, which is also k; o added back), fwd+bwd of the whole loop,
    per form of kernels.attention (Triton's kernels; on Hopper the Mosaic-GPU ones, all three and
    forward + dq), as a scan and unrolled; device time and launches per kernel (`kernel_ms`, a
    trace of 2 calls: run it with command buffers off). `ms_per_layer` against the dense
    section's kernels-alone rows: the twenty-seventh measurement found the Mosaic forward
    launched twice per layer in the scan (performance.md row 88, fixed by a barrier)."""
    from v4jax.kernels.attention import forward_kernel_saveable
    from v4jax.kernels.attention import gpu as attn_gpu
    from v4jax.kernels.blockwise import pack_mask
    if self.smoke:
      L, B, T, H, dqk, dv, K = 2, 1, 64, 2, 48, 32, 16
    else:   # bench_h200's micro-batch: 8 x 4096, 16 heads, top-1024
      L, B, T, H, dqk, dv, K = 8, 8, 4096, BENCH['H'], 192, 128, BENCH['K']
    ks = jax.random.split(jax.random.key(11), 3)
    w_LKK = jax.random.normal(ks[0], (L, dqk, dqk), self.dtype) * dqk ** -0.5
    x = jax.random.normal(ks[1], (B, T, H, dqk), self.dtype)
    v = jax.random.normal(ks[2], (B, T, H, dv), self.dtype)
    words = pack_mask(self.idx(B, T, K), T)
    forms = {'pallas': ()}
    if _hopper():
      forms.update(pallas_mgpu=('fwd', 'dq', 'dkv'), pallas_mgpu_fwd_dq=('fwd', 'dq'))
    shape = dict(shapes='bench' if not self.smoke else 'smoke', L=L, B=B, T=T, H=H, dqk=dqk,
                 dv=dv, K=K)
    for name, mosaic in forms.items():
      def layer(h, w, mosaic=mosaic):
        q = jnp.einsum('bthk,kj->bthj', h, w)
        o, _ = attn_gpu.causal_attention(q, h, v, dqk ** -0.5, select_words_BTW=words,
                                         mgpu=mosaic)
        return h + jnp.pad(o, ((0, 0), (0, 0), (0, 0), (0, dqk - dv))), None
      step = jax.checkpoint(layer, policy=forward_kernel_saveable)

      def unrolled(w, h, step=step):     # the same layers as a Python loop (scan_layers=false)
        for i in range(L):
          h = step(h, w[i])[0]
        return h, None
      for loop, body in (('scan', lambda w, x, step=step: jax.lax.scan(step, x, w)),
                         ('unrolled', unrolled)):
        grad = jax.jit(jax.grad(lambda w, x, body=body: jnp.sum(
            body(w, x)[0].astype(jnp.float32))))
        row = self.record('attn_scan', f'{name}_{loop}_fwd+bwd', shape,
                          lambda grad=grad: self.timeit(grad, w_LKK, x))
        if 'ms' in row:
          row['ms_per_layer'] = round(row['ms'] / L, 4)
          row['kernel_ms'] = self.kernel_ms(grad, w_LKK, x, n=2)
          self.print_kernel_ms(f'attn_scan {name} {loop}', row['kernel_ms'])
    self.save()

  def sparse(self, seqs, ref_max_t):
    cases = [('v3.2', SMOKE, 64)] if self.smoke else (
        [('bench', BENCH, 4096)] + [('v3.2', V3, t) for t in seqs])
    for label, s, T in cases:
      q, kv, idx = self.sparse_inputs(s, T)
      n_valid = int(jnp.sum(idx >= 0))
      fl_f = 2 * s['H'] * n_valid * (s['C'] + s['V'])
      fl_b = 2 * s['H'] * n_valid * (3 * s['C'] + 2 * s['V'])
      shape = dict(shapes=label, T=T, B=s['B'], H=s['H'], K=s['K'])
      cfg = self.sa_cfg if label == 'v3.2' else {}   # swept at V3.2; defaults elsewhere
      (kf, kb), (rf, rb) = self.sparse_fns(s, **cfg)
      self.record('sparse', 'sparse_mla_fwd', dict(shape, impl='pallas', config=cfg),
                  lambda: self.timeit(kf, q, kv, idx), flops=fl_f)
      self.record('sparse', 'sparse_mla_bwd', dict(shape, impl='pallas', note='kernels alone'),
                  lambda: self.timeit(self.bwd_fn(s, **cfg),
                                      *self.bwd_args(s, q, kv, idx, cfg.get('fwd'))), flops=fl_b)
      self.record('sparse', 'sparse_mla_fwd+bwd', dict(shape, impl='pallas'),
                  lambda: self.timeit(kb, q, kv, idx), flops=fl_f + fl_b)
      if self.smoke or T <= ref_max_t:
        fw = self.record('sparse', 'sparse_mla_fwd', dict(shape, impl='xla_reference'),
                         lambda: self.timeit(rf, q, kv, idx), flops=fl_f)
        both = self.record('sparse', 'sparse_mla_fwd+bwd', dict(shape, impl='xla_reference'),
                           lambda: self.timeit(rb, q, kv, idx), flops=fl_f + fl_b)
        if 'ms' in fw and 'ms' in both:
          bw_ms = both['ms'] - fw['ms']
          row = dict(section='sparse', name='sparse_mla_bwd', impl='xla_reference', **shape,
                     ms=round(bw_ms, 4), tflops=round(fl_b / bw_ms / 1e9, 2),
                     note='fwd+bwd minus fwd')
          if self.out['dense_matmul_tflops']:
            row['frac_dense'] = round(row['tflops'] / self.out['dense_matmul_tflops'], 4)
          self.out['results'].append(row)
          print(json.dumps(row, default=_plain), flush=True)
          self.save()
      del q, kv, idx

  def indexer(self, seqs):
    cases = [('v3.2', SMOKE, 64)] if self.smoke else (
        [('peer', PEER, 2048)] + [('v3.2', dict(V3, K=k), t) for t in seqs for k in self.topks])
    for label, s, T in cases:
      q, k, w = self.indexer_inputs(s, T)
      pairs = s['B'] * T * (T + 1) // 2
      fl = 2 * s['HI'] * s['DI'] * pairs
      shape = dict(shapes=label, T=T, B=s['B'], H=s['HI'], D=s['DI'], K=s['K'])
      if self.smoke or label != 'v3.2' or s['K'] == self.topks[0]:
        scores = jax.jit(_scores_only)          # the same for every K: once per T
        self.record('indexer', 'indexer_scores_only', dict(shape, impl='pallas'),
                    lambda: self.timeit(scores, q, k, w), flops=fl)
      for bits in self.radix_bits:
        topk = jax.jit(lambda q, k, w, bits=bits: ix_gpu.indexer_topk(q, k, w, s['K'],
                                                                      radix_bits=bits))
        self.record('indexer', 'indexer_scores+topk', dict(shape, impl='pallas', radix_bits=bits),
                    lambda: self.timeit(topk, q, k, w), flops=fl)
      if self.smoke or T <= 8192:
        ref = jax.jit(lambda q, k, w: ix_ref.indexer_topk(q, k, w, s['K'],
                                                          query_block=0 if self.smoke else 1024))
        self.record('indexer', 'indexer_scores+topk', dict(shape, impl='xla_reference'),
                    lambda: self.timeit(ref, q, k, w), flops=fl)
      del q, k, w

  def kl(self, seqs, ref_max_t=4096):
    """Sparse-stage indexer KL pieces: teacher p^S (head-mean probabilities at the selected
    keys) and student I[t, idx] fwd+bwd, kernels vs gathered jnp (as model/dsa.py does; up to
    T = ref_max_t: the gathered student keys are [T, K, 128] per row), at the bench shape
    (T=4096) and the V3.2 shapes at every --seqs (the crossover adds them to the DSA layer)."""
    cases = ([('v3.2', SMOKE, 64)] if self.smoke else
             [('bench', BENCH, 4096)] + [('v3.2', V3, T) for T in seqs])
    for label, s, T in cases:
      q, kv, idx = self.sparse_inputs(s, T)
      qi, ki, wi = self.indexer_inputs(s, T)
      scale = s['C'] ** -0.5
      fwd_cfg = self.sa_cfg.get('fwd', {}) if label == 'v3.2' else {}
      _, lse = jax.jit(lambda *a: sa_gpu.sparse_mla(*a, s['V'], scale, fwd=fwd_cfg))(q, kv, idx)
      n_valid = int(jnp.sum(idx >= 0))
      shape = dict(shapes=label, T=T, B=s['B'], H=s['H'], HI=s['HI'], K=s['K'])
      gather = lambda x, i: jax.vmap(lambda x, i: x[jnp.maximum(i, 0)])(x, i)

      def probs_ref(q, kv, idx, lse):
        lg = scale * jnp.einsum('bthc,btkc->bthk', q, gather(kv, idx),
                                preferred_element_type=jnp.float32)
        return jnp.mean(jnp.where((idx >= 0)[:, :, None], jnp.exp(lg - lse[..., None]), 0), 2)

      def student_ref(qi, ki, wi, idx):
        d = jnp.einsum('bthd,btkd->bthk', qi, gather(ki, idx), preferred_element_type=jnp.float32)
        return jnp.einsum('bthk,bth->btk', jax.nn.relu(d), wi)
      student_k = lambda *a: ix_gpu.indexer_scores_at(*a, dq_form='dense')
      # the teacher at its own default blocks, as the model calls it (not the forward's swept
      # blocks, which are another kernel's)
      impls = (('pallas', lambda *a: sa_gpu.attention_probs_mean(*a, s['V'], scale), student_k),
               ('xla_reference', probs_ref, student_ref))
      def student(impl, sf):
        sj = jax.jit(jax.value_and_grad(
            lambda qi, ki, wi: jnp.sum(jnp.where(idx >= 0, sf(qi, ki, wi, idx), 0)),
            argnums=(0, 1, 2)))
        self.record('kl', 'student_scores_at_fwd+bwd', dict(shape, impl=impl),
                    lambda: self.timeit(sj, qi, ki, wi), flops=2 * s['HI'] * n_valid * s['DI'] * 4)
      for impl, pf, sf in impls[:1 if T > ref_max_t else 2]:
        pj = jax.jit(pf)
        self.record('kl', 'teacher_probs_mean', dict(shape, impl=impl),
                    lambda: self.timeit(pj, q, kv, idx, lse),
                    flops=2 * s['H'] * n_valid * s['C'])
        student(impl, sf)
      # the student's dq/dw from each token's gathered keys (dq_form='gather'), beside the dense
      # tiles ('pallas'); the crossover counts the form the model's default 'auto' picks at T
      student('pallas_gather_dq', lambda *a: ix_gpu.indexer_scores_at(*a, dq_form='gather'))
      if label != 'v3.2' or self.smoke:
        self.masked_teacher(s, T, shape)
      del q, kv, idx, qi, ki, wi

  def masked_teacher(self, s, T, shape):
    """The masked form's teacher (MHA-form q/k, D = 128 + 64) by the dense tile kernels over a
    few tilings, at bench_h200's micro-batch (B = 8: the Mosaic kernel's CTAs per wave depend
    on it); lse values are random (timing only). FLOPs: 2·H·D per causal (t, s) pair."""
    D, B = (40, s['B']) if self.smoke else (192, 8)
    shape = dict(shape, B=B)
    idx = self.idx(B, T, s['K'])
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    q, k = (jax.random.normal(kk, (B, T, s['H'], D), self.dtype) for kk in (k1, k2))
    lse = jax.random.normal(k3, (B, T, s['H']), jnp.float32) + 5.0
    # the default (128 x 128, 8 warps, 2 stages) and its narrower neighbours; 3 stages and
    # 256-wide tiles exceed the H200's shared memory (docs/performance.md row 67)
    tilings = [{}, dict(block_q=32, block_s=16)] if self.smoke else [
        {}, dict(block_q=64, block_s=64, num_warps=4), dict(block_q=128, block_s=64, num_warps=4),
        dict(block_q=64, block_s=128, num_warps=4)]
    tilings = [('pallas', dict(cfg, mosaic_teacher=False)) for cfg in tilings]
    if is_hopper():
      # the Mosaic GPU kernel (taken under causal top-k): its default (128 keys, 4 stages), key
      # tiles in groups of 3 and 4 per CTA, 2 stages, and 64-key tiles with 2 and 6 stages
      tilings += [('pallas_mgpu', dict(causal=True, **cfg)) for cfg in (
          {}, dict(key_group=3), dict(key_group=4), dict(num_stages=2),
          dict(block_s=64, num_stages=2), dict(block_s=64, num_stages=6))]
    fl = 2 * s['H'] * D * B * T * (T + 1) // 2
    for impl, cfg in tilings:
      f = jax.jit(lambda *a, cfg=cfg: sa_gpu.masked_probs_mean(*a, D ** -0.5, **cfg))
      self.record('kl', 'teacher_masked_probs_mean', dict(shape, D=D, impl=impl, **cfg),
                  lambda: self.timeit(f, q, k, idx, lse), flops=fl)

  def peer(self, seqs):
    """The peer DSA config's attention-side work at its shapes (one layer, one device)."""
    s, T = (SMOKE, 64) if self.smoke else (PEER, 2048)
    scale = (32 + 16) ** -0.5
    q, kv, _ = self.sparse_inputs(s, T)
    qi, ki, wi = self.indexer_inputs(s, T)
    shape = dict(shapes='peer', T=T, B=s['B'], H=s['H'], C=s['C'], K=s['K'])
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    rel = lambda a, b: float(jnp.max(jnp.abs(f32(a) - f32(b))) / jnp.max(jnp.abs(f32(b))))

    # Device parity: radix top-k sets, and the sparse KL (value, grads) of both impls.
    idx = jax.jit(lambda *a: ix_ref.indexer_topk(*a, s['K'], query_block=512))(qi, ki, wi)
    for bits in self.radix_bits:
      def body(row, bits=bits):
        got = jax.jit(lambda *a: ix_gpu.indexer_topk(*a, s['K'], radix_bits=bits))(qi, ki, wi)
        a, b = np.sort(np.asarray(got), -1), np.sort(np.asarray(idx), -1)
        row['rows_equal_frac'] = float(np.mean(np.all(a == b, -1)))
        row['ok'] = row['rows_equal_frac'] > 0.99
      self.run_check(dict(section='check', name='peer_indexer_topk', radix_bits=bits, **shape),
                     body)
    _, lse = jax.jit(lambda *a: sa_gpu.sparse_mla(*a, s['V'], scale))(q, kv, idx)

    def kl_fn(impl):
      return self.cached(('peer_kl', impl), lambda: jax.jit(jax.value_and_grad(
          lambda qi, ki, wi, q, kv, idx, lse: sparse_indexer_kl(
              qi, ki, wi, idx, lambda: attention_probs_mean(q, kv, idx, lse, scale,
                                                            query_block=512, impl=impl),
              query_block=512, impl=impl), argnums=(0, 1, 2))))
    def kl_check(row):
      (vk, gk), (vr, gr) = (kl_fn(i)(qi, ki, wi, q, kv, idx, lse) for i in ('pallas', 'reference'))
      row.update(kl_rel=abs(float(vk) - float(vr)) / abs(float(vr)), dqi_rel=rel(gk[0], gr[0]),
                 dki_rel=rel(gk[1], gr[1]), dwi_rel=rel(gk[2], gr[2]))
      row['ok'] = all(row[k] < 3e-2 for k in ('kl_rel', 'dqi_rel', 'dki_rel', 'dwi_rel'))
    self.run_check(dict(section='check', name='peer_sparse_indexer_kl', **shape), kl_check)

    # Sparse MLA at 16 heads: defaults, then a few block configurations.
    n_valid = int(jnp.sum(idx >= 0))
    fl_f = 2 * s['H'] * n_valid * (s['C'] + s['V'])
    fl_b = 2 * s['H'] * n_valid * (3 * s['C'] + 2 * s['V'])
    B_ = lambda h, k, w, st: dict(block_h=h, block_k=k, num_warps=w, num_stages=st)
    fwd_cfgs = [{}] if self.smoke else [{}, B_(16, 128, 4, 2), B_(16, 32, 4, 3), B_(16, 64, 8, 2)]
    bwd_cfgs = [{}, dict(reduce='atomic')] if self.smoke else [
        {}, dict(reduce='atomic'), dict(dkv=B_(16, 64, 4, 2)), dict(dkv=B_(16, 32, 4, 2)),
        dict(dkv=B_(16, 128, 8, 2), dq=B_(16, 128, 4, 2)),
        dict(dkv=B_(16, 64, 4, 2), reduce='atomic')]
    for cfg in fwd_cfgs:
      (kf, _), _ = self.sparse_fns(s, fwd=cfg or None)
      self.record('peer', 'sparse_mla_fwd', dict(shape, impl='pallas', fwd=cfg),
                  lambda: self.timeit(kf, q, kv, idx), flops=fl_f)
    args = self.bwd_args(s, q, kv, idx)
    for cfg in bwd_cfgs:
      self.record('peer', 'sparse_mla_bwd', dict(shape, impl='pallas', note='kernels alone', **cfg),
                  lambda: self.timeit(self.bwd_fn(s, **cfg), *args), flops=fl_b)
    del args
    (_, kb), (rf, rb) = self.sparse_fns(s)
    self.record('peer', 'sparse_mla_fwd+bwd', dict(shape, impl='pallas'),
                lambda: self.timeit(kb, q, kv, idx), flops=fl_f + fl_b)
    self.record('peer', 'sparse_mla_fwd+bwd', dict(shape, impl='xla_reference'),
                lambda: self.timeit(rb, q, kv, idx), flops=fl_f + fl_b)

    # The sparse KL (teacher + student + custom-VJP KL, fwd+bwd) through model/dsa.py.
    for impl in ('pallas', 'reference'):
      f = kl_fn(impl)
      self.record('peer', 'sparse_indexer_kl_fwd+bwd', dict(shape, impl=impl),
                  lambda: self.timeit(f, qi, ki, wi, q, kv, idx, lse))

    # One layer's DSA attention core: top-k, sparse MLA and the KL, fwd+bwd (as mla.py runs it).
    for impl in ('pallas', 'reference'):
      def core(q, kv, qi, ki, wi, impl=impl):
        from v4jax.kernels.indexer import indexer_topk
        from v4jax.kernels.sparse_attention import sparse_mla
        ix, ix_scores = indexer_topk(qi, ki, wi, s['K'], return_scores=True, query_block=512,
                                     impl=impl)
        o, lse = sparse_mla(q, kv, ix, s['V'], scale, query_block=512, impl=impl)
        teacher = lambda: attention_probs_mean(q, kv, ix, lse, scale, query_block=512, impl=impl)
        kl = sparse_indexer_kl(qi, ki, wi, ix, teacher, topk_scores_BTK=ix_scores,
                               query_block=512, impl=impl)
        return jnp.sum(o.astype(jnp.float32)) + kl
      g = jax.jit(jax.grad(core, argnums=(0, 1, 2, 3, 4)))
      self.record('peer', 'dsa_core_fwd+bwd', dict(shape, impl=impl,
                                                   note='topk + sparse MLA + sparse KL'),
                  lambda: self.timeit(g, q, kv, qi, ki, wi))
    del q, kv, idx, qi, ki, wi

  def dense(self, seqs):
    """cuDNN causal flash attention (MLA MHA form: d_qk 192, d_v 128) fwd+bwd vs DSA."""
    if self.smoke:
      return
    H, dqk, dv = V3['H'], 192, 128
    for T in seqs:
      ks = jax.random.split(jax.random.key(3), 3)
      q = jax.random.normal(ks[0], (1, T, H, dqk), jnp.bfloat16)
      k = jax.random.normal(ks[1], (1, T, H, dqk), jnp.bfloat16)
      v = jax.random.normal(ks[2], (1, T, H, dv), jnp.bfloat16)

      def loss(q, k, v):
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
        return jnp.sum(o.astype(jnp.float32))
      g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      fl = 3.5 * 2 * H * (T * (T + 1) // 2) * (dqk + dv)
      row = self.record('dense', 'cudnn_flash_fwd+bwd', dict(T=T, H=H, dqk=dqk, dv=dv),
                        lambda: self.timeit(g, q, k, v), flops=fl)
      if 'error' in row:   # cuDNN without d_v != d_qk support: pad v to d_qk (upper bound)
        vp = jnp.pad(v, [(0, 0), (0, 0), (0, 0), (0, dqk - dv)])
        self.record('dense', 'cudnn_flash_fwd+bwd', dict(T=T, H=H, dqk=dqk, dv=dqk),
                    lambda: self.timeit(g, q, k, vp), flops=fl)
      # dsa.sparse_attention=masked: the same attention restricted to a top-K key set per query
      # through the model's seam (a [B,1,T,S] mask, which cuDNN gets as a bias).
      from v4jax.kernels.attention import library
      from v4jax.kernels.blockwise import selection_mask
      K = min(V3['K'], T)
      sc = jax.random.uniform(jax.random.key(4), (1, T, T))
      sc = jnp.where(jnp.tril(jnp.ones((T, T), bool))[None], sc, -jnp.inf)
      top, idx = jax.lax.top_k(sc, K)
      idx = jnp.where(jnp.isfinite(top), idx, -1).astype(jnp.int32)
      del sc, top

      def mloss(q, k, v):
        o = library.causal_attention(q, k, v, dqk ** -0.5, select_BTK=idx)
        return jnp.sum(o.astype(jnp.float32))
      gm = jax.jit(jax.grad(mloss, argnums=(0, 1, 2)))
      self.record('dense', 'cudnn_masked_fwd+bwd', dict(T=T, H=H, dqk=dqk, dv=dv, K=K),
                  lambda: self.timeit(gm, q, k, v), flops=fl)
      # Forward alone, unmasked and masked: what the top-k mask (an additive bias for cuDNN)
      # costs the forward (eighth session: 1.83x the unmasked causal forward at T=4096)
      fwd = lambda **kw: jax.jit(lambda q, k, v: library.causal_attention(
          q, k, v, dqk ** -0.5, return_lse=True, **kw))
      fl_f = 2 * H * (T * (T + 1) // 2) * (dqk + dv)
      self.record('dense', 'cudnn_flash_fwd', dict(T=T, H=H, dqk=dqk, dv=dv),
                  lambda: self.timeit(fwd(), q, k, v), flops=fl_f)
      self.record('dense', 'cudnn_masked_fwd', dict(T=T, H=H, dqk=dqk, dv=dv, K=K),
                  lambda: self.timeit(fwd(select_BTK=idx), q, k, v), flops=fl_f)
      # kernels.attention=pallas: the Triton kernel reading the top-k set as packed bits, the
      # same two timings, and its output against cuDNN's masked one
      from v4jax.kernels.attention import gpu as attn_gpu
      pfwd = jax.jit(lambda q, k, v: attn_gpu.causal_attention(q, k, v, dqk ** -0.5,
                                                                select_BTK=idx))
      gp = jax.jit(jax.grad(lambda q, k, v: jnp.sum(pfwd(q, k, v)[0].astype(jnp.float32)),
                            argnums=(0, 1, 2)))
      self.record('dense', 'pallas_masked_fwd+bwd', dict(T=T, H=H, dqk=dqk, dv=dv, K=K),
                  lambda: self.timeit(gp, q, k, v), flops=fl)
      row = self.record('dense', 'pallas_masked_fwd', dict(T=T, H=H, dqk=dqk, dv=dv, K=K),
                        lambda: self.timeit(pfwd, q, k, v), flops=fl_f)
      if 'error' not in row:
        try:
          want = fwd(select_BTK=idx)(q, k, v)[0].astype(jnp.float32)
          row['o_max_abs_err_vs_cudnn'] = float(jnp.max(jnp.abs(
              pfwd(q, k, v)[0].astype(jnp.float32) - want)))
        except Exception as e:  # noqa: BLE001 - the check must not end the benchmark
          row['o_check_error'] = f'{type(e).__name__}: {str(e)[:200]}'
        self.save()

      # the same with cuDNN's fp32 lse returned (the DSA teacher's), and that lse against an
      # fp32 softmax over the allowed keys of the first 16 heads
      def lloss(q, k, v):
        o, lse = library.causal_attention(q, k, v, dqk ** -0.5, select_BTK=idx, return_lse=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(lse)
      gl = jax.jit(jax.grad(lloss, argnums=(0, 1, 2)))

      def lse_err():
        """Over the last nq queries (the most keys): [h, nq, T] fp32 logits, 2 GiB at 32K."""
        _, lse = jax.jit(lambda q, k, v: library.causal_attention(
            q, k, v, dqk ** -0.5, select_BTK=idx, return_lse=True))(q, k, v)
        h, nq = min(H, 16), min(T, 1024)
        lg = jnp.einsum('bthk,bshk->bhts', q[:, T - nq:, :h], k[:, :, :h],
                        preferred_element_type=jnp.float32) * dqk ** -0.5
        causal = jnp.arange(T)[None, :] <= jnp.arange(T - nq, T)[:, None]
        allow = selection_mask(idx[:, T - nq:], T)[:, None] & causal
        want = jax.nn.logsumexp(jnp.where(allow, lg, -jnp.inf), axis=-1)       # [B,h,nq]
        return float(jnp.max(jnp.abs(jnp.swapaxes(lse[:, T - nq:, :h], 1, 2) - want)))
      row = self.record('dense', 'cudnn_masked_lse_fwd+bwd', dict(T=T, H=H, dqk=dqk, dv=dv, K=K),
                        lambda: self.timeit(gl, q, k, v), flops=fl)
      if 'error' not in row:
        try:
          row['lse_max_abs_err'] = lse_err()
        except Exception as e:  # noqa: BLE001 - the check must not end the benchmark
          row['lse_error'] = f'{type(e).__name__}: {str(e)[:200]}'
        self.save()
      del q, k, v, idx
    self.dense_bench_shape()
    self.crossover(seqs)

  def dense_bench_shape(self):
    """The masked form at bench_h200's attention shape (B=4, T=4096, 16 heads, d_qk 192, d_v
    128, top-1024 sets): cuDNN under the [B,1,T,S] bias against the Pallas bit-mask kernel that
    `kernels.attention=auto` picks there, that kernel with document ids (the model's call) and
    without the mask (causal only), fwd+bwd and fwd, in one run; on Hopper also the Mosaic-GPU
    kernels, and their dq and dk/dv kernels one at a time (`pallas_mgpu_dq`, `_dkv`)."""
    from v4jax.kernels.attention import gpu as attn_gpu
    from v4jax.kernels.attention import library
    B, T, H, dqk, dv, K = BENCH['B'], 4096, BENCH['H'], 192, 128, BENCH['K']
    ks = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(ks[0], (B, T, H, dqk), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, dqk), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, dv), jnp.bfloat16)
    idx = self.idx(B, T, K)
    seg = jnp.ones((B, T), jnp.int32)
    pairs = B * H * (T * (T + 1) // 2)          # causal (query, key) pairs of all heads
    fl_f = 2 * pairs * (dqk + dv)
    shape = dict(shapes='bench', B=B, T=T, H=H, dqk=dqk, dv=dv, K=K)
    fwds = {'cudnn_masked': jax.jit(lambda q, k, v: library.causal_attention(
                q, k, v, dqk ** -0.5, select_BTK=idx, return_lse=True)),
            'pallas_masked': jax.jit(lambda q, k, v: attn_gpu.causal_attention(
                q, k, v, dqk ** -0.5, select_BTK=idx)),
            # with document ids, as the model calls it (synthetic and packed data carry them)
            'pallas_masked_seg': jax.jit(lambda q, k, v: attn_gpu.causal_attention(
                q, k, v, dqk ** -0.5, seg, select_BTK=idx)),
            # the same kernel over all causal keys: what reading and expanding the bits costs
            'pallas_unmasked': jax.jit(lambda q, k, v: attn_gpu.causal_attention(
                q, k, v, dqk ** -0.5))}
    if _hopper():   # kernels.attention=pallas_mgpu: the Mosaic-GPU kernels, and the forward
      for name, mosaic in (('pallas_mgpu_masked', ('fwd', 'dq', 'dkv')),   # and dq alone
                           ('pallas_mgpu_fwd_dq_masked', ('fwd', 'dq'))):
        fwds[name] = jax.jit(lambda q, k, v, mosaic=mosaic: attn_gpu.causal_attention(
            q, k, v, dqk ** -0.5, select_BTK=idx, mgpu=mosaic))
    for name, f in fwds.items():
      g = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v)[0].astype(jnp.float32)),
                           argnums=(0, 1, 2)))
      self.record('dense', f'{name}_fwd+bwd', shape, lambda: self.timeit(g, q, k, v),
                  flops=3.5 * fl_f)
      self.record('dense', f'{name}_fwd', shape, lambda: self.timeit(f, q, k, v), flops=fl_f)
    if _hopper():   # the Mosaic backward kernels one at a time (dq: 2 K + V, dk/dv: 2 K + 2 V)
      from v4jax.kernels.attention import mgpu
      from v4jax.kernels.blockwise import pack_mask
      words = pack_mask(idx, T)
      o, lse = jax.jit(lambda q, k, v: mgpu.forward(q, k, v, words, dqk ** -0.5))(q, k, v)
      for kern, width in (('dq', 2 * dqk + dv), ('dkv', 2 * dqk + 2 * dv)):
        bwd = jax.jit(lambda *a, kern=kern: mgpu.backward(*a, dqk ** -0.5, kernels=(kern,)))
        self.record('dense', f'pallas_mgpu_{kern}', shape,
                    lambda: self.timeit(bwd, q, k, v, words, o, lse, v), flops=2 * pairs * width)
    del q, k, v, idx, seg

  def crossover(self, seqs):
    res = self.out['results']
    get = lambda name, T, impl='pallas': next(
        (r['ms'] for r in res if r['name'] == name and r.get('T') == T and r.get('impl', impl) ==
         impl and r.get('shapes', 'v3.2') == 'v3.2' and r.get('K', V3['K']) == V3['K']
         and r.get('radix_bits', self.radix_bits[0]) == self.radix_bits[0] and 'ms' in r), None)
    for T in seqs:
      parts = [get('indexer_scores+topk', T), get('sparse_mla_fwd+bwd', T)]
      kl = [get('teacher_probs_mean', T), get('student_scores_at_fwd+bwd', T)]  # the kl section
      dense = get('cudnn_flash_fwd+bwd', T)
      if None in parts or dense is None:
        continue
      with_kl = None not in kl
      student = {'dense': kl[1], 'gather': get('student_scores_at_fwd+bwd', T,
                                                impl='pallas_gather_dq')}
      form = ix_gpu.resolve_dq_form(T, T, V3['K'])      # kernels.student_dq=auto's pick
      if student[form] is None:
        form = 'dense'
      dsa = sum(parts) + (kl[0] + student[form] if with_kl else 0.0)
      row = dict(T=T, dsa_ms=round(dsa, 3), dense_cudnn_ms=round(dense, 3),
                 dsa_faster=dsa < dense, kl_included=with_kl)
      if with_kl:
        row['student_dq'] = form
        other = 'gather' if form == 'dense' else 'dense'
        if student[other] is not None:    # the same layer with the other student form
          row[f'dsa_ms_student_dq_{other}'] = round(sum(parts) + kl[0] + student[other], 3)
      self.out['crossover'].append(row)


def _hopper() -> bool:
  from v4jax.kernels.grouped_matmul import resolve_impl
  return jax.default_backend() == 'gpu' and resolve_impl('auto', jnp.bfloat16) == 'mgpu'


def _plain(x):
  """JSON for numpy scalars."""
  return x.item() if hasattr(x, 'item') else str(x)


def _scores_only(q, k, w):
  """The masked score slabs indexer_topk would build (same chunking), without the selection."""
  B, T = q.shape[:2]
  bt, bs = min(64, max(16, 1 << (T - 1).bit_length())), 64
  ch = min(1024, max(bs, 1 << (k.shape[1] - 1).bit_length()))
  qT, kp, wT, sq, sk = ix_gpu._layout(q, k, w, None, bt, bs, max(bs, ch))
  Tp, Sp = qT.shape[2], kp.shape[1]
  rows = max(bt, min(Tp, ((1 << 30) // (4 * B * Sp)) // bt * bt))
  total = jnp.float32(0)
  for t0 in range(0, Tp, rows):
    n = min(rows, Tp - t0)
    n_cols = min(Sp, -(-(t0 + n) // max(bs, ch)) * max(bs, ch))
    slab = ix_gpu._score_slab(qT, kp, wT, sq, sk, t0=t0, rows=n, n_cols=n_cols, n_keys=k.shape[1],
                              masked=True, bt=bt, bs=bs, interpret=jax.default_backend() == 'cpu')
    total = total + slab[:, :, 0].sum()
  return total


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default=os.path.join(os.environ.get('OUT', '.'), 'bench_kernels.json'))
  ap.add_argument('--smoke', action='store_true', help='tiny shapes (CPU interpret mode)')
  ap.add_argument('--sections', default='matmul,check,sweep,profile,sparse,indexer,kl,peer,dense')
  ap.add_argument('--seqs', default='4096,8192,16384,32768', help='V3.2-shape sequence lengths')
  ap.add_argument('--checks', default='sparse,indexer', help='check section: which kernels')
  ap.add_argument('--topks', default='2048', help='indexer section: V3.2-shape top-k sizes')
  ap.add_argument('--radix-bits', default='1',
                  help='indexer and peer sections: top-k radix bits per sweep to time (1..4)')
  ap.add_argument('--ref-max-t', type=int, default=4096,
                  help='longest T at which the sparse section also times the XLA reference')
  args = ap.parse_args()
  seqs = [64] if args.smoke else [int(t) for t in args.seqs.split(',')]
  b = Bench(args.smoke, args.out, 'indexer' in args.checks.split(','),
            topks=[int(k) for k in args.topks.split(',')],
            radix_bits=[int(r) for r in args.radix_bits.split(',')])
  sections = args.sections.split(',')
  t0 = time.time()
  for name in ('matmul', 'check', 'sweep', 'profile', 'sparse', 'indexer', 'kl', 'peer', 'dense',
               'attn_sweep', 'attn_scan'):
    if name not in sections:
      continue
    print(f'== {name} ({time.time() - t0:.0f}s)', flush=True)
    try:
      fn = getattr(b, name)
      if name in ('sparse', 'kl'):
        fn(seqs, args.ref_max_t)
      else:
        fn(seqs) if name in ('indexer', 'peer', 'dense') else fn()
    except Exception as e:  # noqa: BLE001
      b.out.setdefault('section_errors', {})[name] = f'{type(e).__name__}: {str(e)[:400]}'
      traceback.print_exc()
    b.out['elapsed_s'] = round(time.time() - t0, 1)
    b.save()
  print(f'wrote {args.out} ({time.time() - t0:.0f}s)')
  for r in b.out['results']:
    if 'ms' in r or 'error' in r:
      print(f"{r['section']:8s} {r['name']:26s} {r.get('impl', ''):14s} T={r.get('T', r.get('n'))}"
            f" K={r.get('K', '')} bits={r.get('radix_bits', '')}"
            f" {r.get('ms', float('nan')):9.3f} ms {r.get('tflops', float('nan')):8.1f} TFLOP/s"
            f" {r.get('frac_dense', float('nan')):6.3f} {r.get('error', '')[:80]}"
            f" {json.dumps({k: r[k] for k in ('fwd', 'dkv', 'dq', 'reduce') if k in r})}")
  for c in b.out['checks']:
    print('check', json.dumps(c, default=_plain))
  for c in b.out['crossover']:
    print('crossover', c)


if __name__ == '__main__':
  main()
