"""The log-mel front-end of PupuJEPA, in NumPy and in jax.numpy (SPEC section 2).

This is the one definition of the front-end. The NumPy twin runs inside Grain worker
processes (no JAX there); the jax.numpy twin runs jitted at inference time on raw audio.
Both share the same constants and the same mel filterbank (built once in NumPy).

Pipeline: mono 24 kHz audio -> reflect-pad (n_fft - hop) / 2 on both sides -> STFT with a
periodic Hann window, no centering -> magnitude sqrt(re^2 + im^2 + 1e-9) -> Slaney mel
filterbank (librosa's default) -> log(max(mel, 1e-5)) -> fixed mean/std normalisation.
Output layout is [time, mel]; `frames * hop` samples give exactly `frames` frames.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import scipy.fft

SAMPLE_RATE = 24_000
# Sample rates accepted anywhere (audio files, in-memory waveforms, front-end configs):
# 4 kHz (narrow-band speech) to 768 kHz (the highest rate of studio converters). A file
# claiming a rate outside it is refused before decoding: a header saying 1 Hz would make
# resampling to 24 kHz allocate 24,000 output samples per stored sample.
SAMPLE_RATE_RANGE = (4_000, 768_000)
N_FFT = 1024
HOP = 240
N_MELS = 128
F_MIN = 0.0
F_MAX = 12_000.0
MAG_EPS = 1e-9
LOG_FLOOR = 1e-5
NORM_MEAN = -4.089994845986366
NORM_STD = 2.0242277159094813
NORM_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class FrontendConfig:
  """Front-end constants; the defaults are the released model's."""
  sample_rate: int = SAMPLE_RATE
  n_fft: int = N_FFT
  hop: int = HOP
  n_mels: int = N_MELS
  f_min: float = F_MIN
  f_max: float = F_MAX
  norm_mean: float = NORM_MEAN
  norm_std: float = NORM_STD

  @property
  def pad(self) -> int:
    return (self.n_fft - self.hop) // 2

  @property
  def frames_per_second(self) -> float:
    return self.sample_rate / self.hop

  def samples_for_frames(self, frames: int) -> int:
    """Number of samples whose spectrogram has exactly `frames` frames."""
    return (frames - 1) * self.hop + self.n_fft - 2 * self.pad

  def num_frames(self, num_samples: int) -> int:
    return 1 + (num_samples + 2 * self.pad - self.n_fft) // self.hop

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


DEFAULT = FrontendConfig()


# Slaney mel scale (librosa htk=False): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
  hz = np.asarray(hz, dtype=np.float64)
  log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-10) / _MIN_LOG_HZ) / _LOGSTEP
  return np.where(hz >= _MIN_LOG_HZ, log_part, hz / _F_SP)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
  mel = np.asarray(mel, dtype=np.float64)
  log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL))
  return np.where(mel >= _MIN_LOG_MEL, log_part, _F_SP * mel)


@functools.lru_cache(maxsize=8)
def mel_filterbank(cfg: FrontendConfig = DEFAULT) -> np.ndarray:
  """Slaney-normalised triangular mel filters, shape [n_mels, n_fft // 2 + 1], float32."""
  fft_freqs = np.linspace(0.0, cfg.sample_rate / 2, 1 + cfg.n_fft // 2)
  mel_pts = np.linspace(_hz_to_mel_slaney(cfg.f_min), _hz_to_mel_slaney(cfg.f_max),
                        cfg.n_mels + 2)
  hz_pts = _mel_to_hz_slaney(mel_pts)
  fdiff = np.diff(hz_pts)
  ramps = hz_pts[:, None] - fft_freqs[None, :]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  weights *= (2.0 / (hz_pts[2:cfg.n_mels + 2] - hz_pts[:cfg.n_mels]))[:, None]
  weights = weights.astype(np.float32)
  weights.setflags(write=False)
  return weights


@functools.lru_cache(maxsize=8)
def hann_window(n_fft: int) -> np.ndarray:
  """Periodic Hann window (torch.hann_window default)."""
  n = np.arange(n_fft, dtype=np.float64)
  window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)
  window.setflags(write=False)
  return window


def _check_waveform(num_samples: int, cfg: FrontendConfig):
  if num_samples <= cfg.pad:
    raise ValueError(f"waveform of {num_samples} samples is too short for the front-end: "
                     f"reflect padding needs more than {cfg.pad} samples")


def log_mel_np(wave: np.ndarray, cfg: FrontendConfig = DEFAULT) -> np.ndarray:
  """NumPy front-end. wave: [..., samples] mono at cfg.sample_rate -> [..., frames, n_mels]."""
  wave = np.asarray(wave, dtype=np.float32)
  _check_waveform(wave.shape[-1], cfg)
  pad_width = [(0, 0)] * (wave.ndim - 1) + [(cfg.pad, cfg.pad)]
  padded = np.pad(wave, pad_width, mode="reflect")
  frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft, axis=-1)[..., ::cfg.hop, :]
  # scipy's pocketfft keeps float32 in single precision: ~7x faster than np.fft here.
  spec = scipy.fft.rfft(frames * hann_window(cfg.n_fft), axis=-1)
  mag = np.sqrt(spec.real.astype(np.float32) ** 2 + spec.imag.astype(np.float32) ** 2 + MAG_EPS)
  mel = mag @ mel_filterbank(cfg).T
  logmel = np.log(np.maximum(mel, LOG_FLOOR))
  return ((logmel - cfg.norm_mean) / (cfg.norm_std + NORM_EPS)).astype(np.float32)


def log_mel_jnp(wave, cfg: FrontendConfig = DEFAULT):
  """jax.numpy twin of `log_mel_np` (jittable; cfg is static)."""
  import jax.numpy as jnp  # Grain workers import this module without needing JAX.
  wave = jnp.asarray(wave, dtype=jnp.float32)
  _check_waveform(wave.shape[-1], cfg)
  pad_width = [(0, 0)] * (wave.ndim - 1) + [(cfg.pad, cfg.pad)]
  padded = jnp.pad(wave, pad_width, mode="reflect")
  n_frames = cfg.num_frames(wave.shape[-1])
  index = np.arange(n_frames)[:, None] * cfg.hop + np.arange(cfg.n_fft)[None, :]
  frames = padded[..., index] * jnp.asarray(hann_window(cfg.n_fft))
  spec = jnp.fft.rfft(frames, axis=-1)
  mag = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + MAG_EPS)
  mel = jnp.matmul(mag, jnp.asarray(mel_filterbank(cfg)).T, precision="highest")
  logmel = jnp.log(jnp.maximum(mel, LOG_FLOOR))
  return (logmel - cfg.norm_mean) / (cfg.norm_std + NORM_EPS)
