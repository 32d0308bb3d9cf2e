"""The TPU Pallas kernels compile ahead of time for TPU v5p and v6e topologies on a CPU machine.

Interpret mode does not prove that Mosaic accepts a kernel (tiling, DMA shapes, SMEM blocks), so
this compiles each kernel's forward and backward through libtpu for a one-chip mesh of a named
topology, at DeepSeek-V3.2 shapes (128 heads, 576-wide entries, 512-wide values, 2048 selected
keys; indexer 64 heads x 128) with short T. It needs the `tpu` extra (`pip install
"jax[tpu]==0.10.2"`, libtpu); without libtpu it skips.
"""
import importlib.util
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

if importlib.util.find_spec('libtpu') is None:
  pytest.skip('libtpu is not installed (pip install "jax[tpu]"): no TPU AOT compile',
              allow_module_level=True)

# Compile-only use: let libtpu load while another process (e.g. tools/aot_compile.py) holds it.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from jax.experimental import topologies  # noqa: E402

from v4jax.kernels import attention, indexer, sparse_attention  # noqa: E402
from v4jax.kernels.attention import tpu as attention_tpu  # noqa: E402
from v4jax.kernels.indexer import tpu as indexer_tpu  # noqa: E402
from v4jax.kernels.sparse_attention import tpu as sparse_tpu  # noqa: E402

pytestmark = pytest.mark.usefixtures('quick_tpu_compile')   # conftest.py

TOPOLOGIES = ['v5p:2x2x1', 'v6e:2x2']


def _compile(topology, fn, *shapes):
  """Compiles fn for one chip of `topology` (Mosaic kernels need a one-device mesh)."""
  try:
    topo = topologies.get_topology_desc(platform='tpu', topology_name=topology)
  except Exception as e:  # noqa: BLE001 - libtpu without this topology name
    pytest.skip(f'libtpu cannot describe {topology}: {e}')
  mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ('x',))
  rep = NamedSharding(mesh, P())
  args = [jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in shapes]
  with jax.set_mesh(mesh):
    return jax.jit(fn).trace(*args).lower().compile()


def _grads(f, n):
  """fn(*args) -> grads of the sum of f's float outputs w.r.t. the first n args."""
  def loss(*a):
    return sum(jnp.sum(jnp.where(jnp.isfinite(o), o, 0).astype(jnp.float32))
               for o in jax.tree.leaves(f(*a)))
  return lambda *a: jax.grad(loss, argnums=tuple(range(n)))(*a)


@pytest.mark.parametrize('topology', TOPOLOGIES)
def test_sparse_mla_compiles(topology):
  B, T, S, H, C, V, K = 1, 8, 4096, 128, 576, 512, 2048
  shapes = [((B, T, H, C), jnp.bfloat16), ((B, S, C), jnp.bfloat16), ((B, T, K), jnp.int32)]
  f = lambda q, kv, idx: sparse_tpu.sparse_mla(q, kv, idx, V, C ** -0.5, interpret=False)
  fwd = _compile(topology, f, *shapes)
  bwd = _compile(topology, lambda q, kv, idx: _grads(lambda q, kv: f(q, kv, idx), 2)(q, kv),
                 *shapes)
  assert fwd.memory_analysis() is not None and bwd.memory_analysis() is not None


@pytest.mark.parametrize('topology', TOPOLOGIES)
def test_indexer_compiles(topology):
  B, T, H, D, K = 1, 512, 64, 128, 256
  shapes = [((B, T, H, D), jnp.bfloat16), ((B, T, D), jnp.bfloat16), ((B, T, H), jnp.float32),
            ((B, T), jnp.int32)]
  _compile(topology, lambda q, k, w, seg: indexer_tpu.indexer_topk(
      q, k, w, K, seg, return_scores=True, interpret=False), *shapes)
  _compile(topology, lambda q, k, w, seg: indexer_tpu.indexer_scores(q, k, w, interpret=False),
           *shapes)


