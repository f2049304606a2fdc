"""Tests for data_pipelines.ingest and the dataset format it writes: folder of messy audio ->
TFDS ArrayRecord dataset; a dataset is never lost to a later ingest, and only datasets in
this project's own feature spec are read."""
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from data_pipelines import dataset_format
from data_pipelines import ingest as ingest_lib
from pupujepa_jax import cli

REPO = pathlib.Path(__file__).resolve().parent.parent


def _tone(seconds, rate, channels=1, freq=440.0):
  t = np.arange(int(seconds * rate)) / rate
  wave = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
  return np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave


def _make_folder(root: pathlib.Path) -> pathlib.Path:
  """Four good files (wav 44.1 kHz stereo, flac 16 kHz, ogg, mp3) and five bad ones."""
  (root / "a").mkdir(parents=True)
  (root / "b" / "c").mkdir(parents=True)
  soundfile.write(root / "a" / "stereo.wav", _tone(1.6, 44_100, channels=2), 44_100)
  soundfile.write(root / "b" / "mono16k.flac", _tone(1.3, 16_000, freq=220), 16_000)
  soundfile.write(root / "b" / "c" / "vorbis.ogg", _tone(1.2, 22_050, freq=330), 22_050,
                  format="OGG", subtype="VORBIS")
  soundfile.write(root / "b" / "song.mp3", _tone(1.5, 32_000, freq=550), 32_000,
                  format="MP3", subtype="MPEG_LAYER_III")
  soundfile.write(root / "empty.wav", np.zeros(0, np.float32), 24_000)
  (root / "corrupt.flac").write_bytes(b"fLaC" + np.random.default_rng(0).bytes(2000))
  soundfile.write(root / "short.wav", _tone(0.3, 24_000), 24_000)
  nan = _tone(1.5, 24_000)
  nan[100] = np.nan
  soundfile.write(root / "nan.wav", nan, 24_000, subtype="FLOAT")
  # 8 KB claiming 1 Hz: 4000 s of audio, 96 million samples once resampled.
  soundfile.write(root / "one_hz.wav", np.zeros(4000, np.int16), 1, subtype="PCM_16")
  (root / "notes.txt").write_text("not audio")
  return root


def _tones(root: pathlib.Path, names, seconds=1.2, rate=24_000) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  for i, name in enumerate(names):
    soundfile.write(root / name, _tone(seconds, rate, freq=200.0 + 50 * i), rate)
  return root


def _paths(out) -> list[str]:
  source = dataset_format.load_data_source(out)
  return sorted(source[i]["path"].decode() for i in range(len(source)))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
  root = _make_folder(tmp_path_factory.mktemp("music"))
  out = tmp_path_factory.mktemp("dataset")
  summary = ingest_lib.ingest(root, out, min_seconds=1.0)
  return root, out, summary


def test_keeps_good_files_and_reports_bad_ones(ingested):
  root, out, summary = ingested
  assert summary["kept"] == 4 and summary["skipped"] == 5 and not summary["reused"]
  report = json.loads((out / ingest_lib.REPORT_NAME).read_text())
  reasons = {s["path"]: s["reason"] for s in report["skipped"]}
  assert sorted(reasons) == ["corrupt.flac", "empty.wav", "nan.wav", "one_hz.wav",
                             "short.wav"]
  assert "empty" in reasons["empty.wav"]
  assert "cannot decode" in reasons["corrupt.flac"]
  assert "too short" in reasons["short.wav"]
  assert "NaN" in reasons["nan.wav"]
  assert "sample rate 1 Hz" in reasons["one_hz.wav"]
  assert summary["hours"] == pytest.approx((1.6 + 1.3 + 1.2 + 1.5) / 3600, rel=0.02)


