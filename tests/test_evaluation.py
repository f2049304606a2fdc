"""Tests of the statistics of the demo's report (pupujepa_jax/evaluation.py) against
independent computations: scikit-learn and mir_eval metrics, metrics of explicitly
resampled test sets, scipy's bootstrap, the normal approximation and closed forms."""
import mir_eval
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from pupujepa_jax import evaluation as ev
from pupujepa_jax import labels
from pupujepa_jax import probe


def _data(task, n=150, seed=0, lead=()):
  """Fixed outputs [*lead, n, C] that beat chance without being perfect, and targets."""
  rng = np.random.default_rng(seed)
  if task == "multiclass":
    targets = rng.integers(0, 5, n)
    return rng.normal(size=lead + (n, 5)) + 1.2 * np.eye(5)[targets], targets
  if task == "key":
    targets = rng.integers(0, 24, n)
    return rng.normal(size=lead + (n, 24)) + 2.0 * np.eye(24)[targets], targets
  if task == "multilabel":
    targets = (rng.random((n, 6)) < 0.3).astype(np.float32)
    scores = rng.normal(size=lead + (n, 6)) + targets
    # Ties within a class: ROC-AUC counts them as one half.
    return np.round(scores, 1), targets
  targets = rng.normal(size=(n, 2)) * [1.0, 10.0]
  return targets + rng.normal(size=lead + (n, 2)) * [0.7, 6.0], targets


def _reference(task, outputs, targets):
  """The metric of plain arrays by scikit-learn / mir_eval."""
  if task == "multiclass":
    return skm.accuracy_score(targets, outputs.argmax(-1))
  if task == "key":
    return np.mean([mir_eval.key.weighted_score(labels.KEY_CLASSES[t], labels.KEY_CLASSES[p])
                    for t, p in zip(targets, outputs.argmax(-1))])
  if task == "multilabel":
    present = [c for c in range(targets.shape[1]) if 0 < targets[:, c].sum() < len(targets)]
    return skm.roc_auc_score(targets[:, present], outputs[:, present], average="macro")
  return skm.r2_score(targets, outputs, multioutput="uniform_average")


@pytest.mark.parametrize("task", ev.TASKS)
def test_main_metric_equals_scikit_learn_and_mir_eval(task):
  outputs, targets = _data(task, lead=(2, 3))
  got = ev.main_metric(task, outputs, targets)
  assert got.shape == (2, 3)
  want = [[_reference(task, o, targets) for o in row] for row in outputs]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  assert 0.15 < np.min(want) and np.max(want) < 0.95  # neither trivial nor perfect
  # The probe's own metric is the same number.
  metric = ev.MAIN_METRIC[task]
  assert probe.metrics_for(task, outputs[1, 2], targets, None)[metric] == pytest.approx(
      got[1, 2], abs=1e-12)


@pytest.mark.parametrize("task", ev.TASKS)
def test_bootstrap_counts_score_the_resampled_test_set(task):
  outputs, targets = _data(task, n=60, seed=1, lead=(2,))
  weights = ev.bootstrap_weights(60, n_boot=6, seed=3)
  got = ev.main_metric(task, outputs, targets, weights)
  assert got.shape == (6, 2)
  for b, counts in enumerate(weights):
    # The resample built explicitly: clip i repeated counts[i] times.
    idx = np.repeat(np.arange(60), counts.astype(int))
    for s in range(2):
      assert got[b, s] == pytest.approx(_reference(task, outputs[s][idx], targets[idx]),
                                        abs=1e-12)


def test_auc_skips_a_class_a_resample_lacks():
  outputs, targets = _data("multilabel", n=40, seed=2)
  targets[:, 0] = 0.0
  targets[7, 0] = 1.0  # one positive clip in class 0
  weights = np.ones((2, 40))
  weights[1, 7] = 0.0  # resample 1 leaves it out
  got = ev.main_metric("multilabel", outputs, targets, weights)
  assert got[0] == pytest.approx(_reference("multilabel", outputs, targets), abs=1e-12)
  keep = np.arange(40) != 7
  assert got[1] == pytest.approx(_reference("multilabel", outputs[keep], targets[keep]),
                                 abs=1e-12)


def test_bootstrap_weights():
  weights = ev.bootstrap_weights(50, n_boot=400, seed=0)
  assert weights.shape == (400, 50) and np.all(weights.sum(1) == 50)
  np.testing.assert_array_equal(weights, ev.bootstrap_weights(50, n_boot=400, seed=0))
  assert not np.array_equal(weights, ev.bootstrap_weights(50, n_boot=400, seed=1))
  # Each clip is drawn Binomial(50, 1/50) times: mean 1, variance 0.98.
  assert weights.mean() == 1.0
  assert weights.var() == pytest.approx(0.98, abs=0.03)


