"""Tests for data_pipelines.ingest: folder of messy audio -> TFDS ArrayRecord dataset."""
import json
import pathlib
import time

import numpy as np
import pytest
import soundfile

from data_pipelines import audio as audio_lib
from data_pipelines import ingest as ingest_lib


def _tone(seconds, rate, channels=1, freq=440.0):
  t = np.arange(int(seconds * rate)) / rate
  wave = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
  return np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave


def _make_folder(root: pathlib.Path) -> pathlib.Path:
  """Four good files (wav 44.1 kHz stereo, flac 16 kHz, ogg, mp3) and four bad ones."""
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
  (root / "notes.txt").write_text("not audio")
  return root


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
  root = _make_folder(tmp_path_factory.mktemp("music"))
  out = tmp_path_factory.mktemp("dataset")
  start = time.perf_counter()
  summary = ingest_lib.ingest(root, out, min_seconds=1.0)
  return root, out, summary, time.perf_counter() - start


def test_keeps_good_files_and_reports_bad_ones(ingested):
  root, out, summary, _ = ingested
  assert summary["kept"] == 4 and summary["skipped"] == 4 and not summary["reused"]
  report = json.loads((out / ingest_lib.REPORT_NAME).read_text())
  reasons = {s["path"]: s["reason"] for s in report["skipped"]}
  assert sorted(reasons) == ["corrupt.flac", "empty.wav", "nan.wav", "short.wav"]
  assert "empty" in reasons["empty.wav"]
  assert "cannot decode" in reasons["corrupt.flac"]
  assert "too short" in reasons["short.wav"]
  assert "NaN" in reasons["nan.wav"]
  assert summary["hours"] == pytest.approx((1.6 + 1.3 + 1.2 + 1.5) / 3600, rel=0.02)


def test_dataset_holds_24k_mono_int16_pcm(ingested):
  root, out, _, _ = ingested
  source = ingest_lib.load_data_source(out)
  assert ingest_lib.dataset_sample_rate(out) == 24_000
  records = {r["path"].decode(): r for r in (source[i] for i in range(len(source)))}
  assert sorted(records) == ["a/stereo.wav", "b/c/vorbis.ogg", "b/mono16k.flac", "b/song.mp3"]
  for rel, record in records.items():
    assert record["audio"].dtype == np.int16 and record["audio"].ndim == 1
    assert record["duration"] == pytest.approx(record["audio"].shape[0] / 24_000, abs=1e-4)
  # The stored PCM is the decoded, downmixed, resampled file to int16 precision.
  expected = audio_lib.load_audio(root / "a" / "stereo.wav", 24_000)
  stored = ingest_lib.pcm_to_float(records["a/stereo.wav"]["audio"])
  assert stored.shape == expected.shape == (int(1.6 * 24_000),)
  np.testing.assert_allclose(stored, expected, atol=1.0 / 32768)


def test_rerun_is_a_noop(ingested):
  root, out, summary, first_seconds = ingested
  files = sorted(p for p in out.rglob("*") if p.is_file())
  mtimes = [p.stat().st_mtime_ns for p in files]
  start = time.perf_counter()
  again = ingest_lib.ingest(root, out, min_seconds=1.0)
  seconds = time.perf_counter() - start
  assert again["reused"] and {**again, "reused": False} == summary
  assert [p.stat().st_mtime_ns for p in files] == mtimes
  assert seconds < first_seconds


def test_changed_folder_is_ingested_again(tmp_path):
  root = tmp_path / "music"
  root.mkdir()
  soundfile.write(root / "one.wav", _tone(1.1, 24_000), 24_000)
  out = tmp_path / "ds"
  assert ingest_lib.ingest(root, out)["kept"] == 1
  soundfile.write(root / "two.flac", _tone(1.2, 48_000), 48_000)
  summary = ingest_lib.ingest(root, out)
  assert summary["kept"] == 2 and not summary["reused"]
  assert len(ingest_lib.load_data_source(out)) == 2


def test_missing_or_empty_folder_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ingest_lib.ingest(tmp_path / "nowhere", tmp_path / "out")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("no audio here")
  with pytest.raises(FileNotFoundError, match="no audio files"):
    ingest_lib.ingest(tmp_path / "empty", tmp_path / "out")


def test_all_files_unusable_is_an_error_with_report(tmp_path):
  root = tmp_path / "music"
  root.mkdir()
  soundfile.write(root / "short.wav", _tone(0.2, 24_000), 24_000)
  with pytest.raises(ValueError, match="no usable audio"):
    ingest_lib.ingest(root, tmp_path / "out")
  report = json.loads((tmp_path / "out" / ingest_lib.REPORT_NAME).read_text())
  assert [s["path"] for s in report["skipped"]] == ["short.wav"]


def test_builder_helper_float32_round_trip(tmp_path):
  waves = [np.linspace(-1, 1, 500 + i, dtype=np.float32) for i in range(3)]

  def examples():
    for i, w in enumerate(waves):
      yield f"k{i}", {"audio": w, "path": f"x/{i}.wav", "duration": w.shape[0] / 24_000}

  ingest_lib.build_array_record_dataset("toy", tmp_path, ingest_lib.audio_features(np.float32),
                                        {"train": examples}, metadata={"sample_rate": 24_000})
  source = ingest_lib.load_data_source(tmp_path)
  got = sorted((r["path"].decode(), r["audio"]) for r in (source[i] for i in range(3)))
  for (path, audio), (i, w) in zip(got, enumerate(waves)):
    assert path == f"x/{i}.wav"
    np.testing.assert_array_equal(audio, w)
  with pytest.raises(KeyError, match="no split 'test'"):
    ingest_lib.load_data_source(tmp_path, split="test")


def test_find_dataset_dir_names_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset"):
    ingest_lib.find_dataset_dir(tmp_path)
