"""The latent losses against their formulas written here in NumPy (float64), on random
arrays whose prediction errors fall on both sides of the smooth-L1 beta and whose targets
include a near-constant token, where the LayerNorm eps decides the value."""
import jax.numpy as jnp
import numpy as np
import pytest

from pupujepa_jax import objectives

EPS = 1e-5  # torch F.layer_norm's default eps (SPEC section 3 and 5)


def _np_layer_norm(x, eps=EPS):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


def _np_smooth_l1(pred, target, beta=1.0):
  d = np.abs(pred - target)
  return np.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta).mean()


def _np_loss(kind, pred, target, eps=EPS):
  pred, target = pred.astype(np.float64), target.astype(np.float64)
  if kind == "smooth_l1":
    return _np_smooth_l1(pred, _np_layer_norm(target, eps))
  if kind == "mse":
    return ((pred - _np_layer_norm(target, eps)) ** 2).mean()
  # normalized_mse: 2 - 2 cos(pred, target) per token, averaged
  cos = (pred * target).sum(-1) / (np.linalg.norm(pred, axis=-1)
                                   * np.linalg.norm(target, axis=-1))
  return (2.0 - 2.0 * cos).mean()


def _arrays(seed=0):
  """pred, target [3, 9, 24] float32. Target tokens have random offsets and scales; token
  (0, 0) is near-constant (std 3e-3, variance ~1e-5 = eps), so the eps matters there.
  Predictions are the normed targets plus errors spread over [0, 3] (half above beta=1)."""
  rng = np.random.default_rng(seed)
  shape = (3, 9, 24)
  target = (rng.standard_normal(shape) * rng.uniform(0.5, 4, shape[:2] + (1,))
            + rng.uniform(-3, 3, shape[:2] + (1,)))
  target[0, 0] = 0.7 + 3e-3 * rng.standard_normal(shape[-1])
  error = rng.uniform(0, 3, shape) * rng.choice([-1.0, 1.0], shape)
  pred = _np_layer_norm(target) + error
  return pred.astype(np.float32), target.astype(np.float32)


def test_test_arrays_exercise_both_smooth_l1_branches_and_the_eps():
  pred, target = _arrays()
  diff = np.abs(pred.astype(np.float64) - _np_layer_norm(target.astype(np.float64)))
  assert 0.25 < (diff < 1.0).mean() < 0.75
  # eps 1e-5 vs 1e-6 moves the near-constant token's normed values by ~2x, and the loss by
  # ~1e-3 relative (measured 9.3e-4 for smooth-L1): 100x the 1e-5 tolerance used below.
  for kind in ("smooth_l1", "mse"):
    a, b = _np_loss(kind, pred, target), _np_loss(kind, pred, target, eps=1e-6)
    assert abs(a - b) / a > 1e-4, kind


def test_layer_norm_matches_numpy():
  _, target = _arrays()
  np.testing.assert_allclose(np.asarray(objectives.layer_norm(target)),
                             _np_layer_norm(target.astype(np.float64)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["smooth_l1", "mse", "normalized_mse"])
def test_latent_loss_matches_its_numpy_formula(kind):
  pred, target = _arrays()
  got = float(objectives.latent_loss(jnp.asarray(pred), jnp.asarray(target), kind))
  want = _np_loss(kind, pred, target)
  # float32 sums of 648 terms against float64: ~1e-7 relative; 1e-5 leaves room.
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # bfloat16 inputs are upcast to float32 before the loss (it is always a float32 scalar).
  got16 = objectives.latent_loss(jnp.asarray(pred, jnp.bfloat16),
                                 jnp.asarray(target, jnp.bfloat16), kind)
  assert got16.dtype == jnp.float32


def test_smooth_l1_hand_values_at_and_around_beta():
  pred = jnp.array([0.0, 0.5, 0.999, 1.0, 1.5, -3.0])
  got = np.asarray([float(objectives.smooth_l1(p[None], jnp.zeros(1))) for p in pred])
  # 0.5 d^2 below 1, d - 0.5 from 1 on (continuous at d = 1).
  np.testing.assert_allclose(got, [0.0, 0.125, 0.5 * 0.999 ** 2, 0.5, 1.0, 2.5], rtol=1e-6)


def test_smooth_l1_with_another_beta_matches_numpy():
  # beta enters both branches (0.5 d^2 / beta below, d - 0.5 beta above): at beta 1 a
  # branch that forgot it would still pass the tests above.
  pred, target = _arrays(seed=1)
  for beta in (0.5, 2.0):
    got = float(objectives.smooth_l1(jnp.asarray(pred), jnp.asarray(target), beta=beta))
    np.testing.assert_allclose(got, _np_smooth_l1(pred.astype(np.float64),
                                                  target.astype(np.float64), beta), rtol=1e-5)
