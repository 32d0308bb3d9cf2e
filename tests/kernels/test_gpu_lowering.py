"""Every DSA, mHC-mixing, cross-entropy and gather-sum GPU kernel lowers to Triton for a CUDA
target on this CPU host, forward and (where differentiable) backward, at the bench config's head
counts and widths (mHC: N = 4 and N = 3, tokens and D not whole blocks): every primitive inside
has a Triton lowering and every block shape is legal. Values are tested in interpret mode beside
each kernel; PTX compilation and the run itself need a GPU (tools/bench_kernels.py). This is the
CI guard for kernel code that only a GPU would otherwise exercise."""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from v4jax.kernels.gather_sum import gpu as gather_sum_gpu
from v4jax.kernels.hc_mix import gpu as hc_gpu
from v4jax.kernels.indexer import gpu as indexer_gpu
from v4jax.kernels.sparse_attention import gpu as sparse_gpu
from v4jax.kernels.xent import gpu as xent_gpu

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
# (absorbed 'probs', MHA 'masked_probs': D = 128 + 64); mHC's read-in, write-back and normed mix:
# one forward and one backward kernel each; the normed mix and read-in as one op: one forward (the
# read-in's, after XLA's GEMMs), two backward (the stream dots, then dX); the LM head's cross
# entropy: 1 (not differentiated: it forms the gradient itself); the MoE's gather-sum: 1.
@pytest.mark.parametrize('name,calls', [('scores', 1), ('topk', 2), ('topk_words', 2),
                                        ('scores_at', 2),
                                        ('scores_at_gather_dq', 2), ('scores_at_given', 2),
                                        ('sparse_mla', 3), ('probs', 1), ('masked_probs', 1),
                                        ('hc_read_in', 2), ('hc_write_back', 2),
                                        ('hc_normed_mix', 2), ('hc_mix_read_in', 3),
                                        ('xent', 1), ('gather_sum', 1)])
def test_kernel_lowers_for_cuda(name, calls):
  qi, ki, wi = bf16(B, T, HI, DI), bf16(B, T, DI), f32(B, T, HI)
  q, kv, idx, lse = bf16(B, T, H, C + 64), bf16(B, T, C + 64), i32(B, T, K), f32(B, T, H)
  if name == 'scores':
    n = _triton_calls(lambda q, k, w: indexer_gpu.indexer_scores(q, k, w, interpret=False),
                      qi, ki, wi)
  elif name.startswith('topk'):     # the set as bit words too: the same two kernels
    words = name == 'topk_words'
    n = _triton_calls(lambda q, k, w: indexer_gpu.indexer_topk(q, k, w, K, return_words=words,
                                                               interpret=False), qi, ki, wi)
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
  elif name.startswith('hc_'):
    n = _hc_mix_calls(name)
  elif name == 'xent':       # bench_h200's vocabulary, 300 rows: partial chunk and row block
    n = _triton_calls(lambda l, t, w: xent_gpu.lse_target_grad(
        l, t, w, xent_gpu.Blocks(block_m=4), interpret=False), bf16(3, 100, 129280),
        i32(3, 100), f32(3, 100))
  elif name == 'gather_sum':  # the MoE's slot sums at bench_h200's D and K, a partial row block
    n = _triton_calls(lambda x, i: gather_sum_gpu.gather_sum(x, i, jnp.float32, interpret=False),
                      bf16(1000, 1536), i32(300, 6))
  elif name == 'probs':
    n = _triton_calls(lambda q, kv, i, l: sparse_gpu.attention_probs_mean(
        q, kv, i, l, V, 0.1, interpret=False), q, kv, idx, lse)
  else:          # the masked form's teacher
    n = _triton_calls(lambda q, k, i, l: sparse_gpu.masked_probs_mean(
        q, k, i, l, 0.1, interpret=False), bf16(B, T, H, 192), bf16(B, T, H, 192), idx, lse)
  assert n == calls


def _hc_mix_calls(name: str) -> int:
  """Forward + backward Triton calls of one mHC mixing op, at N = 4, D = 1536 (bf16 streams) and
  at N = 3, D = 200 (fp32 streams where the op takes them), T = 100: partial blocks."""
  total = set()
  for N, D, dtype in ((4, 1536, jnp.bfloat16), (3, 200, jnp.float32)):
    X, y = jax.ShapeDtypeStruct((B, 100, N, D), dtype), jax.ShapeDtypeStruct((B, 100, D), dtype)
    if name == 'hc_read_in':
      f, args = (lambda X, p: hc_gpu.read_in(X, p, interpret=False)), (X, f32(B, 100, N))
    elif name == 'hc_write_back':
      f = lambda X, y, p, c: hc_gpu.write_back(X, y, p, c, interpret=False)
      args = (X, y, f32(B, 100, N), f32(B, 100, N, N))
    elif name == 'hc_mix_read_in':     # all three outputs get a cotangent
      def f(X, fn, scale, base):
        mu, u, Xw = hc_gpu.mix_read_in(X, fn, scale, base, 1e-6, 1e-6, pass_streams=True,
                                       interpret=False)
        return (jnp.sum(mu) + jnp.sum(u.astype(jnp.float32)) +
                jnp.sum(Xw.astype(jnp.float32) ** 2))
      args = (X.update(dtype=jnp.bfloat16), f32(N * D, (2 + N) * N), f32(), f32(N))
    else:
      f = lambda X, fn: hc_gpu.normed_mix(X, fn, 1e-6, interpret=False)
      args = (X.update(dtype=jnp.bfloat16), f32(N * D, (2 + N) * N))
    total.add(_triton_calls(_sum_grad(lambda *a: f(*a).astype(jnp.float32),
                                      tuple(range(len(args)))), *args))
  assert len(total) == 1, total
  return total.pop()
