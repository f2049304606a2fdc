"""Scaled dot-product attention over [B, N, heads, head_dim] arrays: one entry point,
several kernels.

`dot_product_attention(q, k, v, kernel)` is what every block calls. `kernel` (the run
config's `attention` field) is one of:
- `xla`: the plain reference, softmax(q k^T / sqrt(d)) v with a float32 softmax. It
  materialises the [B, heads, Nq, Nk] logits and probabilities (and keeps them for the
  backward pass).
- `blockwise`: the same numbers computed query block by key block with an online
  softmax (FlashAttention-2's algorithm, in plain JAX), with its own backward pass that
  recomputes the probabilities block by block from the saved log-sum-exp. Memory is
  O(N) instead of O(N^2); every matmul keeps float32 accumulation.
- `cudnn`: cuDNN's fused flash attention through `jax.nn.dot_product_attention(
  implementation="cudnn")`, on NVIDIA GPUs with bf16/fp16 inputs and a head dim that
  is a multiple of 8 and at most 128.
- `splash`: Pallas splash attention on TPUs (sequences padded to its block size, padding
  masked with segment ids).
- `auto` (default): cudnn on GPUs, splash on TPUs, blockwise on CPUs. A kernel that
  does not qualify for the inputs (dtype, head dim, platform) falls back to the next
  one with the reason logged once (`resolve_kernel`).

`attention_weights` gives the softmax probabilities of q and k for pictures.

Under remat's `dots` policy the custom kernels keep what their backward passes need
(named RESIDUALS): a custom backward hides the kernel's inside from the policy, which
would otherwise run the whole attention forward again in the backward pass. The
blockwise and splash kernels name their outputs and log-sum-exps; cuDNN's names nothing,
so `saving_residuals` names every residual of its backward from outside.
"""
from __future__ import annotations

import functools
import logging

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np

KERNELS = ("auto", "xla", "blockwise", "cudnn", "splash")
# Blockwise tiles: at most this many queries, and keys, per block (one key block covers
# the released grids, 2048 tokens, so the online softmax never has to rescale there).
# Sequences are cut into equal blocks (410 tokens: one block of 416, not 512), so little
# work is spent on padding; key blocks tile the keys exactly where they can, and then
# need no padding mask at all.
BLOCK_Q = 512
BLOCK_K = 2048
# (batch, head) pairs per step of the blockwise loop: enough that one step's logits
# block holds about this many elements (4 MB in float32, cache-sized on CPUs) - one pair
# for the released grids, many for short windows, where per-step overheads dominate.
BLOCK_ELEMENTS = 1 << 20
SPLASH_BLOCK = 128
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_NEG = -1e30  # logit of a padded key: exp() underflows to exactly 0
RESIDUALS = "attention_residuals"  # the kernels' saved outputs and log-sum-exps, for remat

log = logging.getLogger(__name__)