def test_dataset_holds_24k_mono_int16_pcm(ingested):
  root, out, _ = ingested
  source = dataset_format.load_data_source(out)
  assert dataset_format.dataset_sample_rate(out) == 24_000
  records = {r["path"].decode(): r for r in (source[i] for i in range(len(source)))}
  assert sorted(records) == ["a/stereo.wav", "b/c/vorbis.ogg", "b/mono16k.flac", "b/song.mp3"]
  for record in records.values():
    assert record["audio"].dtype == np.int16 and record["audio"].ndim == 1
    assert record["duration"] == pytest.approx(record["audio"].shape[0] / 24_000, abs=1e-4)
  # Downmix and resampling against librosa's own loader (its downmix, soxr called by it).
  for rel, seconds, freq in (("a/stereo.wav", 1.6, 440.0), ("b/mono16k.flac", 1.3, 220.0)):
    stored = dataset_format.pcm_to_float(records[rel]["audio"])
    expected, _ = librosa.load(root / rel, sr=24_000, mono=True, res_type="soxr_hq")
    assert stored.shape == expected.shape == (int(seconds * 24_000),)
    np.testing.assert_allclose(stored, expected, atol=1.0 / 32768 + 1e-6)
    # And against physics: the tone is still at its frequency, at the stored rate.
    spectrum = np.abs(np.fft.rfft(stored))
    assert np.argmax(spectrum) * 24_000 / stored.shape[0] == pytest.approx(freq, abs=1.0)
  # The stereo file's channels are (x, x / 2): the downmix is their mean, 0.75 x.
  stereo = dataset_format.pcm_to_float(records["a/stereo.wav"]["audio"])
  assert np.abs(stereo).max() == pytest.approx(0.75 * 0.3, abs=3e-3)


def test_rerun_is_a_noop(ingested):
  root, out, summary = ingested
  files = sorted(p for p in out.rglob("*") if p.is_file())
  mtimes = [p.stat().st_mtime_ns for p in files]
  identity = dataset_format.dataset_identity(out)
  again = ingest_lib.ingest(root, out, min_seconds=1.0)
  assert again["reused"] and {**again, "reused": False} == summary
  assert [p.stat().st_mtime_ns for p in files] == mtimes
  assert dataset_format.dataset_identity(out) == identity


def test_changed_folder_is_ingested_again_with_a_new_identity(tmp_path):
  root = _tones(tmp_path / "music", ["one.wav"])
  out = tmp_path / "ds"
  assert ingest_lib.ingest(root, out)["kept"] == 1
  identity = dataset_format.dataset_identity(out)
  soundfile.write(root / "two.flac", _tone(1.2, 48_000), 48_000)
  summary = ingest_lib.ingest(root, out)
  assert summary["kept"] == 2 and not summary["reused"]
  assert _paths(out) == ["one.wav", "two.flac"]
  assert dataset_format.dataset_identity(out) != identity
  # The swapped-in folder has the usual permissions, not a private temporary folder's.
  assert out.stat().st_mode & 0o777 == (tmp_path / "music").stat().st_mode & 0o777
  # The build happened beside `out`, and nothing of it is left there.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "music"]


def test_another_source_is_replaced_only_with_overwrite(tmp_path, capsys):
  first = _tones(tmp_path / "first", ["a.wav", "b.wav"])
  second = _tones(tmp_path / "second", ["c.wav"])
  out = tmp_path / "ds"
  ingest_lib.ingest(first, out)
  with pytest.raises(ValueError, match=r"ingested from .*first.*pass --overwrite"):
    ingest_lib.ingest(second, out)
  assert _paths(out) == ["a.wav", "b.wav"]
  # The command refuses in one line and exits 2; stdout stays empty.
  argv = ["data", "ingest", "--input", str(second), "--out", str(out)]
  assert cli.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and "--overwrite" in captured.err
  assert _paths(out) == ["a.wav", "b.wav"]
  assert cli.main(argv + ["--overwrite"]) == 0
  assert json.loads(capsys.readouterr().out)["kept"] == 1
  assert _paths(out) == ["c.wav"]


def test_stdout_holds_only_the_json(tmp_path, capsys):
  root = _tones(tmp_path / "music", ["a.wav"])
  assert cli.main(["data", "ingest", "--input", str(root), "--out", str(tmp_path / "ds")]) == 0
  captured = capsys.readouterr()
  summary = json.loads(captured.out)  # TFDS's progress lines would break this
  assert summary["kept"] == 1
  assert "prepared" in captured.err  # TFDS's progress went to stderr


