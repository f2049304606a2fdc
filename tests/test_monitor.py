"""Training-time monitors: the online kNN probe, and a resume on a replaced dataset."""
import warnings

import numpy as np
import pytest

from data_pipelines import ingest
from pupujepa_jax import config as config_lib, labels, metrics, monitor, trainer
from tests import model_fixtures


def _brute_force_knn(train, train_ids, test, test_ids, k, temperature, num_classes):
  correct = 0
  for x, y in zip(test, test_ids):
    sims = [float(np.dot(x, t) / np.linalg.norm(x) / np.linalg.norm(t)) for t in train]
    order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
    votes = [0.0] * num_classes
    for i in order:
      votes[train_ids[i]] += np.exp(sims[i] / temperature)
    correct += int(np.argmax(votes) == y)
  return correct / len(test)


def test_knn_accuracy_matches_a_brute_force_vote():
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((3, 8))
  train_ids, test_ids = rng.integers(0, 3, 60), rng.integers(0, 3, 25)
  train = centres[train_ids] + 0.9 * rng.standard_normal((60, 8))
  test = centres[test_ids] + 0.9 * rng.standard_normal((25, 8))
  got = monitor.knn_accuracy(train, train_ids, test, test_ids, 3, k=7, temperature=0.1)
  want = _brute_force_knn(train, train_ids, test, test_ids, 7, 0.1, 3)
  assert got == pytest.approx(want) and 0.4 < got < 1.0
  far = monitor.knn_accuracy(centres[train_ids] * 10, train_ids, centres[test_ids] * 10,
                             test_ids, 3)
  assert far == 1.0


def _labelled_tones(root):
  """Two classes (low and high tones), train and test rows, paths relative to the csv."""
  rows = []
  for i in range(12):
    low = i % 2 == 0
    model_fixtures.write_tone(root / "audio" / f"t{i}.wav", 0.7,
                              freq=(200.0 if low else 1600.0) * (1 + 0.03 * i), seed=i)
    rows.append((f"audio/t{i}.wav", "low" if low else "high", "train" if i < 8 else "test"))
  return labels.write_labels_csv(rows, root / "labels.csv")


def test_trainer_logs_knn_accuracy_and_a_replaced_dataset_is_reported(tmp_path):
  csv = _labelled_tones(tmp_path / "monitor")
  for i in range(3):
    model_fixtures.write_tone(tmp_path / "a" / f"{i}.wav", 1.0, freq=300.0 + 50 * i, seed=i)
    model_fixtures.write_tone(tmp_path / "b" / f"{i}.wav", 1.0, freq=900.0 + 50 * i, seed=i)
  ingest.ingest(tmp_path / "a", tmp_path / "ds")
  cfg = model_fixtures.smoke_cfg()
  cfg.data.update(source="tfds", path=str(tmp_path / "ds"))
  cfg.monitor.update(every=2, labels=str(csv))
  config_lib.validate(cfg)
  first = trainer.train(cfg, tmp_path / "run", stop_after=4, progress=False)
  assert not first.dataset_changed
  records = {r["step"]: r for r in metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")}
  assert [s for s in records if "knn_accuracy" in records[s]] == [1, 3]
  assert all(0.0 <= records[s]["knn_accuracy"] <= 1.0 for s in (1, 3))
  assert "loss" in records[1]  # merged into the step's record, not a second record

  ingest.ingest(tmp_path / "b", tmp_path / "ds", overwrite=True)  # another source
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    second = trainer.train(cfg, tmp_path / "run", stop_after=1, progress=False)
  assert second.dataset_changed
  assert any("replaced dataset" in str(w.message) for w in caught)
