"""Builds the encoder and predictor of a run from its config, and initialises params.

The model params pytree is `{"encoder": ..., "predictor": ...}`; the EMA teacher is a
second copy of the encoder params. `spectrogram_shape` is `(crop_frames, n_mels)`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pupujepa_jax import config as config_lib
from pupujepa_jax.models.transformer import BlockSpec, Encoder, Predictor

__all__ = ["BlockSpec", "Encoder", "Predictor", "encoder_spec", "predictor_spec",
           "make_encoder", "make_predictor", "init_params", "count_params"]


def _dtype(cfg):
  return jnp.bfloat16 if cfg.get("compute_dtype", "float32") == "bfloat16" else jnp.float32


def encoder_spec(cfg) -> BlockSpec:
  m = cfg.model
  return BlockSpec(width=m.width, depth=m.depth, num_heads=m.num_heads,
                   mlp_ratio=m.mlp_ratio, swiglu=m.swiglu, qk_norm=m.qk_norm,
                   layer_scale=m.layer_scale, drop_path=m.drop_path, pos_embed=m.pos_embed,
                   rope_max_res=m.rope_max_res, rope_linear_bands=m.rope_linear_bands,
                   dtype=_dtype(cfg), remat=bool(cfg.get("remat", False)))


def predictor_spec(cfg) -> BlockSpec:
  """Predictor blocks share the encoder's block flags, with their own size."""
  p = cfg.predictor
  return dataclasses.replace(encoder_spec(cfg), width=p.width, depth=p.depth,
                             num_heads=p.num_heads, drop_path=0.0)


def make_encoder(cfg, deterministic: bool = True) -> Encoder:
  return Encoder(encoder_spec(cfg), patch=(cfg.model.patch_time, cfg.model.patch_freq),
                 deterministic=deterministic)


def make_predictor(cfg, deterministic: bool = True) -> Predictor:
  return Predictor(predictor_spec(cfg), out_width=cfg.model.width,
                   grid=config_lib.grid_shape(cfg), deterministic=deterministic)


def init_params(cfg, rng) -> dict:
  """Fresh {"encoder", "predictor"} params for the run's crop shape."""
  enc_rng, pred_rng = jax.random.split(rng)
  spec = jnp.zeros((1, cfg.data.crop_frames, cfg.frontend.n_mels), jnp.float32)
  encoder = make_encoder(cfg).init(enc_rng, spec)["params"]
  n_ctx = 2
  ctx = jnp.zeros((1, n_ctx, cfg.model.width), jnp.float32)
  idx = jnp.arange(n_ctx)[None]
  predictor = make_predictor(cfg).init(pred_rng, ctx, idx, idx + n_ctx)["params"]
  return {"encoder": encoder, "predictor": predictor}


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
