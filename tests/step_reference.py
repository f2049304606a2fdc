"""A second path through one PupuJEPA step, written for the tests (not used by the code).

`train_step.predict_and_target` computes predictions and teacher targets in one function;
here the same quantities are assembled piece by piece from the modules, with NumPy
indexing for the gathers, one example at a time for the targets-only teacher, the full
grid through `models.encode` (the released embedding) for the I-JEPA teacher, and the
targets held as NumPy constants, so that no gradient can reach them. Also small helpers
the step tests share (`equations`: every equation of a traced program, for counting).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pupujepa_jax import config as config_lib
from pupujepa_jax import masking, models, objectives, train_step

SMOKE = "experiments/pupujepa.py:smoke"


def smoke_cfg(**overrides):
  cfg = config_lib.load_config(SMOKE)
  for key, value in overrides.items():
    if isinstance(value, dict):
      cfg[key].update(value)
    else:
      cfg[key] = value
  config_lib.validate(cfg)
  return cfg


def batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return {"spectrogram": rng.standard_normal(
      (cfg.data.batch_size, cfg.model.crop_frames, cfg.frontend.n_mels)).astype(np.float32)}


def start_state(cfg, step=5, seed=1):
  """A host state at `step` (past the lr warm-up's zero) whose teacher is NOT a copy of
  the student (noise of std 0.05 on every leaf), so an EMA step is visible."""
  state = jax.device_get(train_step.init_state(cfg))
  state["step"] = np.asarray(step, np.int32)
  rng = np.random.default_rng(seed)
  state["teacher"] = jax.tree.map(
      lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), state["teacher"])
  return state


def step_masks(cfg, step, batch_size):
  """The masks and dropout rng `pretrain_step` draws at `step`."""
  mask_rng, dropout_rng = train_step.step_rngs(cfg.seed, step)
  masks = masking.sample_masks(mask_rng, step, config_lib.grid_shape(cfg), batch_size,
                               config_lib.mask(cfg))
  return jax.device_get(masks), dropout_rng


def _rows(x, index):
  """x [B, L, D] (NumPy) at index [B, N] -> [B, N, D] by plain fancy indexing."""
  return x[np.arange(x.shape[0])[:, None], index]


def tokens(cfg, patch_params, spectrogram):
  arch = config_lib.architecture(cfg)
  embed = models.make_patch_embed(arch, config_lib.runtime(cfg))
  return np.asarray(jax.jit(embed.apply)({"params": patch_params}, spectrogram), np.float32)


def reference_targets(cfg, params, teacher, spectrogram, masks):
  """Teacher targets [B, Lt, D] as NumPy, by the config's teacher mode:
  full_grid: the released embedding (`models.encode`) of the whole grid, then gathered;
  targets_only: each example's target tokens alone through the teacher, at their own
  grid positions."""
  arch, runtime = config_lib.architecture(cfg), config_lib.runtime(cfg)
  encoder_params = models.encoder_params(params, teacher)
  if cfg.teacher_mode == "full_grid":
    full = jax.jit(functools.partial(models.encode, arch, runtime=runtime))(
        encoder_params, spectrogram)
    return _rows(np.asarray(full, np.float32), np.asarray(masks.target))
  toks = tokens(cfg, encoder_params["patch_embed"], spectrogram)
  encoder = models.make_encoder(arch, config_lib.grid_shape(cfg), runtime)
  body = {"params": {"blocks": encoder_params["blocks"], "norm": encoder_params["norm"]}}
  run = jax.jit(encoder.apply)
  out = []
  for b, index in enumerate(np.asarray(masks.target)):
    out.append(np.asarray(run(body, toks[b:b + 1, index], index[None]), np.float32)[0])
  return np.stack(out)


def student_loss_fn(cfg, spectrogram, masks, targets, dropout_rng):
  """params -> loss of the student branch against `targets`: constant NumPy targets, or
  a function params -> targets (to differentiate through a teacher on purpose)."""
  arch, runtime = config_lib.architecture(cfg), config_lib.runtime(cfg)
  grid = config_lib.grid_shape(cfg)
  context_index = jnp.asarray(masks.context)
  target_index = jnp.asarray(masks.target)
  rows = jnp.arange(spectrogram.shape[0])[:, None]
  if not callable(targets):
    targets = functools.partial(lambda t, _: t, np.asarray(targets, np.float32))

  def loss(params):
    toks = models.make_patch_embed(arch, runtime).apply({"params": params["patch_embed"]},
                                                        spectrogram)
    student = models.make_encoder(arch, grid, runtime, deterministic=False)
    context = student.apply({"params": params["student"]}, toks[rows, context_index],
                            context_index, rngs={"dropout": dropout_rng})
    predictor = models.make_predictor(arch, config_lib.predictor_size(cfg), grid, runtime,
                                      deterministic=False)
    pred = predictor.apply({"params": params["predictor"]}, context, context_index,
                           target_index, rngs={"dropout": dropout_rng})
    return objectives.latent_loss(pred, targets(params), cfg.loss)
  return loss


def live_teacher_targets(cfg, teacher, spectrogram, masks):
  """params -> targets-only teacher targets computed from the params' patch embedding
  with the gradient left ON (what a missing stop-gradient would differentiate)."""
  arch, runtime = config_lib.architecture(cfg), config_lib.runtime(cfg)
  encoder = models.make_encoder(arch, config_lib.grid_shape(cfg), runtime)
  target_index = jnp.asarray(masks.target)
  rows = jnp.arange(spectrogram.shape[0])[:, None]
  body = {"params": {"blocks": teacher["blocks"], "norm": teacher["norm"]}}

  def targets(params):
    toks = models.make_patch_embed(arch, runtime).apply({"params": params["patch_embed"]},
                                                        spectrogram)
    return encoder.apply(body, toks[rows, target_index], target_index)
  return targets


def step_fn(cfg):
  """The real step, jitted without donation (the tests keep the input state)."""
  return jax.jit(functools.partial(train_step.pretrain_step, cfg=cfg))


def feature_std(features):
  """NumPy: per-dimension std over all tokens of [B, N, D], averaged over D."""
  flat = np.asarray(features, np.float64).reshape(-1, np.shape(features)[-1])
  return flat.std(axis=0).mean()


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (loops, remat, custom rules)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from equations(sub)
