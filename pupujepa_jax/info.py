"""What `pupujepa info` and `pupujepa masks` report about a config (JSON-able dicts)."""
from __future__ import annotations

import functools

import jax

from pupujepa_jax import config as config_lib
from pupujepa_jax import masking, models


def model_info(cfg) -> dict:
  """Parameter counts, token grid and tokens per second of a config.

  `encoder_params` is the released embedding's encoder (patch embedding, blocks, final
  norm), the count the release reports per variant.
  """
  shapes = jax.eval_shape(functools.partial(
      models.init_params, config_lib.architecture(cfg), config_lib.predictor_size(cfg),
      cfg.frontend.n_mels), jax.random.key(0))
  h, w = config_lib.grid_shape(cfg)
  frames_per_second = cfg.frontend.sample_rate / cfg.frontend.hop
  return {
      "variant": cfg.model.variant,
      "encoder_params": models.count_params({"patch_embed": shapes["patch_embed"],
                                             "blocks": shapes["student"]}),
      "predictor_params": models.count_params(shapes["predictor"]),
      "token_grid": [h, w],
      "tokens": h * w,
      "crop_seconds": cfg.model.crop_frames / frames_per_second,
      "time_steps_per_second": frames_per_second / cfg.model.patch_time,
      "tokens_per_second": frames_per_second / cfg.model.patch_time * w,
      "patch": [cfg.model.patch_time, cfg.model.patch_freq],
  }


def mask_report(cfg, strategy: str, n: int, seed: int = 0, step: int = 0,
                png: str | None = None) -> dict:
  """Statistics of `n` masks drawn with `strategy` ("curriculum": the schedule at `step`)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.mask.strategy = strategy
  grid = config_lib.grid_shape(cfg)
  sample = jax.jit(functools.partial(masking.sample_masks, grid=grid, batch_size=n,
                                     mask_cfg=config_lib.mask(cfg).validate(grid)))
  masks = sample(jax.random.key(seed), step)
  target, context = masking.masks_to_bool(masks, grid)
  stats = masking.mask_statistics(target, grid, cfg.mask.ratio, context_bool=context)
  stats["strategy"] = masking.STRATEGIES[int(masks.strategy)]
  if png:
    masking.draw_masks_png(target[:4], grid, png)
    stats["png"] = png
  return stats
