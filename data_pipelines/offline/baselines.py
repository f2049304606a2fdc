"""Hand-crafted baselines for the offline probe tasks, scored with the project's probe.

Three feature sets per clip, each the mean and standard deviation over time of a frame
feature: `logmel` (the project front-end, `pupujepa_jax.frontend.log_mel_np`, 256-d),
`chroma` (librosa STFT chroma, 24-d) and `mfcc` (librosa, 20 coefficients, 40-d). They are
written in the embedding export layout of SPEC section 6 (one `<path>.npy` of shape
[L + 1 = 1, n_chunks = 1, D] per clip, plus `meta.json`), so they are probed by
`pupujepa_jax.probe.probe_features` exactly like model embeddings.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from data_pipelines.offline import render
from data_pipelines.offline.tasks import TASK_INFO
from pupujepa_jax import frontend

FEATURE_SETS = ("logmel", "chroma", "mfcc")
# Frame rates of the feature sets (frames per second at 24 kHz).
_CHROMA_FFT, _CHROMA_HOP = 4096, 1200
_MFCC_FFT, _MFCC_HOP, _N_MFCC = 1024, 240, 20
TOKEN_RATE = {"logmel": frontend.SAMPLE_RATE / frontend.HOP,
              "chroma": frontend.SAMPLE_RATE / _CHROMA_HOP,
              "mfcc": frontend.SAMPLE_RATE / _MFCC_HOP}


def _mean_std(frames: np.ndarray, axis: int) -> np.ndarray:
  return np.concatenate([frames.mean(axis), frames.std(axis)]).astype(np.float32)


def clip_features(audio: np.ndarray, sample_rate: int = frontend.SAMPLE_RATE) -> dict:
  """{feature set: float32 [D]} for one mono clip at 24 kHz."""
  if sample_rate != frontend.SAMPLE_RATE:
    raise ValueError(f"baselines expect {frontend.SAMPLE_RATE} Hz audio, got {sample_rate}")
  librosa = render.require("librosa")
  audio = np.asarray(audio, np.float32)
  chroma = librosa.feature.chroma_stft(y=audio, sr=sample_rate, n_fft=_CHROMA_FFT,
                                       hop_length=_CHROMA_HOP)
  mfcc = librosa.feature.mfcc(y=audio, sr=sample_rate, n_mfcc=_N_MFCC, n_fft=_MFCC_FFT,
                              hop_length=_MFCC_HOP)
  return {"logmel": _mean_std(frontend.log_mel_np(audio), 0),
          "chroma": _mean_std(chroma, 1), "mfcc": _mean_std(mfcc, 1)}


def _read_paths(labels_csv: str) -> list[str]:
  with open(labels_csv, newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or "path" not in reader.fieldnames:
      raise ValueError(f"{labels_csv}: no 'path' column")
    return [row["path"] for row in reader]


def extract_task(task_dir: str, out_dir: str) -> dict[str, int]:
  """Writes <out_dir>/<feature set>/<path>.npy and meta.json for one task; returns D's.

  Clips whose three feature files already exist are not recomputed.
  """
  import soundfile
  dims = {}
  for rel in _read_paths(os.path.join(task_dir, "labels.csv")):
    targets = {fs: os.path.join(out_dir, fs, rel + ".npy") for fs in FEATURE_SETS}
    if all(os.path.isfile(p) for p in targets.values()):
      dims = {fs: int(np.load(p, mmap_mode="r").shape[-1]) for fs, p in targets.items()}
      continue
    path = os.path.join(task_dir, rel)
    try:
      audio, sr = soundfile.read(path, dtype="float32", always_2d=True)
    except Exception as e:
      raise ValueError(f"cannot read task clip {path}: {e}") from e
    for fs, feat in clip_features(audio.mean(1), sr).items():
      os.makedirs(os.path.dirname(targets[fs]), exist_ok=True)
      np.save(targets[fs], feat[None, None, :])
      dims[fs] = int(feat.shape[-1])
  for fs, d in dims.items():
    meta = dict(D=d, L=0, token_rate=TOKEN_RATE[fs], sample_rate=frontend.SAMPLE_RATE,
                readout="mean_std_over_time", model_id=f"baseline-{fs}")
    with open(os.path.join(out_dir, fs, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
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
  from pupujepa_jax import probe  # JAX is only needed once features exist.
  tasks_dir = os.path.abspath(tasks_dir)
  if out_dir is None:
    out_dir = os.path.join(os.path.dirname(tasks_dir), "baselines")
  names = sorted(d for d in os.listdir(tasks_dir)
                 if os.path.isfile(os.path.join(tasks_dir, d, "labels.csv")))
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
                                    os.path.join(tasks_dir, task, "labels.csv"),
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
