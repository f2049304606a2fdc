"""Builds the PupuJEPA modules from an architecture and initialises their params.

The trained params pytree is the release's module layout:
  {"patch_embed": PatchEmbed, "student": Encoder, "predictor": Predictor}
and the EMA teacher is `{"blocks", "norm"}`, a copy of the student (plus its own
"patch_embed" in the `teacher_patch_embed="ema"` ablation). An exported model is the
patch embedding and the teacher (`encoder_params`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pupujepa_jax.models.spec import Architecture, ServingSpec, SpecError
from pupujepa_jax.models.transformer import (BlockSpec, Encoder, PatchEmbed, Predictor,
                                             full_index)

__all__ = ["Architecture", "ServingSpec", "SpecError", "BlockSpec", "Encoder", "PatchEmbed",
           "Predictor", "PredictorSize", "Runtime", "block_spec", "make_patch_embed",
           "make_encoder", "make_predictor", "init_params", "init_encoder",
           "teacher_from_student", "encoder_params", "encode", "count_params", "full_index"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How the modules run (not what they are): compute dtype, remat policy, attention
  kernel, rolled or unrolled block loop, drop-path rate."""
  compute_dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"
  layer_loop: str = "auto"
  drop_path: float = 0.0


@dataclasses.dataclass(frozen=True)
class PredictorSize:
  width: int = 384
  depth: int = 6
  num_heads: int = 6


def block_spec(arch: Architecture, runtime: Runtime = Runtime(),
               size: PredictorSize | None = None) -> BlockSpec:
  """The encoder's block spec, or with `size` the predictor's (same flavour, own size)."""
  width, depth, heads = ((arch.width, arch.depth, arch.num_heads) if size is None
                         else (size.width, size.depth, size.num_heads))
  return BlockSpec(width=width, depth=depth, num_heads=heads, mlp_ratio=arch.mlp_ratio,
                   swiglu=arch.swiglu, qk_norm=arch.qk_norm, k_bias=arch.k_bias,
                   layer_scale=arch.layer_scale,
                   drop_path=runtime.drop_path if size is None else 0.0,
                   pos_embed=arch.pos_embed, rope_max_res=arch.rope_max_res,
                   rope_linear_bands=arch.rope_linear_bands,
                   dtype=DTYPES[runtime.compute_dtype], remat=runtime.remat,
                   attention=runtime.attention, layer_loop=runtime.layer_loop)


def make_patch_embed(arch: Architecture, runtime: Runtime = Runtime()) -> PatchEmbed:
  return PatchEmbed(arch.width, (arch.patch_time, arch.patch_freq),
                    DTYPES[runtime.compute_dtype])


def make_encoder(arch: Architecture, grid, runtime: Runtime = Runtime(),
                 deterministic: bool = True) -> Encoder:
  return Encoder(block_spec(arch, runtime), tuple(grid), deterministic)


def make_predictor(arch: Architecture, size: PredictorSize, grid, runtime: Runtime = Runtime(),
                   deterministic: bool = True) -> Predictor:
  return Predictor(block_spec(arch, runtime, size), arch.width, tuple(grid), deterministic)


def init_encoder(arch: Architecture, n_mels: int, rng) -> dict:
  """Fresh {"patch_embed", "blocks", "norm"}: an encoder as a model dir holds it."""
  grid = arch.grid(n_mels)
  k_patch, k_blocks = jax.random.split(rng)
  spec = jnp.zeros((1, arch.crop_frames, n_mels), jnp.float32)
  patch = make_patch_embed(arch).init(k_patch, spec)["params"]
  tokens = jnp.zeros((1, 2, arch.width), jnp.float32)
  blocks = make_encoder(arch, grid).init(k_blocks, tokens, jnp.arange(2)[None])["params"]
  return {"patch_embed": patch, **blocks}


def init_params(arch: Architecture, size: PredictorSize, n_mels: int, rng) -> dict:
  """Fresh trained params {"patch_embed", "student", "predictor"} (release layout)."""
  k_encoder, k_predictor = jax.random.split(rng)
  encoder = init_encoder(arch, n_mels, k_encoder)
  n_ctx = 2
  ctx = jnp.zeros((1, n_ctx, arch.width), jnp.float32)
  idx = jnp.arange(n_ctx)[None]
  predictor = make_predictor(arch, size, arch.grid(n_mels)).init(k_predictor, ctx, idx,
                                                                 idx + n_ctx)["params"]
  return {"patch_embed": encoder.pop("patch_embed"), "student": encoder,
          "predictor": predictor}


def teacher_from_student(params: dict, ema_patch_embed: bool = False) -> dict:
  """The EMA teacher's scope: the student's blocks and norm (and the patch embedding in
  the `teacher_patch_embed="ema"` ablation). `jnp.copy` keeps it a separate buffer."""
  teacher = dict(params["student"])
  if ema_patch_embed:
    teacher["patch_embed"] = params["patch_embed"]
  return jax.tree.map(jnp.copy, teacher)


def encoder_params(params: dict, teacher: dict) -> dict:
  """{"patch_embed", "blocks", "norm"} of the released embedding: the patch embedding
  the teacher reads (shared, or its own in the EMA ablation) and the teacher."""
  return {"patch_embed": teacher.get("patch_embed", params["patch_embed"]),
          "blocks": teacher["blocks"], "norm": teacher["norm"]}


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def encode(arch: Architecture, params: dict, spectrogram, runtime: Runtime = Runtime(),
           return_layers: bool = False, capture_attention: bool = False):
  """The released embedding of spectrograms [B, T, F]: patch embedding + encoder over the
  full grid. `params` = {"patch_embed", "blocks", "norm"} (see `encoder_params`).

  Returns the final tokens, with `return_layers` (final, layers [L+1, B, N, D]); with
  `capture_attention` also every block's attention [depth, B, heads, N, N] as the last
  element (sown by the blocks themselves, whatever the attention kernel).
  """
  grid = arch.grid(spectrogram.shape[-1])
  tokens = make_patch_embed(arch, runtime).apply({"params": params["patch_embed"]},
                                                 spectrogram)
  body = {"blocks": params["blocks"], "norm": params["norm"]}
  encoder = make_encoder(arch, grid, runtime)
  if not capture_attention:
    return encoder.apply({"params": body}, tokens, return_layers=return_layers)
  out, state = encoder.apply({"params": body}, tokens, return_layers=return_layers,
                             mutable=["intermediates"])
  weights = sown_attention(state)
  return (*out, weights) if return_layers else (out, weights)


def sown_attention(state: dict):
  """The [depth, B, heads, N, N] attention probabilities a block stack sowed."""
  return state["intermediates"]["blocks"]["attn"]["attention"][0]
