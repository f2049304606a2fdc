"""Scores with the power to decide: metrics over clip outputs, bootstrap intervals, paired
comparisons and chance levels (the statistics of `make demo`'s report).

Every statistic starts from clip outputs (the probe's per-clip logits, scores or
predictions, chunks already averaged) and the clips' targets:

- `main_metric` is the task's main metric (accuracy, macro ROC-AUC, mean R^2, the MIREX
  weighted key score) computed with clip weights, vectorised over bootstrap resamples and
  over leading axes (probe seeds, layers). Unit weights give the plain metric, and
  bootstrap counts give the metric of the resampled test set without building it.
- `summarize`: mean +- standard deviation over probe seeds, and a percentile bootstrap
  interval (over test clips) of the seed-mean score: each resample draws clips with
  replacement, scores every seed's predictions on it and averages over the seeds, so the
  interval is about the number the table shows (the seed mean), and its width holds both
  the test set's sampling noise and (through the mean) the seeds' spread.
- `compare`: the paired bootstrap of A's minus B's seed-mean score, on the same resamples
  for both. A beats B only when the two-sided interval of the difference excludes 0;
  otherwise the verdict is a tie.
- `chance_level`: 1/classes for accuracy, 0.5 for ROC-AUC, 0 for R^2 (the train-mean
  predictor), and for the key score the mean score of a shuffled copy of the test labels
  predicting the labels (it depends on the class balance and on which keys are related).

NumPy only; the one definition of the main metric that the probe (validation, early
stopping, layer choice) and the report use.
"""
from __future__ import annotations

import functools

import numpy as np

MAIN_METRIC = {"multiclass": "accuracy", "multilabel": "roc_auc", "regression": "r2",
               "key": "weighted_score"}
TASKS = tuple(MAIN_METRIC)
N_BOOT = 1000
LEVEL = 0.95
# Differences within float rounding of zero are no difference (identical predictions).
_TOLERANCE = 1e-9


@functools.lru_cache(maxsize=1)
def key_score_matrix() -> np.ndarray:
  """[ref, est] -> mir_eval.key.weighted_score over the 24 keys (12 majors, 12 minors)."""
  import mir_eval  # The key task's scores come from mir_eval itself.
  from pupujepa_jax import labels
  matrix = np.asarray([[mir_eval.key.weighted_score(r, e) for e in labels.KEY_CLASSES]
                       for r in labels.KEY_CLASSES])
  matrix.setflags(write=False)
  return matrix


# --------------------------------------------------------------------------- metrics

def _weights(weights, n: int) -> tuple[np.ndarray, bool]:
  if weights is None:
    return np.ones((1, n)), True
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 2 or weights.shape[1] != n:
    raise ValueError(f"weights must be [resamples, {n}], got {weights.shape}")
  return weights, False


