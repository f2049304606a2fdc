"""The train state and the one jitted PupuJEPA update step.

State is a plain dict pytree: `step`, `params` (the trained modules in the release's
layout: `patch_embed`, `student`, `predictor`), `teacher` (EMA of the student's blocks
and norm) and `opt_state`. Randomness (masks, drop-path) is derived from
`fold_in(key(seed), step)`, so a resumed run draws exactly what an uninterrupted one
would, and the state needs no RNG. One step, as the release's forward computes it:

  masks   = sample_masks(step rng)                         (on device, static shapes)
  tokens  = patch_embed(spectrogram)                       (all patches, once)
  target  = teacher(stop_gradient(tokens[targets]))        (targets only | full grid)
  pred    = predictor(student(tokens[context]), context idx, target idx)
  loss    = latent_loss(pred, target); AdamW; teacher <- EMA(teacher, student)

The patch embedding learns only through the student branch (the teacher reads its
output under stop-gradient) and is not EMA-averaged, unless `teacher_patch_embed="ema"`
(an ablation) gives the teacher its own EMA copy. `make_train_step` jits the step over
the mesh with explicit state/batch shardings and donates the state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pupujepa_jax import config as config_lib
from pupujepa_jax import frontend, masking, models, objectives, optim, sharding


def init_state(cfg, seed: int | None = None) -> dict:
  """Fresh state; the teacher starts as an exact copy of the student."""
  seed = cfg.seed if seed is None else seed
  params = models.init_params(config_lib.architecture(cfg), config_lib.predictor_size(cfg),
                              cfg.frontend.n_mels, jax.random.key(seed))
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "teacher": models.teacher_from_student(params, cfg.teacher_patch_embed == "ema"),
      "opt_state": optim.make_optimizer(cfg).init(params),
  }


def abstract_state(cfg):
  return jax.eval_shape(functools.partial(init_state, cfg))


def step_rngs(seed: int, step):
  """(mask rng, dropout rng) of a step: a pure function of seed and step."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), step))


def gather_tokens(tokens, index):
  """tokens [B, L, D] at grid indices [B, N] -> [B, N, D]."""
  return jnp.take_along_axis(tokens, index[..., None], axis=1)


def predict_and_target(cfg, params, teacher, spectrogram, masks: masking.Masks,
                       dropout_rng=None, return_context: bool = False):
  """(predictions, teacher targets) [B, Lt, D] of one batch, as the release's forward.

  Targets carry no gradient. With `dropout_rng=None` drop-path is off (evaluation).
  `return_context` adds the student's context features [B, Lc, D] (for monitoring).
  """
  arch, runtime = config_lib.architecture(cfg), config_lib.runtime(cfg)
  grid = config_lib.grid_shape(cfg)
  train = dropout_rng is not None
  rngs = {"dropout": dropout_rng} if train else {}
  patch_embed = models.make_patch_embed(arch, runtime)
  tokens = patch_embed.apply({"params": params["patch_embed"]}, spectrogram)
  if "patch_embed" in teacher:  # the EMA patch-embedding ablation
    teacher_tokens = patch_embed.apply({"params": teacher["patch_embed"]}, spectrogram)
  else:
    teacher_tokens = tokens
  teacher_tokens = jax.lax.stop_gradient(teacher_tokens)
  teacher_body = {"params": {"blocks": teacher["blocks"], "norm": teacher["norm"]}}
  encoder = models.make_encoder(arch, grid, runtime)
  if cfg.teacher_mode == "targets_only":
    targets = encoder.apply(teacher_body, gather_tokens(teacher_tokens, masks.target),
                            masks.target)
  else:  # full_grid (I-JEPA): encode everything, then gather the targets
    targets = gather_tokens(encoder.apply(teacher_body, teacher_tokens), masks.target)
  targets = jax.lax.stop_gradient(targets)
  student = models.make_encoder(arch, grid, runtime, deterministic=not train)
  context = student.apply({"params": params["student"]},
                          gather_tokens(tokens, masks.context), masks.context, rngs=rngs)
  predictor = models.make_predictor(arch, config_lib.predictor_size(cfg), grid, runtime,
                                    deterministic=not train)
  pred = predictor.apply({"params": params["predictor"]}, context, masks.context,
                         masks.target, rngs=rngs)
  return (pred, targets, context) if return_context else (pred, targets)


