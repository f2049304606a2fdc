"""MagnaTagATune top-50 tags (MARBLE): `mp3/<0-f>/<clip>.mp3` + `annotations_final.csv`.

`annotations_final.csv` is tab-separated with quoted fields: `clip_id`, one 0/1 column per
tag (188), `mp3_path` (e.g. `f/artist-album-01-title-30-59.mp3`, relative to `mp3/`).
Tags: the 50 most frequent over all clips (ties keep the file's column order). Split: the
standard one by the first folder character, 0-b train, c valid, d-f test. As in the
commonly used MARBLE/jukemir version, clips with none of the top-50 tags are dropped, and
so are the three clips whose mp3 files are empty in the official release.
"""
from __future__ import annotations

import csv
import pathlib

import numpy as np

from data_pipelines.builders import base

TOP_K = 50
ANNOTATIONS = "annotations_final.csv"
EMPTY_CLIPS = frozenset({
    "6/norine_braun-now_and_zen-08-gently-117-146.mp3",
    "8/jacob_heringman-josquin_des_prez_lute_settings-19-gintzler__pater_noster-204-233.mp3",
    "9/american_baroque-dances_and_suites_of_rameau_and_couperin-25-le_petit_rien_xiveme_"
    "ordre_couperin-88-117.mp3",
})


def split_of(mp3_path: str, where) -> str:
  folder = mp3_path.split("/", 1)[0]
  if len(folder) != 1 or folder not in "0123456789abcdef" or "/" not in mp3_path:
    raise ValueError(f"{where}: mp3_path {mp3_path!r} does not start with a folder 0-9/a-f")
  index = int(folder, 16)
  return "train" if index < 12 else "valid" if index == 12 else "test"


def read_annotations(path: pathlib.Path) -> tuple[list[str], list[str], np.ndarray]:
  """(tag names, mp3 paths, [clips, tags] 0/1 matrix) of annotations_final.csv."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f, delimiter="\t"))
  if not rows or len(rows[0]) < 3 or rows[0][0] != "clip_id" or rows[0][-1] != "mp3_path":
    raise ValueError(f"{path}: expected a tab-separated header 'clip_id', tags..., "
                     f"'mp3_path', got {rows[0][:3] if rows else 'an empty file'}")
  tags, paths, matrix = rows[0][1:-1], [], []
  for line_no, row in enumerate(rows[1:], 2):
    if not row:
      continue
    if len(row) != len(rows[0]) or any(v not in ("0", "1") for v in row[1:-1]):
      raise ValueError(f"{path}:{line_no}: expected {len(rows[0])} fields with 0/1 tag "
                       f"values, got {len(row)} fields")
    paths.append(row[-1])
    matrix.append([v == "1" for v in row[1:-1]])
  return tags, paths, np.array(matrix, dtype=bool).reshape(len(paths), len(tags))


class MarbleMtt(base.TagsBuilder, skip_registration=True):
  """MagnaTagATune multi-label tagging with the 50 most frequent tags."""
  name = "marble_mtt"
  DESCRIPTION = __doc__
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Extract the MagnaTagATune mp3 zips into mp3/ and put "
                                  f"{ANNOTATIONS} next to it.")

  @classmethod
  def list_examples(cls, manual_dir, config=None) -> base.Listing:
    manual_dir = pathlib.Path(manual_dir)
    csv_path = base.require_file(manual_dir / ANNOTATIONS, "MagnaTagATune")
    mp3_dir = base.require_dir(manual_dir / "mp3", "MagnaTagATune")
    tags, paths, matrix = read_annotations(csv_path)
    # Stable sort: equal counts keep the column order.
    top = np.argsort(-matrix.sum(axis=0), kind="stable")[:TOP_K]
    names = [tags[i] for i in top]
    examples = []
    for line_no, (mp3_path, row) in enumerate(zip(paths, matrix[:, top]), 2):
      split = split_of(mp3_path, f"{csv_path}:{line_no}")
      if not row.any() or mp3_path in EMPTY_CLIPS:
        continue
      audio = base.require_file(mp3_dir / mp3_path, "MagnaTagATune")
      examples.append(base.Example(base.relpath(audio, manual_dir), split,
                                   {"tags": [n for n, on in zip(names, row) if on]}))
    if not examples:
      raise ValueError(f"MagnaTagATune: no clip of {csv_path} has any top-{TOP_K} tag")
    return base.Listing(examples, {"tags": names})