def _weighted_mean(per_clip: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """per_clip [..., n], weights [B, n] -> [B, ...]."""
  return np.einsum("bn,...n->b...", weights, per_clip) / weights.sum(1).reshape(
      (-1,) + (1,) * (per_clip.ndim - 1))


def _r2(pred: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Mean over targets of the weighted R^2; pred [..., n, T], targets [n, T] -> [B, ...]."""
  total = weights.sum(1)[:, None]                              # [B, 1]
  y_mean = weights @ targets / total                           # [B, T]
  ss_tot = weights @ targets ** 2 - total * y_mean ** 2        # [B, T]
  ss_res = np.einsum("bn,...nt->b...t", weights, (pred - targets) ** 2)
  ss_tot = ss_tot.reshape((ss_tot.shape[0],) + (1,) * (pred.ndim - 2) + (-1,))
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.mean(1.0 - ss_res / ss_tot, axis=-1)


def _auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Weighted ROC-AUC of one class: P(score of a positive > score of a negative), ties
  counting one half, each pair weighted by its clips' weights. scores, positive [n];
  weights [B, n] -> [B] (NaN where a resample lacks positives or negatives)."""
  order = np.argsort(scores, kind="stable")
  s, pos, w = scores[order], positive[order], weights[:, order]
  neg_w = np.where(pos, 0.0, w)
  cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(neg_w, axis=1)], axis=1)
  lo = np.searchsorted(s, s, side="left")
  hi = np.searchsorted(s, s, side="right")
  below_or_tied = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])  # [B, n]
  num = np.sum(np.where(pos, w * below_or_tied, 0.0), axis=1)
  den = np.sum(np.where(pos, w, 0.0), axis=1) * neg_w.sum(1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(den > 0, num / den, np.nan)


def _macro_auc(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Macro ROC-AUC over the classes with both outcomes present; scores [..., n, C]."""
  lead = scores.shape[:-2]
  flat = scores.reshape((-1,) + scores.shape[-2:])
  out = np.empty((len(weights), len(flat)))
  positive = np.asarray(targets) > 0.5
  for i, s in enumerate(flat):
    per_class = np.stack([_auc(s[:, c], positive[:, c], weights)
                          for c in range(s.shape[1])], axis=1)
    with np.errstate(invalid="ignore"):
      valid = ~np.isnan(per_class)
      out[:, i] = np.where(valid.any(1), np.nansum(per_class, 1) / np.maximum(
          valid.sum(1), 1), np.nan)
  return out.reshape((len(weights),) + lead)


def main_metric(task: str, outputs, targets, weights=None) -> np.ndarray:
  """The task's main metric of clip outputs, per resample and per leading index.

  Args:
    task: one of TASKS (the probe's task types).
    outputs: [..., n, C] clip logits or scores (multiclass, key, multilabel) or
      [..., n, T] predictions (regression); leading axes are e.g. seeds or layers.
    targets: [n] class indices (multiclass; key: indices into labels.KEY_CLASSES),
      [n, C] multi-hot (multilabel) or [n, T] values (regression).
    weights: None, or [B, n] non-negative clip weights (bootstrap counts).

  Returns:
    float array [...] when weights is None, else [B, ...]. Accuracy and the key score
    are weighted means of a per-clip score; R^2 uses weighted sums of squares; ROC-AUC
    the weighted Mann-Whitney statistic (macro over classes with positives and negatives
    in the resample, as `probe.metrics_for`).
  """
  outputs = np.asarray(outputs, np.float64)
  n = outputs.shape[-2]
  w, squeeze = _weights(weights, n)
  if task in ("multiclass", "key"):
    pred = outputs.argmax(-1)
    targ = np.asarray(targets).astype(np.int64)
    per_clip = (pred == targ).astype(np.float64) if task == "multiclass" else \
        key_score_matrix()[targ, pred]
    out = _weighted_mean(per_clip, w)
  elif task == "multilabel":
    out = _macro_auc(outputs, targets, w)
  elif task == "regression":
    targ = np.asarray(targets, np.float64).reshape(n, -1)
    out = _r2(outputs, targ, w)
  else:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  return out[0] if squeeze else out


# ------------------------------------------------------------------------ statistics

def bootstrap_weights(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
  """[n_boot, n] counts of each clip in resamples of n clips drawn with replacement."""
  rng = np.random.default_rng([seed, n])
  return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
  tail = 50.0 * (1.0 - level)
  lo, hi = np.nanpercentile(samples, [tail, 100.0 - tail])
  return [float(lo), float(hi)]


def summarize(task: str, outputs, targets, weights) -> dict:
  """Seed statistics and the bootstrap interval of one model's test outputs.

  Args:
    outputs: [S, n, C] clip outputs of S probe seeds on the same n test clips.
    weights: [B, n] bootstrap counts (`bootstrap_weights`); pass the same ones to every
      model of a task so their intervals (and `compare`) see the same resamples.

  Returns:
    {"mean", "std" (over seeds, ddof 1; 0 for one seed), "seeds": per-seed scores,
     "ci": [lo, hi] percentile interval of the seed-mean score, "level", "n_clips",
     "n_boot"}.
  """
  outputs = np.asarray(outputs)
  per_seed = main_metric(task, outputs, targets)
  boot = np.nanmean(main_metric(task, outputs, targets, weights), axis=1)
  return {"mean": float(np.mean(per_seed)),
          "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
          "seeds": [float(v) for v in per_seed], "ci": _interval(boot), "level": LEVEL,
          "n_clips": int(outputs.shape[-2]), "n_boot": int(len(weights))}


def compare(task: str, outputs_a, outputs_b, targets, weights) -> dict:
  """Paired bootstrap of A's minus B's seed-mean score over the same test clips.

  Args:
    outputs_a, outputs_b: [S_a, n, C] and [S_b, n, C] clip outputs (seeds may differ in
      number) on the same n clips in the same order.
    weights: [B, n] bootstrap counts, shared by both (the pairing).

  Returns:
    {"diff": seed-mean A minus seed-mean B, "ci": [lo, hi] of the difference,
     "verdict": "a" (lo > 0), "b" (hi < 0) or "tie", "level"}; a difference within
    float rounding of 0 is a tie.
  """
  diff = np.mean(main_metric(task, outputs_a, targets)) - np.mean(
      main_metric(task, outputs_b, targets))
  boot = (np.nanmean(main_metric(task, outputs_a, targets, weights), axis=1)
          - np.nanmean(main_metric(task, outputs_b, targets, weights), axis=1))
  lo, hi = _interval(boot)
  verdict = "a" if lo > _TOLERANCE else "b" if hi < -_TOLERANCE else "tie"
  return {"diff": float(diff), "ci": [lo, hi], "verdict": verdict, "level": LEVEL}


def chance_level(task: str, targets, n_classes: int | None = None, n_shuffles: int = 1000,
                 seed: int = 0) -> float:
  """The score that carries no information about the clips (see the module doc).

  multiclass: 1 / n_classes; multilabel: 0.5; regression: 0.0; key: the mean, over
  `n_shuffles` random permutations, of the weighted score of the permuted test labels as
  predictions of the test labels.
  """
  if task == "multiclass":
    if not n_classes:
      raise ValueError("multiclass chance needs the number of classes")
    return 1.0 / n_classes
  if task == "multilabel":
    return 0.5
  if task == "regression":
    return 0.0
  if task == "key":
    targ = np.asarray(targets).astype(np.int64)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(targ) for _ in range(n_shuffles)])
    return float(np.mean(key_score_matrix()[targ[None, :], shuffled]))
  raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def format_score(summary: dict, digits: int = 3) -> str:
  """'0.612 ± 0.004 [0.571, 0.650]': seed mean ± seed std [bootstrap interval]."""
  lo, hi = summary["ci"]
  return (f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f} "
          f"[{lo:.{digits}f}, {hi:.{digits}f}]")
