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

Many probes at once (`train_probes`): a grid of groups (the layers a probe reads) by
members (seed and learning rate) trains in one vmapped program, each probe with its own
early stopping, plateau schedule and best-validation params; a group's members read one
copy of its layers. `probe_layers` is the grid of single-layer probes times seeds that the
demo and the baselines use (three seeds, `SMALL_DATA_PROTOCOL`); `probe_features` is one
probe, or a learning-rate grid of them, on a feature folder (`pupujepa probe`).

Speed on CPU: one jitted function runs a whole epoch of the grid (`lax.scan` over
fixed-shape minibatches), one predicts a split; the learning rate lives in the optimizer
state, so nothing recompiles across epochs, seeds or the learning-rate grid. The random
draws (initial weights, chunk order, dropout masks) come from NumPy on the host.
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

from pupujepa_jax import evaluation, features, labels

MAIN_METRIC = evaluation.MAIN_METRIC
TASKS = evaluation.TASKS
PROBES = ("mlp", "linear")
# The protocol of `make demo` and `pupujepa data baselines` (`probe_layers` arguments),
# for every model and feature set alike: MARBLE's lr 1e-3, batch 64 and early stopping
# after 10 epochs, at most 50 epochs (the demo's probes stop after 12-50), three seeds.
SMALL_DATA_PROTOCOL = dict(lr=1e-3, max_epochs=50, patience=10, batch_size=64)
SMALL_DATA_SEEDS = (0, 1, 2)
SPLITS = labels.SPLITS
HIDDEN = 512
DROPOUT = 0.2
PLATEAU_FACTOR = 0.5
PLATEAU_PATIENCE = 3
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
      out["weighted_score"] = float(np.mean(evaluation.key_score_matrix()[targ, pred]))
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

class _ProbeRandom:
  """The random stream of one probe seed, on the host: initial weights, the order of
  the training chunks and the dropout masks of every epoch. NumPy, not jax.random:
  threefry inside the epoch program tripled its compile time (measured 0.65 s -> 2.1 s
  linear, 1.2 s -> 3.7 s MLP), which a demo that compiles it for every task feels."""

  def __init__(self, seed: int):
    # Two streams: the order of the chunks and the dropout masks do not depend on the
    # features' width (padded features, other models: the same batches for a seed).
    self.init_rng = np.random.default_rng([int(seed), 0x9B0BE, 0])
    self.rng = np.random.default_rng([int(seed), 0x9B0BE, 1])

  def init(self, dim: int, n_out: int, probe: str) -> dict:
    """Unit-variance weights (`_scale_init` gives them their fan-in scale)."""
    # The input-side weights are drawn last, row by row: features padded with zeros to a
    # wider D start with the same weights on their real dimensions.
    if probe == "mlp":
      w2 = self.init_rng.standard_normal((HIDDEN, n_out), np.float32)
      return {"w2": w2, "w1": self.init_rng.standard_normal((dim, HIDDEN), np.float32)}
    return {"w2": self.init_rng.standard_normal((dim, n_out), np.float32)}

  def epoch(self, n: int, batch_size: int, probe: str):
    """[steps, batch] chunk indices (a permutation, the last batch padded with its first
    chunks: fixed shapes, all seen) and, for the MLP, [steps, batch, HIDDEN] keep masks."""
    steps = -(-n // batch_size)
    perm = self.rng.permutation(n)
    idx = np.concatenate([perm, perm[:steps * batch_size - n]]).reshape(steps, batch_size)
    if probe != "mlp":
      return idx, np.ones((steps, 1, 1), bool)
    return idx, self.rng.random((steps, batch_size, HIDDEN), np.float32) >= DROPOUT


def _scale_init(unit: dict, n_layers: int, n_out: int, fan_in, probe: str) -> dict:
  """Initial params of one probe from unit-variance weights: layer-mixing logits (uniform
  start), He-scaled hidden weights, zero biases.

  `fan_in` (D, or fewer) scales the first layer: features padded with zeros to a common
  D start as if they had only their `fan_in` real dimensions (the padding's weights never
  move: their inputs, hence their gradients, are zero).
  """
  params = {"layer_logits": jnp.zeros((n_layers,), jnp.float32),
            "b2": jnp.zeros((n_out,), jnp.float32)}
  if probe == "mlp":
    params.update(w1=unit["w1"] * jnp.sqrt(2.0 / fan_in), b1=jnp.zeros((HIDDEN,)),
                  w2=unit["w2"] * np.sqrt(1.0 / HIDDEN))
  else:
    params["w2"] = unit["w2"] * jnp.sqrt(1.0 / fan_in)
  return params


def _forward(params: dict, x, probe: str, keep=None):
  """x [B, layers, D] -> outputs [B, n_out]; `keep` [B, HIDDEN] applies dropout (MLP).

  A softmax over the layer logits weights the layers (one layer: weight exactly 1).
  """
  h = jnp.einsum("bld,l->bd", x, jax.nn.softmax(params["layer_logits"]))
  if probe == "mlp":
    h = jax.nn.relu(h @ params["w1"] + params["b1"])
    if keep is not None:
      h = jnp.where(keep, h / (1.0 - DROPOUT), 0.0)
  return h @ params["w2"] + params["b2"]


def _loss(out, y, task: str):
  if task in ("multiclass", "key"):
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
  if task == "multilabel":
    return optax.sigmoid_binary_cross_entropy(out, y).mean()
  return jnp.mean((out - y) ** 2)


def _optimizer(lr):
  # The learning rate is state, so ReduceLROnPlateau and the grid never recompile.
  return optax.inject_hyperparams(optax.adam)(learning_rate=lr)


def _train_epoch(params, opt_state, idx, keep, x, y, *, task, probe):
  """One epoch of minibatch Adam of one probe: batches of chunks `idx` [steps, batch],
  dropout masks `keep` [steps, batch, HIDDEN] (MLP)."""
  tx = _optimizer(0.0)

  def step(carry, inputs):
    p, s = carry
    batch_idx, k = inputs
    grads = jax.grad(lambda q: _loss(_forward(q, x[batch_idx], probe,
                                              k if probe == "mlp" else None),
                                     y[batch_idx], task))(p)
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), None

  (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), (idx, keep))
  return params, opt_state