def test_all_files_unusable_leaves_the_dataset(tmp_path):
  root = _tones(tmp_path / "music", ["a.wav", "b.wav"])
  out = tmp_path / "ds"
  ingest_lib.ingest(root, out)
  report = (out / ingest_lib.REPORT_NAME).read_text()
  for name in ("a.wav", "b.wav"):
    soundfile.write(root / name, _tone(0.2, 24_000), 24_000)
  with pytest.raises(ValueError, match=r"no usable audio .* all 2 files were skipped "
                                       r"\(a.wav: too short.*left as it was"):
    ingest_lib.ingest(root, out)
  assert _paths(out) == ["a.wav", "b.wav"]
  assert (out / ingest_lib.REPORT_NAME).read_text() == report
  # Into a new folder, nothing at all is created.
  with pytest.raises(ValueError, match="no usable audio"):
    ingest_lib.ingest(root, tmp_path / "new")
  assert not (tmp_path / "new").exists()


def test_a_folder_ingest_did_not_make_is_never_replaced(tmp_path):
  root = _tones(tmp_path / "music", ["a.wav"])
  out = tmp_path / "mine"
  out.mkdir()
  (out / "thesis.tex").write_text("precious")
  with pytest.raises(ValueError, match=r"mine is not empty and holds no ingest_report"):
    ingest_lib.ingest(root, out, overwrite=True)
  assert (out / "thesis.tex").read_text() == "precious"


