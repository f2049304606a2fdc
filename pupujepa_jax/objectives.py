"""Latent prediction losses between predictor outputs and teacher target features.

`smooth_l1` (default, I-JEPA) and `mse` compare against the teacher features after a
LayerNorm without affine parameters; `normalized_mse` is M2D's `2 - 2 cos`. All reduce to a
float32 scalar averaged over batch, target tokens and feature dimensions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm(x, eps: float = 1e-5):
  """LayerNorm over the last axis without affine parameters (F.layer_norm(x, x.shape[-1:]))."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def smooth_l1(pred, target, beta: float = 1.0):
  diff = jnp.abs(pred - target)
  return jnp.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).mean()


def normalized_mse(pred, target):
  pred = pred / jnp.linalg.norm(pred, axis=-1, keepdims=True).clip(1e-6)
  target = target / jnp.linalg.norm(target, axis=-1, keepdims=True).clip(1e-6)
  return (2.0 - 2.0 * (pred * target).sum(-1)).mean()


def latent_loss(pred, target, kind: str):
  """Loss of `kind` (config field `loss`) between [B, N, D] predictions and teacher features."""
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  if kind == "smooth_l1":
    return smooth_l1(pred, layer_norm(target))
  if kind == "mse":
    return jnp.square(pred - layer_norm(target)).mean()
  if kind == "normalized_mse":
    return normalized_mse(pred, target)
  raise ValueError(f"loss: unknown loss {kind!r}")


def feature_std(features):
  """Per-dimension std over all tokens of a [B, N, D] batch, averaged over D (collapse alarm)."""
  flat = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
  return flat.std(axis=0).mean()


def rank_me(features, eps: float = 1e-7):
  """RankMe (Garrido et al., 2023): the effective rank exp(H(p)) of token features
  [..., D], p the singular values normalised to sum 1. D for isotropic features, 1 for
  collapsed ones. Singular values come from the D x D Gram matrix (cheap for any N; its
  float32 eigenvalues put a floor of about 0.04 above 1 for rank-one features)."""
  flat = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
  eig = jnp.linalg.eigvalsh(flat.T @ flat)
  sigma = jnp.sqrt(jnp.clip(eig, 0.0))
  p = sigma / sigma.sum() + eps
  return jnp.exp(-(p * jnp.log(p)).sum())


def mean_cosine(a, b):
  """Mean cosine similarity of the last-axis vectors of a and b (predictions vs targets)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  cos = (a * b).sum(-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-6)
  return cos.mean()
