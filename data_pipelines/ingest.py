"""Ingest: a folder tree of audio files -> a TFDS ArrayRecord dataset of 24 kHz mono PCM.

Also the TFDS conventions every dataset of this project follows (ingest and the MARBLE
builders in `data_pipelines/builders/`), so the Grain pipeline can read any of them:
- one `train` split (builders may add others) in ArrayRecord format, read back with
  `builder.as_data_source()`; neither writing nor reading needs TensorFlow;
- features `audio` (int16 PCM, or float32 in [-1, 1]), `path` (text, relative to the
  source) and `duration` (seconds), see `audio_features`;
- the sample rate in the dataset's metadata (`sample_rate`), checked by the pipeline.

`ingest` writes `<out>/<name>/<version>/...` plus `<out>/ingest_report.json`, which lists
every skipped file with its reason and a fingerprint of the input folder: re-running on
an unchanged folder returns the recorded summary without decoding anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import audio as audio_lib

SAMPLE_RATE = 24_000
DATASET_NAME = "audio_folder"
REPORT_NAME = "ingest_report.json"
INT16_SCALE = 32768.0

Example = tuple[str, dict]


def audio_features(dtype=np.int16) -> tfds.features.FeaturesDict:
  """The features of an audio dataset: `audio` PCM (int16 or float32), `path`, `duration`."""
  if np.dtype(dtype) not in (np.dtype(np.int16), np.dtype(np.float32)):
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
    overwrite: bool = False,
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
    overwrite: regenerate even if the dataset already exists (else it is reused).

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
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder


def find_dataset_dir(path) -> pathlib.Path:
  """The one prepared TFDS dataset (folder holding dataset_info.json) at or under `path`."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"dataset folder {path} does not exist")
  if (path / "dataset_info.json").is_file():
    return path
  found = sorted(p.parent for p in path.rglob("dataset_info.json")
                 if not any(part.startswith("incomplete.") for part in p.parts))
  if len(found) != 1:
    what = "no prepared TFDS dataset" if not found else f"{len(found)} datasets ({found})"
    raise FileNotFoundError(f"dataset folder {path} holds {what}; pass the folder of one "
                            "dataset (the one holding dataset_info.json)")
  return found[0]


def load_data_source(path, split: str = "train"):
  """Random-access source of `split` of the TFDS dataset at or under `path`."""
  builder = tfds.builder_from_directory(str(find_dataset_dir(path)))
  if split not in builder.info.splits:
    raise KeyError(f"dataset {builder.data_dir} has no split {split!r}; "
                   f"it has {sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def dataset_sample_rate(path) -> int | None:
  """The `sample_rate` recorded in the dataset's metadata (None if it records none)."""
  builder = tfds.builder_from_directory(str(find_dataset_dir(path)))
  rate = (builder.info.metadata or {}).get("sample_rate")
  return None if rate is None else int(rate)


def _fingerprint(root: pathlib.Path, files: list[pathlib.Path], min_seconds: float,
                 sample_rate: int) -> str:
  h = hashlib.sha256(f"{min_seconds}|{sample_rate}".encode())
  for f in files:
    st = f.stat()
    h.update(f"|{f.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()


def ingest(input_dir, out_dir, min_seconds: float = 1.0, *, sample_rate: int = SAMPLE_RATE,
           workers: int | None = None) -> dict:
  """Turn a folder tree of audio into a TFDS ArrayRecord dataset of mono int16 PCM.

  Files that cannot be decoded, are empty, shorter than `min_seconds` or contain NaN/Inf
  are skipped and listed with their reason in `<out_dir>/ingest_report.json`.

  Args:
    input_dir: folder searched recursively for audio (see audio.AUDIO_EXTENSIONS).
    out_dir: TFDS data dir to write (created).
    min_seconds: shorter tracks are skipped.
    sample_rate: target rate of the stored PCM.
    workers: decoding threads (default: CPU count).

  Returns:
    Summary dict: kept, skipped, hours, dataset_dir, report, reused (True when an
    unchanged folder was ingested before and nothing was redone).

  Raises:
    FileNotFoundError: `input_dir` is missing or holds no audio files.
    ValueError: no file was usable.
  """
  root = pathlib.Path(input_dir).resolve()
  files = audio_lib.list_audio_files(root)
  out = pathlib.Path(out_dir).resolve()
  report_path = out / REPORT_NAME
  fingerprint = _fingerprint(root, files, min_seconds, sample_rate)
  if report_path.is_file():
    report = json.loads(report_path.read_text())
    if (report.get("fingerprint") == fingerprint
        and (pathlib.Path(report.get("dataset_dir", "")) / "dataset_info.json").is_file()):
      return _summary(report, report_path, reused=True)

  skipped, kept = [], []

  def examples():
    skipped.clear()
    kept.clear()
    for f, wave in audio_lib.decode_files(files, sample_rate, min_seconds,
                                          workers or os.cpu_count() or 1):
      rel = f.relative_to(root).as_posix()
      if isinstance(wave, audio_lib.AudioDecodeError):
        skipped.append({"path": rel, "reason": wave.reason})
        continue
      kept.append(wave.shape[0] / sample_rate)
      yield rel, {"audio": to_int16(wave), "path": rel, "duration": kept[-1]}

  out.mkdir(parents=True, exist_ok=True)
  try:
    builder = build_array_record_dataset(
        DATASET_NAME, out, audio_features(np.int16), {"train": examples},
        description=f"Audio ingested from {root}",
        metadata={"sample_rate": sample_rate, "source": str(root)}, overwrite=True)
  except Exception:
    if kept or not skipped:
      raise
    builder = None  # TFDS refuses to write a split without examples.
  if not kept:
    _write_report(report_path, root, None, None, min_seconds, sample_rate, kept, skipped)
    raise ValueError(f"no usable audio in {root}: all {len(skipped)} files were skipped "
                     f"(reasons in {report_path})")
  report = _write_report(report_path, root, pathlib.Path(builder.data_dir), fingerprint,
                         min_seconds, sample_rate, kept, skipped)
  return _summary(report, report_path, reused=False)


def _write_report(path, root, dataset_dir, fingerprint, min_seconds, sample_rate, kept,
                  skipped) -> dict:
  report = {
      "input_dir": str(root),
      "dataset_dir": str(dataset_dir) if dataset_dir else None,
      "fingerprint": fingerprint,
      "sample_rate": sample_rate,
      "min_seconds": min_seconds,
      "kept": len(kept),
      "hours": sum(kept) / 3600.0,
      "skipped": skipped,
  }
  path.write_text(json.dumps(report, indent=2))
  return report


def _summary(report: dict, report_path: pathlib.Path, reused: bool) -> dict:
  return {"kept": report["kept"], "skipped": len(report["skipped"]), "hours": report["hours"],
          "dataset_dir": report["dataset_dir"], "report": str(report_path), "reused": reused}