def test_sigkill_during_a_reingest_keeps_the_old_dataset(tmp_path):
  first = _tones(tmp_path / "first", ["a.wav", "b.wav"])
  out = tmp_path / "ds"
  ingest_lib.ingest(first, out)
  identity = dataset_format.dataset_identity(out)
  # Enough audio that the second build is still running when the first record is written.
  second = _tones(tmp_path / "second", [f"{i:02d}.wav" for i in range(40)], seconds=6.0,
                  rate=44_100)
  proc = subprocess.Popen(
      [sys.executable, "-m", "pupujepa_jax.cli", "data", "ingest", "--input", str(second),
       "--out", str(out), "--overwrite"],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    staging = None
    while proc.poll() is None and staging is None:
      # The build's TFDS folder appears inside the temporary sibling once writing starts.
      started = list(tmp_path.glob(".ds.ingest-*/audio_folder/incomplete.*"))
      staging = started[0] if started else None
    assert staging is not None, f"ingest ended (rc {proc.returncode}) before it was seen"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert _paths(out) == ["a.wav", "b.wav"]
  assert dataset_format.dataset_identity(out) == identity
  # The next ingest reuses the intact dataset and removes the killed run's leftovers.
  assert ingest_lib.ingest(first, out)["reused"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "first", "second"]


def test_a_dataset_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
  # Where renameat2 cannot exchange folders, ingest renames the old dataset aside first; a
  # kill right then leaves this state, which the next ingest repairs.
  first = _tones(tmp_path / "first", ["a.wav"])
  out = tmp_path / "ds"
  ingest_lib.ingest(first, out)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  out.rename(tmp_path / f".ds.ingest-{dead}-0000.old")
  assert ingest_lib.ingest(first, out)["reused"]
  assert _paths(out) == ["a.wav"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "first"]


def _doctor(dataset_dir: pathlib.Path, module: str) -> pathlib.Path:
  """Names `module` as the class of the `path` feature in features.json."""
  path = dataset_dir / dataset_format.FEATURES_FILE
  spec = json.loads(path.read_text())
  spec["featuresDict"]["features"]["path"]["pythonClassName"] = f"{module}.Evil"
  path.write_text(json.dumps(spec))
  return path


def test_a_doctored_features_json_is_refused_without_importing(tmp_path, monkeypatch):
  root = _tones(tmp_path / "music", ["a.wav"])
  out = tmp_path / "ds"
  ingest_lib.ingest(root, out)
  module = "pupujepa_planted_feature"
  marker = tmp_path / "imported"
  (tmp_path / "plant").mkdir()
  (tmp_path / "plant" / f"{module}.py").write_text(
      f"open({str(marker)!r}, 'w').write('ran')\n")
  monkeypatch.syspath_prepend(str(tmp_path / "plant"))
  doctored = _doctor(dataset_format.find_dataset_dir(out), module)
  with pytest.raises(ValueError, match=rf"{doctored}: features .* differ"):
    dataset_format.load_data_source(out)
  assert not marker.exists() and module not in sys.modules
  # What the check prevents: TFDS's own reader imports the named module.
  with pytest.raises(ValueError):
    tfds.builder_from_directory(str(dataset_format.find_dataset_dir(out)))
  assert marker.read_text() == "ran"


def test_the_checked_reader_survives_pickling(tmp_path):
  # Grain sends the source to its worker processes pickled.
  root = _tones(tmp_path / "music", ["a.wav", "b.wav"])
  ingest_lib.ingest(root, tmp_path / "ds")
  source = pickle.loads(pickle.dumps(dataset_format.load_data_source(tmp_path / "ds")))
  assert sorted(source[i]["path"].decode() for i in range(len(source))) == ["a.wav", "b.wav"]


def test_builder_label_features_are_accepted_others_refused(tmp_path):
  features = dict(dataset_format.audio_features().items())
  features["genre"] = tfds.features.ClassLabel(names=["a", "b"])
  features["tags"] = tfds.features.Sequence(tfds.features.ClassLabel(names=["x"]))
  features["valence"] = tfds.features.Scalar(dtype=np.float32)

  def examples():
    yield "k", {"audio": np.zeros(10, np.int16), "path": "x.wav", "duration": 0.1,
                "genre": "b", "tags": ["x"], "valence": 0.5}

  dataset_format.build_array_record_dataset("labelled", tmp_path / "ok",
                                            tfds.features.FeaturesDict(features),
                                            {"train": examples})
  record = dataset_format.load_data_source(tmp_path / "ok")[0]
  assert sorted(record) == ["audio", "duration", "path"]
  features["embedding"] = tfds.features.Tensor(shape=(2,), dtype=np.float32)

  def with_embedding():
    for key, example in examples():
      yield key, {**example, "embedding": np.zeros(2, np.float32)}

  dataset_format.build_array_record_dataset("embedded", tmp_path / "bad",
                                            tfds.features.FeaturesDict(features),
                                            {"train": with_embedding})
  with pytest.raises(ValueError, match=r"features.json: feature\(s\) \['embedding'\] are"):
    dataset_format.load_data_source(tmp_path / "bad")


def test_builder_helper_float32_round_trip(tmp_path):
  waves = [np.linspace(-1, 1, 500 + i, dtype=np.float32) for i in range(3)]

  def examples():
    for i, w in enumerate(waves):
      yield f"k{i}", {"audio": w, "path": f"x/{i}.wav", "duration": w.shape[0] / 24_000}

  dataset_format.build_array_record_dataset(
      "toy", tmp_path, dataset_format.audio_features(np.float32), {"train": examples},
      metadata={"sample_rate": 24_000})
  source = dataset_format.load_data_source(tmp_path)
  got = sorted((r["path"].decode(), r["audio"]) for r in (source[i] for i in range(3)))
  for (path, audio), (i, w) in zip(got, enumerate(waves)):
    assert path == f"x/{i}.wav"
    np.testing.assert_array_equal(audio, w)
  with pytest.raises(KeyError, match="no split 'test'"):
    dataset_format.load_data_source(tmp_path, split="test")


def test_find_dataset_dir_names_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset"):
    dataset_format.find_dataset_dir(tmp_path)


def test_missing_or_empty_folder_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ingest_lib.ingest(tmp_path / "nowhere", tmp_path / "out")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("no audio here")
  with pytest.raises(FileNotFoundError, match="no audio files"):
    ingest_lib.ingest(tmp_path / "empty", tmp_path / "out")
