"""Label vocabularies and the `labels.csv` format, shared by datasets, offline tasks and
the probe (one definition of each).

`labels.csv` is the probe's label table: a header `path,label,split`, then one row per
clip; `path` is the audio file relative to the task (or dataset) root, `label` a class,
several tags or several float targets joined with `;`, `split` one of SPLITS. Files are
written as UTF-8 without a byte-order mark; a mark is accepted when reading (spreadsheet
programs add one).

Light on purpose (no JAX): data workers and builders import it.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
from typing import Iterable

# Sharp spellings; mir_eval reads them as well as flats.
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# 24 keys: the 12 majors, then the 12 minors.
KEY_CLASSES = tuple(f"{tonic} {mode}" for mode in ("major", "minor") for tonic in PITCH_CLASSES)

SPLITS = ("train", "valid", "test")
# The name of a task folder's label table (offline tasks, baselines, the demo).
LABELS_FILE = "labels.csv"
COLUMNS = ("path", "label", "split")
# Joins several tags (multi-label) or several regression targets in one `label` cell.
LABEL_SEPARATOR = ";"


@dataclasses.dataclass(frozen=True)
class LabelRow:
  """One clip of a labels.csv: audio path (relative to the root), label text, split."""
  path: str
  label: str
  split: str


def write_labels_csv(rows: Iterable, out_csv) -> pathlib.Path:
  """Writes `(path, label, split)` rows (tuples or LabelRows) atomically; returns the path.

  A split outside SPLITS is refused, naming the row, before anything is written.
  """
  out_csv = pathlib.Path(out_csv)
  rows = [LabelRow(*row) if not isinstance(row, LabelRow) else row for row in rows]
  for row in rows:
    if row.split not in SPLITS:
      raise ValueError(f"{out_csv}: row {row.path!r} has split {row.split!r}, not one of "
                       f"{SPLITS}")
  out_csv.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_csv.with_name(f".{out_csv.name}.{os.getpid()}.tmp")
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    writer.writerows((row.path, row.label, row.split) for row in rows)
  os.replace(tmp, out_csv)
  return out_csv


def read_labels_csv(labels_csv) -> list[LabelRow]:
  """The rows of a labels.csv, checked: the three columns exist and every split is valid.

  Raises ValueError naming the file (and the line) on a missing column or a bad split.
  """
  # utf-8-sig drops a leading byte-order mark, which would otherwise glue itself to the
  # first column name ("\ufeffpath").
  with open(labels_csv, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    missing = set(COLUMNS) - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{labels_csv}: missing column(s) {sorted(missing)}; "
                       f"expected {','.join(COLUMNS)}")
    rows = []
    for line, record in enumerate(reader, start=2):
      if record["split"] not in SPLITS:
        raise ValueError(f"{labels_csv} line {line}: split {record['split']!r} is not one "
                         f"of {SPLITS}")
      rows.append(LabelRow(record["path"], record["label"], record["split"]))
  return rows
