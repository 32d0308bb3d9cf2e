"""Engram's mix on one device: the projections, gate and short conv, forward and backward.

Times in one process, at bench_h200's Engram (N = 4 streams of D = 1536, d_mem = 1024, a 4-tap
conv) on one micro-batch of --batch x --seq tokens (bf16 streams and memory vectors, fp32
parameters), unless --smoke:
  custom_vjp  `Engram.mix` as the model runs it: the key and value GEMMs (`projections`), then
              `engram.gate_conv` (fp32 math in fused passes, no stream-sized fp32 tensor stored)
  autodiff    the same forward differentiated by jax (gate_conv's forward without its rule):
              what XLA stores and re-reads when the backward is not written out
Each row: pass 'fwd' (the mix) and 'fwd+bwd' (the gradient of sum(R * mix) in the parameters,
X and e), median ms over --iters calls after a compile call, the compiled program's temporaries,
the largest difference of its outputs (or gradients) from custom_vjp's relative to their
largest magnitude, and GB/s = the streams' bytes each pass must move (fwd: X, k read and Y
written; fwd+bwd adds dY, X, k read and dX, dk written) / time, GEMMs included in the time.

  python tools/bench_engram_mix.py --out bench_engram_mix.json     # GPU
  python tools/bench_engram_mix.py --smoke                           # any backend, tiny shapes
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from v4jax.cli import BenchReport, median_seconds  # noqa: E402
from v4jax.config import load_config_file  # noqa: E402
from v4jax.model import engram  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(smoke: bool):
  cfg = load_config_file(os.path.join(_ROOT, 'configs', 'tiny.py' if smoke else 'bench_h200.py'))
  cfg.engram.table_memory = 'device'       # the module holds a (small) table; mix ignores it
  return cfg


def _rel_diff(a, b) -> float:
  """Largest |a - b| over the leaves, relative to each leaf's largest |b|."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return max(float(jnp.max(jnp.abs(f32(x) - f32(y))) / (jnp.max(jnp.abs(f32(y))) + 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--seq', type=int, default=4096)
  ap.add_argument('--iters', type=int, default=20)
  ap.add_argument('--smoke', action='store_true', help='the tiny config, 2 x 64 tokens')
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  cfg = _config(args.smoke)
  B, T = (2, 64) if args.smoke else (args.batch, args.seq)
  iters = 2 if args.smoke else args.iters
  mod = engram.Engram(cfg, cfg.engram.layer_ids[0], 16, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(1), 64))
  for _, var in nnx.to_flat_state(nnx.state(mod, nnx.Param)):   # the conv non-zero too
    var.set_value(var.get_value() + 0.05 * jax.random.normal(next(keys), var.shape))
  N, D, M = mod.n, mod.d, mod.d_mem
  dtype = mod.dtype
  X = jax.random.normal(next(keys), (B, T, N, D)).astype(dtype)
  e = jax.random.normal(next(keys), (B, T, M)).astype(dtype)
  R = jax.random.normal(next(keys), (B, T, N, D)).astype(dtype)
  gdef, state = nnx.split(mod)
  dev = jax.devices()[0]
  report = BenchReport(args.out, iters=iters, shape=dict(B=B, T=T, N=N, D=D, d_mem=M))
  print(f'jax {jax.__version__}, {dev.platform} {dev.device_kind}, B={B} T={T} N={N} D={D} '
        f'd_mem={M}')
  stream = B * T * N * D * jnp.dtype(dtype).itemsize
  moved = {'fwd': 3 * stream, 'fwd+bwd': 8 * stream}
  plain = lambda X, k, v, p, eps: engram._gate_conv_fwd(X, k, v, p, eps)[0]   # no VJP rule
  results = {}
  for name, op in (('custom_vjp', engram.gate_conv), ('autodiff', plain)):
    def mix(s, X, e, op=op):
      return op(X, *nnx.merge(gdef, s).projections(e))
    loss = lambda s, X, e, mix=mix: jnp.sum((R * mix(s, X, e)).astype(jnp.float32))
    for pass_, f in (('fwd', jax.jit(mix)), ('fwd+bwd', jax.jit(jax.grad(loss, (0, 1, 2))))):
      results[name, pass_] = f(state, X, e)
      mem = f.lower(state, X, e).compile().memory_analysis()
      ms = 1e3 * median_seconds(f, state, X, e, iters=iters)
      row = {'name': name, 'pass_': pass_, 'ms': ms, 'gbps': moved[pass_] / ms / 1e6,
             'temp_gb': getattr(mem, 'temp_size_in_bytes', 0) / 1e9,
             'diff': _rel_diff(results[name, pass_], results['custom_vjp', pass_])}
      report.add(row)
      print(f"{name:<11} {pass_:<8} {ms:8.3f} ms {row['gbps']:7.0f} GB/s "
            f"temporaries {row['temp_gb']:.2f} GB  diff {row['diff']:.1e}", flush=True)


if __name__ == '__main__':
  main()
