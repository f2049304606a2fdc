"""Every attention kernel this machine can run equals the plain reference, forward and
gradient, on odd sizes (the teacher's 1638 and the student's 410 tokens), and the kernel
choice falls back with a reason where a kernel does not qualify.

cuDNN needs an NVIDIA GPU and cannot run here: its selection and fallbacks are tested,
its numbers only on a GPU machine (benchmarks/device_check.sh). Splash attention is the
real Pallas TPU kernel run in Pallas' interpret mode on the CPU.
"""
import functools

import jax
from jax._src.interpreters import partial_eval  # dce_jaxpr: not public
import jax.numpy as jnp
import numpy as np
import pytest

from pupujepa_jax.models import attention
from pupujepa_jax.models.transformer import REMAT_POLICIES
from tests import step_reference as ref


def _qkv(n_q, n_k, heads=2, dim=16, batch=2, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, n_q, heads, dim)) * 2
  k = jax.random.normal(keys[1], (batch, n_k, heads, dim)) * 2
  v = jax.random.normal(keys[2], (batch, n_k, heads, dim))
  cot = jax.random.normal(keys[3], (batch, n_q, heads, dim))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), cot


def _value_and_grads(fn, q, k, v, cot):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cot.astype(out.dtype)))


@pytest.mark.parametrize("n,block_q,block_k", [
    (1638, attention.BLOCK_Q, attention.BLOCK_K),  # the teacher: one key block, 4 x 416 queries
    (410, attention.BLOCK_Q, attention.BLOCK_K),   # the student's context: one block each
    (410, 64, 128),  # several key blocks: the online softmax rescales, padded keys (412)
    (37, 16, 8),     # padded keys (40) and queries (48)
])
def test_blockwise_matches_reference(n, block_q, block_k):
  q, k, v, cot = _qkv(n, n)
  blockwise = jax.jit(functools.partial(attention.blockwise_attention, block_q=block_q,
                                        block_k=block_k))
  got = _value_and_grads(blockwise, q, k, v, cot)
  want = _value_and_grads(jax.jit(attention.reference_attention), q, k, v, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * scale, rtol=0,
                               err_msg=name)
    assert scale > 0.1


def test_blockwise_cross_attention_and_bfloat16():
  q, k, v, cot = _qkv(100, 300, seed=1)
  got = _value_and_grads(functools.partial(attention.blockwise_attention, block_q=32,
                                           block_k=64), q, k, v, cot)
  want = _value_and_grads(attention.reference_attention, q, k, v, cot)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * float(
        jnp.abs(b).max()), rtol=0)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  got = _value_and_grads(attention.blockwise_attention, qb, kb, vb, cot)
  assert all(x.dtype == jnp.bfloat16 for x in got)
  # bf16 inputs, float32 accumulation: within bf16's resolution of the float32 result.
  for a, b in zip(got, want):
    err = float(jnp.abs(a.astype(jnp.float32) - b).max()) / float(jnp.abs(b).max())
    assert err < 3e-2, err


def test_blockwise_memory_is_linear_in_tokens():
  """The compiled backward keeps no [B, H, N, N] array: its temporaries grow ~linearly."""
  def temp_bytes(n, fn):
    q, k, v, cot = _qkv(n, n, heads=2, dim=16, batch=1)
    grad = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * cot).sum(), argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  blockwise = functools.partial(attention.blockwise_attention, block_q=128, block_k=512)
  small, large = temp_bytes(1024, blockwise), temp_bytes(4096, blockwise)
  ref_small, ref_large = (temp_bytes(n, attention.reference_attention) for n in (1024, 4096))
  assert large < 6 * small          # 4x tokens: ~4x memory (blocks are fixed size)
  assert ref_large > 8 * ref_small  # the reference: N^2 logits dominate (measured 9.6x)
  assert large < ref_large / 4


def test_splash_kernel_in_interpret_mode_matches_reference():
  q, k, v, cot = _qkv(200, 200, dim=64, batch=1, seed=3)
  splash = jax.jit(functools.partial(attention.splash_attention, interpret=True))
  got = _value_and_grads(splash, q, k, v, cot)
  want = _value_and_grads(attention.reference_attention, q, k, v, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                               atol=2e-5 * float(jnp.abs(b).max()), rtol=0, err_msg=name)