def _grid(fn, per_probe, per_member, per_group):
  """`fn(*per_probe, *per_member, *per_group)` over a [groups, members] grid of probes:
  per-probe arguments have both axes, a member's (its seed's random draws) are shared by
  its groups, a group's (its layers' inputs [groups, n, layers, D]) by its members."""
  n_p, n_m, n_g = len(per_probe), len(per_member), len(per_group)
  inner = jax.vmap(fn, in_axes=(0,) * (n_p + n_m) + (None,) * n_g)
  outer = jax.vmap(inner, in_axes=(0,) * n_p + (None,) * n_m + (0,) * n_g)
  return outer(*per_probe, *per_member, *per_group)


@functools.partial(jax.jit, static_argnames=("n_layers", "n_out", "probe"))
def _init_grid(unit, fan_in, lr, *, n_layers, n_out, probe):
  """Params and Adam states of the grid: unit weights [members, ...], fan_in [groups],
  lr [groups, members]."""
  params = jax.vmap(jax.vmap(lambda u, f: _scale_init(u, n_layers, n_out, f, probe),
                             in_axes=(0, None)), in_axes=(None, 0))(unit, fan_in)
  return params, jax.vmap(jax.vmap(lambda p, r: _optimizer(r).init(p)))(params, lr)


@functools.partial(jax.jit, static_argnames=("task", "probe"))
def _train_epochs(params, opt_state, idx, keep, x, y, *, task, probe):
  """One epoch of every probe of the grid (params, states: [groups, members]; idx, keep:
  [members, ...]; x: [groups, n, layers, D])."""
  one = functools.partial(_train_epoch, y=y, task=task, probe=probe)
  return _grid(lambda p, s, i, k, xi: one(p, s, i, k, xi), (params, opt_state), (idx, keep),
               (x,))


@functools.partial(jax.jit, static_argnames=("probe",))
def _predict(params, x, *, probe):
  """Chunk outputs [groups, members, n_chunks, n_out] of the grid's probes."""
  return _grid(lambda p, xi: _forward(p, xi, probe), (params,), (), (x,))


@jax.jit
def _keep_improved(improved, new, old):
  """Per probe: the new params where `improved` ([groups, members]), else the old ones."""
  return jax.tree.map(
      lambda a, b: jnp.where(improved.reshape(improved.shape + (1,) * (a.ndim - 2)), a, b),
      new, old)


def _clip_mean(chunk_out: np.ndarray, clip: np.ndarray, n_clips: int) -> np.ndarray:
  """Averages chunk outputs (logits, or regression predictions) per clip:
  [..., n_chunks, n_out] -> [..., n_clips, n_out]."""
  average = np.zeros((n_clips, len(clip)))
  average[clip, np.arange(len(clip))] = 1.0
  average /= average.sum(1, keepdims=True)
  return np.einsum("cn,...no->...co", average, np.asarray(chunk_out, np.float64))


