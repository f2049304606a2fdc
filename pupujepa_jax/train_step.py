"""The train state and the one jitted PupuJEPA update step.

State is a plain dict pytree: `step`, `params` ({"encoder", "predictor"} of the student),
`teacher` (EMA encoder params) and `opt_state`. Randomness (masks, drop-path) is derived
from `fold_in(key(seed), step)`, so a resumed run draws exactly what an uninterrupted one
would, and the state needs no RNG. One step:

  masks  = sample_masks(step rng)                       (on device, static shapes)
  target = LN(teacher(targets only | full grid -> gather))      (stop-gradient)
  pred   = predictor(student(context), context idx, target idx)
  loss   = latent_loss(pred, target); AdamW; teacher <- EMA(teacher, student encoder)

`make_train_step` jits it over the mesh with explicit state/batch shardings and donates
the state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pupujepa_jax import config as config_lib
from pupujepa_jax import masking, models, objectives, optim, sharding


def init_state(cfg, seed: int | None = None) -> dict:
  """Fresh state; the teacher starts as an exact copy of the student encoder."""
  seed = cfg.seed if seed is None else seed
  params = models.init_params(cfg, jax.random.key(seed))
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "teacher": jax.tree.map(jnp.copy, params["encoder"]),
      "opt_state": optim.make_optimizer(cfg).init(params),
  }


def abstract_state(cfg):
  return jax.eval_shape(functools.partial(init_state, cfg))


def step_rngs(seed: int, step):
  """(mask rng, dropout rng) of a step: a pure function of seed and step."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), step))


def teacher_targets(cfg, teacher, spectrogram, target_index):
  """Teacher features [B, Lt, D] of the target tokens (no gradient)."""
  encoder = models.make_encoder(cfg)
  if cfg.teacher_mode == "targets_only":
    features = encoder.apply({"params": teacher}, spectrogram, target_index)
  else:  # full_grid (I-JEPA): encode everything, then gather the targets
    full = encoder.apply({"params": teacher}, spectrogram)
    features = jnp.take_along_axis(full, target_index[..., None], axis=1)
  return jax.lax.stop_gradient(features)


def train_step(state: dict, batch: dict, *, cfg) -> tuple[dict, dict]:
  """One optimizer + EMA step on `batch["spectrogram"]` [B, T, F]. Pure."""
  spectrogram = batch["spectrogram"]
  step = state["step"]
  mask_rng, dropout_rng = step_rngs(cfg.seed, step)
  masks = masking.sample_masks(mask_rng, step, config_lib.grid_shape(cfg),
                               spectrogram.shape[0], cfg.mask)
  targets = teacher_targets(cfg, state["teacher"], spectrogram, masks.target)
  encoder = models.make_encoder(cfg, deterministic=False)
  predictor = models.make_predictor(cfg, deterministic=False)

  def loss_fn(params):
    context = encoder.apply({"params": params["encoder"]}, spectrogram, masks.context,
                            rngs={"dropout": dropout_rng})
    pred = predictor.apply({"params": params["predictor"]}, context, masks.context,
                           masks.target, rngs={"dropout": dropout_rng})
    return objectives.latent_loss(pred, targets, cfg.loss)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  optimizer = optim.make_optimizer(cfg)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  momentum = optim.ema_momentum(cfg)(step)
  teacher = optim.ema_update(state["teacher"], params["encoder"], momentum)
  metrics = {
      "loss": loss,
      "learning_rate": optim.learning_rate(cfg)(step),
      "weight_decay": optim.weight_decay(cfg)(step),
      "ema_momentum": momentum,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "teacher_std": objectives.feature_std(targets),
      "mask_strategy": masks.strategy,
  }
  new_state = {"step": step + 1, "params": params, "teacher": teacher, "opt_state": opt_state}
  return new_state, metrics


def state_shardings(cfg, mesh):
  return sharding.state_shardings(mesh, abstract_state(cfg))


def make_train_step(cfg, mesh):
  """`train_step` jitted over `mesh`: FSDP-sharded, donated state; batch split on all axes."""
  shardings = state_shardings(cfg, mesh)
  return jax.jit(functools.partial(train_step, cfg=cfg),
                 in_shardings=(shardings, {"spectrogram": sharding.batch_sharding(mesh)}),
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def create_sharded_state(cfg, mesh, seed: int | None = None) -> dict:
  """Initialise the state directly into its shardings (no full host copy on big models)."""
  init = jax.jit(functools.partial(init_state, cfg, seed),
                 out_shardings=state_shardings(cfg, mesh))
  return init()


def step_flops(cfg, batch_size: int) -> float:
  """FLOPs of one compiled train step, from XLA's cost analysis (CPU/GPU alike)."""
  abstract = abstract_state(cfg)
  spec = jax.ShapeDtypeStruct((batch_size, cfg.data.crop_frames, cfg.frontend.n_mels),
                              jnp.float32)
  lowered = jax.jit(functools.partial(train_step, cfg=cfg)).lower(abstract,
                                                                  {"spectrogram": spec})
  cost = lowered.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0
