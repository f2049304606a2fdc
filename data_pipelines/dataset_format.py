"""The on-disk format of the project's audio datasets (ingest and the MARBLE builders).

A dataset is a TFDS ArrayRecord dataset directory (`dataset_info.json`, `features.json`,
`metadata.json` and the record files), written and read without TensorFlow:
- features `audio` (int16 PCM, or float32 in [-1, 1]), `path` (text, relative to the
  source) and `duration` (seconds), see `audio_features`; the MARBLE builders add label
  features (`ClassLabel`, `Text`, `Scalar`, a `Sequence` of them);
- the sample rate in the metadata (`sample_rate`); ingested datasets also record their
  source folder and its fingerprint there.

Reading never trusts the stored feature description: TFDS would rebuild the features from
`features.json`, importing whatever module a type string names. `load_data_source` reads
`features.json` as plain JSON, refuses it unless its audio features equal the ones built
here (and any others are label features of the builders), and decodes the records with
the FeaturesDict built in code.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import sys
from typing import Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds
from google.protobuf import json_format
from tensorflow_datasets.core import read_only_builder

SAMPLE_RATE = 24_000
INT16_SCALE = 32768.0
AUDIO_DTYPES = (np.int16, np.float32)
INFO_FILE = "dataset_info.json"
FEATURES_FILE = "features.json"
METADATA_FILE = "metadata.json"
AUDIO_KEYS = ("audio", "path", "duration")

Example = tuple[str, dict]


def audio_features(dtype=np.int16) -> tfds.features.FeaturesDict:
  """The features of an audio dataset: `audio` PCM (int16 or float32), `path`, `duration`."""
  if np.dtype(dtype) not in [np.dtype(d) for d in AUDIO_DTYPES]:
    raise ValueError(f"audio dtype must be int16 or float32, got {np.dtype(dtype)}")
  return tfds.features.FeaturesDict({
      # Raw bytes: a varint int64 list would take 2-4x the space of the PCM itself.
      "audio": tfds.features.Tensor(shape=(None,), dtype=dtype,
                                    encoding=tfds.features.Encoding.BYTES),
      "path": tfds.features.Text(),
      "duration": tfds.features.Scalar(dtype=np.float32),
  })


def to_int16(wave: np.ndarray) -> np.ndarray:
  """Float PCM in [-1, 1] -> int16 (clipped: resampling may overshoot full scale)."""
  scaled = np.round(np.asarray(wave, dtype=np.float32) * INT16_SCALE)
  return np.clip(scaled, -INT16_SCALE, INT16_SCALE - 1).astype(np.int16)


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
  """Stored `audio` (int16 or float32) -> float32 in [-1, 1]."""
  pcm = np.asarray(pcm)
  if pcm.dtype == np.int16:
    return pcm.astype(np.float32) / INT16_SCALE
  return pcm.astype(np.float32, copy=False)


def build_array_record_dataset(
    name: str,
    data_dir,
    features: tfds.features.FeaturesDict,
    splits: dict[str, Callable[[], Iterable[Example]]],
    *,
    version: str = "1.0.0",
    description: str = "",
    metadata: dict | None = None,
) -> tfds.core.DatasetBuilder:
  """Write (or reuse) an ArrayRecord TFDS dataset at `<data_dir>/<name>/<version>`.

  Args:
    name: dataset name (snake_case).
    data_dir: the TFDS data dir.
    features: the feature spec, e.g. `audio_features()`.
    splits: split name -> a function returning an iterable of (unique key, example).
    version: dataset version.
    description: free text stored in dataset_info.json.
    metadata: JSON-able dict stored with the dataset (e.g. {"sample_rate": 24000}).

  Returns:
    The prepared builder; `builder.as_data_source()[split]` reads it without TensorFlow.
  """
  dataset_name = name

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version(version)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=description, features=features,
                                   metadata=tfds.core.MetadataDict(metadata or {}))

    def _split_generators(self, dl_manager):
      del dl_manager  # Local data only.
      return {split: self._generate_examples(make) for split, make in splits.items()}

    def _generate_examples(self, make):
      yield from make()

  builder = _Builder(data_dir=str(data_dir), file_format="array_record")
  # TFDS prints its progress lines to stdout; commands keep stdout for their JSON.
  with contextlib.redirect_stdout(sys.stderr):
    builder.download_and_prepare()
  return builder


def find_dataset_dir(path) -> pathlib.Path:
  """The one prepared TFDS dataset (folder holding dataset_info.json) at or under `path`."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"dataset folder {path} does not exist")
  if (path / INFO_FILE).is_file():
    return path
  found = sorted(p.parent for p in path.rglob(INFO_FILE)
                 if not any(part.startswith("incomplete.") for part in p.parts))
  if len(found) != 1:
    what = "no prepared TFDS dataset" if not found else f"{len(found)} datasets ({found})"
    raise FileNotFoundError(f"dataset folder {path} holds {what}; pass the folder of one "
                            f"dataset (the one holding {INFO_FILE})")
  return found[0]


