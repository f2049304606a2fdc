"""Note lists -> 24 kHz mono float32 audio with the General MIDI soundfont of pretty_midi.

TinySoundFont (PyPI `tinysoundfont`) renders the soundfont `TimGM6mb.sf2` that ships inside
`pretty_midi`, so nothing outside the package registries is needed (SPEC section 8). A
`Synth` parses the soundfont once per worker process into a pristine instance that never
plays; every render starts from a clone of it (TinySoundFont's copy: the samples shared,
the voices fresh), because TinySoundFont keeps per-voice state across `reset()` and a
reused instance would make the audio depend on what the worker rendered before, breaking
determinism. A clone renders bit for bit what an instance parsed anew from the bytes
renders, and takes microseconds where parsing took 35 ms (most of a 2.56 s task clip's
render time).

Also here: the post-processing shared by the corpus and the probe tasks (synthetic room
reverb, coloured noise at a given SNR, loudness normalisation) and the General MIDI
program families.
"""
from __future__ import annotations

import dataclasses
import importlib
import os

import numpy as np
from scipy import signal

from pupujepa_jax import frontend

SAMPLE_RATE = frontend.SAMPLE_RATE
SOUNDFONT_NAME = "TimGM6mb.sf2"
MAX_CHANNELS = 16
DRUM_CHANNEL = 9
# The 16 General MIDI families, 8 programs each, in program order.
GM_FAMILIES = ("piano", "chromatic percussion", "organ", "guitar", "bass", "strings",
               "ensemble", "brass", "reed", "pipe", "synth lead", "synth pad",
               "synth effects", "ethnic", "percussive", "sound effects")
# Pitched programs that can carry a voice (families 0-13: no percussive or sound effects).
MELODIC_PROGRAMS = tuple(range(0, 112))


