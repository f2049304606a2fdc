"""Scores of the music21 corpus -> note lists (`Piece`) and the pretraining corpus plan.

A `Piece` is what the renderer needs from a score: per part, the notes as
(onset, duration) in quarter notes and MIDI pitch; the length; the key when the score
states it unambiguously; the time signature. Parsing with music21 is the slow step, so
pieces are cached as JSON, and scores that fail to parse or hold no notes are skipped and
reported, never fatal.

Splits are per piece and fixed by a hash of the piece id (not by the seed), so every task
and every build agrees on which pieces are test pieces, and the pretraining corpus can
leave all of them out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np

from data_pipelines.offline import render
from pupujepa_jax import labels

# music21 corpus collections used, with the share of the selected pieces each gets. Bach
# chorales carry the key task, Palestrina's long masses give the most audio per parse;
# Monteverdi, Haydn and Mozart are left out (seconds to parse each).
COLLECTIONS = (("bach", 0.55), ("palestrina", 0.3), ("ryansMammoth", 0.15))
SCORE_SUFFIXES = (".mxl", ".xml", ".krn", ".abc")
SPLIT_FRACTIONS = (("train", 0.7), ("valid", 0.15), ("test", 0.15))
PITCH_NAMES = labels.PITCH_CLASSES
# Tempo of the corpus renders, in beats per minute of the time signature's beat unit.
CORPUS_BPM = (50.0, 140.0)
CORPUS_MAX_SECONDS = 240.0
# Notes sound for this fraction of their written length, so repeated notes re-articulate.
ARTICULATION = 0.95


class ScoreError(ValueError):
  """A score that cannot be turned into a usable `Piece`."""


@dataclasses.dataclass
class Piece:
  """Notes of one score. parts[i]: float [n, 3] of onset (quarters), duration, MIDI pitch."""
  id: str
  parts: list[np.ndarray]
  length: float
  key: tuple[int, str] | None
  time_signature: tuple[int, int]

  def to_json(self) -> dict:
    return dict(id=self.id, parts=[p.tolist() for p in self.parts], length=self.length,
                key=list(self.key) if self.key else None,
                time_signature=list(self.time_signature))

  @classmethod
  def from_json(cls, d: dict) -> "Piece":
    return cls(id=d["id"], parts=[np.asarray(p, np.float64).reshape(-1, 3) for p in d["parts"]],
               length=float(d["length"]), key=tuple(d["key"]) if d["key"] else None,
               time_signature=tuple(d["time_signature"]))

  def quarter_seconds(self, bpm: float) -> float:
    """Seconds per quarter note when the time signature's beat unit runs at `bpm`."""
    return 60.0 / bpm * self.time_signature[1] / 4.0


def piece_split(piece_id: str) -> str:
  """train/valid/test of a piece, fixed by a hash of its id."""
  u = int(hashlib.sha1(piece_id.encode()).hexdigest()[:8], 16) / 2 ** 32
  edge = 0.0
  for split, frac in SPLIT_FRACTIONS:
    edge += frac
    if u < edge:
      return split
  return SPLIT_FRACTIONS[-1][0]


def list_sources() -> list[tuple[str, str]]:
  """(piece id, path) of every usable corpus score, grouped by collection, sorted."""
  music21 = render.require("music21")
  out = []
  for name, _ in COLLECTIONS:
    paths = sorted(str(p) for p in music21.corpus.getComposer(name)
                   if str(p).endswith(SCORE_SUFFIXES))
    out += [(f"{name}/{pathlib.Path(p).stem}", p) for p in paths]
  return out


def select_sources(n: int, seed: int) -> list[tuple[str, str]]:
  """About `n` sources, deterministic for `seed`: each collection gets its share of every
  split (at least one piece), so small selections still cover all splits."""
  sources = list_sources()
  rng = np.random.default_rng([seed, 1])
  chosen = []
  for name, share in COLLECTIONS:
    for split, frac in SPLIT_FRACTIONS:
      pool = [s for s in sources if s[0].startswith(name + "/") and piece_split(s[0]) == split]
      take = min(len(pool), max(1, int(round(share * frac * n))))
      chosen += [pool[i] for i in sorted(rng.choice(len(pool), take, replace=False))]
  return chosen


def select_test_sources(n: int, seed: int, exclude) -> list[tuple[str, str]]:
  """About `n` more test-split sources, none in `exclude`, each collection its share.

  Test pieces never enter the pretraining corpus, so adding them widens the probe tasks'
  test split (more distinct pieces behind its clips) and leaves the corpus as it is.
  """
  exclude = set(exclude)
  rng = np.random.default_rng([seed, 5])
  chosen = []
  for name, share in COLLECTIONS:
    pool = [s for s in list_sources() if s[0].startswith(name + "/")
            and piece_split(s[0]) == "test" and s[0] not in exclude]
    take = min(len(pool), int(round(share * n)))
    chosen += [pool[i] for i in sorted(rng.choice(len(pool), take, replace=False))]
  return chosen


def _score_key(score, parts: list[np.ndarray], length: float) -> tuple[int, str] | None:
  """(tonic pitch class, mode) when the key signature and the final bass note agree.

  The tonic is the pitch class of the lowest note still sounding at the end; it must be
  the major tonic of the key signature or its relative minor, else (modal pieces, or no
  key signature) the key is unknown.
  """
  signatures = list(score.flatten().getElementsByClass("KeySignature"))
  if not signatures:
    return None
  ending = [p[np.abs(p[:, 0] + p[:, 1] - length) < 1e-6, 2] for p in parts]
  ending = np.concatenate(ending)
  if not len(ending):
    return None
  bass = int(np.min(ending)) % 12
  major = (7 * signatures[0].sharps) % 12
  if bass == major:
    return (major, "major")
  if bass == (major + 9) % 12:
    return (bass, "minor")
  return None


