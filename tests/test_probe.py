"""Tests of the MARBLE probe (pupujepa_jax/probe.py) on synthetic features in tmp_path."""
import json
import os

import mir_eval
import numpy as np
import pytest
from sklearn import metrics as skm

from pupujepa_jax import features, labels
from pupujepa_jax import probe as pr

N_LAYERS = 3
DIM = 16
FAST = {"max_epochs": 40, "patience": 8}


def _write(tmp_path, clips):
  """Writes features and labels.csv; clips: list of (path, label, split, [L+1, n, D])."""
  feat_dir = tmp_path / "feats"
  for path, _, _, arr in clips:
    features.write_features(feat_dir, path, arr)
  features.write_meta(feat_dir, {"D": DIM, "L": N_LAYERS - 1,
                                 "files": [path for path, *_ in clips]})
  labels_csv = labels.write_labels_csv([clip[:3] for clip in clips], tmp_path / "labels.csv")
  return str(feat_dir), str(labels_csv)


def _splits(n_train, n_valid, n_test):
  return ["train"] * n_train + ["valid"] * n_valid + ["test"] * n_test


def _features(rng, signal, signal_layers=(0, 1, 2), n_chunks=None):
  """[L+1, n_chunks, D]: `signal` (D,) added to noise in the given layers."""
  n = n_chunks or int(rng.integers(1, 4))
  arr = rng.normal(size=(N_LAYERS, n, DIM))
  for layer in signal_layers:
    arr[layer] += signal
  return arr


def _multiclass_clips(rng, labels, splits, signal_layers=(0, 1, 2), scale=3.0):
  centers = rng.normal(size=(max(labels) + 1, DIM)) * scale
  return [(f"d/{i:03d}.wav", f"c{lab}", split,
           _features(rng, centers[lab], signal_layers))
          for i, (lab, split) in enumerate(zip(labels, splits))]


def test_separable_multiclass_reaches_full_accuracy(tmp_path):
  rng = np.random.default_rng(0)
  splits = _splits(90, 30, 60)
  labels = rng.integers(0, 3, len(splits))
  feat_dir, labels_csv = _write(tmp_path, _multiclass_clips(rng, labels, splits))
  out = tmp_path / "res" / "r.json"
  res = pr.probe_features(feat_dir, labels_csv, "multiclass", out=str(out), **FAST)
  assert res["test"]["accuracy"] >= 0.95
  assert res["score"] == res["test"]["accuracy"]
  assert res["main_metric"] == "accuracy"
  assert res["classes"] == ["c0", "c1", "c2"]
  assert res["n_clips"] == {"train": 90, "valid": 30, "test": 60}
  assert json.loads(out.read_text()) == json.loads(json.dumps(res))


def test_random_labels_stay_near_chance(tmp_path):
  rng = np.random.default_rng(1)
  splits = _splits(90, 30, 90)
  clips = [(f"{i}.wav", f"c{rng.integers(0, 3)}", s, _features(rng, 0.0))
           for i, s in enumerate(splits)]
  feat_dir, labels_csv = _write(tmp_path, clips)
  res = pr.probe_features(feat_dir, labels_csv, "multiclass", **FAST)
  # Chance is 1/3; with 90 test clips its standard deviation is ~0.05.
  assert 0.1 < res["test"]["accuracy"] < 0.6


def test_layer_selection(tmp_path):
  rng = np.random.default_rng(2)
  splits = _splits(90, 30, 90)
  labels = rng.integers(0, 3, len(splits))
  feat_dir, labels_csv = _write(
      tmp_path, _multiclass_clips(rng, labels, splits, signal_layers=(2,)))
  good = pr.probe_features(feat_dir, labels_csv, "multiclass", layer=2, **FAST)
  bad = pr.probe_features(feat_dir, labels_csv, "multiclass", layer="0", **FAST)
  mixed = pr.probe_features(feat_dir, labels_csv, "multiclass", layer="all", **FAST)
  assert good["test"]["accuracy"] >= 0.95 and good["layer"] == 2
  assert bad["test"]["accuracy"] < 0.6 and bad["layer"] == 0
  # The learned layer weights find the informative layer among the noise.
  assert mixed["test"]["accuracy"] >= 0.9
  with pytest.raises(ValueError, match="layer 3 out of range"):
    pr.probe_features(feat_dir, labels_csv, "multiclass", layer=3, **FAST)