def require(module: str):
  """Imports `module` or raises an ImportError that says how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    hint = {"tinysoundfont": "pip install --no-deps tinysoundfont",
            "music21": "pip install music21", "pretty_midi": "pip install pretty_midi"}
    raise ImportError(f"offline music needs the package {module!r} "
                      f"({hint.get(module, 'pip install ' + module)}): {e}") from e


def soundfont_path() -> str:
  """Path of the General MIDI soundfont shipped inside pretty_midi."""
  pretty_midi = require("pretty_midi")
  path = os.path.join(os.path.dirname(pretty_midi.__file__), SOUNDFONT_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"pretty_midi ships no soundfont at {path}")
  return path


def program_family(program: int) -> str:
  return GM_FAMILIES[program // 8]


@dataclasses.dataclass(frozen=True)
class Track:
  """One instrument: a GM program (or the drum kit) and its notes.

  `notes` is float [n, 4]: start seconds, end seconds, MIDI pitch, velocity in (0, 1].
  """
  program: int
  notes: np.ndarray
  is_drum: bool = False


def _channels(tracks: list[Track]) -> list[int]:
  """MIDI channel per track: drums on the GM drum channel, the others on the rest."""
  melodic = iter(c for c in range(MAX_CHANNELS) if c != DRUM_CHANNEL)
  return [DRUM_CHANNEL if t.is_drum else next(melodic) for t in tracks]


def _events(tracks: list[Track], num_samples: int, sample_rate: int) -> np.ndarray:
  """Sorted int events [n, 5]: sample, kind (0 off, 1 on), channel, pitch, velocity*1e4."""
  rows = []
  for track, channel in zip(tracks, _channels(tracks)):
    notes = np.asarray(track.notes, dtype=np.float64).reshape(-1, 4)
    keep = (notes[:, 2] >= 0) & (notes[:, 2] <= 127) & (notes[:, 1] > notes[:, 0])
    notes = notes[keep]
    start = np.clip(np.round(notes[:, 0] * sample_rate), 0, num_samples)
    end = np.clip(np.round(notes[:, 1] * sample_rate), 0, num_samples)
    pitch = np.round(notes[:, 2])
    vel = np.round(np.clip(notes[:, 3], 0.0, 1.0) * 1e4)
    n = len(notes)
    rows.append(np.stack([start, np.ones(n), np.full(n, channel), pitch, vel], 1))
    rows.append(np.stack([end, np.zeros(n), np.full(n, channel), pitch, np.zeros(n)], 1))
  if not rows:
    return np.zeros((0, 5), np.int64)
  events = np.concatenate(rows).astype(np.int64)
  # Offs before ons at the same sample, so a repeated pitch re-attacks.
  order = np.lexsort((events[:, 3], events[:, 2], events[:, 1], events[:, 0]))
  return events[order]


class Synth:
  """Renders `Track`s to mono float32 audio at `sample_rate` with a GM soundfont."""

  def __init__(self, sf2_path: str | None = None, sample_rate: int = SAMPLE_RATE,
               max_voices: int = 256):
    self._tsf = require("tinysoundfont")._tinysoundfont
    path = sf2_path or soundfont_path()
    with open(path, "rb") as f:
      # Parsed here, so a bad soundfont fails now, not in a worker's first job.
      self._pristine = self._tsf.SoundFont(f.read())
    self._pristine.set_output(self._tsf.OutputMode.Mono, sample_rate, 0.0)
    self.sample_rate = sample_rate
    self.max_voices = max_voices

  def _fresh(self):
    sf = self._tsf.SoundFont(self._pristine)  # A clone: fresh voices and channels.
    sf.set_max_voices(self.max_voices)
    return sf

  def render(self, tracks: list[Track], seconds: float) -> np.ndarray:
    """Audio of `tracks` over [0, seconds): float32 [round(seconds * sample_rate)]."""
    melodic_tracks = sum(not t.is_drum for t in tracks)
    if melodic_tracks > MAX_CHANNELS - 1:
      raise ValueError(f"at most {MAX_CHANNELS - 1} melodic tracks can be rendered, "
                       f"got {melodic_tracks}")
    num_samples = int(round(seconds * self.sample_rate))
    sf = self._fresh()
    for track, channel in zip(tracks, _channels(tracks)):
      if not 0 <= track.program <= 127:
        raise ValueError(f"GM program {track.program} is not in 0..127")
      sf.channel_set_preset_number(channel, 0 if track.is_drum else track.program,
                                   track.is_drum)
    out = np.zeros(num_samples, np.float32)
    buf = memoryview(out).cast("B")
    pos = 0
    for sample, kind, channel, pitch, vel in _events(tracks, num_samples, self.sample_rate):
      if sample > pos:
        sf.render(buf[4 * pos:4 * sample], False)
        pos = sample
      if kind:
        sf.channel_note_on(int(channel), int(pitch), vel / 1e4)
      else:
        sf.channel_note_off(int(channel), int(pitch))
    if pos < num_samples:
      sf.render(buf[4 * pos:], False)
    return out


def reverb(x: np.ndarray, rng: np.random.Generator, rt60: float, wet: float,
           sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Mixes `x` with a synthetic room (exponentially decaying noise, RT60 seconds)."""
  if wet <= 0.0:
    return x
  n = max(1, int(rt60 * sample_rate))
  t = np.arange(n) / sample_rate
  ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
  ir /= np.sqrt(np.sum(ir ** 2))
  tail = signal.fftconvolve(x, ir)[:len(x)]
  return ((1.0 - wet) * x + wet * tail).astype(np.float32)


def add_noise(x: np.ndarray, rng: np.random.Generator, snr_db: float,
              colour: float = 0.0) -> np.ndarray:
  """Adds noise at `snr_db` below the signal; `colour` in [0, 1) low-passes it (1-pole)."""
  noise = rng.standard_normal(len(x))
  if colour > 0.0:
    noise = signal.lfilter([1.0], [1.0, -colour], noise)
  rms_x = np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12
  noise *= rms_x / (np.sqrt(np.mean(noise ** 2)) + 1e-12) * 10 ** (-snr_db / 20)
  return (x + noise).astype(np.float32)


def normalise_loudness(x: np.ndarray, target_dbfs: float = -20.0,
                       peak: float = 0.99) -> np.ndarray:
  """Scales `x` to an RMS of `target_dbfs`, then down if its peak would exceed `peak`."""
  rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
  if rms < 1e-9:
    raise ValueError("cannot normalise silent audio")
  y = x * (10 ** (target_dbfs / 20) / rms)
  top = np.max(np.abs(y))
  if top > peak:
    y *= peak / top
  return y.astype(np.float32)
