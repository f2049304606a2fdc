"""The teacher's EMA: the update rule on hand values, and its scope in the real step
(teacher = EMA of the new student's blocks and norm; the predictor never enters it; the
shared patch embedding is trained only through the student branch, or EMA-averaged in
the `teacher_patch_embed="ema"` ablation)."""
import jax
import numpy as np
import optax
import pytest

from pupujepa_jax import objectives, optim, train_step
from tests import step_reference as ref


def test_ema_update_on_hand_values():
  teacher = {"a": np.array([1.0, 2.0], np.float32), "b": {"c": np.float32(10.0)}}
  student = {"a": np.array([3.0, 6.0], np.float32), "b": {"c": np.float32(0.0)}}
  out = optim.ema_update(teacher, student, np.float32(0.75))
  # 0.75 * teacher + 0.25 * student, by hand (exact in binary floating point).
  np.testing.assert_array_equal(np.asarray(out["a"]), [1.5, 3.0])
  assert float(out["b"]["c"]) == 7.5
  # momentum 1 keeps the teacher, momentum 0 copies the student
  assert float(optim.ema_update(teacher, student, 1.0)["b"]["c"]) == 10.0
  np.testing.assert_array_equal(np.asarray(optim.ema_update(teacher, student, 0.0)["a"]),
                                [3.0, 6.0])


# After one step: teacher == m * old_teacher + (1 - m) * new_student, recomputed here in
# float32 NumPy from the step's own outputs. The two float32 evaluations may round
# differently (XLA fuses; measured up to 1 ulp, 1.2e-7 on values in [1, 2)), so each
# element is held to 4 float32 ulps of its terms, |m t| + |(1 - m) s|: ~5e-7 at most here.
# Skipping the update would be off by (1 - m) |student - teacher| ~ 2e-4 (the teacher
# starts 0.05 away from the student), swapping m and 1 - m by ~5e-2.
ULPS = 4 * np.finfo(np.float32).eps


def _assert_ema(got, teacher, student, m):
  for path, g, t, s in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(got),
                           jax.tree.leaves(teacher), jax.tree.leaves(student)):
    t, s = np.asarray(t, np.float32), np.asarray(s, np.float32)
    want = m * t + (np.float32(1) - m) * s
    bound = ULPS * (np.abs(m * t) + np.abs((np.float32(1) - m) * s))
    err = np.abs(np.asarray(g, np.float64) - want)
    assert np.all(err <= bound), (jax.tree_util.keystr(path[0]), err.max())
    # teeth: the update moved this leaf by far more than the bound
    assert np.abs(want - t).max() > 100 * bound.max(), jax.tree_util.keystr(path[0])


@pytest.mark.parametrize("patch_embed", ["shared", "ema"])
def test_step_teacher_is_the_ema_of_the_updated_student(patch_embed):
  cfg = ref.smoke_cfg(teacher_patch_embed=patch_embed)
  state = ref.start_state(cfg, step=5)
  spectrogram = ref.batch(cfg)["spectrogram"]
  new, metrics = jax.device_get(ref.step_fn(cfg)(state, {"spectrogram": spectrogram}))
  # The logged momentum is the linear ramp 0.996 -> 1.0 at step 5 of 200 (by hand).
  m = np.float32(metrics["ema_momentum"])
  np.testing.assert_allclose(m, 0.996 + 0.004 * 5 / cfg.total_steps, rtol=1e-7)
  # Scope: the student's blocks and norm (plus the patch embedding in the ablation),
  # never the predictor; same tree as the student's.
  scope = {"blocks", "norm"} | ({"patch_embed"} if patch_embed == "ema" else set())
  assert set(new["teacher"]) == scope
  student = {"blocks": new["params"]["student"]["blocks"],
             "norm": new["params"]["student"]["norm"]}
  if patch_embed == "ema":
    student["patch_embed"] = new["params"]["patch_embed"]
  assert jax.tree.structure(new["teacher"]) == jax.tree.structure(student)
  _assert_ema(new["teacher"], state["teacher"], student, m)
  # The student itself moved (the EMA is of the updated student, not the old one).
  assert ref.max_abs_diff(new["params"]["student"], state["params"]["student"]) > 1e-4
  # The targets were read through this layout's patch embedding: the logged teacher_std
  # is that of targets computed here with it. In the ablation, targets read through the
  # student's patch embedding instead would differ (measured std 0.9824 vs 0.9683).
  masks, _ = ref.step_masks(cfg, state["step"], spectrogram.shape[0])
  own = ref.reference_targets(cfg, state["params"], state["teacher"], spectrogram, masks)
  np.testing.assert_allclose(metrics["teacher_std"], ref.feature_std(own), rtol=1e-5)
  if patch_embed == "ema":
    shared = {k: v for k, v in state["teacher"].items() if k != "patch_embed"}
    other = ref.reference_targets(cfg, state["params"], shared, spectrogram, masks)
    assert abs(ref.feature_std(other) - ref.feature_std(own)) > 1e-3 * ref.feature_std(own)