def test_multilabel_planted_signal(tmp_path):
  rng = np.random.default_rng(3)
  splits = _splits(150, 50, 100)
  tags = [f"t{i}" for i in range(4)]
  vecs = rng.normal(size=(4, DIM)) * 2.0
  clips = []
  for i, s in enumerate(splits):
    on = rng.random(4) < 0.4
    on[i % 4] = True  # every clip has a tag, every tag appears in every split
    clips.append((f"{i}.wav", ";".join(t for t, o in zip(tags, on) if o), s,
                  _features(rng, vecs[on].sum(0))))
  feat_dir, labels_csv = _write(tmp_path, clips)
  res = pr.probe_features(feat_dir, labels_csv, "multilabel", probe="linear", lr=1e-2,
                          **FAST)
  assert res["classes"] == tags
  assert res["test"]["roc_auc"] > 0.95 and res["test"]["ap"] > 0.9
  assert res["score"] == res["test"]["roc_auc"]


@pytest.mark.parametrize("planted", [True, False])
def test_regression_r2(tmp_path, planted):
  rng = np.random.default_rng(4)
  splits = _splits(150, 50, 100)
  proj = rng.normal(size=(DIM, 2))
  clips = []
  for i, s in enumerate(splits):
    base = rng.normal(size=DIM)
    feats = rng.normal(size=(N_LAYERS, 2, DIM)) * 0.05 + base
    y = base @ proj * np.array([1.0, 10.0]) + np.array([0.0, 50.0])
    if not planted:
      y = rng.normal(size=2)
    clips.append((f"{i}.wav", f"{y[0]:.6f};{y[1]:.6f}", s, feats))
  feat_dir, labels_csv = _write(tmp_path, clips)
  res = pr.probe_features(feat_dir, labels_csv, "regression", probe="linear", lr=1e-2,
                          **FAST)
  assert len(res["test"]["r2_per_target"]) == 2
  assert res["test"]["r2"] == pytest.approx(np.mean(res["test"]["r2_per_target"]))
  if planted:
    assert min(res["test"]["r2_per_target"]) > 0.9
  else:
    assert res["test"]["r2"] < 0.2


def test_key_weighted_score_matches_mir_eval():
  rng = np.random.default_rng(5)
  refs = ["C major", "A minor", "G major", "Db major", "F# minor", "Bb minor", "E major"]
  preds = rng.integers(0, 24, len(refs))
  # Hand-made: exact (via enharmonic), relative, fifth, parallel.
  preds[:4] = [pr.KEY_CLASSES.index(k) for k in
               ("C major", "C major", "D major", "C# major")]
  got = pr.metrics_for("key", preds, refs, pr.KEY_CLASSES)
  want = np.mean([mir_eval.key.weighted_score(r, pr.KEY_CLASSES[p])
                  for r, p in zip(refs, preds)])
  assert got["weighted_score"] == pytest.approx(want)
  want_acc = np.mean([mir_eval.key.weighted_score(r, pr.KEY_CLASSES[p]) == 1.0
                      for r, p in zip(refs, preds)])
  assert got["accuracy"] == pytest.approx(want_acc)
  # Logits give the same as their argmax.
  logits = np.eye(24)[preds] * 3.0
  assert pr.metrics_for("key", logits, refs, pr.KEY_CLASSES) == got


