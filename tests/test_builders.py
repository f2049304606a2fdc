"""Tests for data_pipelines.builders: MARBLE datasets from local copies -> TFDS ArrayRecord."""
import csv
import json
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import audio as audio_lib
from data_pipelines import builders
from data_pipelines import dataset_format
from data_pipelines.builders import base
from data_pipelines.builders import giantsteps_key
from data_pipelines.builders import gtzan
from tests.fixtures import marble

tfds.disable_progress_bar()

# name passed to builders.build -> (fixture writer, key of its expected dict or None)
BUILDS = {
    "gtzan": ("gtzan", None),
    "nsynth": ("nsynth", None),
    "giantsteps_key": ("giantsteps_key", None),
    "mtt": ("mtt", None),
    "emomusic": ("emomusic", None),
    "mtg_jamendo/top50": ("mtg_jamendo", "top50tags"),
    "vocalset/technique": ("vocalset", "technique"),
    "vocalset/singer": ("vocalset", "singer"),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Every dataset written once and built once: name -> (manual dir, expected, builder)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  roots, out = {}, {}
  for name, (writer, key) in BUILDS.items():
    if writer not in roots:
      root = tmp_path_factory.mktemp(writer)
      roots[writer] = (root, marble.WRITERS[writer](root))
    root, expected = roots[writer]
    expected = expected[key] if key else expected
    out[name] = (root, expected, builders.build(name, root, data_dir))
  return out


def _decoded_labels(builder, example, names):
  labels = {}
  for name in names:
    feature, value = builder.info.features[name], example[name]
    if isinstance(feature, tfds.features.Sequence):
      labels[name] = [feature.feature.int2str(int(v)) for v in value]
    elif isinstance(feature, tfds.features.ClassLabel):
      # NSynth pitch is a ClassLabel over 0-127, compared as the MIDI number.
      labels[name] = int(value) if name == "pitch" else feature.int2str(int(value))
    else:
      labels[name] = pytest.approx(float(value))
  return labels


@pytest.mark.parametrize("name", list(BUILDS))
def test_examples_labels_and_splits_match_the_files(prepared, name):
  root, expected, builder = prepared[name]
  sources = builder.as_data_source()
  got = {}
  for split, source in sources.items():
    for i in range(len(source)):
      ex = source[i]
      path = ex["path"].decode()
      label_names = list(expected[path][1]) if path in expected else []
      got[path] = (split, _decoded_labels(builder, ex, label_names))
      if path == sorted(expected)[0]:
        # Whole clip, 24 kHz mono int16, exactly what load_audio decodes.
        want = dataset_format.to_int16(audio_lib.load_audio(root / path, base.SAMPLE_RATE))
        assert ex["audio"].dtype == np.int16
        np.testing.assert_array_equal(ex["audio"], want)
        assert ex["duration"] == pytest.approx(want.shape[0] / base.SAMPLE_RATE)
  assert got == expected
  assert builder.info.metadata["sample_rate"] == base.SAMPLE_RATE
  assert builder.info.metadata["manual_dir"] == str(root.resolve())
  assert "tensorflow" not in sys.modules


def test_label_classes(prepared):
  assert prepared["gtzan"][2].info.features["genre"].names == list(gtzan.GENRES)
  assert prepared["giantsteps_key"][2].info.features["key"].num_classes == 24
  assert prepared["nsynth"][2].info.features["pitch"].num_classes == 128
  # MTT: the 50 most frequent of 55 tags, most frequent first; the 5 rare ones are out.
  names = prepared["mtt"][2].info.features["tags"].feature.names
  assert names == marble.MTT_TAGS[:50]
  mtg = prepared["mtg_jamendo/top50"][2].info.features["tags"].feature.names
  assert mtg == sorted({t for _, labels in prepared["mtg_jamendo/top50"][1].values()
                        for t in labels["tags"]})


def test_prepared_dataset_reloads_from_its_folder(prepared):
  builder = prepared["mtt"][2]
  again = tfds.builder_from_directory(builder.data_dir)
  source = again.as_data_source("test")
  assert len(source) == 2
  assert again.info.features["tags"].feature.names == marble.MTT_TAGS[:50]
  assert again.info.metadata["sample_rate"] == base.SAMPLE_RATE
  # The pipeline's reader accepts the builders' label features and decodes the audio.
  checked = dataset_format.load_data_source(builder.data_dir, "test")
  for i in range(len(source)):
    assert sorted(checked[i]) == ["audio", "duration", "path"]
    np.testing.assert_array_equal(checked[i]["audio"], source[i]["audio"])


def test_gtzan_filtered_split_has_the_published_sizes():
  split = gtzan.filtered_split()
  counts = {s: sum(v == s for v in split.values()) for s in base.SPLITS}
  assert counts == {"train": 443, "valid": 197, "test": 290}
  assert "jazz.00054" in split and "classical.00042" not in split


def test_gtzan_uses_user_split_files(tmp_path):
  marble.write_gtzan(tmp_path)
  (tmp_path / "train_filtered.txt").write_text("classical/classical.00042.wav\n")
  (tmp_path / "valid_filtered.txt").write_text("blues/blues.00012.wav\n")
  (tmp_path / "test_filtered.txt").write_text("blues/blues.00029.wav\n\n")
  listing = gtzan.MarbleGtzan.list_examples(tmp_path)
  assert {e.path: e.split for e in listing.examples} == {
      "genres/classical/classical.00042.wav": "train",
      "genres/blues/blues.00012.wav": "valid", "genres/blues/blues.00029.wav": "test"}
  (tmp_path / "test_filtered.txt").write_text("blues/blues.29.wav\n")
  with pytest.raises(ValueError, match="test_filtered.txt:1"):
    gtzan.MarbleGtzan.list_examples(tmp_path)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_write_labels_csv_from_builder_and_from_folder(prepared, tmp_path):
  root, expected, builder = prepared["mtt"]
  rows = _read_csv(builders.write_labels_csv(builder, tmp_path / "mtt.csv"))
  assert {r["path"]: (r["split"], r["label"].split(";")) for r in rows} == {
      p: (s, labels["tags"]) for p, (s, labels) in expected.items()}
  assert all((root / r["path"]).is_file() for r in rows)

  root, expected, _ = prepared["emomusic"]
  rows = _read_csv(builders.write_labels_csv(root, tmp_path / "emo.csv", dataset="emomusic"))
  for r in rows:
    split, labels = expected[r["path"]]
    valence, arousal = map(float, r["label"].split(";"))
    assert (r["split"], valence, arousal) == (split, labels["valence"], labels["arousal"])

  root, expected, builder = prepared["nsynth"]
  rows = _read_csv(builders.write_labels_csv(builder, tmp_path / "p.csv", label="pitch"))
  assert {r["path"]: int(r["label"]) for r in rows} == {
      p: labels["pitch"] for p, (_, labels) in expected.items()}

  # A reloaded (read-only) builder finds its manual dir and config in the metadata.
  root, expected, builder = prepared["vocalset/singer"]
  again = tfds.builder_from_directory(builder.data_dir)
  rows = _read_csv(builders.write_labels_csv(again, tmp_path / "singer.csv"))
  assert {r["path"]: (r["split"], r["label"]) for r in rows} == {
      p: (s, labels["singer"]) for p, (s, labels) in expected.items()}


def test_write_labels_csv_for_a_config_without_building(prepared, tmp_path):
  root = prepared["mtg_jamendo/top50"][0]
  expected = marble.write_mtg_jamendo(tmp_path / "copy")["genre"]
  rows = _read_csv(builders.write_labels_csv(tmp_path / "copy", tmp_path / "genre.csv",
                                             dataset="mtg_jamendo/genre"))
  assert {r["path"]: (r["split"], r["label"]) for r in rows} == {
      p: (s, ";".join(labels["tags"])) for p, (s, labels) in expected.items()}
  assert (root / "audio").is_dir()


def test_giantsteps_key_normalisation():
  assert [giantsteps_key.parse_key(text, "x") for text, _ in marble.KEY_TEXTS] == [
      key for _, key in marble.KEY_TEXTS]
  for bad in ("", "H minor", "C dorian", "C major extra"):
    with pytest.raises(ValueError, match="bad.key"):
      giantsteps_key.parse_key(bad, "bad.key")


def _corrupt(name, root):
  """Break one label file of a freshly written dataset; returns the text the error names."""
  if name == "gtzan":
    (root / "genres").rename(root / "gentres")
    return "genres"
  if name == "nsynth":
    path = root / "nsynth-valid" / "examples.json"
    notes = json.loads(path.read_text())
    next(iter(notes.values()))["pitch"] = 300
    path.write_text(json.dumps(notes))
    return "nsynth-valid/examples.json"
  if name == "giantsteps_key":
    path = next((root / "giantsteps-key-dataset/annotations/key").glob("1001*.key"))
    path.write_text("not a key")
    return path.name
  if name == "mtt":
    path = root / "annotations_final.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [lines[3].replace('"1"', '"yes"', 1)] + lines[4:]))
    return "annotations_final.csv:4"
  if name == "emomusic":
    path = root / "annotations" / "static_annotations.csv"
    path.write_text(path.read_text().replace("mean_valence", "valence"))
    return "static_annotations.csv"
  if name == "mtg_jamendo/top50":
    path = root / "data/splits/split-0/autotagging_top50tags-test.tsv"
    path.write_text(path.read_text().replace("\tinstrument---piano\tmood/theme---happy", ""))
    return "autotagging_top50tags-test.tsv:2"
  if name == "vocalset/technique":
    marble.write_audio(root / "FULL" / "female1" / "loose.wav", 0)
    return "loose.wav"
  raise KeyError(name)


@pytest.mark.parametrize("name", [n for n in BUILDS if n != "vocalset/singer"])
def test_bad_input_names_the_file(name, tmp_path):
  writer = BUILDS[name][0]
  marble.WRITERS[writer](tmp_path)
  culprit = _corrupt(name, tmp_path)
  cls, config = builders.resolve(name)
  with pytest.raises((ValueError, FileNotFoundError), match=culprit):
    cls.list_examples(tmp_path, config)


def test_missing_audio_and_missing_manual_dir_are_errors(tmp_path):
  marble.write_emomusic(tmp_path)
  clip = next((tmp_path / "clips_45seconds").glob("*.mp3"))
  clip.unlink()
  with pytest.raises(FileNotFoundError, match=clip.name):
    builders.write_labels_csv(tmp_path, tmp_path / "x.csv", dataset="emomusic")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    builders.build("gtzan", tmp_path / "nowhere", tmp_path / "tfds")
  with pytest.raises(KeyError, match="unknown dataset"):
    builders.resolve("gtzan2")
  with pytest.raises(KeyError, match="no config"):
    builders.resolve("vocalset/pitch")


def test_undecodable_audio_names_the_file(tmp_path):
  expected = marble.write_gtzan(tmp_path / "gtzan")
  bad = tmp_path / "gtzan" / sorted(expected)[0]
  bad.write_bytes(b"RIFF" + bytes(100))
  with pytest.raises(audio_lib.AudioDecodeError, match=bad.name):
    builders.build("gtzan", tmp_path / "gtzan", tmp_path / "tfds")


def test_build_reuses_a_prepared_dataset(prepared):
  root, _, builder = prepared["gtzan"]
  info = pathlib.Path(builder.data_dir) / "dataset_info.json"
  before = info.stat().st_mtime_ns
  again = builders.build("gtzan", root, pathlib.Path(builder.data_dir).parents[1])
  assert info.stat().st_mtime_ns == before
  assert len(again.as_data_source()["train"]) == 2


def test_giantsteps_single_folder_layout_and_hidden_files(tmp_path):
  expected = {}
  for i, (text, key) in enumerate(marble.KEY_TEXTS * 2):
    marble.write_audio(tmp_path / "audio" / f"{i}.LOFI.mp3", i, seconds=0.2)
    (tmp_path / "annotations" / "key").mkdir(parents=True, exist_ok=True)
    (tmp_path / "annotations" / "key" / f"{i}.LOFI.key").write_text(text)
    split = base.hash_split(f"{i}.LOFI.mp3", (("train", 0.8), ("valid", 0.1), ("test", 0.1)))
    expected[f"audio/{i}.LOFI.mp3"] = (split, {"key": key})
  (tmp_path / "audio" / "._0.LOFI.mp3").write_bytes(b"macOS resource fork")
  listing = giantsteps_key.MarbleGiantstepsKey.list_examples(tmp_path)
  assert {e.path: (e.split, e.labels) for e in listing.examples} == expected
  (tmp_path / "annotations" / "key" / "3.LOFI.key").unlink()
  with pytest.raises(FileNotFoundError, match="3.LOFI.key"):
    giantsteps_key.MarbleGiantstepsKey.list_examples(tmp_path)


def test_cli_data_build_prints_only_its_json(tmp_path, capsys):
  """TFDS's own progress goes to stderr: stdout parses as the summary."""
  import json
  from pupujepa_jax import cli
  marble.write_gtzan(tmp_path / "gtzan")
  assert cli.main(["data", "build", "--dataset", "gtzan", "--manual_dir",
                   str(tmp_path / "gtzan"), "--out", str(tmp_path / "tfds")]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["dataset"] == "gtzan" and sum(summary["splits"].values()) > 0
