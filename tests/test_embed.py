"""Windowing (whole and streamed), readouts and the MARBLE feature layout of
`pupujepa embed`, which never mixes two models' features in one folder."""
import json
import shutil

import jax
import numpy as np
import pytest
import soundfile
import soxr

from data_pipelines import audio
from pupujepa_jax import cli, config as config_lib, export, features, inference
from tests import model_fixtures


def test_window_starts_cover_the_clip_and_end_aligned():
  assert inference.window_starts(100, 100, 100) == [0]
  assert inference.window_starts(250, 100, 100) == [0, 100, 150]
  assert inference.window_starts(300, 100, 50) == [0, 50, 100, 150, 200]
  looped = inference.split_windows(np.arange(3.0), 8, 8, "loop")
  np.testing.assert_array_equal(looped, [[0, 1, 2, 0, 1, 2, 0, 1]])
  padded = inference.split_windows(np.arange(1.0, 4.0), 5, 5, "pad")
  np.testing.assert_array_equal(padded, [[1, 2, 3, 0, 0]])
  wave = np.arange(250.0)
  windows = inference.split_windows(wave, 100, 100)
  np.testing.assert_array_equal(windows[-1], wave[150:])
  with pytest.raises(ValueError, match="non-empty mono"):
    inference.split_windows(np.zeros((10, 2)), 8, 8)


@pytest.mark.parametrize("window,hop", [(10_000, 10_000), (10_000, 3_000), (24_000, 7_777),
                                        (70_000, 70_000)])
def test_streamed_windows_equal_whole_file_windows(tmp_path, window, hop):
  # Stereo 44.1 kHz over many decoding blocks: equal to soundfile + downmix + soxr in one
  # call, within the resampler's float tolerance.
  stereo = model_fixtures.write_tone(tmp_path / "stereo.wav", 2.5, sample_rate=44_100,
                                     channels=2)
  data, rate = soundfile.read(stereo, dtype="float32")
  whole = inference.split_windows(soxr.resample(data.mean(axis=1), rate, 24_000,
                                                quality="HQ"), window, hop)
  streamed = np.stack(list(inference.iter_windows(
      audio.stream_audio(stereo, 24_000, block_frames=8_192), window, hop)))
  assert streamed.shape == whole.shape
  np.testing.assert_allclose(streamed, whole, atol=1e-6)
  # Mono at 24 kHz: exactly the whole file's windows.
  mono = model_fixtures.write_tone(tmp_path / "mono.wav", 2.5)
  whole = inference.split_windows(soundfile.read(mono, dtype="float32")[0], window, hop)
  streamed = np.stack(list(inference.iter_windows(
      audio.stream_audio(mono, 24_000, block_frames=5_000), window, hop)))
  np.testing.assert_array_equal(streamed, whole)


@pytest.mark.parametrize("policy", ["loop", "pad"])
def test_streamed_short_clip_is_looped_or_padded(tmp_path, policy):
  clip = model_fixtures.write_tone(tmp_path / "short.wav", 0.2)
  wave = soundfile.read(clip, dtype="float32")[0]
  streamed = list(inference.iter_windows(audio.stream_audio(clip, 24_000, block_frames=1_000),
                                         10_000, 10_000, policy))
  np.testing.assert_array_equal(np.stack(streamed),
                                inference.split_windows(wave, 10_000, 10_000, policy))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  cfg = model_fixtures.smoke_cfg()
  params = model_fixtures.init_encoder(cfg, 0)
  out = tmp_path_factory.mktemp("model")
  export.write_model_dir(out, params, config_lib.serving_spec(cfg), model_id="smoke-init",
                         source="test")
  return out


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
  cfg = model_fixtures.smoke_cfg()
  out = tmp_path_factory.mktemp("other_model")
  export.write_model_dir(out, model_fixtures.init_encoder(cfg, 1),
                         config_lib.serving_spec(cfg), model_id="smoke-other", source="test")
  return out


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("audio")
  model_fixtures.write_tone(root / "a" / "b.wav", 1.5, freq=330.0, seed=1)
  model_fixtures.write_tone(root / "a" / "deeper" / "c.wav", 2.0, freq=550.0, seed=2)
  model_fixtures.write_tone(root / "stereo.wav", 1.0, sample_rate=44_100, channels=2,
                            freq=220.0, seed=3)
  model_fixtures.write_tone(root / "short.wav", 0.2, freq=880.0, seed=4)
  (root / "broken.wav").write_bytes(b"RIFF not really a wav file")
  return root


def test_embed_folder_writes_the_marble_layout(model_dir, audio_dir, tmp_path):
  out = tmp_path / "feats"
  assert cli.main(["embed", "--model", str(model_dir), "--input", str(audio_dir),
                   "--out", str(out), "--no_progress"]) == 0
  meta = json.loads((out / "meta.json").read_text())
  assert meta["D"] == 8 * 64 and meta["L"] == 2 and meta["token_rate"] == 25.0
  assert meta["sample_rate"] == 24_000 and meta["readout"] == "freqcat"
  assert meta["model_id"] == "smoke-init" and meta["window_seconds"] == pytest.approx(0.64)
  assert [f["path"] for f in meta["failed"]] == ["broken.wav"]
  assert "cannot decode" in meta["failed"][0]["reason"]
  expected_chunks = {"a/b.wav": 3, "a/deeper/c.wav": 4, "stereo.wav": 2, "short.wav": 1}
  assert sorted(meta["files"]) == sorted(expected_chunks)
  model = inference.load(model_dir)
  from data_pipelines import audio
  for rel, n_chunks in expected_chunks.items():
    feats = np.load(out / (rel + ".npy"))
    assert feats.shape == (3, n_chunks, 8 * 64) and feats.dtype == np.float32
    # Batching windows across files gives what embedding the file alone gives.
    alone = model.embed(audio.load_audio(audio_dir / rel), 24_000)
    np.testing.assert_allclose(feats, alone, atol=2e-5)
  assert not (out / "broken.wav.npy").exists()
  # Different audio gives different features.
  assert np.abs(np.load(out / "a/b.wav.npy") - np.load(out / "short.wav.npy")).max() > 1e-2


