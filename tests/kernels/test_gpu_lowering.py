"""Every DSA GPU kernel lowers to Triton for a CUDA target on this CPU host, forward and (where
differentiable) backward, at the bench config's head counts and widths: every primitive inside
has a Triton lowering and every block shape is legal. Values are tested in interpret mode beside
each kernel; PTX compilation and the run itself need a GPU (tools/bench_kernels.py). This is the
CI guard for kernel code that only a GPU would otherwise exercise."""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from v4jax.kernels.indexer import gpu as indexer_gpu
from v4jax.kernels.sparse_attention import gpu as sparse_gpu

TRITON = '__gpu$xla.gpu.triton'
B, T, HI, DI, H, C, V, K = 1, 192, 16, 128, 16, 576, 512, 64   # T, K: several blocks
bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)


def _triton_calls(fn, *args) -> int:
  exp = export.export(jax.jit(fn), platforms=['cuda'],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  return exp.mlir_module().count(TRITON)


def _sum_grad(f, argnums):
  return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=argnums)


# Triton calls expected: scores 1; top-k: the score slab and the radix select; the student's
# backward: the dk and dq/dw kernels (also when its value is top-k's scores: no forward kernel);
# sparse MLA's backward: dkv, dq and the dkv segment sum; the teacher 1 in either form
# (absorbed 'probs', MHA 'masked_probs': D = 128 + 64).
@pytest.mark.parametrize('name,calls', [('scores', 1), ('topk', 2), ('scores_at', 2),
                                        ('scores_at_gather_dq', 2), ('scores_at_given', 2),
                                        ('sparse_mla', 3), ('probs', 1), ('masked_probs', 1)])
def test_kernel_lowers_for_cuda(name, calls):
  qi, ki, wi = bf16(B, T, HI, DI), bf16(B, T, DI), f32(B, T, HI)
  q, kv, idx, lse = bf16(B, T, H, C + 64), bf16(B, T, C + 64), i32(B, T, K), f32(B, T, H)
  if name == 'scores':
    n = _triton_calls(lambda q, k, w: indexer_gpu.indexer_scores(q, k, w, interpret=False),
                      qi, ki, wi)
  elif name == 'topk':
    n = _triton_calls(lambda q, k, w: indexer_gpu.indexer_topk(q, k, w, K, interpret=False),
                      qi, ki, wi)
  elif name.startswith('scores_at') and name != 'scores_at_given':
    # the student forward, then its dense dk kernel and its dq/dw kernel (tiles or gathered)
    form = 'gather' if name.endswith('gather_dq') else 'dense'
    f = lambda q, k, w, i: indexer_gpu.indexer_scores_at(q, k, w, i, dq_form=form,
                                                         interpret=False)
    assert _triton_calls(f, qi, ki, wi, idx) == 1
    n = _triton_calls(_sum_grad(f, (0, 1, 2)), qi, ki, wi, idx) - 1
  elif name == 'scores_at_given':
    f = lambda q, k, w, i, s: indexer_gpu.indexer_scores_at(q, k, w, i, scores_BTK=s,
                                                            interpret=False)
    assert _triton_calls(f, qi, ki, wi, idx, f32(B, T, K)) == 0
    n = _triton_calls(_sum_grad(f, (0, 1, 2)), qi, ki, wi, idx, f32(B, T, K))
  elif name == 'sparse_mla':     # forward, then the dkv and dq kernels
    f = lambda q, kv, i: sparse_gpu.sparse_mla(q, kv, i, V, 0.1, interpret=False)[0]
    assert _triton_calls(f, q, kv, idx) == 1
    n = _triton_calls(_sum_grad(f, (0, 1)), q, kv, idx) - 1
  elif name == 'probs':
    n = _triton_calls(lambda q, kv, i, l: sparse_gpu.attention_probs_mean(
        q, kv, i, l, V, 0.1, interpret=False), q, kv, idx, lse)
  else:
    n = _triton_calls(lambda q, k, i, l: sparse_gpu.masked_probs_mean(
        q, k, i, l, 0.1, interpret=False), bf16(B, T, H, 192), bf16(B, T, H, 192), idx, lse)
  assert n == calls
