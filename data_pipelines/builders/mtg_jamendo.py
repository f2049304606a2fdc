"""MTG-Jamendo auto-tagging (MARBLE): `audio/` + the split tsv files of `split-0`.

Configs: `top50`, `genre`, `instrument`, `moodtheme`, reading
`split-0/autotagging_<subset>-{train,validation,test}.tsv` (found anywhere under the
manual dir, e.g. `data/splits/split-0/` as in the mtg-jamendo-dataset repository). A tsv
row is `TRACK_ID  ARTIST_ID  ALBUM_ID  PATH  DURATION  TAG  TAG ...` (tab-separated, PATH
relative to `audio/`, e.g. `14/214.mp3`; the low-quality `14/214.low.mp3` is accepted too).
Split: MARBLE's, split-0 (validation -> `valid`). Tags keep their full names
(`genre---rock`); the class list is every tag in the three files, sorted.
"""
from __future__ import annotations

import csv
import pathlib

import tensorflow_datasets as tfds

from data_pipelines.builders import base

SUBSETS = {"top50": "autotagging_top50tags", "genre": "autotagging_genre",
           "instrument": "autotagging_instrument", "moodtheme": "autotagging_moodtheme"}
SPLIT_FILES = {"train": "train", "valid": "validation", "test": "test"}
_HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS")


def read_tsv(path: pathlib.Path) -> list[tuple[str, list[str]]]:
  """(audio path relative to audio/, tags) of each row of an autotagging tsv file."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if not rows or tuple(rows[0][:6]) != _HEADER:
    raise ValueError(f"{path}: expected the header {'  '.join(_HEADER)}, "
                     f"got {rows[0] if rows else 'an empty file'}")
  tracks = []
  for line_no, row in enumerate(rows[1:], 2):
    if not row:
      continue
    if len(row) < 6 or not row[3] or not all(row[5:]):
      raise ValueError(f"{path}:{line_no}: expected a PATH and at least one tag, got {row}")
    tracks.append((row[3], row[5:]))
  return tracks


def _audio_file(audio_dir: pathlib.Path, path: str, where) -> pathlib.Path:
  full = audio_dir / path
  low = full.with_name(full.name.removesuffix(".mp3") + ".low.mp3")
  for candidate in (full, low):
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f"{where}: audio file {full} (or {low.name}) does not exist")


class MarbleMtgJamendo(base.TagsBuilder, skip_registration=True):
  """MTG-Jamendo multi-label tagging (top50, genre, instrument or mood/theme)."""
  name = "marble_mtg_jamendo"
  DESCRIPTION = __doc__
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"{p}, split-0")
                     for n, p in SUBSETS.items()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the MTG-Jamendo audio in audio/ (NN/ID.mp3) and the "
                                  "split-0 tsv files anywhere under the manual dir.")

  @classmethod
  def list_examples(cls, manual_dir, config=None) -> base.Listing:
    manual_dir = pathlib.Path(manual_dir)
    config = config or "top50"
    if config not in SUBSETS:
      raise ValueError(f"MTG-Jamendo: unknown config {config!r}, expected one of "
                       f"{sorted(SUBSETS)}")
    audio_dir = base.require_dir(manual_dir / "audio", "MTG-Jamendo")
    split_dir = base.find_one(manual_dir, "split-0", "MTG-Jamendo", dirs=True)
    examples = []
    for split, suffix in SPLIT_FILES.items():
      tsv = base.require_file(split_dir / f"{SUBSETS[config]}-{suffix}.tsv", "MTG-Jamendo")
      for path, tags in read_tsv(tsv):
        audio = _audio_file(audio_dir, path, tsv)
        examples.append(base.Example(base.relpath(audio, manual_dir), split, {"tags": tags}))
    names = sorted({t for e in examples for t in e.labels["tags"]})
    return base.Listing(examples, {"tags": names})