def batch_spectrogram(cfg, batch: dict):
  """Log-mel spectrograms [B, T, F] of a batch: the front-end of raw audio crops
  `batch["audio"]` [B, samples] (what the pipeline yields), or `batch["spectrogram"]`."""
  if "audio" in batch:
    return frontend.log_mel_jnp(batch["audio"], config_lib.frontend(cfg))
  return batch["spectrogram"]


def pretrain_step(state: dict, batch: dict, *, cfg) -> tuple[dict, dict]:
  """One optimizer + EMA step on a batch (see `batch_spectrogram`). Pure."""
  spectrogram = batch_spectrogram(cfg, batch)
  step = state["step"]
  mask_rng, dropout_rng = step_rngs(cfg.seed, step)
  masks = masking.sample_masks(mask_rng, step, config_lib.grid_shape(cfg),
                               spectrogram.shape[0], config_lib.mask(cfg))

  def loss_fn(params):
    pred, targets, context = predict_and_target(cfg, params, state["teacher"], spectrogram,
                                                masks, dropout_rng, return_context=True)
    return objectives.latent_loss(pred, targets, cfg.loss), (pred, targets, context)

  (loss, (pred, targets, context)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"])
  optimizer = optim.make_optimizer(cfg, step)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  momentum = optim.ema_momentum(cfg)(step)
  teacher = optim.ema_update(state["teacher"], models.teacher_from_student(
      params, "patch_embed" in state["teacher"]), momentum)
  metrics = {
      "loss": loss,
      "learning_rate": optim.learning_rate(cfg)(step),
      "weight_decay": optim.weight_decay(cfg)(step),
      "ema_momentum": momentum,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "mask_strategy": masks.strategy,
      # Learning monitors (cheap next to the step): feature spread of both encoders
      # (collapse alarm), the effective rank of the teacher's tokens (RankMe), and how
      # well the predictor points at its (layer-normed) targets.
      "teacher_std": objectives.feature_std(targets),
      "student_std": objectives.feature_std(jax.lax.stop_gradient(context)),
      "teacher_rank": objectives.rank_me(targets),
      "prediction_cosine": objectives.mean_cosine(jax.lax.stop_gradient(pred),
                                                  objectives.layer_norm(targets)),
  }
  new_state = {"step": step + 1, "params": params, "teacher": teacher, "opt_state": opt_state}
  return new_state, metrics


def state_shardings(cfg, mesh):
  return sharding.state_shardings(mesh, abstract_state(cfg))


def make_train_step(cfg, mesh):
  """`pretrain_step` jitted over `mesh`: FSDP-sharded, donated state; batch split on all axes."""
  shardings = state_shardings(cfg, mesh)
  # The batch (a dict of arrays) is split on its leading axis over all devices.
  return jax.jit(functools.partial(pretrain_step, cfg=cfg),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def create_sharded_state(cfg, mesh, seed: int | None = None) -> dict:
  """Initialise the state directly into its shardings (no full host copy on big models)."""
  init = jax.jit(functools.partial(init_state, cfg, seed),
                 out_shardings=state_shardings(cfg, mesh))
  return init()


def audio_batch_spec(cfg, batch_size: int) -> dict:
  """Abstract batch as the pipeline yields it: {"audio": [B, crop samples] float32}."""
  samples = config_lib.frontend(cfg).samples_for_frames(cfg.model.crop_frames)
  return {"audio": jax.ShapeDtypeStruct((batch_size, samples), jnp.float32)}


def lowered_flops(lowered) -> float:
  """FLOPs XLA counts in a lowered computation, before optimisation."""
  cost = lowered.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


def step_flops(cfg, batch) -> float:
  """FLOPs XLA counts in one train step on `batch` (arrays or ShapeDtypeStructs), before
  optimisation: the cross-check of `models.flops` (which MFU uses)."""
  return lowered_flops(jax.jit(functools.partial(pretrain_step, cfg=cfg)).lower(
      abstract_state(cfg), batch))
