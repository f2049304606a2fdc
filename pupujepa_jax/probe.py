"""MARBLE-protocol probes on exported features, in JAX and optax (SPEC section 7).

Reads a feature folder (SPEC section 6, `pupujepa_jax.features`: `<path>.npy` of shape
[L + 1, n_chunks, D] per audio file, only the files its `meta.json` lists) and a
`labels.csv` (`pupujepa_jax.labels`: columns `path,label,split`), then trains the MARBLE
v2 probe: a layer choice (one layer K, or a learned softmax-weighted sum over all layers),
then an MLP (one hidden layer of 512, ReLU, dropout 0.2) or a strictly linear map; Adam,
ReduceLROnPlateau (factor 0.5, patience 3) and early stopping on the validation metric,
batch 64, an optional learning-rate grid.
Chunks are separate training examples; their outputs are averaged per clip to evaluate.

Tasks: `multiclass` (accuracy), `multilabel` (macro ROC-AUC and AP; `;` separates tags),
`regression` (R^2 per target and mean; `;` separates float targets) and `key` (24-way
multiclass over major/minor keys; accuracy and the MIREX weighted score of mir_eval).

Speed on CPU: all arrays live on the device, one jitted function runs a whole epoch
(`lax.scan` over fixed-shape minibatches of a permuted index array) and one jitted function
predicts a split; the learning rate lives in the optimizer state, so neither recompiles
across epochs or across the learning-rate grid.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import mir_eval
import numpy as np
import optax
from sklearn import metrics as skm

from pupujepa_jax import features, labels

MAIN_METRIC = {"multiclass": "accuracy", "multilabel": "roc_auc", "regression": "r2",
               "key": "weighted_score"}
TASKS = tuple(MAIN_METRIC)
PROBES = ("mlp", "linear")
# The protocol of `make demo` and `pupujepa data baselines`, for every model and feature
# set alike: a few hundred clips need MARBLE's optional learning-rate grid.
SMALL_DATA_PROTOCOL = dict(probe="mlp", layer="all", lr=(1e-3, 5e-3), max_epochs=100,
                           patience=10)
SPLITS = labels.SPLITS
HIDDEN = 512
DROPOUT = 0.2
PLATEAU_FACTOR = 0.5
PLATEAU_PATIENCE = 3
# The 24 key classes, in a fixed order (mir_eval treats enharmonic spellings as equal).
KEY_TONICS = labels.PITCH_CLASSES
KEY_CLASSES = labels.KEY_CLASSES
_STD_FLOOR = 1e-6


# ----------------------------------------------------------------------------- loading

def _read_labels(labels_csv: str) -> list[labels.LabelRow]:
  """Rows of labels.csv (see `labels.read_labels_csv`); every split must have clips."""
  rows = labels.read_labels_csv(labels_csv)
  for split in SPLITS:
    if not any(r.split == split for r in rows):
      raise ValueError(f"{labels_csv}: split {split!r} is empty")
  return rows


def _layer_indices(layer, n_layers: int, source: str) -> list[int]:
  """The layer indices a `layer` argument ("all", K or "K") selects."""
  if layer == "all":
    return list(range(n_layers))
  try:
    k = int(layer)
  except (TypeError, ValueError):
    raise ValueError(f"layer must be 'all' or an integer, got {layer!r}") from None
  if not 0 <= k < n_layers:
    raise ValueError(f"layer {k} out of range: {source} has {n_layers} layers (0..{n_layers - 1})")
  return [k]


def load_split_features(features_dir: str, labels_csv: str, layer="all") -> dict:
  """Loads the features of every labelled clip, grouped by split.

  Args:
    features_dir: a feature folder (`pupujepa_jax.features`): only the files its
      meta.json lists are read.
    labels_csv: csv with columns path,label,split.
    layer: "all", or a layer index K (int or digit string; 0 = patch embedding output).

  Returns:
    {"meta": meta.json contents, "layers": selected layer indices,
     "splits": {split: {"x": float32 [n_chunks_total, n_selected_layers, D],
                        "clip": int32 [n_chunks_total] (clip index within the split),
                        "paths": [str] per clip, "labels": [str] per clip}}}

  Raises:
    ValueError naming the file: a clip not listed in meta.json, a missing file, a shape
    unlike the others, NaN/Inf values.
  """
  rows = _read_labels(labels_csv)
  meta = features.require_meta(features_dir)
  layers, shape_ref = None, None
  parts = {s: {"x": [], "clip": [], "paths": [], "labels": []} for s in SPLITS}
  for row in rows:
    arr = features.read_features(features_dir, row.path, meta)
    feat_path = features.feature_file(features_dir, row.path)
    if shape_ref is None:
      shape_ref = (arr.shape[0], arr.shape[2], feat_path)
      layers = _layer_indices(layer, arr.shape[0], feat_path)
    elif (arr.shape[0], arr.shape[2]) != shape_ref[:2]:
      raise ValueError(f"{feat_path}: shape {arr.shape} disagrees with {shape_ref[2]} "
                       f"([{shape_ref[0]}, n_chunks, {shape_ref[1]}])")
    part = parts[row.split]
    # [layers, chunks, D] -> [chunks, layers, D]: chunks are the examples.
    part["x"].append(np.asarray(arr[layers], dtype=np.float32).transpose(1, 0, 2))
    part["clip"].append(np.full(arr.shape[1], len(part["paths"]), dtype=np.int32))
    part["paths"].append(row.path)
    part["labels"].append(row.label)
  splits = {s: {"x": np.concatenate(p["x"]), "clip": np.concatenate(p["clip"]),
                "paths": p["paths"], "labels": p["labels"]} for s, p in parts.items()}
  return {"meta": meta, "layers": layers, "splits": splits}


# ----------------------------------------------------------------------------- targets

def _key_index(label: str) -> int:
  """Index into KEY_CLASSES of a key label such as "F# minor" or "Db major"."""
  mir_eval.key.validate_key(label)
  tonic, mode = mir_eval.key.split_key_string(label)
  if tonic is None or mode not in ("major", "minor"):
    raise ValueError(f"key label {label!r} is not one of the 24 major/minor keys")
  return tonic + (12 if mode == "minor" else 0)


def encode_targets(task: str, split_labels: dict[str, list[str]]) -> tuple[dict, list[str]]:
  """Per-clip targets for each split, and the class (or target) names.

  multiclass: int class indices (classes from train); key: int indices into
  KEY_CLASSES; multilabel: multi-hot float32 (tags from train); regression: float32
  [n, n_targets]. Unknown classes in valid/test raise ValueError naming class and split.
  """
  if task == "key":
    out = {}
    for split, labs in split_labels.items():
      idx = []
      for lab in labs:
        try:
          idx.append(_key_index(lab.strip()))
        except ValueError as e:
          raise ValueError(f"unknown key class {lab!r} in split {split!r}: {e}") from None
      out[split] = np.asarray(idx, dtype=np.int32)
    return out, list(KEY_CLASSES)
  if task == "regression":
    out, n_targets = {}, None
    for split, labs in split_labels.items():
      try:
        vals = [[float(v) for v in lab.split(labels.LABEL_SEPARATOR)] for lab in labs]
      except ValueError:
        raise ValueError(f"non-numeric regression target in split {split!r}") from None
      for lab, v in zip(labs, vals):
        n_targets = n_targets or len(v)
        if len(v) != n_targets:
          raise ValueError(f"regression label {lab!r} in split {split!r} has {len(v)} "
                           f"targets, expected {n_targets}")
      out[split] = np.asarray(vals, dtype=np.float32)
    return out, [f"target{i}" for i in range(n_targets)]
  if task not in ("multiclass", "multilabel"):
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  split_tags = {s: [[t.strip() for t in lab.split(labels.LABEL_SEPARATOR)]
                    if task == "multilabel"
                    else [lab.strip()] for lab in labs] for s, labs in split_labels.items()}
  classes = sorted({t for tags in split_tags["train"] for t in tags if t})
  index = {c: i for i, c in enumerate(classes)}
  out = {}
  for split, tags_list in split_tags.items():
    for tags in tags_list:
      for t in tags:
        if t and t not in index:
          raise ValueError(f"unknown class {t!r} in split {split!r} (not seen in train)")
    if task == "multiclass":
      out[split] = np.asarray([index[t[0]] for t in tags_list], dtype=np.int32)
    else:
      hot = np.zeros((len(tags_list), len(classes)), dtype=np.float32)
      for i, tags in enumerate(tags_list):
        hot[i, [index[t] for t in tags if t]] = 1.0
      out[split] = hot
  return out, classes


# ----------------------------------------------------------------------------- metrics

@functools.lru_cache(maxsize=1)
def _key_score_matrix() -> np.ndarray:
  """[ref, est] -> mir_eval.key.weighted_score over the 24 key classes."""
  return np.asarray([[mir_eval.key.weighted_score(r, e) for e in KEY_CLASSES]
                     for r in KEY_CLASSES])


def _class_predictions(logits_or_preds) -> np.ndarray:
  arr = np.asarray(logits_or_preds)
  return arr.argmax(-1) if arr.ndim == 2 else arr.astype(np.int64)


def _macro_ranking(fn, targets: np.ndarray, scores: np.ndarray) -> float:
  """Macro average of a per-class ranking metric over classes with both outcomes present."""
  per_class = [fn(targets[:, c], scores[:, c]) for c in range(targets.shape[1])
               if 0 < targets[:, c].sum() < len(targets)]
  return float(np.mean(per_class)) if per_class else float("nan")


def metrics_for(task: str, logits_or_preds, targets, classes) -> dict:
  """Per-clip metrics of a task.

  Args:
    task: one of TASKS.
    logits_or_preds: [n, C] logits/scores (multiclass, key, multilabel), or [n] predicted
      class indices (multiclass, key), or [n, T] / [n] predictions (regression).
    targets: [n] class indices or label strings (multiclass, key), [n, C] multi-hot
      (multilabel), or [n, T] / [n] values (regression).
    classes: class names (key: KEY_CLASSES order); used to map string targets.

  Returns:
    A dict of floats: accuracy (multiclass, key), weighted_score (key), roc_auc and ap
    (multilabel; macro over classes having positives and negatives), r2 (mean over
    targets) and r2_per_target (regression).
  """
  if task in ("multiclass", "key"):
    targ = np.asarray(targets)
    if targ.dtype.kind in "US":
      index = {c: i for i, c in enumerate(classes)}
      unknown = sorted({str(t) for t in targ if t not in index}) if task != "key" else []
      if unknown:
        raise ValueError(f"unknown class(es) {unknown} in targets; classes are {list(classes)}")
      targ = np.asarray([_key_index(t) if task == "key" else index[t] for t in targ])
    pred = _class_predictions(logits_or_preds)
    out = {"accuracy": float(np.mean(pred == targ))}
    if task == "key":
      out["weighted_score"] = float(np.mean(_key_score_matrix()[targ, pred]))
    return out
  if task == "multilabel":
    targ, scores = np.asarray(targets), np.asarray(logits_or_preds, dtype=np.float64)
    return {"roc_auc": _macro_ranking(skm.roc_auc_score, targ, scores),
            "ap": _macro_ranking(skm.average_precision_score, targ, scores)}
  if task == "regression":
    targ = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    pred = np.asarray(logits_or_preds, dtype=np.float64).reshape(targ.shape)
    per = skm.r2_score(targ, pred, multioutput="raw_values")
    return {"r2": float(np.mean(per)), "r2_per_target": [float(v) for v in per]}
  raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ----------------------------------------------------------------------------- model

def _init_params(key, n_layers: int, dim: int, n_out: int, probe: str) -> dict:
  """Layer-mixing logits (uniform start) and the MLP or linear weights."""
  params = {"layer_logits": jnp.zeros((n_layers,), jnp.float32)}
  if probe == "mlp":
    k1, k2 = jax.random.split(key)
    params["w1"] = jax.random.normal(k1, (dim, HIDDEN)) * np.sqrt(2.0 / dim)
    params["b1"] = jnp.zeros((HIDDEN,))
    params["w2"] = jax.random.normal(k2, (HIDDEN, n_out)) * np.sqrt(1.0 / HIDDEN)
  else:
    params["w2"] = jax.random.normal(key, (dim, n_out)) * np.sqrt(1.0 / dim)
  params["b2"] = jnp.zeros((n_out,))
  return params


def _forward(params: dict, x, probe: str, dropout_key=None):
  """x [B, layers, D] -> outputs [B, n_out]; dropout only when dropout_key is given."""
  h = jnp.einsum("bld,l->bd", x, jax.nn.softmax(params["layer_logits"]))
  if probe == "mlp":
    h = jax.nn.relu(h @ params["w1"] + params["b1"])
    if dropout_key is not None:
      keep = jax.random.bernoulli(dropout_key, 1.0 - DROPOUT, h.shape)
      h = jnp.where(keep, h / (1.0 - DROPOUT), 0.0)
  return h @ params["w2"] + params["b2"]


def _loss(out, y, task: str):
  if task in ("multiclass", "key"):
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
  if task == "multilabel":
    return optax.sigmoid_binary_cross_entropy(out, y).mean()
  return jnp.mean((out - y) ** 2)


def _optimizer(lr: float):
  # The learning rate is state, so ReduceLROnPlateau and the grid never recompile.
  return optax.inject_hyperparams(optax.adam)(learning_rate=lr)


@functools.partial(jax.jit, static_argnames=("task", "probe", "batch_size"))
def _train_epoch(params, opt_state, key, x, y, *, task, probe, batch_size):
  """One epoch of minibatch Adam over a permutation of the training chunks."""
  n = x.shape[0]
  steps = -(-n // batch_size)
  perm_key, drop_key = jax.random.split(key)
  perm = jax.random.permutation(perm_key, n)
  # Pad the last batch with the permutation's first examples: fixed shapes, all seen.
  idx = jnp.concatenate([perm, perm[:steps * batch_size - n]]).reshape(steps, batch_size)
  tx = _optimizer(0.0)

  def step(carry, inputs):
    p, s = carry
    batch_idx, k = inputs
    loss, grads = jax.value_and_grad(
        lambda q: _loss(_forward(q, x[batch_idx], probe, k), y[batch_idx], task))(p)
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  (params, opt_state), losses = jax.lax.scan(
      step, (params, opt_state), (idx, jax.random.split(drop_key, steps)))
  return params, opt_state, losses.mean()


@functools.partial(jax.jit, static_argnames=("probe",))
def _predict(params, x, *, probe):
  return _forward(params, x, probe)


def _clip_mean(chunk_out: np.ndarray, clip: np.ndarray, n_clips: int) -> np.ndarray:
  """Averages chunk outputs (logits, or regression predictions) per clip."""
  sums = np.zeros((n_clips, chunk_out.shape[1]), np.float64)
  np.add.at(sums, clip, chunk_out)
  return sums / np.bincount(clip, minlength=n_clips)[:, None]


# ----------------------------------------------------------------------------- training

def _prepare(data: dict, task: str) -> dict:
  """Standardised device arrays per split, and what is needed to score them."""
  splits = data["splits"]
  targets, classes = encode_targets(task, {s: splits[s]["labels"] for s in SPLITS})
  x_train = splits["train"]["x"]
  mean = x_train.mean(axis=0, keepdims=True)
  std = x_train.std(axis=0, keepdims=True)
  std = np.where(std < _STD_FLOOR, 1.0, std)
  y_mean = y_std = None
  if task == "regression":
    y_mean = targets["train"].mean(axis=0)
    y_std = targets["train"].std(axis=0)
    y_std = np.where(y_std < _STD_FLOOR, 1.0, y_std)
  prepared = {"classes": classes, "y_mean": y_mean, "y_std": y_std, "splits": {}}
  for s in SPLITS:
    clip = splits[s]["clip"]
    y_clip = targets[s]
    y_fit = (y_clip - y_mean) / y_std if task == "regression" else y_clip
    prepared["splits"][s] = {
        "x": jnp.asarray((splits[s]["x"] - mean) / std),
        "y_chunk": jnp.asarray(y_fit[clip]),
        "clip": clip, "n_clips": len(splits[s]["paths"]), "y_clip": y_clip}
  return prepared


def _n_outputs(task: str, prepared: dict) -> int:
  if task == "regression":
    return prepared["splits"]["train"]["y_clip"].shape[1]
  return len(prepared["classes"])


def _evaluate(params, prepared: dict, split: str, task: str, probe: str) -> dict:
  part = prepared["splits"][split]
  out = np.asarray(_predict(params, part["x"], probe=probe), dtype=np.float64)
  clip_out = _clip_mean(out, part["clip"], part["n_clips"])
  if task == "regression":
    clip_out = clip_out * prepared["y_std"] + prepared["y_mean"]
  return metrics_for(task, clip_out, part["y_clip"], prepared["classes"])


def _score(metrics: dict, task: str) -> float:
  """The validation criterion; NaN (undefined metric) counts as the worst score."""
  value = metrics[MAIN_METRIC[task]]
  return -np.inf if np.isnan(value) else value


def _train_one(prepared: dict, task: str, probe: str, lr: float, seed: int,
               max_epochs: int, batch_size: int, patience: int) -> dict:
  """Trains one probe; returns the best-validation params, metrics and epoch count."""
  train = prepared["splits"]["train"]
  init_key, loop_key = jax.random.split(jax.random.PRNGKey(seed))
  params = _init_params(init_key, train["x"].shape[1], train["x"].shape[2],
                        _n_outputs(task, prepared), probe)
  opt_state = _optimizer(lr).init(params)
  batch = min(batch_size, train["x"].shape[0])
  best = {"score": -np.inf, "params": params, "valid": None, "epoch": 0}
  plateau_best, plateau_wait, current_lr = -np.inf, 0, lr
  epoch = 0
  for epoch in range(1, max_epochs + 1):
    params, opt_state, _ = _train_epoch(
        params, opt_state, jax.random.fold_in(loop_key, epoch), train["x"],
        train["y_chunk"], task=task, probe=probe, batch_size=batch)
    valid = _evaluate(params, prepared, "valid", task, probe)
    score = _score(valid, task)
    if score > best["score"] or best["valid"] is None:
      best = {"score": score, "params": params, "valid": valid, "epoch": epoch}
    elif epoch - best["epoch"] >= patience:
      break
    # ReduceLROnPlateau (mode max) on the validation metric.
    if score > plateau_best:
      plateau_best, plateau_wait = score, 0
    else:
      plateau_wait += 1
      if plateau_wait > PLATEAU_PATIENCE:
        current_lr *= PLATEAU_FACTOR
        plateau_wait = 0
        opt_state.hyperparams["learning_rate"] = jnp.asarray(current_lr, jnp.float32)
  best["epochs"] = epoch
  return best


def probe_features(features_dir: str, labels_csv: str, task: str, probe: str = "mlp",
                   layer="all", seed: int = 0, lr: float | tuple = 1e-3,
                   max_epochs: int = 200, batch_size: int = 64, patience: int = 10,
                   out: str | None = None) -> dict:
  """Trains and evaluates a MARBLE probe on exported features.

  Args:
    features_dir: export folder (SPEC section 6 layout).
    labels_csv: csv with columns path,label,split (path relative to the task root;
      the feature file is `<features_dir>/<path>.npy`).
    task: "multiclass", "multilabel", "regression" or "key".
    probe: "mlp" (512 hidden, ReLU, dropout 0.2) or "linear".
    layer: "all" (learned softmax-weighted sum over layers) or a layer index K.
    seed: seeds initialisation, shuffling and dropout (same seed -> same result).
    lr: a learning rate, or a tuple of them (grid; best by validation metric).
    max_epochs, batch_size, patience: training length, minibatch size, early-stopping
      patience in epochs (on the validation metric).
    out: if given, the result is also written there as JSON.

  Returns:
    {"task", "probe", "layer", "valid": metrics, "test": metrics, "main_metric",
     "score" (test main metric), "epochs", "best_lr", "best_epoch", "lr_grid"
     ({lr: valid main metric}), "seed", "classes", "n_clips" ({split: n})}.
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  if probe not in PROBES:
    raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
  lrs = tuple(lr) if isinstance(lr, (tuple, list)) else (lr,)
  if not lrs:
    raise ValueError("lr grid is empty")
  data = load_split_features(features_dir, labels_csv, layer)
  prepared = _prepare(data, task)
  runs = {float(r): _train_one(prepared, task, probe, float(r), seed, max_epochs,
                               batch_size, patience) for r in lrs}
  # Ties go to the earlier grid entry (max keeps the first maximum).
  best_lr = max(runs, key=lambda r: runs[r]["score"])
  best = runs[best_lr]
  test = _evaluate(best["params"], prepared, "test", task, probe)
  main = MAIN_METRIC[task]
  result = {
      "task": task, "probe": probe, "layer": layer if layer == "all" else int(layer),
      "valid": best["valid"], "test": test, "main_metric": main, "score": test[main],
      "epochs": best["epochs"], "best_epoch": best["epoch"], "best_lr": best_lr,
      "lr_grid": {str(r): runs[r]["valid"][main] for r in runs}, "seed": seed,
      "classes": prepared["classes"],
      "n_clips": {s: prepared["splits"][s]["n_clips"] for s in SPLITS}}
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
  return result


def format_table(results: list[dict]) -> str:
  """A small markdown table: one row per result, its main test and validation metric."""
  lines = ["| task | probe | layer | metric | test | valid | best lr | epochs |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    m = r["main_metric"]
    lines.append(f"| {r['task']} | {r['probe']} | {r['layer']} | {m} | "
                 f"{r['test'][m]:.4f} | {r['valid'][m]:.4f} | {r['best_lr']:g} | "
                 f"{r['epochs']} |")
  return "\n".join(lines)
