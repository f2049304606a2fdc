"""Hand-crafted baselines for the offline probe tasks, scored with the project's probe.

Three feature sets per clip, each the mean and standard deviation over time of a frame
feature: `logmel` (the project front-end, `pupujepa_jax.frontend.log_mel_np`, 256-d),
`chroma` (librosa STFT chroma, 24-d) and `mfcc` (librosa, 20 coefficients, 40-d). They are
written in the feature-folder layout (`pupujepa_jax.features`: one `<path>.npy` of shape
[L + 1 = 1, n_chunks = 1, D] per clip, plus `meta.json`), so they are probed by
`pupujepa_jax.probe.probe_features` exactly like model embeddings.

This is library code (it runs the probe); the tasks it scores come from
`data_pipelines.offline`, which knows nothing of the probe.
"""
from __future__ import annotations

import json
import os

import librosa
import numpy as np

from data_pipelines import audio
from data_pipelines.offline.tasks import TASK_INFO
from pupujepa_jax import features, frontend, labels, probe

FEATURE_SETS = ("logmel", "chroma", "mfcc")
LABELS_FILE = labels.LABELS_FILE
# Frame rates of the feature sets (frames per second at 24 kHz).
_CHROMA_FFT, _CHROMA_HOP = 4096, 1200
_MFCC_FFT, _MFCC_HOP, _N_MFCC = 1024, 240, 20
TOKEN_RATE = {"logmel": frontend.SAMPLE_RATE / frontend.HOP,
              "chroma": frontend.SAMPLE_RATE / _CHROMA_HOP,
              "mfcc": frontend.SAMPLE_RATE / _MFCC_HOP}


def _mean_std(frames: np.ndarray, axis: int) -> np.ndarray:
  return np.concatenate([frames.mean(axis), frames.std(axis)]).astype(np.float32)


def clip_features(wave: np.ndarray, sample_rate: int = frontend.SAMPLE_RATE) -> dict:
  """{feature set: float32 [D]} for one mono clip at 24 kHz."""
  if sample_rate != frontend.SAMPLE_RATE:
    raise ValueError(f"baselines expect {frontend.SAMPLE_RATE} Hz audio, got {sample_rate}")
  wave = np.asarray(wave, np.float32)
  chroma = librosa.feature.chroma_stft(y=wave, sr=sample_rate, n_fft=_CHROMA_FFT,
                                       hop_length=_CHROMA_HOP)
  mfcc = librosa.feature.mfcc(y=wave, sr=sample_rate, n_mfcc=_N_MFCC, n_fft=_MFCC_FFT,
                              hop_length=_MFCC_HOP)
  return {"logmel": _mean_std(frontend.log_mel_np(wave), 0),
          "chroma": _mean_std(chroma, 1), "mfcc": _mean_std(mfcc, 1)}


def _meta(feature_set: str) -> dict:
  """What the features of `feature_set` are (their identity in `features.open_folder`)."""
  return dict(L=0, token_rate=TOKEN_RATE[feature_set], sample_rate=frontend.SAMPLE_RATE,
              readout="mean_std_over_time", model_id=f"baseline-{feature_set}")


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


def compute_baselines(tasks_dir: str, out_dir: str | None = None, seed: int = 0) -> dict:
  """Extracts the baseline features of every task under `tasks_dir` and probes them.

  Args:
    tasks_dir: folder of task folders, each with `labels.csv` (path,label,split) and the
      clips it names (e.g. <out>/tasks from `build_offline`).
    out_dir: where features go (<out_dir>/<task>/<feature set>/...); default: a
      `baselines` folder beside `tasks_dir`. Scores are also written to
      <out_dir>/scores.json.
    seed: probe seed.

  Returns:
    {task: {feature set: test metrics}}, e.g. {"key": {"chroma": {"weighted_score": ..}}}.
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
    scores[task] = {}
    for fs in FEATURE_SETS:
      result = probe.probe_features(os.path.join(task_out, fs),
                                    os.path.join(tasks_dir, task, LABELS_FILE),
                                    TASK_INFO[task].type, seed=seed,
                                    **probe.SMALL_DATA_PROTOCOL)
      scores[task][fs] = result["test"]
  with open(os.path.join(out_dir, "scores.json"), "w") as f:
    json.dump(scores, f, indent=1)
  return scores


def format_scores(scores: dict) -> str:
  """Markdown table task x feature set of the tasks' main test metric."""
  lines = ["| task | metric | " + " | ".join(FEATURE_SETS) + " |",
           "|---|---|" + "---|" * len(FEATURE_SETS)]
  for task, by_set in sorted(scores.items()):
    metric = TASK_INFO[task].main_metric
    lines.append(f"| {task} | {metric} | " +
                 " | ".join(f"{by_set[fs][metric]:.3f}" for fs in FEATURE_SETS) + " |")
  return "\n".join(lines)