# ----------------------------------------------------------------------------- training

def prepare(data: dict, task: str) -> dict:
  """Standardised arrays per split (`load_split_features` output), and what is
  needed to score them: per split "x" [n_chunks, layers, D], "y_chunk" (fit targets),
  "clip", "n_clips", "y_clip" (the clips' targets, as `evaluation.main_metric` takes
  them); "classes"; and for regression the train mean and std of the targets."""
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
  prepared = {"task": task, "classes": classes, "y_mean": y_mean, "y_std": y_std,
              "layers": data["layers"], "splits": {}}
  for s in SPLITS:
    clip = splits[s]["clip"]
    y_clip = targets[s]
    y_fit = (y_clip - y_mean) / y_std if task == "regression" else y_clip
    prepared["splits"][s] = {
        "x": ((splits[s]["x"] - mean) / std).astype(np.float32),
        "y_chunk": jnp.asarray(y_fit[clip]),
        "clip": clip, "n_clips": len(splits[s]["paths"]), "y_clip": y_clip}
  return prepared


def _n_outputs(task: str, prepared: dict) -> int:
  if task == "regression":
    return prepared["splits"]["train"]["y_clip"].shape[1]
  return len(prepared["classes"])


def _clip_outputs(params, inputs: dict, prepared: dict, split: str, probe: str) -> np.ndarray:
  """[groups, members, n_clips, n_out] clip outputs (regression: in target units)."""
  part = prepared["splits"][split]
  out = _clip_mean(np.asarray(_predict(params, inputs[split], probe=probe)), part["clip"],
                   part["n_clips"])
  if prepared["task"] == "regression":
    out = out * prepared["y_std"] + prepared["y_mean"]
  return out


def train_probes(prepared: dict, probe: str, layer_sets, seeds, lrs, fan_in=None,
                 max_epochs: int = 200, batch_size: int = 64, patience: int = 10) -> dict:
  """Trains a grid of probes side by side in one vmapped program.

  Probe (g, m) reads the layers `layer_sets[g]` (lists of layer indices of equal length;
  several are mixed by learned softmax weights), starts from seed `seeds[m]`
  (initialisation, shuffling, dropout) at learning rate `lrs[m]`; `fan_in[g]` (default:
  D) scales its initialisation (see `_scale_init`). A group's probes read one copy of
  its layers. Each probe runs the protocol on its own: ReduceLROnPlateau (factor 0.5,
  patience 3) and early stopping (`patience` epochs without a better validation main
  metric) on its validation score, keeping its best-validation params; the loop ends
  when every probe has stopped.

  Returns {"valid": [groups, members] best validation main metric, "best_epoch",
  "epochs" (ints, same shape), "outputs": {"valid", "test": [groups, members, n_clips,
  n_out] clip outputs of the best params}}.
  """
  task = prepared["task"]
  if probe not in PROBES:
    raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
  layer_sets = [[int(k) for k in ls] for ls in layer_sets]
  if len(seeds) != len(lrs) or len({len(ls) for ls in layer_sets}) != 1:
    raise ValueError(f"one lr per seed ({len(seeds)} seeds, {len(lrs)} lrs) and layer sets "
                     f"of one length ({layer_sets})")
  shape = (len(layer_sets), len(seeds))
  # [groups, n, layers, D] per split: each group's layers, read by all its members.
  inputs = {s: jnp.asarray(np.stack([prepared["splits"][s]["x"][:, ls] for ls in layer_sets]))
            for s in SPLITS}
  train, valid = prepared["splits"]["train"], prepared["splits"]["valid"]
  _, n_chunks, n_layers, dim = inputs["train"].shape
  n_out = _n_outputs(task, prepared)
  randoms = [_ProbeRandom(s) for s in seeds]
  unit = jax.tree.map(lambda *a: np.stack(a), *[r.init(dim, n_out, probe) for r in randoms])
  fan_in = np.full(len(layer_sets), dim) if fan_in is None else np.asarray(fan_in)
  lr = np.broadcast_to(np.asarray(lrs, np.float32), shape).copy()
  params, opt_state = _init_grid(unit, jnp.asarray(fan_in, jnp.float32), jnp.asarray(lr),
                                 n_layers=n_layers, n_out=n_out, probe=probe)
  batch = min(batch_size, n_chunks)
  best_params = params
  best = np.full(shape, -np.inf)
  best_epoch = np.zeros(shape, np.int64)
  stopped_at = np.zeros(shape, np.int64)  # 0 while training
  plateau_best, plateau_wait = np.full(shape, -np.inf), np.zeros(shape, np.int64)
  for epoch in range(1, max_epochs + 1):
    draws = [r.epoch(n_chunks, batch, probe) for r in randoms]
    params, opt_state = _train_epochs(
        params, opt_state, np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws]),
        inputs["train"], train["y_chunk"], task=task, probe=probe)
    score = evaluation.main_metric(
        task, _clip_outputs(params, inputs, prepared, "valid", probe), valid["y_clip"])
    score = np.where(np.isnan(score), -np.inf, score)  # An undefined metric is the worst.
    running = stopped_at == 0
    improved = running & ((score > best) | (epoch == 1))
    best_params = _keep_improved(jnp.asarray(improved), params, best_params)
    best = np.where(improved, score, best)
    best_epoch = np.where(improved, epoch, best_epoch)
    stopped_at = np.where(running & (epoch - best_epoch >= patience), epoch, stopped_at)
    if np.all(stopped_at > 0):
      break
    # ReduceLROnPlateau (mode max) on the validation metric.
    better = score > plateau_best
    plateau_best = np.where(better, score, plateau_best)
    plateau_wait = np.where(better, 0, plateau_wait + 1)
    reduce = plateau_wait > PLATEAU_PATIENCE
    lr = np.where(reduce, lr * PLATEAU_FACTOR, lr).astype(np.float32)
    plateau_wait = np.where(reduce, 0, plateau_wait)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr)
  return {"valid": best, "best_epoch": best_epoch,
          "epochs": np.where(stopped_at > 0, stopped_at, epoch),
          "outputs": {s: _clip_outputs(best_params, inputs, prepared, s, probe)
                      for s in ("valid", "test")}}


