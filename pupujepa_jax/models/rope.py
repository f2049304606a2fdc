"""2-D positions for the token grid: axial rotary embeddings and the sin-cos ablation.

Rotary tables follow timm's `RotaryEmbeddingCat(in_pixels=True)` exactly: each axis'
coordinate is `linspace(-1, 1, n)` over the grid extent (positions normalised to the input
length), multiplied by `dim // 4` frequency bands `linspace(1, max_res / 2) * pi` (or
log-spaced), giving per token [time bands, freq bands] angles, each repeated twice
(interleaved pairs), as a [tokens, 2 * dim] table of [sin | cos]. Tables are NumPy
constants (computed once per grid), gathered per token index so the encoder, the
target-only teacher and the predictor rotate exactly the positions they see.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def frequency_bands(num_bands: int, max_res: float, linear_bands: bool) -> np.ndarray:
  if linear_bands:
    bands = np.linspace(1.0, max_res / 2, num_bands, dtype=np.float32)
  else:
    bands = 2.0 ** np.linspace(0.0, np.log2(max_res) - 1, num_bands, dtype=np.float32)
  return (bands * np.float32(np.pi)).astype(np.float32)


@functools.lru_cache(maxsize=32)
def rope_table(grid: tuple[int, int], head_dim: int, max_res: float = 224.0,
               linear_bands: bool = True) -> np.ndarray:
  """[H*W, 2*head_dim] float32 table of [sin | cos] for a time-major grid."""
  if head_dim % 4:
    raise ValueError(f"rotary head dim {head_dim} must be a multiple of 4")
  bands = frequency_bands(head_dim // 4, max_res, linear_bands)
  axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in grid]
  coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # [H, W, 2]
  angles = (coords[..., None] * bands).reshape(grid[0] * grid[1], -1)  # [L, 2 * nb]
  angles = np.repeat(angles, 2, axis=-1)  # interleaved pairs -> [L, head_dim]
  table = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)
  table.setflags(write=False)
  return table


def gather_rope(table: np.ndarray, index):
  """sin, cos of shape [B, N, head_dim] for token indices [B, N]."""
  rows = jnp.asarray(table)[index]
  sin, cos = jnp.split(rows, 2, axis=-1)
  return sin, cos


def rotate_pairs(x):
  """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] (timm `rot`)."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x, sin, cos):
  """Rotate x [B, N, heads, head_dim] with sin/cos [B, N, head_dim]."""
  sin = sin[:, :, None, :].astype(x.dtype)
  cos = cos[:, :, None, :].astype(x.dtype)
  return x * cos + rotate_pairs(x) * sin


@functools.lru_cache(maxsize=32)
def sincos_table(grid: tuple[int, int], width: int) -> np.ndarray:
  """2-D absolute sin-cos position embedding [H*W, width] (MAE style; the ablation)."""
  if width % 4:
    raise ValueError(f"sin-cos embedding width {width} must be a multiple of 4")
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  t, f = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  parts = []
  for pos in (t.reshape(-1), f.reshape(-1)):
    angle = pos[:, None] * omega[None, :]
    parts += [np.sin(angle), np.cos(angle)]
  table = np.concatenate(parts, axis=-1).astype(np.float32)
  table.setflags(write=False)
  return table
