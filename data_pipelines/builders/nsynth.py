"""NSynth instrument family and pitch (MARBLE): `nsynth-{train,valid,test}/`.

Each folder holds `examples.json` (note_str -> {"instrument_family": int, "pitch": int,
...}) and `audio/<note_str>.wav`. Splits are NSynth's own folders. Labels: `instrument`
(the 11 instrument families) and `pitch` (MIDI 0-127, 128 classes, as MARBLE).
"""
from __future__ import annotations

import json
import pathlib

import tensorflow_datasets as tfds

from data_pipelines.builders import base

FAMILIES = ("bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed",
            "string", "synth_lead", "vocal")
NUM_PITCHES = 128
FOLDERS = {"train": "nsynth-train", "valid": "nsynth-valid", "test": "nsynth-test"}


def _int_field(note: dict, field: str, upper: int, where: str) -> int:
  value = note.get(field)
  if not isinstance(value, int) or not 0 <= value < upper:
    raise ValueError(f"{where}: field {field!r} must be an integer in [0, {upper}), "
                     f"got {value!r}")
  return value


class MarbleNsynth(base.MarbleBuilder, skip_registration=True):
  """NSynth notes with instrument-family and pitch labels."""
  name = "marble_nsynth"
  DESCRIPTION = __doc__
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Extract nsynth-{train,valid,test}.jsonwav.tar.gz into "
                                  "the manual dir (nsynth-*/examples.json + audio/).")
  CSV_LABELS = ("instrument",)

  def label_features(self):
    return {"instrument": tfds.features.ClassLabel(names=FAMILIES),
            "pitch": tfds.features.ClassLabel(num_classes=NUM_PITCHES)}

  @classmethod
  def list_examples(cls, manual_dir, config=None) -> base.Listing:
    manual_dir = pathlib.Path(manual_dir)
    examples = []
    for split, folder in FOLDERS.items():
      split_dir = manual_dir / folder
      if not split_dir.exists():
        continue  # Some users keep only some splits; none at all is an error below.
      json_path = base.require_file(split_dir / "examples.json", "NSynth")
      try:
        notes = json.loads(json_path.read_text())
      except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from e
      if not isinstance(notes, dict):
        raise ValueError(f"{json_path}: expected an object note_str -> note")
      for note_str in sorted(notes):
        where = f"{json_path} [{note_str!r}]"
        note = notes[note_str]
        if not isinstance(note, dict):
          raise ValueError(f"{where}: expected an object, got {note!r}")
        family = _int_field(note, "instrument_family", len(FAMILIES), where)
        pitch = _int_field(note, "pitch", NUM_PITCHES, where)
        audio = base.require_file(split_dir / "audio" / f"{note_str}.wav", "NSynth")
        examples.append(base.Example(base.relpath(audio, manual_dir), split,
                                     {"instrument": FAMILIES[family], "pitch": pitch}))
    if not examples:
      raise FileNotFoundError(f"NSynth: none of {sorted(FOLDERS.values())} in {manual_dir}")
    return base.Listing(examples)