def test_key_task_end_to_end(tmp_path):
  rng = np.random.default_rng(6)
  keys = list(pr.KEY_CLASSES)
  keys[1] = "Db major"  # an enharmonic spelling is the same class as "C# major"
  centers = rng.normal(size=(24, DIM)) * 3.0
  clips = []
  for i in range(24 * 8):
    k = i % 24
    s = ("train", "train", "train", "train", "valid", "valid", "test", "test")[i // 24]
    clips.append((f"{i}.wav", keys[k], s, _features(rng, centers[k])))
  feat_dir, labels_csv = _write(tmp_path, clips)
  res = pr.probe_features(feat_dir, labels_csv, "key", probe="linear", lr=1e-2, **FAST)
  assert res["main_metric"] == "weighted_score"
  assert res["test"]["accuracy"] > 0.8
  assert res["test"]["accuracy"] <= res["test"]["weighted_score"] <= 1.0


def test_logits_are_averaged_per_clip(tmp_path):
  rng = np.random.default_rng(7)
  a, b = np.zeros(DIM), np.zeros(DIM)
  a[0], b[1] = 3.0, 3.0
  clips = []
  for i, s in enumerate(_splits(80, 20, 0)):
    lab = i % 2
    clips.append((f"{i}.wav", f"c{lab}", s, _features(rng, (a, b)[lab], n_chunks=2)))
  # Test clips of class c0: one strong c0 chunk among two weak c1 chunks. Chunk majority
  # votes c1; the per-clip mean of the (linear) logits says c0.
  for i in range(20):
    arr = np.stack([0.3 * b, 6.0 * a, 0.3 * b])[None].repeat(N_LAYERS, 0)
    clips.append((f"t{i}.wav", "c0", "test", arr + rng.normal(size=arr.shape) * 0.05))
  feat_dir, labels_csv = _write(tmp_path, clips)
  res = pr.probe_features(feat_dir, labels_csv, "multiclass", probe="linear", lr=1e-2,
                          **FAST)
  assert res["test"]["accuracy"] == 1.0
  # And the helper itself, on a clip whose chunks disagree.
  out = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [5.0, 1.0]])
  np.testing.assert_allclose(pr._clip_mean(out, np.array([0, 0, 0, 1]), 2),
                             [[2 / 3, 2 / 3], [5.0, 1.0]])


def test_same_seed_same_result_and_lr_grid(tmp_path):
  rng = np.random.default_rng(8)
  splits = _splits(60, 20, 20)
  labels = rng.integers(0, 3, len(splits))
  feat_dir, labels_csv = _write(
      tmp_path, _multiclass_clips(rng, labels, splits, scale=0.7))
  kw = dict(lr=(1e-3, 3e-3), seed=3, max_epochs=15, patience=5)
  first = pr.probe_features(feat_dir, labels_csv, "multiclass", **kw)
  second = pr.probe_features(feat_dir, labels_csv, "multiclass", **kw)
  assert first == second
  assert set(first["lr_grid"]) == {"0.001", "0.003"}
  assert first["best_lr"] in (1e-3, 3e-3)
  assert first["valid"]["accuracy"] == max(first["lr_grid"].values())
  table = pr.format_table([first, second])
  assert table.count("\n") == 3 and "| multiclass | mlp | all | accuracy |" in table


def test_missing_feature_file(tmp_path):
  rng = np.random.default_rng(9)
  splits = _splits(4, 2, 2)
  feat_dir, labels_csv = _write(
      tmp_path, _multiclass_clips(rng, [0, 1] * 4, splits))
  os.remove(os.path.join(feat_dir, "d", "005.wav.npy"))
  with pytest.raises(ValueError, match=r"missing feature file .*005\.wav\.npy"):
    pr.probe_features(feat_dir, labels_csv, "multiclass", **FAST)


def test_unknown_class_in_test(tmp_path):
  rng = np.random.default_rng(10)
  feat_dir, labels_csv = _write(
      tmp_path, _multiclass_clips(rng, [0, 1, 0, 1, 0, 1, 0, 2], _splits(4, 2, 2)))
  with pytest.raises(ValueError, match=r"unknown class 'c2' in split 'test'"):
    pr.probe_features(feat_dir, labels_csv, "multiclass", **FAST)


def test_unknown_key_label(tmp_path):
  rng = np.random.default_rng(11)
  clips = [(f"{i}.wav", k, s, _features(rng, 0.0)) for i, (k, s) in enumerate(
      zip(["C major", "A minor", "C major", "H major"], _splits(2, 1, 1)))]
  feat_dir, labels_csv = _write(tmp_path, clips)
  with pytest.raises(ValueError, match=r"unknown key class 'H major' in split 'test'"):
    pr.probe_features(feat_dir, labels_csv, "key", **FAST)


