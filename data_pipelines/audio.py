"""Audio decoding and resampling: any file soundfile reads, to mono float32 at a target rate.

The one place that turns audio files into waveforms (ingest, builders, embedding, demo).
soundfile (libsndfile >= 1.1) decodes wav, flac, ogg/vorbis, opus and mp3 without system
packages; soxr does high-quality resampling.

Files are decoded as a stream (`stream_audio`): blocks of `BLOCK_FRAMES` frames are
downmixed and fed to soxr's streaming resampler, so memory does not grow with the file's
length unless the caller keeps the samples (`load_audio` does, as a convenience). The
header's sample rate is checked against `frontend.SAMPLE_RATE_RANGE` before anything is
decoded: a tiny file claiming 1 Hz would otherwise resample into gigabytes.
"""
from __future__ import annotations

import concurrent.futures
import pathlib
from typing import Iterator

import numpy as np
import soundfile
import soxr

from pupujepa_jax import frontend

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
SHORT_POLICIES = ("loop", "pad")
# About 1.5 s of 44.1 kHz audio per block: large enough for speed, small beside a window.
BLOCK_FRAMES = 65_536
RESAMPLE_QUALITY = "HQ"


class AudioDecodeError(RuntimeError):
  """An audio file could not be turned into a usable waveform."""

  def __init__(self, path, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = str(path)
    self.reason = reason


def check_sample_rate(rate) -> int:
  """`rate` as an int; ValueError naming it when outside `frontend.SAMPLE_RATE_RANGE`."""
  low, high = frontend.SAMPLE_RATE_RANGE
  if not low <= rate <= high:
    raise ValueError(f"sample rate {rate} Hz is outside the supported range "
                     f"{low}..{high} Hz")
  return int(rate)


def to_mono(wave: np.ndarray) -> np.ndarray:
  """[samples] or [samples, channels] -> [samples] by averaging channels."""
  wave = np.asarray(wave, dtype=np.float32)
  return wave.mean(axis=1) if wave.ndim == 2 else wave


def resample(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
  check_sample_rate(source_rate)
  if source_rate == target_rate:
    return np.asarray(wave, dtype=np.float32)
  return soxr.resample(np.asarray(wave, dtype=np.float32), source_rate, target_rate,
                       quality=RESAMPLE_QUALITY).astype(np.float32)


def prepare_waveform(wave: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
  """Mono float32 at `target_rate` from an in-memory [samples(, channels)] array."""
  return resample(to_mono(wave), sample_rate, target_rate)


def _open(path: pathlib.Path) -> soundfile.SoundFile:
  """The opened file, after checking its header's sample rate (nothing decoded yet)."""
  try:
    f = soundfile.SoundFile(str(path))
  except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError)
    raise AudioDecodeError(path, f"cannot decode audio ({e})") from e
  try:
    check_sample_rate(f.samplerate)
  except ValueError as e:
    f.close()
    raise AudioDecodeError(path, str(e)) from None
  return f


def stream_audio(path, sample_rate: int = 24_000,
                 block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
  """Mono float32 blocks of `path` at `sample_rate`, decoded and resampled as a stream.

  Their concatenation equals decoding the whole file, averaging its channels and
  resampling in one call. Raises AudioDecodeError naming the file when its sample rate is
  out of range, it cannot be decoded, it is empty or it holds NaN/Inf (possibly after
  some blocks were yielded).
  """
  path = pathlib.Path(path)
  with _open(path) as f:
    stream = (None if f.samplerate == sample_rate else
              soxr.ResampleStream(f.samplerate, sample_rate, 1, dtype="float32",
                                  quality=RESAMPLE_QUALITY))
    blocks = f.blocks(block_frames, dtype="float32", always_2d=True)
    decoded = 0
    while True:
      try:
        block = next(blocks, None)
      except Exception as e:  # a damaged frame in the middle of the file
        raise AudioDecodeError(path, f"cannot decode audio ({e})") from e
      if block is None:
        break
      if not np.all(np.isfinite(block)):
        raise AudioDecodeError(path, "audio contains NaN or Inf samples")
      decoded += block.shape[0]
      mono = block.mean(axis=1)
      out = mono if stream is None else stream.resample_chunk(mono)
      if out.size:
        yield out
  if decoded == 0:
    raise AudioDecodeError(path, "empty audio")
  if stream is not None:
    tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
    if tail.size:
      yield tail


def load_audio(path, sample_rate: int = 24_000, min_seconds: float = 0.0) -> np.ndarray:
  """Decode `path` to mono float32 at `sample_rate` (the concatenated `stream_audio`).

  Raises AudioDecodeError naming the file when its sample rate is out of range, it cannot
  be decoded, is empty, shorter than `min_seconds`, or contains NaN/Inf.
  """
  wave = np.concatenate(list(stream_audio(path, sample_rate)))
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