def attention_weights(q, k):
  """float32 softmax(q k^T / sqrt(d)) [B, heads, Nq, Nk]."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
  return jax.nn.softmax(logits, axis=-1)


def reference_attention(q, k, v):
  """Plain attention with a float32 softmax; materialises the [B, heads, N, N] weights."""
  weights = attention_weights(q, k)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(v.dtype)


# ------------------------------------------------------------------------ kernel choice

def resolve_kernel(requested: str, platform: str, dtype, head_dim: int) -> tuple[str, str]:
  """(kernel that runs, reason if it is not the requested one) for these inputs."""
  if requested not in KERNELS:
    raise ValueError(f"attention kernel {requested!r} not in {KERNELS}")
  if requested == "auto":
    preferred = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "blockwise")
    kernel, reason = resolve_kernel(preferred, platform, dtype, head_dim)
    return kernel, reason
  if requested == "cudnn":
    problems = []
    if platform not in ("gpu", "cuda"):
      problems.append(f"needs an NVIDIA GPU (platform is {platform})")
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
      problems.append(f"needs bf16/fp16 inputs (got {jnp.dtype(dtype).name})")
    if head_dim % 8 or head_dim > 128:
      problems.append(f"needs a head dim that is a multiple of 8 and <= 128 (got {head_dim})")
    if problems:
      fallback = "xla" if platform in ("gpu", "cuda") else "blockwise"
      return fallback, f"cudnn attention {'; '.join(problems)}: using {fallback}"
  if requested == "splash" and platform != "tpu":
    return "blockwise", f"splash attention needs a TPU (platform is {platform}): using blockwise"
  return requested, ""


@functools.lru_cache(maxsize=None)
def _log_fallback(reason: str) -> None:
  log.warning(reason)


def dot_product_attention(q, k, v, kernel: str = "auto"):
  """softmax(q k^T / sqrt(d)) v for q [B, Nq, H, d], k and v [B, Nk, H, d]."""
  chosen, reason = resolve_kernel(kernel, jax.default_backend(), q.dtype, q.shape[-1])
  if reason:
    _log_fallback(reason)
  if chosen == "xla":
    return reference_attention(q, k, v)
  if chosen == "blockwise":
    return blockwise_attention(q, k, v)
  if chosen == "cudnn":
    return saving_residuals(cudnn_attention)(q, k, v)
  return splash_attention(q, k, v)


def cudnn_attention(q, k, v):
  """cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16 inputs; see module docstring)."""
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def saving_residuals(attention_fn):
  """`attention_fn` with its output and every residual its backward pass keeps named
  RESIDUALS, so remat's dots policy saves them (for kernels that do not name their own)."""
  @jax.custom_vjp
  def attend(q, k, v):
    return attention_fn(q, k, v)

  def forward(q, k, v):
    # `backward` is a pytree whose leaves are the residuals; the output is named too, or
    # the policy would recompute it (and so the kernel) for whatever follows.
    out, backward = jax.vjp(attention_fn, q, k, v)
    return jax.tree.map(lambda x: ad_checkpoint.checkpoint_name(x, RESIDUALS),
                        (out, backward))

  attend.defvjp(forward, lambda backward, d_out: backward(d_out))
  return attend


# --------------------------------------------------------------------------- blockwise

def _blocks(x, n_blocks: int, block: int):
  """[B, H, N, ...] padded to n_blocks * block -> [n_blocks, B, H, block, ...]."""
  pad = n_blocks * block - x.shape[2]
  if pad:
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
  x = x.reshape(x.shape[:2] + (n_blocks, block) + x.shape[3:])
  return jnp.moveaxis(x, 2, 0)