def test_empty_split(tmp_path):
  rng = np.random.default_rng(12)
  feat_dir, labels_csv = _write(
      tmp_path, _multiclass_clips(rng, [0, 1, 0, 1], ["train", "train", "test", "test"]))
  with pytest.raises(ValueError, match=r"split 'valid' is empty"):
    pr.probe_features(feat_dir, labels_csv, "multiclass", **FAST)


def test_reads_only_the_files_meta_json_lists(tmp_path):
  rng = np.random.default_rng(13)
  clips = _multiclass_clips(rng, [0, 1] * 6, _splits(8, 2, 2))
  feat_dir, labels_csv = _write(tmp_path, clips)
  # A stale file of another model beside the listed ones, named by labels.csv.
  features.write_features(feat_dir, "d/stale.wav", np.ones((N_LAYERS, 1, DIM)))
  with open(labels_csv, "a") as f:
    f.write("d/stale.wav,c0,test\n")
  with pytest.raises(ValueError, match=r"meta.json does not list 'd/stale.wav'"):
    pr.probe_features(feat_dir, labels_csv, "multiclass", **FAST)


def test_one_nan_in_one_of_200_files_is_an_error_naming_it(tmp_path):
  rng = np.random.default_rng(14)
  clips = _multiclass_clips(rng, rng.integers(0, 3, 200), _splits(120, 40, 40))
  clips[137][3][1, 0, 5] = np.nan
  feat_dir, labels_csv = _write(tmp_path, clips)
  with pytest.raises(ValueError, match=r"d/137.wav.npy: features hold NaN or Inf"):
    pr.probe_features(feat_dir, labels_csv, "multiclass", **FAST)


def test_labels_csv_with_a_byte_order_mark(tmp_path):
  rng = np.random.default_rng(15)
  splits = _splits(30, 10, 10)
  feat_dir, labels_csv = _write(
      tmp_path, _multiclass_clips(rng, rng.integers(0, 2, len(splits)), splits))
  text = open(labels_csv, encoding="utf-8").read()
  with open(labels_csv, "w", encoding="utf-8-sig") as f:  # what spreadsheets save
    f.write(text)
  assert open(labels_csv, "rb").read(3) == b"\xef\xbb\xbf"
  rows = labels.read_labels_csv(labels_csv)
  assert rows[0] == labels.LabelRow("d/000.wav", rows[0].label, "train") and len(rows) == 50
  res = pr.probe_features(feat_dir, labels_csv, "multiclass", **FAST)
  assert res["n_clips"] == {"train": 30, "valid": 10, "test": 10}


def test_labels_csv_errors_name_the_file_and_line(tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("path,label\na.wav,x\n")
  with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['split'\]"):
    labels.read_labels_csv(bad)
  bad.write_text("path,label,split\na.wav,x,train\nb.wav,y,dev\n")
  with pytest.raises(ValueError, match=r"bad.csv line 3: split 'dev'"):
    labels.read_labels_csv(bad)
  with pytest.raises(ValueError, match=r"row 'b.wav' has split 'dev'"):
    labels.write_labels_csv([("a.wav", "x", "train"), ("b.wav", "y", "dev")],
                            tmp_path / "out.csv")
  assert not (tmp_path / "out.csv").exists()


def test_metrics_equal_scikit_learn_on_fixed_matrices():
  rng = np.random.default_rng(16)
  targets = rng.integers(0, 4, 60)
  logits = rng.normal(size=(60, 4)) + 1.5 * np.eye(4)[targets]
  got = pr.metrics_for("multiclass", logits, targets, ["a", "b", "c", "d"])
  assert got["accuracy"] == pytest.approx(skm.accuracy_score(targets, logits.argmax(1)))
  assert 0.3 < got["accuracy"] < 1.0  # neither trivial nor perfect
  hot = (rng.random((80, 5)) < 0.35).astype(np.float32)
  scores = rng.normal(size=(80, 5)) + hot
  got = pr.metrics_for("multilabel", scores, hot, list("abcde"))
  assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(hot, scores, average="macro"))
  assert got["ap"] == pytest.approx(skm.average_precision_score(hot, scores,
                                                                average="macro"))
  y = rng.normal(size=(50, 2)) * [1.0, 10.0]
  pred = y + rng.normal(size=(50, 2)) * [0.5, 2.0]
  got = pr.metrics_for("regression", pred, y, ["t0", "t1"])
  assert got["r2"] == pytest.approx(skm.r2_score(y, pred, multioutput="uniform_average"))
  assert got["r2_per_target"] == pytest.approx(list(skm.r2_score(y, pred,
                                                                 multioutput="raw_values")))


