"""The log-mel front-end: NumPy and jax.numpy twins against a librosa computation."""
import jax
import librosa
import numpy as np
import pytest

from pupujepa_jax import frontend


def librosa_log_mel(wave, cfg=frontend.DEFAULT):
  """Independent reference: librosa STFT/mel with the released recipe (SPEC section 2)."""
  padded = np.pad(wave.astype(np.float64), (cfg.pad, cfg.pad), mode="reflect")
  stft = librosa.stft(padded, n_fft=cfg.n_fft, hop_length=cfg.hop, win_length=cfg.n_fft,
                      window="hann", center=False)
  mag = np.sqrt(stft.real ** 2 + stft.imag ** 2 + 1e-9)
  mel_basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                                  fmin=cfg.f_min, fmax=cfg.f_max)
  mel = mel_basis @ mag
  logmel = np.log(np.maximum(mel, 1e-5))
  return ((logmel - cfg.norm_mean) / (cfg.norm_std + 1e-8)).T


def _music_like(seconds=10.24, seed=0):
  rng = np.random.default_rng(seed)
  sr = frontend.SAMPLE_RATE
  t = np.arange(int(seconds * sr)) / sr
  wave = sum(np.sin(2 * np.pi * f * t) * rng.uniform(0.05, 0.3)
             for f in rng.uniform(60, 8000, 12))
  return (wave + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def test_mel_filterbank_matches_librosa_slaney():
  ref = librosa.filters.mel(sr=24000, n_fft=1024, n_mels=128, fmin=0.0, fmax=12000.0)
  np.testing.assert_allclose(frontend.mel_filterbank(), ref, atol=1e-7, rtol=1e-5)


def test_shapes_frames_and_crop_length():
  cfg = frontend.DEFAULT
  assert cfg.samples_for_frames(1024) == 245_760  # 10.24 s at 24 kHz
  assert cfg.num_frames(245_760) == 1024
  out = frontend.log_mel_np(np.zeros(245_760, np.float32) + 1e-3)
  assert out.shape == (1024, 128) and out.dtype == np.float32


def test_numpy_jax_and_librosa_agree():
  wave = _music_like()
  ref = librosa_log_mel(wave)
  np_out = frontend.log_mel_np(wave)
  jnp_out = np.asarray(jax.jit(frontend.log_mel_jnp)(wave))
  assert np_out.shape == ref.shape == (1024, 128)
  np.testing.assert_allclose(np_out, ref, atol=1e-4, rtol=0)
  np.testing.assert_allclose(jnp_out, ref, atol=1e-4, rtol=0)
  np.testing.assert_allclose(jnp_out, np_out, atol=1e-4, rtol=0)
  assert ref.std() > 0.5  # a real spectrogram, not a constant


def test_batched_input_and_silence_floor():
  waves = np.stack([_music_like(1.0, 1), np.zeros(24_000, np.float32)])
  out = frontend.log_mel_np(waves)
  assert out.shape == (2, 100, 128)
  np.testing.assert_allclose(out[0], frontend.log_mel_np(waves[0]), atol=1e-6)
  floor = (np.log(1e-5) - frontend.NORM_MEAN) / (frontend.NORM_STD + 1e-8)
  # Silence: magnitude sqrt(1e-9) through the filterbank, floored at log(1e-5).
  assert np.all(out[1] >= floor - 1e-5) and np.all(np.isfinite(out[1]))


def test_too_short_waveform_is_a_clear_error():
  with pytest.raises(ValueError, match="too short"):
    frontend.log_mel_np(np.zeros(100, np.float32))
