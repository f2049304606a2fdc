"""VocalSet singer and technique (MARBLE): `<singer>/<context>/<technique>/*.wav`.

The manual dir holds the singer folders (`female1` ... `female9`, `male1` ... `male11`),
directly or inside `FULL/` as in the release. Configs:
- `technique`: the 10 techniques of the VocalSet paper and MARBLE (other folders such as
  `fast_forte` or `messa` are skipped); split by singer, so test singers are never heard
  in training: test = female2, female8, male3, male5, male10 (the held-out singers of the
  VocalSet paper); valid = female4, male9 (this project's choice); train = the rest.
- `singer`: all 20 singers, so every singer must be in every split: split by recording,
  80 / 10 / 10 by a deterministic hash of the file path.
"""
from __future__ import annotations

import pathlib
import re

import tensorflow_datasets as tfds

from data_pipelines.builders import base

SINGERS = tuple([f"female{i}" for i in range(1, 10)] + [f"male{i}" for i in range(1, 12)])
TECHNIQUES = ("belt", "breathy", "inhaled", "lip_trill", "spoken", "straight", "trill",
              "trillo", "vibrato", "vocal_fry")
TEST_SINGERS = ("female2", "female8", "male3", "male5", "male10")
VALID_SINGERS = ("female4", "male9")
_SINGER = re.compile(r"^(female[1-9]|male([1-9]|1[01]))$")


def _singer_split(singer: str) -> str:
  return "test" if singer in TEST_SINGERS else "valid" if singer in VALID_SINGERS else "train"


class MarbleVocalset(base.MarbleBuilder, skip_registration=True):
  """VocalSet singer identification or singing-technique classification."""
  name = "marble_vocalset"
  DESCRIPTION = __doc__
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="technique", description="10 techniques, held-out singers"),
      tfds.core.BuilderConfig(name="singer", description="20 singers, split by recording"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Extract VocalSet so that the manual dir (or its FULL/ "
                                  "folder) holds <singer>/<context>/<technique>/*.wav.")

  @classmethod
  def csv_labels(cls, config=None) -> tuple[str, ...]:
    return (config or "technique",)

  def label_features(self):
    features = {"singer": tfds.features.ClassLabel(names=SINGERS),
                "context": tfds.features.Text()}
    if self.config_name != "singer":
      features["technique"] = tfds.features.ClassLabel(names=TECHNIQUES)
    return features

  @classmethod
  def list_examples(cls, manual_dir, config=None) -> base.Listing:
    manual_dir = pathlib.Path(manual_dir)
    config = config or "technique"
    if config not in ("technique", "singer"):
      raise ValueError(f"VocalSet: unknown config {config!r}, expected technique or singer")
    root = manual_dir / "FULL" if (manual_dir / "FULL").is_dir() else manual_dir
    examples = []
    for path in base.visible_files(base.require_dir(root, "VocalSet"), "**/*.wav"):
      parts = path.relative_to(root).parts
      if len(parts) != 4 or not _SINGER.match(parts[0]):
        raise ValueError(f"VocalSet: {path} is not at <singer>/<context>/<technique>/<file>"
                         f".wav under {root} with a singer among female1-9, male1-11")
      singer, context, technique = parts[:3]
      rel = base.relpath(path, manual_dir)
      labels = {"singer": singer, "context": context}
      if config == "singer":
        split = base.hash_split(rel, (("train", 0.8), ("valid", 0.1), ("test", 0.1)))
      elif technique in TECHNIQUES:
        split, labels["technique"] = _singer_split(singer), technique
      else:
        continue
      examples.append(base.Example(rel, split, labels))
    if not examples:
      raise FileNotFoundError(f"VocalSet: no usable .wav files under {root}")
    return base.Listing(examples)
