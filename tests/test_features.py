"""Tests of the feature-folder layout (pupujepa_jax/features.py) shared by embed, the
baselines and the probe."""
import os

import numpy as np
import pytest

from pupujepa_jax import features

META = {"model_id": "m1", "readout": "mean", "step": 3}


def test_files_are_replaced_atomically_not_written_in_place(tmp_path):
  target = features.write_features(tmp_path, "a/x.wav", np.zeros((2, 1, 3)))
  # A second name for the same bytes: writing in place would change what it shows.
  os.link(target, tmp_path / "snapshot.npy")
  features.write_features(tmp_path, "a/x.wav", np.ones((2, 1, 3)))
  np.testing.assert_array_equal(np.load(tmp_path / "snapshot.npy"), np.zeros((2, 1, 3)))
  np.testing.assert_array_equal(np.load(target), np.ones((2, 1, 3)))
  meta = features.write_meta(tmp_path, dict(META, files=["a/x.wav"]))
  os.link(meta, tmp_path / "meta_snapshot.json")
  features.write_meta(tmp_path, dict(META, files=[]))
  assert "a/x.wav" in (tmp_path / "meta_snapshot.json").read_text()
  assert sorted(p.name for p in tmp_path.rglob("*")) == [
      "a", "meta.json", "meta_snapshot.json", "snapshot.npy", "x.wav.npy"]
  with pytest.raises(ValueError, match="under 'files'"):
    features.write_meta(tmp_path, META)


def test_open_folder_refuses_another_model_and_removes_only_its_files(tmp_path):
  features.write_features(tmp_path, "a.wav", np.zeros((1, 1, 2)))
  features.write_features(tmp_path, "b.wav", np.zeros((1, 1, 2)))
  features.write_meta(tmp_path, dict(META, files=["a.wav"]))
  other = dict(META, model_id="m2")
  with pytest.raises(ValueError, match=r"holds features of model 'm1' \(step 3, readout mean\)"
                                       r", not of model 'm2'.*--overwrite"):
    features.open_folder(tmp_path, other)
  assert (tmp_path / "a.wav.npy").exists() and (tmp_path / "meta.json").exists()
  # Another step of the same model is another model's features too.
  with pytest.raises(ValueError, match="step 3"):
    features.open_folder(tmp_path, dict(META, step=4))
  features.open_folder(tmp_path, other, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b.wav.npy"]


def test_open_folder_keeps_the_same_models_files_but_not_its_meta(tmp_path):
  features.write_features(tmp_path, "a.wav", np.zeros((1, 1, 2)))
  features.write_meta(tmp_path, dict(META, files=["a.wav"], D=2))
  features.open_folder(tmp_path, dict(META, D=5))  # D is derived, not identity
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav.npy"]


def test_read_features_checks_listing_shape_and_values(tmp_path):
  features.write_features(tmp_path, "ok.wav", np.ones((2, 3, 4)))
  bad = np.ones((2, 3, 4))
  bad[1, 2, 3] = np.nan
  features.write_features(tmp_path, "nan.wav", bad)
  features.write_features(tmp_path, "stale.wav", np.ones((2, 3, 4)))
  features.write_features(tmp_path, "flat.wav", np.ones((2, 0, 4)))
  meta = dict(META, files=["ok.wav", "nan.wav", "gone.wav", "flat.wav"],
              failed=[{"path": "broken.wav", "reason": "cannot decode audio"}])
  assert features.read_features(tmp_path, "ok.wav", meta).shape == (2, 3, 4)
  with pytest.raises(ValueError, match=r"nan.wav.npy: features hold NaN or Inf"):
    features.read_features(tmp_path, "nan.wav", meta)
  with pytest.raises(ValueError, match=r"meta.json does not list 'stale.wav'"):
    features.read_features(tmp_path, "stale.wav", meta)
  with pytest.raises(ValueError, match=r"does not list 'broken.wav' \(embedding failed: "
                                       r"cannot decode audio\)"):
    features.read_features(tmp_path, "broken.wav", meta)
  with pytest.raises(ValueError, match=r"missing feature file .*gone.wav.npy \(listed"):
    features.read_features(tmp_path, "gone.wav", meta)
  with pytest.raises(ValueError, match=r"flat.wav.npy: expected shape"):
    features.read_features(tmp_path, "flat.wav", meta)


def test_require_meta_names_what_is_missing(tmp_path):
  with pytest.raises(ValueError, match="meta.json is missing"):
    features.require_meta(tmp_path)
  (tmp_path / "meta.json").write_text('{"D": 4}')
  with pytest.raises(ValueError, match="lists no feature files"):
    features.require_meta(tmp_path)
  (tmp_path / "meta.json").write_text("{not json")
  with pytest.raises(ValueError, match="meta.json: cannot read"):
    features.require_meta(tmp_path)
