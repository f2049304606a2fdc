"""Audio decoding and resampling: any file soundfile reads, to mono float32 at a target rate.

The one place that turns audio files into waveforms (ingest, builders, embedding, demo).
soundfile (libsndfile >= 1.1) decodes wav, flac, ogg/vorbis, opus and mp3 without system
packages; soxr does high-quality resampling.
"""
from __future__ import annotations

import concurrent.futures
import pathlib
from typing import Iterator

import numpy as np
import soundfile
import soxr

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
SHORT_POLICIES = ("loop", "pad")


class AudioDecodeError(RuntimeError):
  """An audio file could not be turned into a usable waveform."""

  def __init__(self, path, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = str(path)
    self.reason = reason


def to_mono(wave: np.ndarray) -> np.ndarray:
  """[samples] or [samples, channels] -> [samples] by averaging channels."""
  wave = np.asarray(wave, dtype=np.float32)
  return wave.mean(axis=1) if wave.ndim == 2 else wave


def resample(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
  if source_rate == target_rate:
    return np.asarray(wave, dtype=np.float32)
  return soxr.resample(np.asarray(wave, dtype=np.float32), source_rate, target_rate,
                       quality="HQ").astype(np.float32)


def prepare_waveform(wave: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
  """Mono float32 at `target_rate` from an in-memory [samples(, channels)] array."""
  return resample(to_mono(wave), sample_rate, target_rate)


def load_audio(path, sample_rate: int = 24_000, min_seconds: float = 0.0) -> np.ndarray:
  """Decode `path` to mono float32 at `sample_rate`.

  Raises AudioDecodeError naming the file when it cannot be decoded, is empty, shorter
  than `min_seconds`, or contains NaN/Inf.
  """
  path = pathlib.Path(path)
  try:
    wave, source_rate = soundfile.read(str(path), dtype="float32", always_2d=False)
  except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError)
    raise AudioDecodeError(path, f"cannot decode audio ({e})") from e
  if wave.size == 0:
    raise AudioDecodeError(path, "empty audio")
  if not np.all(np.isfinite(wave)):
    raise AudioDecodeError(path, "audio contains NaN or Inf samples")
  wave = prepare_waveform(wave, source_rate, sample_rate)
  if wave.shape[0] < min_seconds * sample_rate:
    raise AudioDecodeError(
        path, f"too short: {wave.shape[0] / sample_rate:.2f} s < {min_seconds} s minimum")
  return wave


def list_audio_files(root) -> list[pathlib.Path]:
  """Audio files under `root` (recursive, sorted); a missing or empty folder is an error."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"audio folder {root} does not exist or is not a folder")
  files = sorted(p for p in root.rglob("*")
                 if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
  if not files:
    raise FileNotFoundError(f"audio folder {root} holds no audio files "
                            f"({', '.join(AUDIO_EXTENSIONS)})")
  return files


def _decode_or_error(path, sample_rate: int, min_seconds: float):
  try:
    return load_audio(path, sample_rate=sample_rate, min_seconds=min_seconds)
  except AudioDecodeError as e:
    return e


def decode_files(files, sample_rate: int, min_seconds: float = 0.0,
                 workers: int = 1) -> Iterator:
  """(file, waveform or AudioDecodeError) in file order, `workers` files decoded at a time."""
  files = list(files)
  # soundfile and soxr release the GIL; chunks bound the waveforms held in memory.
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, len(files), 4 * workers):
      chunk = files[start:start + 4 * workers]
      yield from zip(chunk, pool.map(
          lambda f: _decode_or_error(f, sample_rate, min_seconds), chunk))


def take_crop(wave: np.ndarray, offset: int, crop_samples: int, short_policy: str) -> np.ndarray:
  """`crop_samples` samples from `offset`; short clips are looped or zero-padded at the end."""
  if wave.shape[0] >= crop_samples:
    return wave[offset:offset + crop_samples]
  if short_policy == "loop":
    reps = -(-(offset + crop_samples) // wave.shape[0])
    return np.tile(wave, reps)[offset:offset + crop_samples]
  if short_policy == "pad":
    return np.pad(wave, (0, crop_samples - wave.shape[0]))
  raise ValueError(f"short_policy: {short_policy!r} not in {SHORT_POLICIES}")
