"""GTZAN genre (MARBLE): `genres/<genre>/<genre>.000NN.wav`, fault-filtered split.

Split: the fault-filtered split of Kereliuk et al. / Sturm (443 train, 197 valid, 290 test
tracks; the 70 repeated, distorted or mislabelled tracks are left out), the split MARBLE
uses, as published in jongpillee/music_dataset_split (`{train,valid,test}_filtered.txt`)
and in torchaudio's GTZAN dataset. It is stored here as track-number ranges. When the
manual dir holds `train_filtered.txt`, `valid_filtered.txt` and `test_filtered.txt`
(lines `blues/blues.00029.wav`), those files are used instead. Tracks on disk that are
in no split are skipped; listed tracks missing on disk are skipped too (partial copies;
e.g. delete `jazz.00054.wav` where it is corrupt, as in some redistributed copies).
"""
from __future__ import annotations

import pathlib
import re

import tensorflow_datasets as tfds

from data_pipelines.builders import base

GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop",
          "reggae", "rock")

# genre -> track-number ranges (inclusive) of each split of the fault-filtered split.
_FILTERED_SPLIT = {
    "train": {
        "blues": "29-49 73-97",
        "classical": "30-33 43-48 50-67 80-99",
        "country": "19-26 28-29 65-99",
        "disco": "5 15-20 22-37 39-45 47 49 53-54 56-57 59 61 70 73-74 89",
        "hiphop": "2-25 28-29 31-38 41-42 55-61 77-80",
        "jazz": "0-1 11-24 41 47-72",
        "metal": "2-3 5 21 24 35 46-57 59-66 69 71-72 79-80 84 86 89-99",
        "pop": "2-9 11-12 16-20 23-29 31-36 38-42 44 46 49-50 80 97-99",
        "reggae": "0-2 4 6 9 11-12 14-32 42-45 49-51 54-60 63 69",
        "rock": "0-9 16-26 57-70 91-99",
    },
    "valid": {
        "blues": "0-11 50-60",
        "classical": "0-10 68-76",
        "country": "0-7 9-18 27 41-42 45 49",
        "disco": "0 2-4 6-14 46 48 52 67-68 72 75 90 95",
        "hiphop": "81-98",
        "jazz": "2-10 25-32",
        "metal": "0-1 6-11 16-20 36-37 68 76-77 81-82",
        "pop": "10 53 55 58-62 81 83-86",
        "reggae": "61-62 70 72 74 76-78 85 92-99",
        "rock": "38 49-56 71-85",
    },
    "test": {
        "blues": "12-28 61-72 98-99",
        "classical": "11-29 34-41 49 77-79",
        "country": "30-40 43-44 46-48 50-51 53-64",
        "disco": "1 21 58 62-66 69 76-88 91-94 96-97 99",
        "hiphop": "0 26-27 30 40 43-45 51-54 62-75 99",
        "jazz": "73-99",
        "metal": "12-15 22-23 25-33 38-39 67 70 73-75 78 83 85 87-88",
        "pop": "0-1 13-14 43 63-66 69-79 82 88-96",
        "reggae": "34-40 46-48 52-53 64-68 71 79 82-84 87-90",
        "rock": "10-15 27-37 39-48 86-90",
    },
}
SPLIT_FILES = {split: f"{split}_filtered.txt" for split in base.SPLITS}
_TRACK = re.compile(r"^(?P<genre>[a-z]+)\.(?P<number>\d{5})$")


def _expand(ranges: str) -> list[int]:
  numbers = []
  for part in ranges.split():
    lo, _, hi = part.partition("-")
    numbers.extend(range(int(lo), int(hi or lo) + 1))
  return numbers


def filtered_split() -> dict[str, str]:
  """Track name (e.g. 'blues.00029') -> split, from the built-in fault-filtered split."""
  return {f"{genre}.{n:05d}": split
          for split, genres in _FILTERED_SPLIT.items()
          for genre, ranges in genres.items() for n in _expand(ranges)}


def _split_from_files(manual_dir: pathlib.Path) -> dict[str, str] | None:
  present = [manual_dir / name for name in SPLIT_FILES.values() if (manual_dir / name).exists()]
  if not present:
    return None
  if len(present) != len(SPLIT_FILES):
    raise FileNotFoundError(f"GTZAN: found {[p.name for p in present]} in {manual_dir}; "
                            f"give all of {sorted(SPLIT_FILES.values())} or none")
  track_split = {}
  for split, name in SPLIT_FILES.items():
    for line_no, line in enumerate((manual_dir / name).read_text().splitlines(), 1):
      if not line.strip():
        continue
      track = pathlib.PurePosixPath(line.strip()).stem
      if not _TRACK.match(track):
        raise ValueError(f"{manual_dir / name}:{line_no}: expected a line like "
                         f"'blues/blues.00029.wav', got {line.strip()!r}")
      track_split[track] = split
  return track_split


class MarbleGtzan(base.MarbleBuilder, skip_registration=True):
  """GTZAN genre classification, 10 classes."""
  name = "marble_gtzan"
  DESCRIPTION = __doc__
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Extract GTZAN so that the manual dir holds "
                                  "genres/<genre>/<genre>.000NN.wav.")
  CSV_LABELS = ("genre",)

  def label_features(self):
    return {"genre": tfds.features.ClassLabel(names=GENRES)}

  @classmethod
  def list_examples(cls, manual_dir, config=None) -> base.Listing:
    manual_dir = pathlib.Path(manual_dir)
    genres_dir = base.require_dir(manual_dir / "genres", "GTZAN")
    track_split = _split_from_files(manual_dir) or filtered_split()
    examples = []
    for path in base.visible_files(genres_dir, "*/*.wav"):
      match = _TRACK.match(path.stem)
      if not match or match["genre"] != path.parent.name or match["genre"] not in GENRES:
        raise ValueError(f"GTZAN: {path} is not named <genre>/<genre>.000NN.wav with a "
                         f"genre among {GENRES}")
      split = track_split.get(path.stem)
      if split:
        examples.append(base.Example(base.relpath(path, manual_dir), split,
                                     {"genre": match["genre"]}))
    if not examples:
      raise FileNotFoundError(f"GTZAN: no track of the split under {genres_dir}")
    return base.Listing(examples)
