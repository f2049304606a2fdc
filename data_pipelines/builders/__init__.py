"""Local TFDS builders for the MARBLE evaluation datasets, and their probe label tables.

    builder = build("gtzan", manual_dir="~/data/gtzan", data_dir="~/tfds")
    builder.as_data_source()["train"][0]  # {"audio": int16[n], "path", "duration", "genre"}
    write_labels_csv(builder, "gtzan_labels.csv")  # path,label,split for `pupujepa probe`

Names: see BUILDERS; a config follows a slash (`mtg_jamendo/genre`, `vocalset/singer`).
Each dataset module documents its folder layout, labels and split.
"""
from __future__ import annotations

import os
import pathlib

import tensorflow_datasets as tfds

from data_pipelines.builders import base
from data_pipelines.builders.emomusic import MarbleEmomusic
from data_pipelines.builders.giantsteps_key import MarbleGiantstepsKey
from data_pipelines.builders.gtzan import MarbleGtzan
from data_pipelines.builders.mtg_jamendo import MarbleMtgJamendo
from data_pipelines.builders.mtt import MarbleMtt
from data_pipelines.builders.nsynth import MarbleNsynth
from data_pipelines.builders.vocalset import MarbleVocalset
from pupujepa_jax import labels as labels_lib

BUILDERS: dict[str, type[base.MarbleBuilder]] = {
    "gtzan": MarbleGtzan,
    "nsynth": MarbleNsynth,
    "giantsteps_key": MarbleGiantstepsKey,
    "mtt": MarbleMtt,
    "emomusic": MarbleEmomusic,
    "mtg_jamendo": MarbleMtgJamendo,
    "vocalset": MarbleVocalset,
}


def resolve(name: str) -> tuple[type[base.MarbleBuilder], str | None]:
  """'mtg_jamendo/genre' -> (builder class, 'genre'); the TFDS name `marble_gtzan` works too."""
  dataset, _, config = name.partition("/")
  by_tfds_name = {cls.name: cls for cls in BUILDERS.values()}
  cls = BUILDERS.get(dataset) or by_tfds_name.get(dataset)
  if cls is None:
    raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(BUILDERS)}")
  configs = [c.name for c in cls.BUILDER_CONFIGS or []]
  if config and config not in configs:
    raise KeyError(f"dataset {dataset!r} has no config {config!r}; "
                   f"configs: {configs or 'none'}")
  return cls, config or (configs[0] if configs else None)


def build(name: str, manual_dir, data_dir, *, overwrite: bool = False) -> base.MarbleBuilder:
  """Prepare dataset `name` from the local copy in `manual_dir` into `data_dir` (TFDS).

  An already prepared dataset is reused unless `overwrite`. Returns the builder; read it
  with `builder.as_data_source()[split]` (no TensorFlow needed).
  """
  cls, config = resolve(name)
  manual_dir = pathlib.Path(os.path.expanduser(manual_dir))
  base.require_dir(manual_dir, f"{name} manual dir")
  builder = cls(config=config, data_dir=os.path.expanduser(str(data_dir)),
                file_format="array_record")
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), download_mode=mode))
  return builder


def write_labels_csv(source, out_csv, *, dataset: str | None = None,
                     label: str | None = None) -> pathlib.Path:
  """Write MARBLE-style probe labels `path,label,split` for a dataset's local copy.

  `path` is the audio file relative to the dataset root (the manual dir), so
  `pupujepa embed --input <manual dir>` and `pupujepa probe --labels <out_csv>` line up.
  Multi-label tags and several regression targets are joined with ';'.

  Args:
    source: a prepared builder (its manual dir is read from the dataset's metadata), or
      the manual dir itself, then with `dataset`.
    out_csv: the file to write (parent folders are created).
    dataset: dataset name as in `build` (required when `source` is a folder).
    label: one label feature to write instead of the dataset's default (e.g. "pitch" for
      NSynth, "valence" for Emomusic).

  Returns:
    The path written.
  """
  if isinstance(source, tfds.core.DatasetBuilder):
    config = source.builder_config.name if source.builder_config else None
    cls, config = resolve(source.name + (f"/{config}" if config else ""))
    manual_dir = (source.info.metadata or {}).get("manual_dir")
    if not manual_dir:
      raise ValueError(f"dataset {source.data_dir} records no manual_dir in its metadata; "
                       "pass the manual dir and `dataset=` instead")
  else:
    if dataset is None:
      raise ValueError("write_labels_csv: give `dataset=` when `source` is a folder")
    cls, config = resolve(dataset)
    manual_dir = source
  manual_dir = pathlib.Path(manual_dir)
  base.require_dir(manual_dir, f"{cls.name} manual dir")
  labels = (label,) if label else cls.csv_labels(config)
  rows = base.labels_rows(cls.list_examples(manual_dir, config), labels)
  return labels_lib.write_labels_csv(rows, out_csv)
