"""Scaled dot-product attention over [B, N, heads, head_dim] arrays, one definition.

`dot_product_attention(q, k, v, kernel)` is what every block calls; `kernel` (config
field `model.attention`) picks the implementation. `attention_weights` gives the softmax
probabilities of the same q and k for pictures.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = ("auto", "xla")


def attention_weights(q, k):
  """float32 softmax(q k^T / sqrt(d)) [B, heads, Nq, Nk]."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
  return jax.nn.softmax(logits, axis=-1)


def reference_attention(q, k, v):
  """Plain attention with a float32 softmax; materialises the [B, heads, N, N] weights."""
  weights = attention_weights(q, k)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def dot_product_attention(q, k, v, kernel: str = "auto"):
  """softmax(q k^T / sqrt(d)) v for q [B, Nq, H, d], k and v [B, Nk, H, d]."""
  if kernel not in KERNELS:
    raise ValueError(f"attention kernel {kernel!r} not in {KERNELS}")
  return reference_attention(q, k, v)
