"""An online kNN probe of the teacher during training (DINO's kNN monitor, for audio).

If the run config names a small labelled set (`monitor.labels`: a labels.csv whose paths
are relative to its folder, single-label classes, `train` and `test` or `valid` rows),
the trainer embeds its clips with the current teacher every `monitor.every` steps (the
released embedding: final LayerNorm, mean over tokens, one window per clip) and logs
`knn_accuracy`: each held-out clip takes the similarity-weighted vote of its k nearest
training clips (cosine, weights exp(sim / 0.07), k = 20). It costs one forward pass over
the set, and tells whether the representation improves before any probe is trained.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from pupujepa_jax import frontend, labels as labels_lib, models

NEIGHBOURS = 20
TEMPERATURE = 0.07
BATCH = 16


def knn_accuracy(train_feats, train_ids, test_feats, test_ids, num_classes: int,
                 k: int = NEIGHBOURS, temperature: float = TEMPERATURE) -> float:
  """Accuracy of a similarity-weighted kNN vote on L2-normalised features (NumPy)."""
  def normalise(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sims = normalise(test_feats) @ normalise(train_feats).T
  k = min(k, sims.shape[1])
  nearest = np.argsort(-sims, axis=1)[:, :k]
  votes = np.zeros((sims.shape[0], num_classes))
  weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
  np.add.at(votes, (np.arange(sims.shape[0])[:, None], train_ids[nearest]), weights)
  return float(np.mean(votes.argmax(1) == test_ids))


class KnnMonitor:
  """The labelled set in memory and a jitted embedding of it (see module docstring)."""

  def __init__(self, labels_csv, spec: models.ServingSpec,
               runtime: models.Runtime = models.Runtime()):
    from data_pipelines import audio
    labels_csv = pathlib.Path(labels_csv)
    rows = labels_lib.read_labels_csv(labels_csv)
    test_split = "test" if any(r.split == "test" for r in rows) else "valid"
    rows = [r for r in rows if r.split in ("train", test_split)]
    if any(labels_lib.LABEL_SEPARATOR in r.label for r in rows):
      raise ValueError(f"monitor.labels: {labels_csv} has multi-label rows; the kNN monitor "
                       "needs one class per clip")
    if not any(r.split == "train" for r in rows) or not any(r.split == test_split
                                                             for r in rows):
      raise ValueError(f"monitor.labels: {labels_csv} needs train and test (or valid) rows")
    classes = sorted({r.label for r in rows})
    window = spec.window_samples
    waves = []
    for r in rows:  # one window per clip: the start, looped if the clip is shorter
      wave = audio.load_audio(labels_csv.parent / r.path, spec.frontend.sample_rate)
      waves.append(audio.take_crop(wave, 0, window, "loop"))
    self.waves = np.stack(waves).astype(np.float32)
    self.ids = np.array([classes.index(r.label) for r in rows])
    self.is_train = np.array([r.split == "train" for r in rows])
    self.num_classes = len(classes)
    arch, fe = spec.architecture, spec.frontend
    from pupujepa_jax import inference  # the released embedding's readout, one definition
    self._embed = jax.jit(lambda params, waves: inference.readout(models.encode(
        arch, params, frontend.log_mel_jnp(waves, fe), runtime), spec.grid, "mean"))

  def features(self, encoder_params) -> np.ndarray:
    """[clips, D] released-embedding features of the set, in fixed-size batches."""
    out = []
    for start in range(0, len(self.waves), BATCH):
      batch = self.waves[start:start + BATCH]
      n = len(batch)
      batch = np.pad(batch, [(0, BATCH - n), (0, 0)])
      out.append(np.asarray(self._embed(encoder_params, jnp.asarray(batch)))[:n])
    return np.concatenate(out)

  def evaluate(self, params: dict, teacher: dict) -> dict:
    feats = self.features(models.encoder_params(params, teacher))
    return {"knn_accuracy": knn_accuracy(feats[self.is_train], self.ids[self.is_train],
                                         feats[~self.is_train], self.ids[~self.is_train],
                                         self.num_classes)}
