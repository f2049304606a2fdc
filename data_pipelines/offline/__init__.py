"""Offline music: a pretraining corpus and labelled probe tasks rendered from packages.

`build_offline` parses music21 corpus scores, renders them with the General MIDI soundfont
of pretty_midi through TinySoundFont (SPEC section 8), and writes

  <out>/corpus/*.wav                       pretraining audio (24 kHz mono, 16-bit)
  <out>/tasks/<task>/audio/*.wav           probe clips
  <out>/tasks/<task>/labels.csv            path,label,split (`;` joins multiple labels)
  <out>/summary.json                       counts, durations, skips, sizes, time

Everything random comes from generators seeded by (seed, purpose, index) in the main
process, so the files do not depend on the worker count or scheduling. The build is
cached: a finished build with the same arguments returns its summary at once, and an
interrupted one re-renders only the files it lacks. Test-split pieces of the tasks never
appear in the corpus. `pupujepa_jax.baselines` scores hand-crafted features on the tasks.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time

import numpy as np

from data_pipelines.offline import corpus
from data_pipelines.offline import render
from data_pipelines.offline import tasks as tasks_lib
from data_pipelines.offline.tasks import TASK_INFO, TASKS
from pupujepa_jax import labels

__all__ = ["build_offline", "TASK_INFO", "TASKS"]

# Bump when the construction changes, so old caches are not reused.
BUILD_VERSION = 2
MIN_PIECES = 24
# Test clips per extra test piece (see `extra_test_pieces`).
TEST_CLIPS_PER_PIECE = 5


def default_examples(hours: float) -> int:
  """Examples per task for a corpus of `hours`: 600 for the 2-hour demo (210 test clips)."""
  return int(np.clip(round(300 * hours), 16, 2000))


def default_pieces(hours: float) -> int:
  """How many scores to parse for the corpus (and the tasks' train and valid splits):
  enough for variety, few enough to parse in seconds."""
  return int(np.clip(round(hours * 50), MIN_PIECES, 400))


def extra_test_pieces(examples: int) -> int:
  """Test-split scores parsed beyond the corpus selection, so that the test clips of a
  task come from many pieces (about TEST_CLIPS_PER_PIECE clips each)."""
  test_share = dict(tasks_lib.SPLIT_SHARES)["test"]
  return int(round(examples * test_share / TEST_CLIPS_PER_PIECE))


# ------------------------------------------------------------------------------ workers

_SYNTH = None


def _init_worker():
  global _SYNTH
  _SYNTH = render.Synth()


def _parse_job(source):
  try:
    return corpus.parse_source(source), None
  except corpus.ScoreError as e:
    return None, str(e)


def _write_wav(path: str, audio: np.ndarray):
  import soundfile  # Imported here: only workers write audio.
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.wav"
  soundfile.write(tmp, audio, render.SAMPLE_RATE, subtype="PCM_16")
  os.replace(tmp, path)


def _render_job(job):
  """Renders one corpus item or task example to `path`; returns (path, seconds, error)."""
  kind, spec, piece, path = job
  try:
    if kind == "corpus":
      audio = corpus.render_corpus_item(spec, piece, _SYNTH)
    else:
      audio = tasks_lib.render_example(spec, piece, _SYNTH)
    _write_wav(path, audio)
    return path, len(audio) / render.SAMPLE_RATE, None
  except Exception as e:  # A failed render is skipped and counted, never fatal.
    return path, 0.0, f"{spec.get('piece')}: {type(e).__name__}: {e}"


def _run(pool, fn, jobs, progress: bool, desc: str):
  from tqdm import tqdm
  it = pool.imap(fn, jobs, chunksize=1) if pool else map(fn, jobs)
  return list(tqdm(it, total=len(jobs), desc=desc, disable=not progress, leave=False))


# -------------------------------------------------------------------------------- build

def _args_hash(args: dict) -> str:
  return hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]


def _cached_summary(out_dir: str, digest: str) -> dict | None:
  """The summary of a finished build with the same arguments, if all its files exist."""
  path = os.path.join(out_dir, "summary.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  if summary.get("args_hash") != digest:
    return None
  files = summary.get("files", [])
  if not all(os.path.isfile(os.path.join(out_dir, p)) for p in files):
    return None
  return summary


def _prepare_out_dir(out_dir: str, args: dict, digest: str):
  """Clears outputs of a build with other arguments (an interrupted build with the same
  arguments keeps its files), then stamps the folder with these arguments."""
  os.makedirs(out_dir, exist_ok=True)
  stamp = os.path.join(out_dir, "build_args.json")
  if os.path.isfile(stamp):
    with open(stamp) as f:
      if json.load(f).get("args_hash") == digest:
        return
  for sub in ("corpus", "tasks"):
    shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
  if os.path.isfile(os.path.join(out_dir, "summary.json")):
    os.remove(os.path.join(out_dir, "summary.json"))
  with open(stamp, "w") as f:
    json.dump({**args, "args_hash": digest}, f)


def _load_pieces(sources, cache_dir, pool, progress):
  pieces, skipped, todo = [], [], []
  for source in sources:
    cached = corpus.load_cached(source[0], cache_dir)
    (pieces.append(cached) if cached else todo.append(source))
  for piece, error in _run(pool, _parse_job, todo, progress, "parse scores"):
    if piece is None:
      skipped.append(error)
    else:
      corpus.store_cached(piece, cache_dir)
      pieces.append(piece)
  order = {s[0]: i for i, s in enumerate(sources)}
  pieces.sort(key=lambda p: order[p.id])
  return pieces, skipped


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def _plan_jobs(out_dir: str, pieces: list, tasks: tuple[str, ...], examples: int,
               seed: int, hours: float) -> tuple[dict, list]:
  """The task clips ({task: specs}) and the render jobs (kind, spec, piece, wav path) of
  the corpus and every task; all test pieces are held out of the corpus, whichever tasks
  are built."""
  by_id = {p.id: p for p in pieces}
  specs = {t: tasks_lib.plan_task(t, pieces, examples, seed) for t in tasks}
  train_pieces = [p for p in pieces if corpus.piece_split(p.id) != "test"]
  plans = corpus.plan_corpus(train_pieces, hours * 3600.0, seed) if hours > 0 else []
  jobs = [("corpus", p, by_id[p["piece"]],
           os.path.join(out_dir, "corpus", p["name"] + ".wav")) for p in plans]
  jobs += [("task", s, by_id[s["piece"]], os.path.join(out_dir, "tasks", t, s["name"]))
           for t in tasks for s in specs[t]]
  return specs, jobs


def _collect_rendered(out_dir: str, jobs: list, specs: dict, results: dict):
  """What rendered: the corpus jobs, every file written (relative to `out_dir`) and each
  task's summary; writes each task's labels.csv for its rendered clips."""
  def ok(path):
    return results.get(path, (None, None))[1] is None

  corpus_jobs = [j for j in jobs if j[0] == "corpus" and ok(j[3])]
  files = [os.path.relpath(j[3], out_dir) for j in corpus_jobs]
  summary_tasks = {}
  for t, task_specs in specs.items():
    task_dir = os.path.join(out_dir, "tasks", t)
    rows = [s for s in task_specs if ok(os.path.join(task_dir, s["name"]))]
    files += [os.path.join("tasks", t, s["name"]) for s in rows]
    summary_tasks[t] = _write_task_labels(task_dir, rows, TASK_INFO[t].clip_seconds)
  return corpus_jobs, files, summary_tasks


def _check_build_args(tasks: tuple[str, ...], hours: float) -> None:
  unknown = [t for t in tasks if t not in TASK_INFO]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; known: {TASKS}")
  if hours < 0:
    raise ValueError(f"hours must be >= 0, got {hours}")
  for module in ("music21", "pretty_midi", "tinysoundfont", "soundfile"):
    render.require(module)


def _write_task_labels(task_dir: str, rows: list[dict], clip_seconds: float) -> dict:
  """Writes a task's labels.csv for its rendered clips; returns the task's summary."""
  labels.write_labels_csv([(s["name"], s["label"], s["split"]) for s in rows],
                          os.path.join(task_dir, labels.LABELS_FILE))
  return dict(
      examples=len(rows), bytes=_dir_bytes(task_dir),
      splits={sp: sum(s["split"] == sp for s in rows) for sp in labels.SPLITS},
      pieces=len({s["piece"] for s in rows}), clip_seconds=clip_seconds)


def build_offline(out_dir: str, hours: float = 2.0, seed: int = 0, num_workers: int = 2,
                  progress: bool = True, tasks: tuple[str, ...] = TASKS,
                  examples_per_task: int | None = None) -> dict:
  """Renders the pretraining corpus and the probe tasks under `out_dir` (see module doc).

  Returns the summary dict (also written to <out_dir>/summary.json): per-part counts,
  audio seconds, skipped scores and renders with reasons, sizes in bytes, wall time, and
  `cached` (True when a finished identical build was found and nothing was rendered).
  """
  t0 = time.time()
  tasks = tuple(tasks)
  _check_build_args(tasks, hours)
  examples = examples_per_task or default_examples(hours)
  args = dict(version=BUILD_VERSION, hours=float(hours), seed=int(seed), tasks=list(tasks),
              examples_per_task=int(examples))
  digest = _args_hash(args)
  cached = _cached_summary(out_dir, digest)
  if cached is not None:
    return {**cached, "cached": True, "seconds_wall": round(time.time() - t0, 3)}
  _prepare_out_dir(out_dir, args, digest)

  sources = corpus.select_sources(default_pieces(hours), seed)
  sources += corpus.select_test_sources(extra_test_pieces(examples), seed,
                                        [s[0] for s in sources])
  ctx = multiprocessing.get_context("spawn")  # Fork is unsafe once JAX threads exist.
  pool = ctx.Pool(num_workers, initializer=_init_worker) if num_workers > 1 else None
  if pool is None:
    _init_worker()
  t_parse = time.time()
  try:
    pieces, skipped_scores = _load_pieces(sources, os.path.join(out_dir, "cache", "pieces"),
                                          pool, progress)
    specs, jobs = _plan_jobs(out_dir, pieces, tasks, examples, seed, hours)
    todo = [j for j in jobs if not os.path.isfile(j[3])]
    t_render = time.time()
    results = {path: (seconds, error)
               for path, seconds, error in _run(pool, _render_job, todo, progress, "render")}
  finally:
    if pool is not None:
      pool.close()
      pool.join()

  corpus_jobs, files, summary_tasks = _collect_rendered(out_dir, jobs, specs, results)
  failed = [e for _, e in results.values() if e is not None]
  summary = dict(
      args=args, args_hash=digest, cached=False,
      corpus=dict(files=len(corpus_jobs),
                  hours=round(sum(j[1]["seconds"] for j in corpus_jobs) / 3600, 4),
                  pieces=len({j[1]["piece"] for j in corpus_jobs}),
                  bytes=_dir_bytes(os.path.join(out_dir, "corpus"))),
      tasks=summary_tasks,
      scores=dict(selected=len(sources), parsed=len(pieces), skipped=len(skipped_scores),
                  skipped_reasons=skipped_scores),
      renders=dict(jobs=len(jobs), rendered=len(todo), skipped=len(failed),
                   skipped_reasons=failed),
      seconds_wall=round(time.time() - t0, 2),
      seconds_phases=dict(start=round(t_parse - t0, 2), parse=round(t_render - t_parse, 2),
                          render=round(time.time() - t_render, 2)),
      files=files)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary
