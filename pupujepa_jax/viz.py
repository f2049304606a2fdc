"""Looking inside a trained model: attention maps over the log-mel spectrogram.

The paper's case study: pick a layer and a query patch (time, frequency), take the
encoder's attention from that patch to every token (per head and averaged over heads)
plus the attention rollout up to that layer, and draw them over the spectrogram. Given a
training checkpoint, the predictor's attention from a masked (target) slot to the
context tokens under a sampled mask is drawn the same way.

The attention probabilities come from the model itself: every block sows them into the
`intermediates` collection (`models.encode(..., capture_attention=True)`), so pictures
follow any change of the model and work with every attention kernel. Pictures use
matplotlib's object API (no pyplot, no global backend state).
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from pupujepa_jax import models


# ----------------------------------------------------------------------------- compute

@functools.lru_cache(maxsize=8)
def _encoder_attention_fn(arch: models.Architecture, runtime: models.Runtime):
  """Jitted (params, spectrogram [T, F], query) -> the query's attention row per block and
  head [depth, heads, N] and the head-mean matrices [depth, N, N]."""

  def rows(params, spectrogram, query):
    _, weights = models.encode(arch, params, spectrogram[None], runtime,
                               capture_attention=True)
    weights = weights[:, 0]  # [depth, heads, N, N]
    return weights[:, :, query], weights.mean(axis=1)

  return jax.jit(rows)


def encoder_attention(arch: models.Architecture, params, spectrogram,
                      runtime: models.Runtime = models.Runtime()):
  """Every block's attention [depth, B, heads, N, N] for spectrograms [B, T, F]."""
  return models.encode(arch, params, spectrogram, runtime, capture_attention=True)[1]


def attention_maps(arch: models.Architecture, params, spectrogram, layer: int,
                   query: tuple[int, int], runtime: models.Runtime = models.Runtime()) -> dict:
  """Maps of the query patch's attention on the token grid, for one spectrogram [T, F].

  Returns {"heads": [heads, Ht, W], "mean": [Ht, W], "rollout": [Ht, W]} where rollout
  multiplies the head-averaged attention (plus identity for the residual, renormalised)
  of blocks 0..layer, read from the query's row.
  """
  grid = arch.grid(np.shape(spectrogram)[-1])
  if not 0 <= layer < arch.depth:
    raise ValueError(f"layer {layer} out of range: the encoder has blocks 0..{arch.depth - 1}")
  t, f = query
  if not (0 <= t < grid[0] and 0 <= f < grid[1]):
    raise ValueError(f"query {query} outside the {grid[0]}x{grid[1]} token grid")
  q = t * grid[1] + f
  rows, means = jax.device_get(_encoder_attention_fn(arch, runtime)(
      params, jnp.asarray(spectrogram), q))
  n = grid[0] * grid[1]
  roll = np.eye(n, dtype=np.float64)[q]
  for l in range(layer, -1, -1):
    roll = roll @ (0.5 * means[l] + 0.5 * np.eye(n))
  return {"heads": rows[layer].reshape(-1, *grid), "mean": rows[layer].mean(0).reshape(grid),
          "rollout": roll.reshape(grid)}


def predictor_attention(cfg, params, spectrogram, masks):
  """Every predictor block's attention [depth, B, heads, Lc+Lt, Lc+Lt] under `masks`.

  `params` = the trained {"patch_embed", "student", "predictor"}: the student encodes
  the context tokens and the predictor sows its attention over [context ; mask tokens].
  """
  from pupujepa_jax import config as config_lib, train_step
  arch, runtime, grid = (config_lib.architecture(cfg), config_lib.runtime(cfg),
                         config_lib.grid_shape(cfg))
  tokens = models.make_patch_embed(arch, runtime).apply({"params": params["patch_embed"]},
                                                        spectrogram)
  context = models.make_encoder(arch, grid, runtime).apply(
      {"params": params["student"]}, train_step.gather_tokens(tokens, masks.context),
      masks.context)
  predictor = models.make_predictor(arch, config_lib.predictor_size(cfg), grid, runtime)
  _, state = predictor.apply({"params": params["predictor"]}, context, masks.context,
                             masks.target, mutable=["intermediates"])
  return models.sown_attention(state)


# ----------------------------------------------------------------------------- drawing

def draw_log_mel(ax, spectrogram, frames_per_second: float = 100.0, title: str | None = None,
                 cmap: str = "magma", **kwargs):
  """Draw a log-mel spectrogram [T, n_mels] on `ax`: time (s) on x, mel bin on y."""
  spectrogram = np.asarray(spectrogram)
  t, m = spectrogram.shape
  image = ax.imshow(spectrogram.T, origin="lower", aspect="auto", cmap=cmap,
                    extent=(0, t / frames_per_second, 0, m), interpolation="nearest", **kwargs)
  ax.set_xlabel("time (s)")
  ax.set_ylabel("mel bin")
  if title:
    ax.set_title(title)
  return image


def _overlay(ax, spectrogram, grid_map, patch, fps, title, fig, query=None):
  draw_log_mel(ax, spectrogram, fps, title=title, cmap="gray", alpha=0.55)
  t, m = np.shape(spectrogram)
  heat = np.kron(np.asarray(grid_map, np.float64), np.ones(patch))
  heat = np.ma.masked_invalid(heat)
  image = ax.imshow(heat.T, origin="lower", aspect="auto", cmap="inferno", alpha=0.6,
                    extent=(0, t / fps, 0, m), interpolation="nearest")
  fig.colorbar(image, ax=ax, label="attention weight", pad=0.01)
  if query is not None:
    _mark(ax, query, patch, fps)


def _mark(ax, query, patch, fps):
  from matplotlib.patches import Rectangle
  qt, qf = query
  ax.add_patch(Rectangle((qt * patch[0] / fps, qf * patch[1]), max(patch[0] / fps, 0.04),
                         patch[1], fill=False, edgecolor="lime", linewidth=2))


def attention_figure(spectrogram, maps: dict, query, patch, frames_per_second: float = 100.0,
                     title: str = "", max_heads: int = 8):
  """Figure: spectrogram, head-mean attention, rollout and per-head maps of one query."""
  from matplotlib.figure import Figure
  heads = maps["heads"][:max_heads]
  fig = Figure(figsize=(13, 11), layout="constrained")
  rows = fig.subfigures(2, 1, height_ratios=[3, 1])
  top = rows[0].subplots(3, 1)
  image = draw_log_mel(top[0], spectrogram, frames_per_second,
                       title=f"{title} log-mel spectrogram, query patch (t={query[0]}, "
                             f"f={query[1]}) in green")
  fig.colorbar(image, ax=top[0], label="normalised log-mel", pad=0.01)
  _mark(top[0], query, patch, frames_per_second)
  _overlay(top[1], spectrogram, maps["mean"], patch, frames_per_second,
           "attention of the query, mean over heads", fig, query)
  _overlay(top[2], spectrogram, maps["rollout"], patch, frames_per_second,
           "attention rollout up to this layer (residual-corrected)", fig, query)
  bottom = rows[1].subplots(1, len(heads), squeeze=False)[0]
  for h, ax in enumerate(bottom):
    ax.imshow(np.asarray(heads[h]).T, origin="lower", aspect="auto", cmap="inferno",
              extent=(0, heads.shape[1] * patch[0] / frames_per_second, 0,
                      heads.shape[2] * patch[1]), interpolation="nearest")
    _mark(ax, query, patch, frames_per_second)
    ax.set_title(f"head {h}")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel bin" if h == 0 else "")
  return fig


def encoder_attention_png(model, wave, sample_rate: int, out, layer: int = -1,
                          query: tuple[int, int] | None = None, start_seconds: float = 0.0
                          ) -> dict:
  """Draw the teacher's attention for one window of `wave` to `out` (PNG); returns info."""
  from data_pipelines import audio
  mono = audio.prepare_waveform(np.asarray(wave), int(sample_rate), model.sample_rate)
  start = int(round(start_seconds * model.sample_rate))
  window = model.windows(mono[start:] if start < mono.shape[0] else mono)[0]
  spectrogram = np.asarray(model.spectrogram(window))
  depth = model.architecture.depth
  layer = layer % depth if -depth <= layer < depth else layer
  grid = model.grid
  query = (grid[0] // 2, grid[1] // 2) if query is None else tuple(query)
  maps = attention_maps(model.architecture, model.params, spectrogram, layer, query,
                        model.runtime)
  patch = (model.architecture.patch_time, model.architecture.patch_freq)
  fig = attention_figure(spectrogram, maps, query, patch, model.frontend.frames_per_second,
                         title=f"{model.model_id}, encoder block {layer}:")
  _save(fig, out)
  return {"out": str(out), "layer": layer, "query": list(query), "grid": list(grid),
          "max_weight": float(maps["mean"].max())}


def predictor_attention_png(workdir, wave, sample_rate: int, out, layer: int = -1,
                            query: tuple[int, int] | None = None, step: int | None = None,
                            seed: int = 0) -> dict:
  """Draw the predictor's attention from a target slot to the tokens under a random mask."""
  from data_pipelines import audio
  from pupujepa_jax import config as config_lib, frontend, masking
  from pupujepa_jax import workdir as workdir_lib
  cfg, _, step, state = workdir_lib.restore(workdir, step)
  fcfg = config_lib.frontend(cfg)
  mono = audio.prepare_waveform(np.asarray(wave), int(sample_rate), fcfg.sample_rate)
  window = np.resize(mono, fcfg.samples_for_frames(cfg.model.crop_frames))
  spectrogram = np.asarray(frontend.log_mel_jnp(window, fcfg))
  grid = config_lib.grid_shape(cfg)
  masks = jax.jit(masking.sample_masks, static_argnums=(2, 3, 4))(
      jax.random.key(seed), step, grid, 1, config_lib.mask(cfg))
  depth = cfg.predictor.depth
  if not -depth <= layer < depth:
    raise ValueError(f"layer {layer} out of range: the predictor has blocks 0..{depth - 1}")
  layer = layer % depth
  weights = jax.jit(functools.partial(predictor_attention, cfg))(
      state["params"], spectrogram[None], masks)[layer]
  context, target = np.asarray(masks.context[0]), np.asarray(masks.target[0])
  want = (grid[0] // 2, grid[1] // 2) if query is None else tuple(query)
  # The query is the target slot closest to the requested patch.
  tpos = np.stack([target // grid[1], target % grid[1]], 1)
  slot = int(np.argmin(np.abs(tpos - np.asarray(want)).sum(1)))
  row = np.asarray(weights[0, :, len(context) + slot])  # [heads, Lc + Lt]
  index = np.concatenate([context, target])
  mean = np.zeros(grid[0] * grid[1])
  mean[index] = row.mean(0)
  hidden = np.zeros(grid[0] * grid[1])
  hidden[target] = 1.0
  heads = np.zeros((row.shape[0], grid[0] * grid[1]))
  heads[:, index] = row
  query = tuple(int(v) for v in tpos[slot])
  maps = {"mean": mean.reshape(grid), "heads": heads.reshape(-1, *grid)}
  maps["rollout"] = np.where(hidden.reshape(grid) > 0, np.nan, maps["mean"])
  patch = (cfg.model.patch_time, cfg.model.patch_freq)
  fig = attention_figure(spectrogram, maps, query, patch, fcfg.frames_per_second,
                         title=f"predictor block {layer} (step {step}):")
  fig.axes[2].set_title("attention to the context tokens (outlined in cyan); masked targets left blank")
  fig.axes[2].contour(np.linspace(0, spectrogram.shape[0] / fcfg.frames_per_second,
                                  spectrogram.shape[0]), np.arange(spectrogram.shape[1]),
                      np.kron(hidden.reshape(grid), np.ones(patch)).T, levels=[0.5],
                      colors="cyan", linewidths=0.6)
  _save(fig, out)
  return {"out": str(out), "layer": layer, "query": list(query), "step": int(step),
          "n_context": int(len(context)), "n_target": int(len(target)),
          "context_weight": float(row.mean(0)[:len(context)].sum())}


def _save(fig, out) -> None:
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=90)
