"""GiantSteps key (MARBLE): `audio/*.mp3` + `annotations/key/*.key`, 24 key classes.

MARBLE trains and validates on giantsteps-mtg-key and tests on giantsteps-key, so the
manual dir should hold both repositories side by side:

    giantsteps-mtg-key-dataset/audio/<id>.mp3 + annotations/key/<id>.key  -> train / valid
    giantsteps-key-dataset/audio/<id>.mp3     + annotations/key/<id>.key  -> test

train/valid is a deterministic hash split of the mtg-key tracks (90 / 10 by file name).
A single dataset laid out directly in the manual dir (`audio/` + `annotations/key/`) is
also accepted and split 80 / 10 / 10 by the same hash. A `.key` file holds one key such as
`Eb minor` (tonic spelled with sharps or flats, any case); it is normalised to one of the
24 names in KEYS (`D# minor`), which `mir_eval.key.weighted_score` reads. Each audio file
needs its `.key` file; annotations without audio are skipped (the mtg-key audio is fetched
by a script and some previews may be missing).
"""
from __future__ import annotations

import pathlib

import mir_eval
import tensorflow_datasets as tfds

from data_pipelines.builders import base
from pupujepa_jax import labels

TONICS = labels.PITCH_CLASSES
KEYS = labels.KEY_CLASSES
MTG_KEY_DIR = "giantsteps-mtg-key-dataset"
KEY_DIR = "giantsteps-key-dataset"
_MODES = {"major": "major", "maj": "major", "minor": "minor", "min": "minor"}


def parse_key(text: str, where) -> str:
  """'eb  Minor' / 'D#\\tmin' -> 'D# minor'; anything else is an error naming `where`."""
  parts = text.split()
  if len(parts) == 2 and parts[1].lower() in _MODES:
    tonic = parts[0][:1].upper() + parts[0][1:].lower()
    key = f"{tonic} {_MODES[parts[1].lower()]}"
    try:
      mir_eval.key.validate_key(key)
      semitone, mode = mir_eval.key.split_key_string(key)
    except ValueError:
      pass
    else:
      return f"{TONICS[semitone % 12]} {mode}"
  raise ValueError(f"{where}: expected a key like 'Eb minor', got {text.strip()!r}")


def _tracks(dataset_dir: pathlib.Path, manual_dir: pathlib.Path, what: str):
  """(relative audio path, key) of every audio file of one GiantSteps folder."""
  audio_dir = base.require_dir(dataset_dir / "audio", what)
  key_dir = base.require_dir(dataset_dir / "annotations" / "key", what)
  tracks = []
  for audio in base.visible_files(audio_dir, "*.mp3"):
    key_file = base.require_file(key_dir / f"{audio.stem}.key", f"{what} (key of {audio.name})")
    tracks.append((base.relpath(audio, manual_dir), parse_key(key_file.read_text(), key_file)))
  if not tracks:
    raise FileNotFoundError(f"{what}: no .mp3 files in {audio_dir}")
  return tracks


class MarbleGiantstepsKey(base.MarbleBuilder, skip_registration=True):
  """GiantSteps key estimation, 24 classes."""
  name = "marble_giantsteps_key"
  DESCRIPTION = __doc__
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Put {MTG_KEY_DIR}/ and {KEY_DIR}/ (each with audio/ and "
                                  "annotations/key/) in the manual dir.")
  CSV_LABELS = ("key",)

  def label_features(self):
    return {"key": tfds.features.ClassLabel(names=KEYS)}

  @classmethod
  def list_examples(cls, manual_dir, config=None) -> base.Listing:
    manual_dir = pathlib.Path(manual_dir)
    if (manual_dir / MTG_KEY_DIR).exists() or (manual_dir / KEY_DIR).exists():
      train = _tracks(manual_dir / MTG_KEY_DIR, manual_dir, "GiantSteps MTG key")
      test = _tracks(manual_dir / KEY_DIR, manual_dir, "GiantSteps key")
      labelled = [(p, k, base.hash_split(pathlib.PurePosixPath(p).name,
                                         (("train", 0.9), ("valid", 0.1))))
                  for p, k in train]
      labelled += [(p, k, "test") for p, k in test]
    else:
      labelled = [(p, k, base.hash_split(pathlib.PurePosixPath(p).name,
                                         (("train", 0.8), ("valid", 0.1), ("test", 0.1))))
                  for p, k in _tracks(manual_dir, manual_dir, "GiantSteps key")]
    return base.Listing([base.Example(p, split, {"key": k}) for p, k, split in labelled])