def test_interval_of_an_accuracy_matches_scipy_and_the_normal_approximation():
  rng = np.random.default_rng(4)
  n = 400
  correct = rng.random(n) < 0.6
  targets = np.zeros(n, int)
  outputs = np.stack([correct, ~correct], axis=-1).astype(float)[None]  # one seed
  summary = ev.summarize("multiclass", outputs, targets, ev.bootstrap_weights(n, 4000, 0))
  p = correct.mean()
  assert summary["mean"] == p and summary["std"] == 0.0 and summary["seeds"] == [p]
  scipy_ci = stats.bootstrap((correct.astype(float),), np.mean, n_resamples=4000,
                             method="percentile", random_state=0).confidence_interval
  np.testing.assert_allclose(summary["ci"], [scipy_ci.low, scipy_ci.high], atol=0.006)
  half = 1.96 * np.sqrt(p * (1 - p) / n)
  np.testing.assert_allclose(summary["ci"], [p - half, p + half], atol=0.006)
  assert summary["n_clips"] == n and summary["n_boot"] == 4000 and summary["level"] == 0.95


def test_summary_over_seeds():
  outputs, targets = _data("regression", n=120, seed=5, lead=(3,))
  summary = ev.summarize("regression", outputs, targets, ev.bootstrap_weights(120, 500, 0))
  per_seed = [skm.r2_score(targets, o) for o in outputs]
  np.testing.assert_allclose(summary["seeds"], per_seed, atol=1e-12)
  assert summary["mean"] == pytest.approx(np.mean(per_seed))
  assert summary["std"] == pytest.approx(np.std(per_seed, ddof=1))
  lo, hi = summary["ci"]
  assert lo < summary["mean"] < hi
  assert ev.format_score(summary) == (f"{np.mean(per_seed):.3f} ± "
                                      f"{np.std(per_seed, ddof=1):.3f} [{lo:.3f}, {hi:.3f}]")


def test_paired_comparison():
  rng = np.random.default_rng(6)
  n = 300
  targets = rng.integers(0, 3, n)
  correct_a = rng.random(n) < 0.7
  correct_b = correct_a.copy()
  correct_b[np.flatnonzero(correct_a)[:8]] = False  # B: A with 8 clips wrong (-0.027)

  def outputs(correct):
    wrong = (targets + 1) % 3
    return np.eye(3)[np.where(correct, targets, wrong)][None]

  weights = ev.bootstrap_weights(n, 2000, 0)
  cmp = ev.compare("multiclass", outputs(correct_a), outputs(correct_b), targets, weights)
  assert cmp["diff"] == pytest.approx(8 / n)
  # Pairing: the same resamples for both, so only the 8 differing clips vary the
  # difference, and A wins although each score's own interval holds the other's mean.
  assert cmp["verdict"] == "a" and cmp["ci"][0] > 0
  alone = ev.summarize("multiclass", outputs(correct_b), targets, weights)
  assert alone["ci"][0] < correct_a.mean() < alone["ci"][1]
  # The bootstrap spread of a paired difference of means: sd(d) / sqrt(n).
  d = correct_a.astype(float) - correct_b
  lo, hi = cmp["ci"]
  assert (hi - lo) / (2 * 1.96) == pytest.approx(d.std() / np.sqrt(n), rel=0.15)
  assert ev.compare("multiclass", outputs(correct_b), outputs(correct_a), targets,
                    weights)["verdict"] == "b"
  same = ev.compare("multiclass", outputs(correct_a), outputs(correct_a)[[0, 0]], targets,
                    weights)
  assert same == {"diff": 0.0, "ci": [0.0, 0.0], "verdict": "tie", "level": 0.95}
  # Random other predictions of the same accuracy: no verdict.
  shuffled = correct_a[rng.permutation(n)]
  assert ev.compare("multiclass", outputs(correct_a), outputs(shuffled), targets,
                    weights)["verdict"] == "tie"


def test_chance_levels():
  assert ev.chance_level("multiclass", None, n_classes=4) == 0.25
  assert ev.chance_level("multilabel", None) == 0.5
  assert ev.chance_level("regression", None) == 0.0
  # Balanced keys: each estimate scores 1 + 0.5 + 0.3 + 0.2 against the 24 references.
  balanced = np.repeat(np.arange(24), 5)
  assert ev.chance_level("key", balanced, n_shuffles=2000) == pytest.approx(2 / 24, abs=0.002)
  # Unbalanced: the expectation over permutations is the mean score over all pairs.
  rng = np.random.default_rng(7)
  keys = rng.choice(24, 90, p=np.r_[np.full(12, 1.5), np.full(12, 0.5)] / 24)
  matrix = np.array([[mir_eval.key.weighted_score(r, e) for e in labels.KEY_CLASSES]
                     for r in labels.KEY_CLASSES])
  closed_form = matrix[keys[:, None], keys[None, :]].mean()
  assert ev.chance_level("key", keys, n_shuffles=4000) == pytest.approx(closed_form,
                                                                       abs=0.003)
  assert abs(closed_form - 2 / 24) > 0.005
  with pytest.raises(ValueError, match="number of classes"):
    ev.chance_level("multiclass", None)