def probe_layers(prepared: dict, probe: str, layers, seeds=(0, 1, 2), lr: float = 1e-3,
                 fan_in=None, max_epochs: int = 200, batch_size: int = 64,
                 patience: int = 10) -> dict:
  """Single-layer probes on each of `layers` (indices into the prepared layer axis),
  each with every seed, trained side by side (`train_probes`; `fan_in` per layer).

  Returns {"layers", "seeds", "valid": [n_layers, n_seeds] best validation main metric,
  "test_outputs": [n_layers, n_seeds, n_test, n_out] clip outputs, "test_targets",
  "epochs": [n_layers, n_seeds]}.
  """
  layers, seeds = [int(k) for k in layers], [int(s) for s in seeds]
  run = train_probes(prepared, probe, [[k] for k in layers], seeds, [lr] * len(seeds),
                     fan_in, max_epochs, batch_size, patience)
  return {"layers": layers, "seeds": seeds, "valid": run["valid"],
          "test_outputs": run["outputs"]["test"],
          "test_targets": prepared["splits"]["test"]["y_clip"], "epochs": run["epochs"]}


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
    lr: a learning rate, or a tuple of them (grid, trained side by side; best by
      validation metric).
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
  lrs = tuple(float(r) for r in lr) if isinstance(lr, (tuple, list)) else (float(lr),)
  if not lrs:
    raise ValueError("lr grid is empty")
  prepared = prepare(load_split_features(features_dir, labels_csv, layer), task)
  all_layers = list(range(prepared["splits"]["train"]["x"].shape[1]))
  run = train_probes(prepared, probe, [all_layers], [seed] * len(lrs), lrs,
                     max_epochs=max_epochs, batch_size=batch_size, patience=patience)
  # Ties go to the earlier grid entry (argmax keeps the first maximum).
  i = int(np.argmax(run["valid"][0]))
  y = {s: prepared["splits"][s]["y_clip"] for s in ("valid", "test")}
  metrics = {s: metrics_for(task, run["outputs"][s][0, i], y[s], prepared["classes"])
             for s in y}
  main = MAIN_METRIC[task]
  result = {
      "task": task, "probe": probe, "layer": layer if layer == "all" else int(layer),
      "valid": metrics["valid"], "test": metrics["test"], "main_metric": main,
      "score": metrics["test"][main], "epochs": int(run["epochs"][0, i]),
      "best_epoch": int(run["best_epoch"][0, i]), "best_lr": lrs[i],
      "lr_grid": {str(r): float(v) for r, v in zip(lrs, run["valid"][0])}, "seed": seed,
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