def _prepared(tmp_path, seed=17, signal_layers=(2,), n=(90, 30, 60)):
  rng = np.random.default_rng(seed)
  splits = _splits(*n)
  labels_ = rng.integers(0, 3, len(splits))
  feat_dir, labels_csv = _write(
      tmp_path, _multiclass_clips(rng, labels_, splits, signal_layers=signal_layers,
                                  scale=1.0))
  return pr.prepare(pr.load_split_features(feat_dir, labels_csv, "all"), "multiclass")


def test_single_layer_probes_side_by_side(tmp_path):
  prepared = _prepared(tmp_path)
  run = pr.probe_layers(prepared, "linear", [0, 1, 2], seeds=(0, 1, 2), lr=1e-2, **FAST)
  assert run["valid"].shape == run["epochs"].shape == (3, 3)
  assert run["test_outputs"].shape == (3, 3, 60, 3)
  test = np.array([[pr.metrics_for("multiclass", o, run["test_targets"], None)["accuracy"]
                    for o in layer] for layer in run["test_outputs"]])
  # Only layer 2 carries the classes: the validation split finds it, the test agrees.
  assert int(np.argmax(run["valid"].mean(1))) == 2
  assert test[2].min() > 0.7 and test[:2].max() < 0.5  # measured 0.78-0.92, 0.27-0.40
  # Seeds are different probes; each stops on its own.
  assert not np.allclose(run["test_outputs"][2, 0], run["test_outputs"][2, 1])
  assert len(set(run["epochs"].ravel())) > 1
  # A probe of the grid is the probe trained alone: the others do not change it.
  alone = pr.probe_layers(prepared, "linear", [1], seeds=(2,), lr=1e-2, **FAST)
  np.testing.assert_allclose(alone["test_outputs"][0, 0], run["test_outputs"][1, 2],
                             rtol=1e-4, atol=1e-5)
  assert alone["epochs"][0, 0] == run["epochs"][1, 2]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_zero_padding_with_its_fan_in_changes_nothing(tmp_path, kind):
  """Baseline sets of different widths share one program, padded with zeros: a padded
  set with its real fan-in trains exactly like the set alone."""
  prepared = _prepared(tmp_path, signal_layers=(0, 1, 2))
  padded = {**prepared, "splits": {
      s: dict(p, x=np.pad(p["x"], ((0, 0), (0, 0), (0, 24)))) for s, p in
      prepared["splits"].items()}}
  kw = dict(seeds=(4,), lr=1e-2, max_epochs=8, patience=8)
  plain = pr.probe_layers(prepared, kind, [0, 1], **kw)
  wide = pr.probe_layers(padded, kind, [0, 1], fan_in=[DIM, DIM], **kw)
  np.testing.assert_allclose(wide["test_outputs"], plain["test_outputs"], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(wide["valid"], plain["valid"])
  # Without its fan-in the padded set starts (and ends) elsewhere.
  other = pr.probe_layers(padded, kind, [0, 1], **kw)
  assert np.abs(other["test_outputs"] - plain["test_outputs"]).max() > 1e-2


def test_grid_arguments_are_checked(tmp_path):
  prepared = _prepared(tmp_path, n=(12, 6, 6))
  with pytest.raises(ValueError, match="one lr per seed"):
    pr.train_probes(prepared, "linear", [[0]], [0, 1], [1e-3])
  with pytest.raises(ValueError, match="layer sets of one length"):
    pr.train_probes(prepared, "linear", [[0], [0, 1]], [0], [1e-3])
  with pytest.raises(ValueError, match="probe must be one of"):
    pr.train_probes(prepared, "svm", [[0]], [0], [1e-3])
