"""Tests for data_pipelines.audio: streamed decoding against soundfile + soxr called
directly, and the sample-rate range checked before anything is decoded."""
import tracemalloc

import numpy as np
import pytest
import soundfile
import soxr

from data_pipelines import audio
from pupujepa_jax import frontend
from pupujepa_jax.models import spec


def _noise(path, seconds, rate, channels, seed=0):
  rng = np.random.default_rng(seed)
  wave = (0.2 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
  soundfile.write(path, wave.squeeze(), rate, subtype="FLOAT")
  return path


def test_one_definition_of_the_sample_rate_range():
  assert frontend.SAMPLE_RATE_RANGE == (4_000, 768_000)
  assert spec.SAMPLE_RATE_RANGE is frontend.SAMPLE_RATE_RANGE


def test_a_tiny_file_claiming_1_hz_is_refused_before_decoding(tmp_path):
  # 8 KB of samples at 1 Hz: 4000 s, which resampling to 24 kHz would make 96 million
  # samples (hundreds of MB).
  path = tmp_path / "one_hz.wav"
  soundfile.write(path, np.zeros(4000, np.int16), 1, subtype="PCM_16")
  assert path.stat().st_size < 8_200
  tracemalloc.start()
  try:
    with pytest.raises(audio.AudioDecodeError, match=r"one_hz.wav: sample rate 1 Hz is "
                                                     r"outside .*4000..768000"):
      audio.load_audio(path)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 1_000_000


def test_rates_outside_the_range_are_refused_for_files_and_arrays(tmp_path):
  path = tmp_path / "fast.wav"
  soundfile.write(path, np.zeros(100, np.float32), 800_000)
  with pytest.raises(audio.AudioDecodeError, match="fast.wav: sample rate 800000 Hz"):
    next(audio.stream_audio(path))
  with pytest.raises(ValueError, match="sample rate 2000 Hz"):
    audio.prepare_waveform(np.zeros(100, np.float32), 2_000, 24_000)
  # The ends of the range are accepted.
  for rate in frontend.SAMPLE_RATE_RANGE:
    assert audio.prepare_waveform(np.zeros(rate // 100, np.float32), rate, 24_000).shape == \
        (240,)


def test_stream_equals_soundfile_and_soxr_called_directly(tmp_path):
  path = _noise(tmp_path / "stereo.wav", 2.3, 44_100, 2)
  blocks = list(audio.stream_audio(path, 24_000, block_frames=10_000))
  assert len(blocks) > 5
  data, rate = soundfile.read(path, dtype="float32")
  expected = soxr.resample(data.mean(axis=1), rate, 24_000, quality="HQ")
  streamed = np.concatenate(blocks)
  assert streamed.shape == expected.shape and abs(streamed.shape[0] - 2.3 * 24_000) <= 1
  np.testing.assert_allclose(streamed, expected, atol=1e-6)
  np.testing.assert_array_equal(audio.load_audio(path), streamed)
  # At the target rate, mono: exactly the file's samples.
  mono = _noise(tmp_path / "mono.wav", 1.1, 24_000, 1)
  np.testing.assert_array_equal(
      np.concatenate(list(audio.stream_audio(mono, 24_000, block_frames=7_000))),
      soundfile.read(mono, dtype="float32")[0])


def test_nan_late_in_a_file_is_an_error_naming_it(tmp_path):
  wave = np.full(50_000, 0.1, np.float32)
  wave[-10] = np.nan
  path = tmp_path / "late_nan.wav"
  soundfile.write(path, wave, 24_000, subtype="FLOAT")
  stream = audio.stream_audio(path, 24_000, block_frames=8_192)
  assert next(stream).shape == (8_192,)
  with pytest.raises(audio.AudioDecodeError, match="late_nan.wav: audio contains NaN"):
    list(stream)