def test_mean_readout_single_file_and_overlap(model_dir, audio_dir, tmp_path):
  model = inference.load(model_dir, batch_size=3)
  assert model.batch_size % jax.local_device_count() == 0
  meta = inference.embed_folder(model, audio_dir / "a" / "deeper" / "c.wav", tmp_path,
                                readout="mean", layers=[0, -1], hop_seconds=0.32,
                                progress=False)
  feats = np.load(tmp_path / "c.wav.npy")
  assert meta["D"] == 64 and meta["layers"] == [0, 2]
  assert feats.shape == (2, 6, 64)  # 2.0 s: starts 0, .32, .64, .96, 1.28 + end-aligned 1.36
  # The freqcat vector holds the 8 band means, whose average is the mean readout.
  cat = inference.embed_folder(model, audio_dir / "a" / "deeper" / "c.wav", tmp_path / "c",
                               readout="freqcat", layers=[0, -1], hop_seconds=0.32,
                               progress=False)
  assert cat["D"] == 8 * 64
  bands = np.load(tmp_path / "c" / "c.wav.npy").reshape(2, 6, 8, 64)
  np.testing.assert_allclose(bands.mean(2), feats, atol=1e-5)
  assert np.abs(bands[:, :, 0] - bands[:, :, 7]).max() > 1e-2


def test_embed_refuses_bad_arguments(model_dir, audio_dir, tmp_path):
  model = inference.load(model_dir)
  with pytest.raises(ValueError, match="training window of 0.64 s"):
    inference.embed_folder(model, audio_dir, tmp_path, window_seconds=10.24, progress=False)
  with pytest.raises(ValueError, match="readout 'cls'"):
    inference.embed_folder(model, audio_dir, tmp_path, readout="cls", progress=False)
  with pytest.raises(ValueError, match="layer 5 out of range"):
    model.embed(np.zeros(24_000, np.float32), 24_000, layers=[5])
  with pytest.raises(ValueError, match="hop_seconds=0.001"):
    model.embed(np.zeros(24_000, np.float32), 24_000, hop_seconds=0.001)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    inference.embed_folder(model, tmp_path / "nowhere", tmp_path, progress=False)


def test_long_stereo_file_streams_through_batches(model_dir, tmp_path):
  # 4 s of 44.1 kHz stereo: several decoding blocks, 7 windows over batches of 2.
  root = tmp_path / "audio"
  model_fixtures.write_tone(root / "long.wav", 4.0, sample_rate=44_100, channels=2, seed=5)
  model_fixtures.write_tone(root / "next.wav", 1.0, freq=660.0, seed=6)
  # A NaN in its second decoding block: some of its windows were embedded before.
  late_nan = np.full(72_000, 0.1, np.float32)
  late_nan[-1] = np.nan
  soundfile.write(root / "late_nan.wav", late_nan, 24_000, subtype="FLOAT")
  model = inference.load(model_dir, batch_size=2)
  meta = inference.embed_folder(model, root, tmp_path / "feats", progress=False)
  assert meta["files"] == ["long.wav", "next.wav"]
  assert [f["path"] for f in meta["failed"]] == ["late_nan.wav"]
  assert "NaN" in meta["failed"][0]["reason"]
  assert not (tmp_path / "feats" / "late_nan.wav.npy").exists()
  for name in meta["files"]:
    wave, rate = soundfile.read(root / name, dtype="float32")
    alone = model.embed(wave, rate)
    np.testing.assert_allclose(np.load(tmp_path / "feats" / f"{name}.npy"), alone, atol=2e-5)
  assert np.load(tmp_path / "feats" / "long.wav.npy").shape[1] == 7


def test_another_models_folder_is_refused_unless_overwrite(model_dir, other_model_dir,
                                                           audio_dir, tmp_path, capsys):
  out = tmp_path / "feats"
  assert cli.main(["embed", "--model", str(model_dir), "--input", str(audio_dir),
                   "--out", str(out), "--no_progress"]) == 0
  capsys.readouterr()
  first = json.loads((out / "meta.json").read_text())
  (out / "notes.txt").write_text("the user's")
  np.save(out / "unlisted.wav.npy", np.zeros((1, 1, 1), np.float32))
  subset = tmp_path / "subset"
  subset.mkdir()
  shutil.copy(audio_dir / "stereo.wav", subset / "stereo.wav")
  argv = ["embed", "--model", str(other_model_dir), "--input", str(subset), "--out",
          str(out), "--no_progress"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "holds features of model 'smoke-init'" in err and "--overwrite" in err
  assert json.loads((out / "meta.json").read_text()) == first
  assert cli.main(argv + ["--overwrite"]) == 0
  meta = json.loads((out / "meta.json").read_text())
  assert meta["model_id"] == "smoke-other" and meta["files"] == ["stereo.wav"]
  # The old model's listed files are gone; nothing else was touched.
  left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
  assert left == ["meta.json", "notes.txt", "stereo.wav.npy", "unlisted.wav.npy"]
  # The same model again needs no overwrite.
  assert cli.main(argv) == 0
  assert features.read_meta(out)["files"] == ["stereo.wav"]