def test_patch_embedding_learns_only_through_the_student_branch():
  """The gradient of the step's loss equals the gradient of the student branch alone
  against constant targets (computed in the test), for every param including the shared
  patch embedding; and the step's logged grad norm and loss are those of that gradient."""
  cfg = ref.smoke_cfg()
  state = ref.start_state(cfg, step=5)
  spectrogram = ref.batch(cfg)["spectrogram"]
  masks, dropout_rng = ref.step_masks(cfg, state["step"], spectrogram.shape[0])
  params, teacher = state["params"], state["teacher"]
  targets = ref.reference_targets(cfg, params, teacher, spectrogram, masks)

  def step_loss(p):  # what pretrain_step differentiates
    pred, tgt = train_step.predict_and_target(cfg, p, teacher, spectrogram, masks,
                                              dropout_rng)
    return objectives.latent_loss(pred, tgt, cfg.loss)
  loss, grads = jax.jit(jax.value_and_grad(step_loss))(params)
  student_only = ref.student_loss_fn(cfg, spectrogram, masks, targets, dropout_rng)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(student_only))(params)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  # The patch embedding is trained (a gradient well above round-off) ...
  pe_scale = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(ref_grads["patch_embed"]))
  assert pe_scale > 1e-3
  # ... and only through the student: both gradients agree to float round-off (measured
  # max 6e-8 absolute, on gradients up to 0.8; the patch embedding's are up to 5.5e-3),
  # while the teacher branch, were it differentiated, would add a term 6x larger than
  # the student's own patch-embedding gradient (checked below).
  for path, g, r in zip(jax.tree_util.tree_leaves_with_path(grads),
                        jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-3 * pe_scale,
                               err_msg=jax.tree_util.keystr(path[0]))
  # Teeth: with the teacher's input tokens differentiated (a dropped stop-gradient), the
  # patch-embedding gradient moves by far more than the tolerance above (measured 0.032
  # against a largest student-branch patch-embedding gradient of 0.0055).
  leaky = ref.student_loss_fn(cfg, spectrogram, masks,
                              ref.live_teacher_targets(cfg, teacher, spectrogram, masks),
                              dropout_rng)
  leaky_loss, leaky_grads = jax.jit(jax.value_and_grad(leaky))(params)
  np.testing.assert_allclose(float(leaky_loss), float(ref_loss), rtol=1e-5)
  leak = ref.max_abs_diff(leaky_grads["patch_embed"], ref_grads["patch_embed"])
  assert leak > 0.1 * pe_scale
  # The real step: its logged loss and grad norm are those of the student-only gradient.
  _, metrics = jax.device_get(ref.step_fn(cfg)(state, {"spectrogram": spectrogram}))
  np.testing.assert_allclose(metrics["loss"], float(ref_loss), rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], float(optax.tree.norm(ref_grads)),
                             rtol=1e-4)