def _unblock(x, n: int):
  """[n_blocks, B, H, block, ...] -> [B, H, n, ...]."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])[:, :, :n]


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _tile(n: int, max_block: int, multiple: int) -> tuple[int, int]:
  """(block size, number of blocks): the fewest blocks of at most ~max_block that cover n,
  all of one size, rounded up to a multiple of `multiple`."""
  block = _ceil_div(_ceil_div(n, _ceil_div(n, max_block)), multiple) * multiple
  return block, _ceil_div(n, block)


def _tiles(n_q: int, n_k: int, block_q: int, block_k: int) -> tuple[int, int, int, int]:
  """(query block, query blocks, key block, key blocks); query blocks are multiples of 8
  (vector width), key blocks exact where possible (no padding mask)."""
  return (*_tile(n_q, block_q, 8), *_tile(n_k, block_k, 1))


def _layout(q, k, v, block_q, block_k):
  """Head-major, scaled, blocked q/k/v and the key-padding bias of every key block (None
  when the key blocks tile the keys exactly: adding zeros would cost a pass over every
  logits block)."""
  n_q, n_k, d = q.shape[1], k.shape[1], q.shape[-1]
  bq, nq, bk, nk = _tiles(n_q, n_k, block_q, block_k)
  head_major = lambda x: jnp.swapaxes(x, 1, 2)
  qb = _blocks(head_major(q * jnp.asarray(1.0 / np.sqrt(d), q.dtype)), nq, bq)
  kb, vb = _blocks(head_major(k), nk, bk), _blocks(head_major(v), nk, bk)
  bias = None
  if nk * bk != n_k:
    bias = jnp.where(jnp.arange(nk * bk) < n_k, 0.0, _NEG).astype(jnp.float32).reshape(nk, bk)
  return qb, kb, vb, bias


def _scores(q_block, k_block, bias_block):
  scores = jnp.einsum("bhqd,bhkd->bhqk", q_block, k_block, preferred_element_type=jnp.float32)
  return scores if bias_block is None else scores + bias_block


def _flash_forward(q, k, v, block_q, block_k):
  """(output [B, Nq, H, d], log-sum-exp [B, H, Nq] of the scaled logits)."""
  qb, kb, vb, bias = _layout(q, k, v, block_q, block_k)

  def one_query_block(q_block):
    shape = q_block.shape[:-1]
    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_block.shape, jnp.float32))

    def one_key_block(carry, xs):
      m, l, acc = carry
      k_block, v_block, bias_block = xs
      s = _scores(q_block, k_block, bias_block)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(-1)
      acc = acc * correction[..., None] + jnp.einsum(
          "bhqk,bhkd->bhqd", p.astype(v_block.dtype), v_block,
          preferred_element_type=jnp.float32)
      return (m_new, l, acc), None

    (m, l, acc), _ = jax.lax.scan(one_key_block, init, (kb, vb, bias))
    return acc / l[..., None], m + jnp.log(l)

  out, lse = jax.lax.map(one_query_block, qb)
  n_q = q.shape[1]
  out = jnp.swapaxes(_unblock(out, n_q), 1, 2).astype(q.dtype)
  return out, _unblock(lse, n_q)


def _flash_backward(block_q, block_k, residuals, d_out):
  q, k, v, out, lse = residuals
  n_q, n_k, d = q.shape[1], k.shape[1], q.shape[-1]
  qb, kb, vb, bias = _layout(q, k, v, block_q, block_k)
  bq, nq = qb.shape[3], qb.shape[0]
  head_major = lambda x: jnp.swapaxes(x, 1, 2)
  # delta_i = sum_j p_ij dp_ij = rowsum(dO * O); padded query rows have dO = 0.
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  dob = _blocks(head_major(d_out), nq, bq)
  lse_b, delta_b = _blocks(lse, nq, bq), _blocks(delta, nq, bq)

  # dK and dV are accumulated transposed ([.., d, key]): dK^T = Q^T dS and dV^T = dO^T P
  # contract over queries with both operands in their natural layout, which CPU matmuls
  # run ~2.5x faster than dS^T Q (a contraction over the leading dimension of both).
  transposed = lambda x: jnp.swapaxes(x, -1, -2)

  def one_query_block(carry, xs):
    dk_t, dv_t = carry
    q_block, q_t, do_block, do_t, lse_block, delta_block = xs

    def one_key_block(dq, ys):
      k_block, v_block, bias_block = ys
      p = jnp.exp(_scores(q_block, k_block, bias_block) - lse_block[..., None])
      dv_t_block = jnp.einsum("bhdq,bhqk->bhdk", do_t, p.astype(do_block.dtype),
                              preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", do_block, v_block,
                      preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_block[..., None])).astype(q_block.dtype)
      dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds, k_block, preferred_element_type=jnp.float32)
      dk_t_block = jnp.einsum("bhdq,bhqk->bhdk", q_t, ds, preferred_element_type=jnp.float32)
      return dq, (dk_t_block, dv_t_block)

    dq, (dk_t_blocks, dv_t_blocks) = jax.lax.scan(
        one_key_block, jnp.zeros(q_block.shape, jnp.float32), (kb, vb, bias))
    return (dk_t + dk_t_blocks, dv_t + dv_t_blocks), dq

  zeros = jnp.zeros(transposed(kb).shape, jnp.float32)
  (dk_t, dv_t), dq = jax.lax.scan(one_query_block, (zeros, zeros),
                                   (qb, transposed(qb), dob, transposed(dob), lse_b, delta_b))
  dk, dv = transposed(dk_t), transposed(dv_t)
  scale = 1.0 / np.sqrt(d)
  # q was scaled before the matmuls: d(q * s) / dq = s; k saw the scaled q already.
  dq = jnp.swapaxes(_unblock(dq, n_q), 1, 2) * scale
  dk = jnp.swapaxes(_unblock(dk, n_k), 1, 2)
  dv = jnp.swapaxes(_unblock(dv, n_k), 1, 2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, block_q, block_k):
  return _flash_forward(q, k, v, block_q, block_k)[0]


def _flash_fwd_rule(q, k, v, block_q, block_k):
  out, lse = _flash_forward(q, k, v, block_q, block_k)
  out, lse = (ad_checkpoint.checkpoint_name(x, RESIDUALS) for x in (out, lse))
  return out, (q, k, v, out, lse)


_flash.defvjp(_flash_fwd_rule, _flash_backward)


def blockwise_attention(q, k, v, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                        heads_per_step: int | str | None = "auto"):
  """Memory-light attention (see module docstring); any Nq, Nk (padding is masked).

  The (batch x head) pairs are processed `heads_per_step` at a time in a sequential
  loop, so one block's logits ([heads_per_step, block_q, block_k]) stay in the CPU's
  caches; "auto" picks it from BLOCK_ELEMENTS, None processes all pairs in every block.
  """
  b, n_q, h, d = q.shape
  pairs = b * h
  if heads_per_step == "auto":
    bq, _, bk, _ = _tiles(n_q, k.shape[1], block_q, block_k)
    block = bq * bk
    heads_per_step = max(1, BLOCK_ELEMENTS // block)
  if heads_per_step is None or heads_per_step >= pairs:
    return _flash(q, k, v, int(block_q), int(block_k))
  chunk = max(c for c in range(1, min(heads_per_step, pairs) + 1) if pairs % c == 0)

  def per_pair(x):  # [B, N, H, d] -> [pairs / chunk, chunk, N, 1, d]
    x = jnp.swapaxes(x, 1, 2).reshape(pairs, x.shape[1], 1, d)
    return x.reshape(pairs // chunk, chunk, *x.shape[1:])

  out = jax.lax.map(lambda xs: _flash(*xs, int(block_q), int(block_k)),
                    (per_pair(q), per_pair(k), per_pair(v)))
  return jnp.swapaxes(out.reshape(b, h, n_q, d), 1, 2)


# ------------------------------------------------------------------------------ splash

def splash_attention(q, k, v, interpret: bool = False):
  """Pallas splash attention (TPU); `interpret` runs the same kernel on any platform.

  Sequences are padded to the kernel's block size; padded keys are masked with segment
  ids (real keys 0, padding 1; every query is 0, so padded query rows stay finite and
  are dropped).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  b, n_q, h, d = q.shape
  n_k = k.shape[1]
  length = _ceil_div(max(n_q, n_k), SPLASH_BLOCK) * SPLASH_BLOCK
  mask = masks.MultiHeadMask([masks.FullMask((length, length)) for _ in range(h)])
  sizes = splash.BlockSizes(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK,
                            block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK,
                            block_q_dq=SPLASH_BLOCK, block_kv_dq=SPLASH_BLOCK)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret, residual_checkpoint_name=RESIDUALS)
  segments = splash.SegmentIds(q=jnp.zeros(length, jnp.int32),
                               kv=(jnp.arange(length) >= n_k).astype(jnp.int32))

  def head_major(x, n):  # [B, N, H, d] -> [B, H, length, d]
    return jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, 0), (0, length - n), (0, 0)])

  qh = head_major(q * jnp.asarray(1.0 / np.sqrt(d), q.dtype), n_q)
  out = jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=segments))(
      qh, head_major(k, n_k), head_major(v, n_k))
  return jnp.swapaxes(out[:, :, :n_q], 1, 2).astype(q.dtype)
