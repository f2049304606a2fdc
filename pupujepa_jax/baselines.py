"""Hand-crafted baselines for the offline probe tasks, scored with the project's probe.

Three feature sets per clip, each the mean and standard deviation over time of a frame
feature: `logmel` (the project front-end, `pupujepa_jax.frontend.log_mel_np`, 256-d),
`chroma` (librosa's STFT chroma filters and, per frame, the magnitudes of the chroma's
12-point DFT, which do not change with transposition: 38-d) and `mfcc` (20 cepstral
coefficients of the front-end's log-mel, 40-d). They are written in the feature-folder
layout (`pupujepa_jax.features`: one `<path>.npy` of shape [L + 1 = 1, n_chunks = 1, D] per
clip, plus `meta.json`), so they are probed exactly like model embeddings (`probe_sets`:
the linear and the MLP probe, three seeds, all sets side by side; `compute_baselines`
adds the bootstrap statistics of `pupujepa_jax.evaluation`).

This is library code (it runs the probe); the tasks it scores come from
`data_pipelines.offline`, which knows nothing of the probe.
"""
from __future__ import annotations

import functools
import json
import os

import librosa
import numpy as np
import scipy.fft
import threadpoolctl

from data_pipelines import audio
from data_pipelines.offline.tasks import TASK_INFO
from pupujepa_jax import evaluation, features, frontend, labels, probe

FEATURE_SETS = ("logmel", "chroma", "mfcc")
# Bump when a feature set's definition changes: a folder of the older definition is then
# another model's features, never reused.
DEFINITION_VERSION = 2
LABELS_FILE = labels.LABELS_FILE
# Chroma from a 4096-point STFT (5.9 Hz bins: semitones apart down to ~100 Hz), 20 frames
# per second; the soundfont is in tune, so librosa's tuning estimate (two thirds of the
# time of a librosa chroma) is replaced by tuning 0.
_CHROMA_FFT, _CHROMA_HOP = 4096, 1200
_N_MFCC = 20
TOKEN_RATE = {"logmel": frontend.SAMPLE_RATE / frontend.HOP,
              "chroma": frontend.SAMPLE_RATE / _CHROMA_HOP,
              "mfcc": frontend.SAMPLE_RATE / frontend.HOP}