def _read_json(path: pathlib.Path) -> dict:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read ({e})") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return value


def _class_name(cls) -> str:
  """The type string TFDS stores for a feature class (`pythonClassName`)."""
  return f"{cls.__module__}.{cls.__name__}"


def _is_label_feature(spec) -> bool:
  """Whether a stored feature description is one of the builders' label features."""
  if not isinstance(spec, dict):
    return False
  kind = spec.get("pythonClassName")
  if kind in (_class_name(tfds.features.ClassLabel), _class_name(tfds.features.Scalar),
              _class_name(tfds.features.Text)):
    return True
  if kind == _class_name(tfds.features.Sequence):
    sequence = spec.get("sequence")
    inner = sequence.get("feature") if isinstance(sequence, dict) else None
    return _is_label_feature(inner) and inner["pythonClassName"] != kind
  return False


def checked_features(dataset_dir) -> tfds.features.FeaturesDict:
  """The audio FeaturesDict, built in code, that the stored feature description matches.

  Raises ValueError naming `features.json` unless it describes this project's audio
  features (int16 or float32 PCM) plus, optionally, the builders' label features.
  """
  path = pathlib.Path(dataset_dir) / FEATURES_FILE
  if not path.is_file():
    raise ValueError(f"{path}: missing; not a dataset of this project")
  stored = _read_json(path)
  features_dict = stored.get("featuresDict")
  top = features_dict.get("features") if isinstance(features_dict, dict) else None
  if stored.get("pythonClassName") != _class_name(tfds.features.FeaturesDict) or \
      not isinstance(top, dict):
    raise ValueError(f"{path}: the stored features are not a FeaturesDict of this "
                     "project's audio features; refusing to read the dataset")
  for dtype in AUDIO_DTYPES:
    ours = audio_features(dtype)
    # The form `features.json` stores (TFDS writes the feature proto as JSON).
    expected = json_format.MessageToDict(ours.to_proto())["featuresDict"]["features"]
    if all(top.get(k) == expected[k] for k in AUDIO_KEYS):
      break
  else:
    raise ValueError(f"{path}: features {list(AUDIO_KEYS)} differ from this project's "
                     "audio features (int16 or float32 PCM, path, duration); refusing to "
                     "read the dataset")
  others = sorted(k for k in top if k not in AUDIO_KEYS and not _is_label_feature(top[k]))
  if others:
    raise ValueError(f"{path}: feature(s) {others} are not label features of this "
                     "project (ClassLabel, Text, Scalar, a Sequence of them); refusing to "
                     "read the dataset")
  return ours


class _SpecReader(read_only_builder.ReadOnlyBuilder, skip_registration=True):
  """A prepared dataset decoded with features built in code, never from features.json.

  TFDS pickles a builder (into Grain workers) as its constructor's arguments, so the
  features are checked again wherever it is rebuilt.
  """

  def __init__(self, builder_dir):
    self._code_features = checked_features(builder_dir)
    super().__init__(builder_dir=str(builder_dir))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=self._code_features)


def load_data_source(path, split: str = "train"):
  """Random-access source of `split` ({"audio", "path", "duration"} records) of the
  dataset at or under `path`, after checking its stored features (`checked_features`)."""
  dataset_dir = find_dataset_dir(path)
  builder = _SpecReader(dataset_dir)
  if split not in builder.info.splits:
    raise KeyError(f"dataset {dataset_dir} has no split {split!r}; "
                   f"it has {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def dataset_metadata(path) -> dict:
  """The metadata dict stored with the dataset at or under `path` ({} if none)."""
  file = find_dataset_dir(path) / METADATA_FILE
  return _read_json(file) if file.is_file() else {}


def dataset_sample_rate(path) -> int | None:
  """The `sample_rate` recorded in the dataset's metadata (None if it records none)."""
  rate = dataset_metadata(path).get("sample_rate")
  return None if rate is None else int(rate)


def dataset_identity(path) -> str:
  """An identity of the dataset at or under `path`: equal for the same data, different
  once the dataset is replaced by another build.

  A hash of its description files: `metadata.json` (an ingested dataset records there the
  fingerprint of its source: every input file's relative path, size and mtime, and the
  ingest options) and `dataset_info.json` (split sizes). A trainer stores it at the start
  of a run and compares it when the run resumes.
  """
  dataset_dir = find_dataset_dir(path)
  digest = hashlib.sha256()
  for name in (METADATA_FILE, INFO_FILE):
    file = dataset_dir / name
    digest.update(name.encode() + b"\0")
    digest.update(file.read_bytes() if file.is_file() else b"")
  return digest.hexdigest()
