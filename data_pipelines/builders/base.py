"""Shared machinery of the MARBLE dataset builders: local folder -> TFDS ArrayRecord.

Every builder reads a user's local copy of a dataset (the TFDS "manual dir"), lists its
clips with MARBLE's labels and splits (`train`, `valid`, `test`), and writes the
project's dataset format (see `data_pipelines.dataset_format`): features `audio` (int16 PCM,
24 kHz mono, whole clip), `path` (relative to the manual dir), `duration`, plus label
features; `sample_rate` in the metadata; read back with `builder.as_data_source()`, no
TensorFlow needed. Labels use `ClassLabel`, `Sequence(ClassLabel)` and `Scalar` features,
which work without TensorFlow (`tfds.features.Audio` does not, hence the plain Tensor).

A dataset module defines a `MarbleBuilder` subclass whose `list_examples(manual_dir,
config)` is pure file parsing (no audio decoding); `write_labels_csv` reuses it to write
the `path,label,split` table read by `pupujepa probe` (format: `pupujepa_jax.labels`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Sequence

import tensorflow_datasets as tfds

from data_pipelines import audio as audio_lib
from data_pipelines import dataset_format
from pupujepa_jax import labels as labels_lib

SAMPLE_RATE = dataset_format.SAMPLE_RATE
SPLITS = labels_lib.SPLITS


@dataclasses.dataclass(frozen=True)
class Example:
  """One clip: `path` relative to the manual dir (posix), its split and label values.

  Label values are what the label features encode: a class name (str) or index (int) for
  ClassLabel, a list of class names for Sequence(ClassLabel), a float for Scalar.
  """
  path: str
  split: str
  labels: dict


@dataclasses.dataclass(frozen=True)
class Listing:
  """The clips of a dataset, plus class names only known from its label files."""
  examples: list[Example]
  vocabularies: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def hash_fraction(key: str) -> float:
  """A stable pseudo-random number in [0, 1) for `key` (same on every machine)."""
  return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 2**32


def hash_split(key: str, fractions: Sequence[tuple[str, float]]) -> str:
  """Assign `key` to a split by `hash_fraction`: fractions are (split, share), summing to 1."""
  x, edge = hash_fraction(key), 0.0
  for split, share in fractions:
    edge += share
    if x < edge:
      return split
  return fractions[-1][0]


def require_dir(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_dir():
    raise FileNotFoundError(f"{what}: folder {path} does not exist")
  return path


def require_file(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_file():
    raise FileNotFoundError(f"{what}: file {path} does not exist")
  return path


def find_one(root: pathlib.Path, pattern: str, what: str, *, dirs: bool = False) -> pathlib.Path:
  """The single file (or folder) matching `pattern` at any depth under `root`."""
  found = sorted(p for p in root.rglob(pattern) if (p.is_dir() if dirs else p.is_file()))
  if len(found) != 1:
    where = "none" if not found else ", ".join(str(p) for p in found)
    raise FileNotFoundError(f"{what}: expected one {pattern!r} under {root}, found {where}")
  return found[0]


def visible_files(root: pathlib.Path, pattern: str) -> list[pathlib.Path]:
  """Sorted files matching `pattern` under `root`, without hidden ones (`.x`, `._x` or
  `__MACOSX/`, which macOS zips add) below `root`."""
  return sorted(p for p in root.glob(pattern) if p.is_file() and not any(
      part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts))


def relpath(path: pathlib.Path, root: pathlib.Path) -> str:
  return path.relative_to(root).as_posix()


class MarbleBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: subclasses set the class attributes and the two abstract hooks."""
  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = ""
  # Default `label` column(s) of `write_labels_csv`; several are joined with ';'.
  CSV_LABELS: tuple[str, ...] = ()

  @classmethod
  def list_examples(cls, manual_dir: pathlib.Path, config: str | None) -> Listing:
    """Parse the local copy's label files (no audio decoding). Raises on bad input."""
    raise NotImplementedError

  @classmethod
  def csv_labels(cls, config: str | None = None) -> tuple[str, ...]:
    """The label feature(s) `write_labels_csv` writes by default for `config`."""
    return cls.CSV_LABELS

  def label_features(self) -> dict[str, tfds.features.FeatureConnector]:
    raise NotImplementedError

  @property
  def config_name(self) -> str | None:
    return self.builder_config.name if self.builder_config else None

  def _info(self) -> tfds.core.DatasetInfo:
    features = dict(dataset_format.audio_features().items())
    features.update(self.label_features())
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(sample_rate=SAMPLE_RATE))

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(os.fspath(dl_manager.manual_dir)).resolve()
    listing = self.list_examples(manual_dir, self.config_name)
    for name, names in listing.vocabularies.items():
      feature = self.info.features[name]
      # Sequence(ClassLabel) holds its ClassLabel in `.feature`.
      getattr(feature, "feature", feature).names = names
    self.info.metadata.update(manual_dir=str(manual_dir),
                              csv_labels=list(self.csv_labels(self.config_name)))
    by_split = {split: [e for e in listing.examples if e.split == split] for split in SPLITS}
    # TFDS cannot write an empty split, so a split without clips is left out.
    return {split: self._generate_examples(manual_dir, examples)
            for split, examples in by_split.items() if examples}

  def _generate_examples(self, manual_dir: pathlib.Path, examples: list[Example]):
    files = [manual_dir / e.path for e in examples]
    workers = min(8, os.cpu_count() or 1)
    decoded = audio_lib.decode_files(files, SAMPLE_RATE, 0.0, workers)
    for example, (_, wave) in zip(examples, decoded):
      if isinstance(wave, audio_lib.AudioDecodeError):
        raise wave
      yield example.path, {"audio": dataset_format.to_int16(wave), "path": example.path,
                           "duration": wave.shape[0] / SAMPLE_RATE, **example.labels}


def _format_value(value) -> str:
  if isinstance(value, (list, tuple)):
    return labels_lib.LABEL_SEPARATOR.join(_format_value(v) for v in value)
  return str(value)


def labels_rows(listing: Listing, labels: Sequence[str]) -> list[tuple[str, str, str]]:
  """(path, label, split) rows; several label features are joined with ';'."""
  rows = []
  for e in listing.examples:
    missing = [name for name in labels if name not in e.labels]
    if missing:
      raise KeyError(f"{e.path}: no label {missing[0]!r} (has {sorted(e.labels)})")
    rows.append((e.path, labels_lib.LABEL_SEPARATOR.join(_format_value(e.labels[n])
                                                         for n in labels),
                 e.split))
  return rows


class TagsBuilder(MarbleBuilder, skip_registration=True):
  """A multi-label tagging dataset whose tag names come from its label files."""
  CSV_LABELS = ("tags",)

  def label_features(self):
    # The vocabulary is set from the label files when the dataset is prepared.
    return {"tags": tfds.features.Sequence(tfds.features.ClassLabel())}