def extract_piece(score, piece_id: str) -> Piece:
  """music21 score (or opus, or single part) -> `Piece`; raises ScoreError if unusable."""
  music21 = render.require("music21")
  if isinstance(score, music21.stream.Opus):
    if not score.scores:
      raise ScoreError(f"{piece_id}: opus holds no scores")
    score = score.scores[0]
  if not isinstance(score, music21.stream.Stream):
    raise ScoreError(f"{piece_id}: not a music21 stream but {type(score).__name__}")
  streams = list(score.parts) or [score]
  parts = []
  for part in streams:
    rows = []
    for n in part.stripTies().flatten().notes:
      dur = float(n.quarterLength)
      if dur <= 0:  # Grace notes.
        continue
      rows += [(float(n.offset), dur, float(p.midi)) for p in n.pitches]
    if rows:
      parts.append(np.asarray(rows, np.float64))
  if not parts:
    raise ScoreError(f"{piece_id}: score holds no pitched notes")
  length = max(float(np.max(p[:, 0] + p[:, 1])) for p in parts)
  signatures = list(score.flatten().getElementsByClass("TimeSignature"))
  ts = (signatures[0].numerator, signatures[0].denominator) if signatures else (4, 4)
  return Piece(id=piece_id, parts=parts, length=length, key=_score_key(score, parts, length),
               time_signature=ts)


def parse_source(source) -> Piece:
  """(piece id, path or music21 stream) -> `Piece`; raises ScoreError on any failure."""
  piece_id, score = source
  try:
    if isinstance(score, (str, os.PathLike)):
      # forceSource: music21 would otherwise load (and write) a pickle of the parsed score
      # in $TMPDIR/music21, a predictable folder anyone on the machine can write to, and
      # unpickling a planted file runs its code.
      score = render.require("music21").converter.parse(score, forceSource=True)
    return extract_piece(score, piece_id)
  except ScoreError:
    raise
  except Exception as e:  # music21 raises many kinds of errors on odd scores.
    raise ScoreError(f"{piece_id}: {type(e).__name__}: {e}") from e


def _cache_name(piece_id: str) -> str:
  return piece_id.replace("/", "__") + ".json"


def load_cached(piece_id: str, cache_dir: str | None) -> Piece | None:
  if cache_dir is None:
    return None
  path = os.path.join(cache_dir, _cache_name(piece_id))
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return Piece.from_json(json.load(f))


def store_cached(piece: Piece, cache_dir: str):
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, _cache_name(piece.id))
  with open(path + ".tmp", "w") as f:
    json.dump(piece.to_json(), f)
  os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------- rendering

def piece_tracks(piece: Piece, programs: list[int], quarter_s: float, transpose: int,
                 velocities: list[float], start_s: float = 0.0,
                 stop_s: float | None = None) -> list[render.Track]:
  """Tracks of `piece` at `quarter_s` seconds per quarter, shifted so `start_s` is 0.

  Notes ending before `start_s` or starting at/after `stop_s` are dropped.
  """
  tracks = []
  for part, program, vel in zip(piece.parts, programs, velocities):
    on = part[:, 0] * quarter_s - start_s
    off = on + part[:, 1] * quarter_s * ARTICULATION
    keep = off > 0
    if stop_s is not None:
      keep &= on < stop_s - start_s
    notes = np.stack([np.maximum(on, 0.0), off, part[:, 2] + transpose,
                      np.full(len(part), vel)], 1)[keep]
    tracks.append(render.Track(program=int(program), notes=notes))
  return tracks


def plan_corpus(pieces: list[Piece], seconds: float, seed: int) -> list[dict]:
  """Random renders (instrumentation, transposition, tempo) of `pieces` summing to `seconds`.

  Pieces are used round-robin in a seeded order; each render is a dict of plain values.
  """
  if not pieces:
    raise ValueError("no pieces left for the pretraining corpus")
  rng = np.random.default_rng([seed, 2])
  order = rng.permutation(len(pieces))
  plans, total, i = [], 0.0, 0
  while total < seconds:
    piece = pieces[order[i % len(pieces)]]
    bpm = float(rng.uniform(*CORPUS_BPM))
    quarter_s = piece.quarter_seconds(bpm)
    dur = min(piece.length * quarter_s + 1.5, CORPUS_MAX_SECONDS)
    plans.append(dict(
        name=f"{i:05d}_{piece.id.replace('/', '_')}", piece=piece.id, seconds=dur,
        quarter_s=quarter_s, transpose=int(rng.integers(-6, 6)),
        programs=[int(p) for p in rng.choice(render.MELODIC_PROGRAMS, len(piece.parts))],
        velocities=[float(v) for v in rng.uniform(0.5, 1.0, len(piece.parts))],
        rt60=float(rng.uniform(0.2, 1.5)), wet=float(rng.uniform(0.0, 0.4)),
        fx_seed=int(rng.integers(2 ** 31))))
    total += dur
    i += 1
  return plans


def render_corpus_item(plan: dict, piece: Piece, synth: render.Synth) -> np.ndarray:
  tracks = piece_tracks(piece, plan["programs"], plan["quarter_s"], plan["transpose"],
                        plan["velocities"])
  audio = synth.render(tracks, plan["seconds"])
  audio = render.reverb(audio, np.random.default_rng(plan["fx_seed"]), plan["rt60"], plan["wet"])
  return render.normalise_loudness(audio)