@pytest.mark.parametrize("kernel", [
    functools.partial(attention.blockwise_attention, heads_per_step=None),
    functools.partial(attention.blockwise_attention, heads_per_step=1),  # inside lax.map
    functools.partial(attention.splash_attention, interpret=True),
    # cuDNN's kernel needs a GPU; the wrapper that names its residuals takes any kernel,
    # here the reference, whose batched dots the dots policy would recompute.
    attention.saving_residuals(attention.reference_attention),
], ids=["blockwise", "blockwise_head_loop", "splash", "saving_residuals"])
def test_remat_dots_keeps_the_kernels_residuals(kernel):
  """Under remat's dots policy the gradient runs the kernel's forward once, as without
  remat (what its backward needs is saved by name); under "full" it runs it again."""
  q, k, v, _ = _qkv(130, 130, dim=64, batch=1)
  loss = lambda q, k, v: jnp.sum(jnp.tanh(kernel(q * 2.0, k, v)))

  def calls(policy):
    fn = loss if policy is None else jax.checkpoint(loss, policy=REMAT_POLICIES[policy])
    jaxpr = jax.make_jaxpr(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v).jaxpr
    # Without dead code, as XLA compiles it: splash's recomputed forward stays in the
    # traced program (unused: its outputs are saved) until eliminated.
    live, _ = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return sum(eqn.primitive.name in ("dot_general", "pallas_call")
               for eqn in ref.equations(live))
  assert calls("dots") == calls(None)
  assert calls("full") > calls(None)


def test_saving_residuals_keeps_the_kernels_numbers():
  """The wrapper that names a kernel's residuals (cuDNN's, on GPUs) changes no number."""
  q, k, v, cot = _qkv(130, 97, dim=64)
  wrapped = _value_and_grads(attention.saving_residuals(attention.reference_attention),
                             q, k, v, cot)
  for got, want in zip(wrapped, _value_and_grads(attention.reference_attention, q, k, v, cot)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("requested,platform,dtype,head_dim,want,reason", [
    ("auto", "cpu", jnp.float32, 64, "blockwise", ""),
    ("auto", "gpu", jnp.bfloat16, 64, "cudnn", ""),
    ("auto", "gpu", jnp.float32, 64, "xla", "bf16/fp16"),
    ("auto", "gpu", jnp.bfloat16, 192, "xla", "head dim"),
    ("auto", "tpu", jnp.bfloat16, 64, "splash", ""),
    ("cudnn", "cpu", jnp.bfloat16, 64, "blockwise", "NVIDIA GPU"),
    ("splash", "gpu", jnp.bfloat16, 64, "blockwise", "needs a TPU"),
    ("xla", "tpu", jnp.float32, 64, "xla", ""),
    ("blockwise", "gpu", jnp.float32, 64, "blockwise", ""),
])
def test_kernel_choice_and_fallbacks(requested, platform, dtype, head_dim, want, reason):
  chosen, why = attention.resolve_kernel(requested, platform, dtype, head_dim)
  assert chosen == want
  assert (reason in why) and (bool(why) == bool(reason))
  with pytest.raises(ValueError, match="attention kernel 'flash'"):
    attention.resolve_kernel("flash", platform, dtype, head_dim)


def test_every_kernel_runs_in_the_model():
  """The encoder gives the same tokens with every kernel this machine runs."""
  from pupujepa_jax import models
  arch = models.Architecture(width=64, depth=2, num_heads=2, crop_frames=64)
  params = jax.jit(functools.partial(models.init_encoder, arch, 128))(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 64, 128))
  outs = {kernel: jax.jit(functools.partial(
      models.encode, arch, runtime=models.Runtime(attention=kernel)))(params, x)
      for kernel in ("xla", "blockwise", "auto", "cudnn")}  # cudnn falls back here
  for kernel, out in outs.items():
    np.testing.assert_allclose(np.asarray(out), np.asarray(outs["xla"]), atol=1e-5,
                               err_msg=kernel)


@pytest.mark.parametrize("heads_per_step", [1, 3, 4])  # 4 does not divide 6 pairs: 3
def test_blockwise_head_loop_matches_reference(heads_per_step):
  q, k, v, cot = _qkv(150, 150, heads=3, batch=2, seed=5)
  fn = functools.partial(attention.blockwise_attention, block_q=64, block_k=64,
                         heads_per_step=heads_per_step)
  got = _value_and_grads(jax.jit(fn), q, k, v, cot)
  want = _value_and_grads(attention.reference_attention, q, k, v, cot)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                               atol=2e-5 * float(jnp.abs(b).max()), rtol=0)


def test_blockwise_tiles_are_balanced():
  """Blocks are equal, cover the sequence with the fewest blocks, and pad by less than a
  vector (queries) or not at all where the keys divide evenly."""
  assert attention._tiles(2048, 2048, 512, 2048) == (512, 4, 2048, 1)
  assert attention._tiles(1638, 1638, 512, 2048) == (416, 4, 1638, 1)  # not 4 x 512
  assert attention._tiles(410, 410, 512, 2048) == (416, 1, 410, 1)
  # The padded cases test_blockwise_matches_reference relies on to cover the padding mask:
  assert attention._tiles(410, 410, 64, 128)[2:] == (103, 4)  # 412 keys
  assert attention._tiles(37, 37, 16, 8) == (16, 3, 8, 5)     # 48 queries, 40 keys
  for n in range(1, 700, 7):
    for most in (8, 64, 100, 512):
      bq, nq, bk, nk = attention._tiles(n, n, most, most)
      assert nq == -(-n // most) and bq % 8 == 0 and 0 <= bq * nq - n < 8 * nq
      assert nk == -(-n // most) and 0 <= bk * nk - n < nk