def _mean_std(frames: np.ndarray, axis: int) -> np.ndarray:
  return np.concatenate([frames.mean(axis), frames.std(axis)]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _chroma_filters() -> np.ndarray:
  return librosa.filters.chroma(sr=frontend.SAMPLE_RATE, n_fft=_CHROMA_FFT,
                                tuning=0.0).astype(np.float32)


def chroma(wave: np.ndarray) -> np.ndarray:
  """[12, frames] chroma of a 24 kHz clip: librosa's `chroma_stft` (power spectrum, each
  frame scaled to a maximum of 1) at tuning 0, on an STFT framed like the front-end's
  (reflect padding, periodic Hann window, no centring)."""
  pad = (_CHROMA_FFT - _CHROMA_HOP) // 2
  padded = np.pad(np.asarray(wave, np.float32), (pad, pad), mode="reflect")
  frames = np.lib.stride_tricks.sliding_window_view(padded, _CHROMA_FFT)[::_CHROMA_HOP]
  power = np.abs(scipy.fft.rfft(frames * frontend.hann_window(_CHROMA_FFT), axis=-1)) ** 2
  raw = _chroma_filters() @ power.T
  return raw / np.maximum(raw.max(axis=0, keepdims=True), np.finfo(np.float32).tiny)


def mfcc(logmel: np.ndarray) -> np.ndarray:
  """[frames, 20] MFCCs: the orthonormal DCT-II of the front-end's log-mel frames."""
  return scipy.fft.dct(logmel, type=2, norm="ortho", axis=-1)[:, :_N_MFCC]


def clip_features(wave: np.ndarray, sample_rate: int = frontend.SAMPLE_RATE) -> dict:
  """{feature set: float32 [D]} for one mono clip at 24 kHz."""
  if sample_rate != frontend.SAMPLE_RATE:
    raise ValueError(f"baselines expect {frontend.SAMPLE_RATE} Hz audio, got {sample_rate}")
  logmel = frontend.log_mel_np(wave)
  frames = chroma(wave)
  # |DFT| over the 12 pitch classes of each chroma frame is the same at every root, so a
  # linear probe can read interval content (chord quality) from it; the raw chroma
  # cannot be read linearly at an unknown root.
  intervals = np.abs(np.fft.rfft(frames, axis=0))
  return {"logmel": _mean_std(logmel, 0),
          "chroma": _mean_std(np.concatenate([frames, intervals]), 1),
          "mfcc": _mean_std(mfcc(logmel), 0)}


def _meta(feature_set: str) -> dict:
  """What the features of `feature_set` are (their identity in `features.open_folder`;
  the definition's version stands in the config hash)."""
  return dict(L=0, token_rate=TOKEN_RATE[feature_set], sample_rate=frontend.SAMPLE_RATE,
              readout="mean_std_over_time", model_id=f"baseline-{feature_set}",
              config_hash=f"definition-v{DEFINITION_VERSION}")


def extract_task(task_dir: str, out_dir: str) -> dict[str, int]:
  """Writes <out_dir>/<feature set>/<path>.npy and meta.json for one task; returns D's.

  Clips whose three feature files exist from an earlier run are not recomputed; a folder
  holding other features is refused (see `features.open_folder`).
  """
  rows = labels.read_labels_csv(os.path.join(task_dir, LABELS_FILE))
  folders = {fs: os.path.join(out_dir, fs) for fs in FEATURE_SETS}
  for fs, folder in folders.items():
    features.open_folder(folder, _meta(fs))
  dims = {}
  # One BLAS thread: small matrix products on two threads that compete with other
  # processes for two cores run hundreds of times slower (measured 39 ms against 0.08 ms).
  with threadpoolctl.threadpool_limits(1):
    for row in rows:
      targets = {fs: features.feature_file(folder, row.path) for fs, folder in folders.items()}
      if all(p.is_file() for p in targets.values()):
        dims = {fs: int(np.load(p, mmap_mode="r").shape[-1]) for fs, p in targets.items()}
        continue
      wave = audio.load_audio(os.path.join(task_dir, row.path), frontend.SAMPLE_RATE)
      for fs, feat in clip_features(wave).items():
        features.write_features(folders[fs], row.path, feat[None, None, :])
        dims[fs] = int(feat.shape[-1])
  for fs, d in dims.items():
    features.write_meta(folders[fs], dict(_meta(fs), D=d, files=[r.path for r in rows]))
  return dims


def load_sets(task_out: str, labels_csv: str) -> tuple[dict, list[int]]:
  """The feature sets of one task (`extract_task`'s folders) as one
  `probe.load_split_features` result whose layer axis holds the sets, in FEATURE_SETS
  order, zero-padded to the widest; and each set's real width (the probe's `fan_in`).
  One array lets one compiled probe program train every set side by side."""
  datas = [probe.load_split_features(os.path.join(task_out, fs), labels_csv, "all")
           for fs in FEATURE_SETS]
  widths = [d["splits"]["train"]["x"].shape[2] for d in datas]
  splits = {}
  for s, part in datas[0]["splits"].items():
    xs = [np.pad(d["splits"][s]["x"], ((0, 0), (0, 0), (0, max(widths) - w)))
          for d, w in zip(datas, widths)]
    splits[s] = dict(part, x=np.concatenate(xs, axis=1))
  return {"meta": {}, "layers": list(range(len(FEATURE_SETS))), "splits": splits}, widths


def probe_sets(task_out: str, labels_csv: str, task_type: str,
               seeds=probe.SMALL_DATA_SEEDS) -> tuple[dict, dict]:
  """Both probes (linear and MLP) on every feature set of one task, every seed.

  Returns ({protocol: `probe.probe_layers` result, one "layer" per feature set},
  the prepared data (test targets, classes, clip counts)).
  """
  data, widths = load_sets(task_out, labels_csv)
  prepared = probe.prepare(data, task_type)
  runs = {protocol: probe.probe_layers(prepared, protocol, range(len(FEATURE_SETS)), seeds,
                                       fan_in=widths, **probe.SMALL_DATA_PROTOCOL)
          for protocol in probe.PROBES}
  return runs, prepared


def compute_baselines(tasks_dir: str, out_dir: str | None = None, seed: int = 0,
                      n_boot: int = evaluation.N_BOOT) -> dict:
  """Extracts the baseline features of every task under `tasks_dir` and probes them.

  Args:
    tasks_dir: folder of task folders, each with `labels.csv` (path,label,split) and the
      clips it names (e.g. <out>/tasks from `build_offline`).
    out_dir: where features go (<out_dir>/<task>/<feature set>/...); default: a
      `baselines` folder beside `tasks_dir`. Scores are also written to
      <out_dir>/scores.json.
    seed: the first of the three probe seeds, and the bootstrap's seed.
    n_boot: bootstrap resamples of the test clips.

  Returns:
    {task: {feature set: {probe: evaluation.summarize(...) of the main test metric,
    plus "valid" (seed-mean validation score)}}}, e.g. scores["key"]["chroma"]["mlp"].
  """
  tasks_dir = os.path.abspath(tasks_dir)
  if out_dir is None:
    out_dir = os.path.join(os.path.dirname(tasks_dir), "baselines")
  names = sorted(d for d in os.listdir(tasks_dir)
                 if os.path.isfile(os.path.join(tasks_dir, d, LABELS_FILE)))
  if not names:
    raise ValueError(f"{tasks_dir}: no task folder with a labels.csv")
  unknown = [t for t in names if t not in TASK_INFO]
  if unknown:
    raise ValueError(f"{tasks_dir}: unknown task folder(s) {unknown}; known: {tuple(TASK_INFO)}")
  scores = {}
  for task in names:
    task_out = os.path.join(out_dir, task)
    extract_task(os.path.join(tasks_dir, task), task_out)
    task_type = TASK_INFO[task].type
    runs, prepared = probe_sets(task_out, os.path.join(tasks_dir, task, LABELS_FILE),
                                task_type, tuple(seed + i for i in range(3)))
    targets = prepared["splits"]["test"]["y_clip"]
    weights = evaluation.bootstrap_weights(len(targets), n_boot, seed)
    scores[task] = {fs: {protocol: dict(
        evaluation.summarize(task_type, run["test_outputs"][i], targets, weights),
        valid=float(run["valid"][i].mean())) for protocol, run in runs.items()}
        for i, fs in enumerate(FEATURE_SETS)}
  with open(os.path.join(out_dir, "scores.json"), "w") as f:
    json.dump(scores, f, indent=1)
  return scores


def format_scores(scores: dict) -> str:
  """Markdown table (task, probe) x feature set: seed mean ± std [bootstrap interval] of
  the tasks' main test metric."""
  lines = ["| task | metric | probe | " + " | ".join(FEATURE_SETS) + " |",
           "|---|---|---|" + "---|" * len(FEATURE_SETS)]
  for task, by_set in sorted(scores.items()):
    for protocol in probe.PROBES:
      lines.append(f"| {task} | {TASK_INFO[task].main_metric} | {protocol} | " + " | ".join(
          evaluation.format_score(by_set[fs][protocol]) for fs in FEATURE_SETS) + " |")
  return "\n".join(lines)
