"""Emomusic / EMO valence and arousal (MARBLE): `clips_45seconds/*.mp3` + annotation csvs.

Annotation files (anywhere under the manual dir, e.g. in `annotations/`):
- `static_annotations.csv`: `song_id, mean_arousal, std_arousal, mean_valence,
  std_valence` (the 744 de-duplicated songs); targets are the means on the 1-9 scale;
- `songs_info.csv`: `song_id, file_name, ..., Mediaeval 2013 set` (development /
  evaluation).
Split by song id, as MARBLE (after jukemir): the MediaEval 2013 evaluation songs are
`test`; the development songs are split into `train` and `valid` (1/8 of the songs) by a
deterministic hash of the song id. Each annotated song needs its clip
`clips_45seconds/<file_name>` (default `<song_id>.mp3`).
"""
from __future__ import annotations

import csv
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders import base

STATIC = "static_annotations.csv"
SONGS_INFO = "songs_info.csv"
_SETS = {"development": "train", "evaluation": "test"}


def read_csv(path: pathlib.Path, required: tuple[str, ...]) -> list[dict]:
  """Rows of a comma-separated file as dicts with whitespace-stripped keys and values."""
  with open(path, newline="") as f:
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()}
            for row in csv.DictReader(f)]
  header = set(rows[0]) if rows else set()
  missing = [c for c in required if c not in header]
  if missing:
    raise ValueError(f"{path}: missing column(s) {missing} (has {sorted(header)})")
  return rows


def _set_column(rows: list[dict], path) -> str:
  for column in rows[0]:
    if column.lower().startswith("mediaeval"):
      return column
  raise ValueError(f"{path}: no 'Mediaeval 2013 set' column (has {sorted(rows[0])})")


class MarbleEmomusic(base.MarbleBuilder, skip_registration=True):
  """Emomusic static valence / arousal regression."""
  name = "marble_emomusic"
  DESCRIPTION = __doc__
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Extract clips_45sec_mp3.zip (clips_45seconds/) and the "
                                  f"annotations ({STATIC}, {SONGS_INFO}) into the manual dir.")
  CSV_LABELS = ("valence", "arousal")

  def label_features(self):
    return {"valence": tfds.features.Scalar(dtype=np.float32),
            "arousal": tfds.features.Scalar(dtype=np.float32)}

  @classmethod
  def list_examples(cls, manual_dir, config=None) -> base.Listing:
    manual_dir = pathlib.Path(manual_dir)
    clips = base.require_dir(manual_dir / "clips_45seconds", "Emomusic")
    static_path = base.find_one(manual_dir, STATIC, "Emomusic")
    info_path = base.find_one(manual_dir, SONGS_INFO, "Emomusic")
    static = read_csv(static_path, ("song_id", "mean_valence", "mean_arousal"))
    info_rows = read_csv(info_path, ("song_id",))
    set_column = _set_column(info_rows, info_path)
    info = {row["song_id"]: row for row in info_rows}
    examples = []
    for line_no, row in enumerate(static, 2):
      where = f"{static_path}:{line_no}"
      song = row["song_id"]
      if song not in info:
        raise ValueError(f"{where}: song_id {song!r} is not in {info_path}")
      split = _SETS.get(info[song][set_column].lower())
      if split is None:
        raise ValueError(f"{info_path}: song {song!r} has set {info[song][set_column]!r}, "
                         f"expected one of {sorted(_SETS)}")
      if split == "train":
        split = base.hash_split(song, (("train", 7 / 8), ("valid", 1 / 8)))
      try:
        valence, arousal = float(row["mean_valence"]), float(row["mean_arousal"])
      except ValueError as e:
        raise ValueError(f"{where}: mean_valence/mean_arousal are not numbers ({e})") from e
      audio = base.require_file(clips / (info[song].get("file_name") or f"{song}.mp3"),
                                "Emomusic")
      examples.append(base.Example(base.relpath(audio, manual_dir), split,
                                   {"valence": valence, "arousal": arousal}))
    if not examples:
      raise ValueError(f"Emomusic: {static_path} lists no songs")
    return base.Listing(examples)