@pytest.mark.parametrize('topology', TOPOLOGIES)
def test_sparse_kl_kernels_compile(topology):
  """The sparse KL student (indexer scores at the selected keys, forward and q/k/w backward) and
  teacher (head-mean attention probabilities) at V3.2 shapes."""
  B, T, S, K = 1, 8, 4096, 2048
  H, C, HI, D = 128, 576, 64, 128
  ishapes = [((B, T, HI, D), jnp.bfloat16), ((B, S, D), jnp.bfloat16), ((B, T, HI), jnp.float32),
             ((B, T, K), jnp.int32)]
  f = lambda q, k, w, idx: indexer_tpu.indexer_scores_at(q, k, w, idx, interpret=False)
  _compile(topology, f, *ishapes)
  _compile(topology, lambda q, k, w, idx: _grads(lambda *a: f(*a, idx), 3)(q, k, w), *ishapes)
  pshapes = [((B, T, H, C), jnp.bfloat16), ((B, S, C), jnp.bfloat16), ((B, T, K), jnp.int32),
             ((B, T, H), jnp.float32)]
  _compile(topology, lambda q, kv, idx, lse: sparse_tpu.attention_probs_mean(
      q, kv, idx, lse, C ** -0.5, interpret=False), *pshapes)


@pytest.mark.parametrize('topology', TOPOLOGIES)
def test_dense_flash_attention_compiles(topology):
  """jax's bundled TPU flash attention behind kernels.attention=tpu_flash, forward (o, lse) and
  q/k/v backward, at bench_h200's MLA widths (qk 192, values 128: padded to 256) and a T that is
  not a multiple of its 128-row blocks, with segment ids."""
  B, T, H, K, V = 1, 1000, 16, 192, 128
  shapes = [((B, T, H, K), jnp.bfloat16), ((B, T, H, K), jnp.bfloat16),
            ((B, T, H, V), jnp.bfloat16), ((B, T), jnp.int32)]
  f = lambda q, k, v, seg: attention_tpu.causal_attention(q, k, v, K ** -0.5, seg)
  fwd = _compile(topology, f, *shapes)
  bwd = _compile(topology, lambda q, k, v, seg: _grads(lambda *a: f(*a, seg), 3)(q, k, v),
                 *shapes)
  assert fwd.memory_analysis() is not None and bwd.memory_analysis() is not None
  assert attention_tpu.FWD_SCOPE in fwd.as_text() and attention_tpu.BWD_SCOPE in bwd.as_text()


def test_dispatch_auto_picks_tpu_kernels(monkeypatch):
  """With V4JAX_TARGET_PLATFORM=tpu (AOT on a CPU host) impl='auto' runs the Mosaic kernels."""
  monkeypatch.setenv('V4JAX_TARGET_PLATFORM', 'tpu')
  B, T, H, C, V, K = 1, 8, 16, 576, 512, 128
  shapes = [((B, T, H, C), jnp.bfloat16), ((B, T, C), jnp.bfloat16), ((B, T, K), jnp.int32)]
  c = _compile('v5p:2x2x1', lambda q, kv, idx: sparse_attention.sparse_mla(q, kv, idx, V, 0.1),
               *shapes)
  assert 'sparse_mla_fwd_tpu' in c.as_text()
  ishapes = [((B, T, H, 128), jnp.bfloat16), ((B, T, 128), jnp.bfloat16), ((B, T, H), jnp.float32)]
  c = _compile('v5p:2x2x1', lambda q, k, w: indexer.indexer_topk(q, k, w, 4), *ishapes)
  assert 'indexer_scores_tpu' in c.as_text()
  idx = ((B, T, K), jnp.int32)
  c = _compile('v5p:2x2x1', lambda q, k, w, idx: indexer.indexer_scores_at(q, k, w, idx),
               *ishapes, idx)
  assert 'indexer_scores_at_tpu' in c.as_text()
  c = _compile('v5p:2x2x1', lambda q, kv, idx, lse: sparse_attention.attention_probs_mean(
      q, kv, idx, lse, 0.1), *shapes, ((B, T, H), jnp.float32))
  assert 'sparse_mla_probs_tpu' in c.as_text()
  c = _compile('v5p:2x2x1', lambda q, k, v: attention.causal_attention(q, k, v, 0.1),
               ((B, T, H, 192), jnp.bfloat16), ((B, T, H, 192), jnp.bfloat16),
               ((B, T, H, 128), jnp.bfloat16))
  assert attention_tpu.FWD_SCOPE in c.as_text()      # dense attention: the bundled TPU flash
