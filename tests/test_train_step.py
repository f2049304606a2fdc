"""The jitted train step: sharding invariance, learning, no recompiles, schedules, losses."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pupujepa_jax import config as config_lib
from pupujepa_jax import objectives, optim, sharding, train_step
from tests import step_reference as ref
from tests import test_objectives

SMOKE = "experiments/pupujepa.py:smoke"


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return {"spectrogram": rng.standard_normal(
      (cfg.data.batch_size, cfg.model.crop_frames, cfg.frontend.n_mels)).astype(np.float32)}


def _structured_batch(cfg, seed=0):
  """Smooth spectrogram-like images: hidden patches are predictable from visible ones."""
  rng = np.random.default_rng(seed)
  t = np.linspace(0, 1, cfg.model.crop_frames)[:, None]
  f = np.linspace(0, 1, cfg.frontend.n_mels)[None, :]
  images = []
  for _ in range(cfg.data.batch_size):
    a, b, c = rng.uniform(1, 4, 3)
    images.append(np.sin(2 * np.pi * (a * t + rng.uniform())) * np.cos(2 * np.pi * b * f)
                  + np.sin(2 * np.pi * c * (t + f)))
  return {"spectrogram": np.stack(images).astype(np.float32)}


def _run(cfg, mesh, steps, batch):
  state = train_step.create_sharded_state(cfg, mesh)
  step_fn = train_step.make_train_step(cfg, mesh)
  metrics = []
  for _ in range(steps):
    state, m = step_fn(state, sharding.global_batch(batch, mesh))
    metrics.append(jax.tree.map(float, m))
  return jax.device_get(state), metrics, step_fn


def test_one_device_and_eight_devices_agree():
  cfg = config_lib.load_config(SMOKE)
  cfg.mesh.fsdp = 2
  cfg.optim.warmup_steps = 1  # every step after the first updates params and teacher
  batch = _batch(cfg)
  one = sharding.make_mesh(1, 1, jax.devices()[:1])
  eight = sharding.make_mesh(4, 2)
  steps = 4
  state1, metrics1, _ = _run(cfg, one, steps, batch)
  state8, metrics8, _ = _run(cfg, eight, steps, batch)
  for m1, m8 in zip(metrics1, metrics8):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  # The updates (final - initial) agree to 1% of the largest update, for the params and
  # for the teacher: a side that skipped its optimizer or EMA update differs by 100%.
  # (Not 1e-5: Adam divides by sqrt(v) + 1e-8, so for gradients near 1e-8 the float32
  # summation-order differences between 1 and 8 devices become a fraction of an update.)
  init = jax.device_get(train_step.init_state(cfg))
  scales = {}
  for part in ("params", "teacher"):
    delta1 = [a - s for a, s in zip(jax.tree.leaves(state1[part]), jax.tree.leaves(init[part]))]
    delta8 = [b - s for b, s in zip(jax.tree.leaves(state8[part]), jax.tree.leaves(init[part]))]
    scales[part] = max(np.abs(d).max() for d in delta1)
    worst = max(np.abs(d1 - d8).max() for d1, d8 in zip(delta1, delta8))
    assert worst <= 0.01 * scales[part], (part, worst, scales[part])
  # Measured: params move ~3e-3 (3 Adam steps at lr 1e-3), the teacher ~2e-5 (EMA 0.996).
  assert scales["params"] > cfg.optim.lr and scales["teacher"] > 1e-3 * scales["params"]


def test_params_are_fsdp_sharded_on_the_mesh():
  cfg = config_lib.load_config(SMOKE)
  cfg.mesh.fsdp = 2
  mesh = sharding.make_mesh(4, 2)
  state = train_step.create_sharded_state(cfg, mesh)
  qkv = state["params"]["student"]["blocks"]["attn"]["qkv"]["kernel"]
  assert "fsdp" in tuple(qkv.sharding.spec)
  assert qkv.addressable_shards[0].data.size == qkv.size // 2
  teacher_qkv = state["teacher"]["blocks"]["attn"]["qkv"]["kernel"]
  assert teacher_qkv.sharding == qkv.sharding
  bias = state["params"]["student"]["norm"]["bias"]
  assert bias.sharding.is_fully_replicated


@pytest.mark.slow
def test_tiny_model_learns_a_fixed_batch_without_collapse():
  cfg = config_lib.load_config(SMOKE)
  # 400 steps: with the released layout (the teacher reads the student's patch embedding,
  # a moving input) the loss halves between steps 300 and 400 (0.52x at 300, measured).
  cfg.total_steps = 400
  cfg.optim.update(lr=2e-3, warmup_steps=20)
  batch = _structured_batch(cfg, seed=1)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  _, metrics, _ = _run(cfg, mesh, cfg.total_steps, batch)
  first = np.mean([m["loss"] for m in metrics[:5]])
  last = np.mean([m["loss"] for m in metrics[-10:]])
  assert last <= 0.5 * first, (first, last)
  # Collapse alarm: teacher features keep per-dimension spread across tokens.
  assert min(m["teacher_std"] for m in metrics[-10:]) > 0.05


def test_no_recompilation_across_steps_and_strategies():
  cfg = config_lib.load_config(SMOKE)
  cfg.mask.probs = (0.34, 0.33, 0.33)
  mesh = sharding.make_mesh(8, 1)
  _, metrics, step_fn = _run(cfg, mesh, 8, _batch(cfg))
  assert len({m["mask_strategy"] for m in metrics}) >= 2
  assert step_fn._cache_size() == 1


@pytest.mark.parametrize("overrides", [
    dict(compute_dtype="bfloat16", remat="dots"),
    dict(teacher_mode="full_grid", loss="normalized_mse"),
    dict(loss="mse", model=dict(pos_embed="sincos", drop_path=0.1, layer_scale=0.1)),
])
def test_variants_of_the_step_run_and_stay_finite(overrides):
  cfg = ref.smoke_cfg(**overrides)
  config_lib.validate(cfg, 8)
  _, metrics, _ = _run(cfg, sharding.make_mesh(8, 1), 2, _batch(cfg))
  assert all(np.isfinite(m["loss"]) for m in metrics)
  if cfg.compute_dtype == "bfloat16":
    state = train_step.create_sharded_state(cfg, sharding.make_mesh(8, 1))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))


def test_losses():
  rng = np.random.default_rng(0)
  target = rng.standard_normal((2, 5, 16)).astype(np.float32) * 3 + 1
  normed = objectives.layer_norm(target)
  np.testing.assert_allclose(np.asarray(normed).mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(normed).std(-1), 1, atol=1e-3)
  assert float(objectives.latent_loss(normed, target, "smooth_l1")) < 1e-6
  assert float(objectives.latent_loss(normed, target, "mse")) < 1e-6
  assert float(objectives.latent_loss(target * 2, target, "normalized_mse")) < 1e-6
  assert abs(float(objectives.latent_loss(-target, target, "normalized_mse")) - 4.0) < 1e-5
  # smooth-L1 with beta 1: quadratic below 1, linear above.
  assert np.isclose(float(objectives.smooth_l1(jnp.array([0.5]), jnp.array([0.0]))), 0.125)
  assert np.isclose(float(objectives.smooth_l1(jnp.array([3.0]), jnp.array([0.0]))), 2.5)


def test_schedules_and_decay_mask():
  cfg = config_lib.load_config("experiments/pupujepa.py:steps=1000")
  cfg.optim.update(lr=1e-3, warmup_steps=100, min_lr=1e-6)
  lr, wd, ema = optim.learning_rate(cfg), optim.weight_decay(cfg), optim.ema_momentum(cfg)
  assert float(lr(0)) == 0.0 and np.isclose(float(lr(100)), 1e-3)
  assert np.isclose(float(lr(1000)), 1e-6) and float(lr(50)) < float(lr(100))
  assert np.isclose(float(wd(0)), 0.04) and np.isclose(float(wd(1000)), 0.4)
  assert np.isclose(float(wd(500)), 0.22, atol=1e-6)
  assert np.isclose(float(ema(0)), 0.996) and np.isclose(float(ema(1000)), 1.0)
  state = jax.eval_shape(functools.partial(train_step.init_state, cfg))
  mask = optim.decay_mask(state["params"])
  enc = mask["student"]
  assert enc["blocks"]["attn"]["qkv"]["kernel"] and mask["patch_embed"]["proj"]["kernel"]
  assert not enc["blocks"]["attn"]["qkv"]["bias"]
  assert not enc["blocks"]["norm1"]["scale"]
  assert not mask["predictor"]["mask_token"]


@pytest.mark.parametrize("field,value,message", [
    ("model.crop_frames", 1022, "model.crop_frames"),
    ("model.patch_freq", 48, "frontend.n_mels"),
    ("mask.strategy", "stripes", "mask.strategy"),
    ("loss", "l2", "loss"),
])
def test_bad_configs_name_the_field(field, value, message):
  cfg = config_lib.load_config(SMOKE)
  group, _, key = field.rpartition(".")
  (cfg[group] if group else cfg)[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg, 8)


def test_unknown_variant_key_and_mesh_errors():
  with pytest.raises(ValueError, match="variant"):
    config_lib.load_config("experiments/pupujepa.py:variant=gigantic")
  cfg = config_lib.load_config(SMOKE)
  cfg.model.unknown_field = 3
  with pytest.raises(config_lib.ConfigError, match="model.unknown_field"):
    config_lib.validate(cfg)
  cfg = config_lib.load_config(SMOKE)
  cfg.data.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match="batch_size"):
    config_lib.validate(cfg, 8)


# --------------------------------------------- step variants against a second path (issue 15)


def _predict_and_target(cfg, state, spectrogram, masks, dropout_rng=None):
  fn = jax.jit(lambda p, t, s, m, r: train_step.predict_and_target(cfg, p, t, s, m, r))
  return fn(state["params"], state["teacher"], spectrogram, masks, dropout_rng)


def _step_loss_and_grads(cfg, state, spectrogram, masks, dropout_rng):
  """(loss, grads) of the loss `pretrain_step` differentiates."""
  def loss(params):
    pred, targets = train_step.predict_and_target(cfg, params, state["teacher"], spectrogram,
                                                  masks, dropout_rng)
    return objectives.latent_loss(pred, targets, cfg.loss)
  return jax.jit(jax.value_and_grad(loss))(state["params"])


def test_teacher_modes_match_a_second_path_and_differ():
  """full_grid == the released embedding of the whole grid, then gathered; targets_only
  == the teacher on each example's target tokens alone. The real step's logged loss and
  teacher_std are recomputed in NumPy from those targets. The two modes differ (in
  full_grid the targets attend to the context tokens too)."""
  targets = {}
  for mode in ("targets_only", "full_grid"):
    cfg = ref.smoke_cfg(teacher_mode=mode)
    state = ref.start_state(cfg, step=5)
    spectrogram = ref.batch(cfg)["spectrogram"]
    masks, dropout_rng = ref.step_masks(cfg, state["step"], spectrogram.shape[0])
    want = ref.reference_targets(cfg, state["params"], state["teacher"], spectrogram, masks)
    pred, got = jax.device_get(_predict_and_target(cfg, state, spectrogram, masks))
    # Measured bit-identical on CPU (features of std 1.0); 1e-5 leaves room for another
    # backend's summation order and is 35000x below the gap between the modes.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=mode)
    _, metrics = jax.device_get(ref.step_fn(cfg)(state, {"spectrogram": spectrogram}))
    np.testing.assert_allclose(metrics["teacher_std"],
                               want.reshape(-1, want.shape[-1]).astype(np.float64)
                               .std(0).mean(), rtol=1e-5, err_msg=mode)
    # drop_path is 0 in smoke: the training forward equals the evaluation one.
    np.testing.assert_allclose(metrics["loss"], test_objectives._np_loss(cfg.loss, pred, want),
                               rtol=1e-5, err_msg=mode)
    targets[mode] = want
  gap = np.abs(targets["full_grid"] - targets["targets_only"]).max()
  assert gap > 0.05, gap  # measured 0.36 (features of std 1.0)


def test_bf16_compute_matches_float32_and_keeps_float32_state():
  cfg32 = ref.smoke_cfg()
  cfg16 = ref.smoke_cfg(compute_dtype="bfloat16")
  state = ref.start_state(cfg32, step=5)
  spectrogram = ref.batch(cfg32)["spectrogram"]
  new32, m32 = jax.device_get(ref.step_fn(cfg32)(state, {"spectrogram": spectrogram}))
  new16, m16 = jax.device_get(ref.step_fn(cfg16)(state, {"spectrogram": spectrogram}))
  # One step from the same state and batch. Measured relative differences: loss 4.6e-4,
  # grad norm 2.1e-2 (bfloat16 keeps 8 significant bits, 4e-3 per rounding; the backward
  # pass compounds them). Bounds ~4x the measurements.
  rel_loss = abs(m16["loss"] - m32["loss"]) / m32["loss"]
  rel_grad = abs(m16["grad_norm"] - m32["grad_norm"]) / m32["grad_norm"]
  assert rel_loss < 2e-3 and rel_grad < 8e-2, (rel_loss, rel_grad)
  # bf16 is really in effect (the predictions are bfloat16 and the loss moved) ...
  masks, _ = ref.step_masks(cfg16, state["step"], spectrogram.shape[0])
  pred, targets = _predict_and_target(cfg16, state, spectrogram, masks)
  assert pred.dtype == jnp.bfloat16 and targets.dtype == jnp.bfloat16
  assert rel_loss > 1e-6
  # ... while params, teacher and optimizer state stay float32 after the step (all but
  # Adam's integer count).
  for part in ("params", "teacher", "opt_state"):
    dtypes = {x.dtype for x in jax.tree.leaves(new16[part])
              if not np.issubdtype(x.dtype, np.integer)}
    assert dtypes == {np.dtype(np.float32)}, (part, dtypes)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_loss_and_gradients_of_no_remat(remat):
  """With drop-path on (0.5 at the last block), so the recomputed forward must also
  redraw the same drop masks."""
  base = ref.smoke_cfg(model=dict(drop_path=0.5))
  cfg = ref.smoke_cfg(model=dict(drop_path=0.5), remat=remat)
  state = ref.start_state(base, step=5)
  spectrogram = ref.batch(base)["spectrogram"]
  masks, dropout_rng = ref.step_masks(base, state["step"], spectrogram.shape[0])
  loss0, grads0 = _step_loss_and_grads(base, state, spectrogram, masks, dropout_rng)
  loss1, grads1 = _step_loss_and_grads(cfg, state, spectrogram, masks, dropout_rng)
  # Measured: identical to the bit. A tolerance of float32 round-off all the same.
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
  for path, g1, g0 in zip(jax.tree_util.tree_leaves_with_path(grads1),
                          jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path[0]))
  # The comparison has teeth: the drop masks matter. Another dropout key changes the
  # last student block's gradients (an example whose block is dropped contributes none)
  # by far more than the tolerance above (measured 3.2e-3, on gradients up to 4.8e-3).
  _, grads2 = _step_loss_and_grads(base, state, spectrogram, masks,
                                   jax.random.fold_in(dropout_rng, 1))
  last = lambda g: jax.tree.map(lambda x: np.asarray(x)[-1], g["student"]["blocks"])
  assert ref.max_abs_diff(last(grads2), last(grads0)) > 1e-4
  # ... and remat is really applied: the forward program holds `remat` equations, and
  # none without remat.
  def loss(c):
    return lambda p: objectives.latent_loss(*train_step.predict_and_target(
        c, p, state["teacher"], spectrogram, masks, dropout_rng), c.loss)
  program = lambda c: str(jax.make_jaxpr(loss(c))(state["params"]))
  assert "remat" in program(cfg) and "remat" not in program(base)
  # ... and its policy holds: "dots" recomputes none of the matmuls in the backward pass
  # (the Linears' without batch axes, the blockwise attention's batched ones), "full"
  # both kinds.
  def dots_in_gradient(c):
    return _dots(jax.make_jaxpr(jax.grad(loss(c)))(state["params"]).jaxpr)
  no_remat, with_remat = dots_in_gradient(base), dots_in_gradient(cfg)
  if remat == "dots":
    assert with_remat == no_remat
  else:
    recomputed = {kind: with_remat[kind] - no_remat[kind] for kind in no_remat}
    assert all(n > 0 for n in recomputed.values()), recomputed


def _dots(jaxpr) -> dict[str, int]:
  """dot_general equations without and with batch axes in a jaxpr and every jaxpr inside."""
  count = {"batchless": 0, "batched": 0}
  for eqn in ref.equations(jaxpr):
    if eqn.primitive.name == "dot_general":
      batched = eqn.params["dimension_numbers"][1] != ((), ())
      count["batched" if batched else "batchless"] += 1
  return count


def test_step_keeps_the_teacher_sharded_like_the_student():
  """FSDP: the compiled step's outputs put every teacher leaf where the matching student
  leaf is (and where the next step's inputs expect it), and a state whose teacher is
  replicated is refused rather than silently run."""
  cfg = config_lib.load_config(SMOKE)
  cfg.mesh.fsdp = 2
  mesh = sharding.make_mesh(4, 2)
  step_fn = train_step.make_train_step(cfg, mesh)
  state = train_step.create_sharded_state(cfg, mesh)
  batch = sharding.global_batch(_batch(cfg), mesh)
  out = step_fn.lower(state, batch).compile().output_shardings[0]
  expected = train_step.state_shardings(cfg, mesh)["teacher"]
  student = {k: out["params"]["student"][k] for k in ("blocks", "norm")}

  def same(t, s, e, x):
    return t.is_equivalent_to(s, x.ndim) and t.is_equivalent_to(e, x.ndim)
  agree = jax.tree.map(same, out["teacher"], student, expected,
                       train_step.abstract_state(cfg)["teacher"])
  assert all(jax.tree.leaves(agree)), agree
  split = [not t.is_fully_replicated for t in jax.tree.leaves(out["teacher"])]
  assert sum(split) >= 4  # qkv, proj, fc1, fc2 kernels at least are split over fsdp
  # The arrays a real step returns follow: half of the teacher's qkv kernel per device.
  new, _ = step_fn(state, batch)
  qkv = new["teacher"]["blocks"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.is_equivalent_to(
      new["params"]["student"]["blocks"]["attn"]["qkv"]["kernel"].sharding, qkv.ndim)
  assert qkv.addressable_shards[0].data.size == qkv.size // 2
  # A replicated teacher does not match the step's input shardings: refused.
  new["teacher"] = jax.device_put(new["teacher"], sharding.replicated(mesh))
  with pytest.raises(ValueError, match="does not match"):
    step_fn(new, batch)
