"""The training loop: config -> mesh -> data -> jitted steps -> logs and checkpoints.

`train(cfg, workdir)` is the whole job; the CLI only parses flags and calls it. A workdir
holds `config.json`, `run_info.json` (git revision, package versions), `metrics.jsonl`,
`tb/` and `checkpoints/`. Restarting with the same workdir resumes exactly: the state and
the Grain iterator come back from the same checkpoint and every random draw is a function
of (seed, step). SIGTERM (pod preemption) saves a checkpoint and returns normally; a
non-finite loss stops the run before anything non-finite is saved.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import subprocess
import time
from importlib import metadata

import jax
import numpy as np

from pupujepa_jax import checkpointing, metrics as metrics_lib, sharding, train_step
from pupujepa_jax import config as config_lib

# Fields that may change between a run and its resumption without changing its result.
RESUMABLE_FIELDS = ("total_steps", "log_every", "checkpoint.every", "checkpoint.keep",
                    "checkpoint.keep_period", "data.num_workers", "data.prefetch_buffer",
                    "data.path")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
            "ml-collections", "tensorflow-datasets")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


class ConfigMismatchError(RuntimeError):
  """A workdir holds a run of a different config."""


@dataclasses.dataclass
class TrainResult:
  final_step: int
  last_metrics: dict
  stopped_by_signal: bool
  workdir: str


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Join a multi-process job: explicit flags, or the platform's auto-detection (pods)."""
  if coordinator is None and num_processes is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator, num_processes, process_id)


def flatten(cfg_dict: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in cfg_dict.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  """Fields (dotted names) whose values differ, ignoring RESUMABLE_FIELDS."""
  a, b = flatten(old), flatten(new)
  return sorted(k for k in set(a) | set(b)
                if k not in RESUMABLE_FIELDS and a.get(k, "<absent>") != b.get(k, "<absent>"))


def _git_revision() -> str:
  try:
    here = pathlib.Path(__file__).resolve().parent
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def run_info() -> dict:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return {"git_revision": _git_revision(), "packages": versions,
          "process_count": jax.process_count(), "device_count": jax.device_count(),
          "backend": jax.default_backend()}


def prepare_workdir(cfg, workdir, allow_config_change: bool = False) -> pathlib.Path:
  """Create the workdir, refuse a foreign run in it, write config.json and run_info.json."""
  workdir = pathlib.Path(workdir)
  new = json.loads(cfg.to_json())
  config_path = workdir / "config.json"
  if config_path.exists() and checkpointing.checkpoint_dir(workdir).exists():
    old = json.loads(config_path.read_text())
    diff = config_differences(old, new)
    if diff and not allow_config_change:
      flat_old, flat_new = flatten(old), flatten(new)
      details = "; ".join(f"{k}: {flat_old.get(k, '<absent>')!r} -> "
                          f"{flat_new.get(k, '<absent>')!r}" for k in diff[:10])
      raise ConfigMismatchError(
          f"{workdir} holds a run with a different config ({details}). Use a new workdir, "
          "or pass --allow_config_change to resume it with the new values.")
  if jax.process_index() == 0:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      config_path.write_text(json.dumps(new, indent=2, sort_keys=True))
      (workdir / "run_info.json").write_text(json.dumps(run_info(), indent=2))
    except OSError as e:
      raise OSError(f"cannot write to workdir {workdir}: {e.strerror or e}") from e
  return workdir


class _StopSignal:
  """Turns SIGTERM into a flag the loop polls (preemption: save, then exit cleanly)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, nothing to restore
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train(cfg, workdir, *, stop_after: int | None = None, progress: bool = True,
          allow_config_change: bool = False) -> TrainResult:
  """Train `cfg` in `workdir` (resuming if it holds a checkpoint) up to cfg.total_steps.

  `stop_after` ends the loop after that many steps of this call (tests, smoke runs);
  the run still checkpoints and can be resumed.
  """
  from data_pipelines import pipeline  # heavy (grain, tfds): only when training

  config_lib.validate(cfg, jax.device_count())
  workdir = prepare_workdir(cfg, workdir, allow_config_change)
  mesh = sharding.mesh_from_config(cfg)
  step_fn = train_step.make_train_step(cfg, mesh)
  shardings = train_step.state_shardings(cfg, mesh)
  manager = checkpointing.make_manager(workdir, cfg.checkpoint.keep, cfg.checkpoint.keep_period)
  iterator = pipeline.make_pretrain_iterator(cfg.data, config_lib.frontend_from_config(cfg),
                                             seed=cfg.seed)
  if manager.latest_step() is not None:
    start, state = checkpointing.restore(manager, train_step.abstract_state(cfg), shardings,
                                         data_args=pipeline.checkpoint_args_restore(iterator))
  else:
    start, state = 0, train_step.create_sharded_state(cfg, mesh)
  end = cfg.total_steps if stop_after is None else min(cfg.total_steps, start + stop_after)
  writer = metrics_lib.MetricWriter(workdir, cfg.total_steps, start,
                                    enabled=jax.process_index() == 0, progress=progress)
  tokens_per_example = int(np.prod(config_lib.grid_shape(cfg)))
  pending, last, step = [], {}, start
  last_good_checkpoint = start if start else None
  clock = (time.perf_counter(), start)

  def flush():
    nonlocal last, clock
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    elapsed = time.perf_counter() - clock[0]
    steps_done = pending[-1][0] + 1 - clock[1]
    rate = steps_done / elapsed if elapsed > 0 else float("nan")
    for (s, _), m in zip(pending, fetched):
      if not np.isfinite(m["loss"]):
        raise NonFiniteLossError(
            f"loss is {float(m['loss'])} at step {s}; stopping. Last good checkpoint: "
            f"{last_good_checkpoint if last_good_checkpoint is not None else 'none'} "
            f"under {checkpointing.checkpoint_dir(workdir)}")
      extra = {"steps_per_second": rate,
               "examples_per_second": rate * cfg.data.batch_size,
               "tokens_per_second": rate * cfg.data.batch_size * tokens_per_example}
      last = writer.write(s, {**m, **extra})
    writer.advance(len(pending))
    pending.clear()
    clock = (time.perf_counter(), steps_done + clock[1])

  def checkpoint(force=False):
    nonlocal last_good_checkpoint
    flush()  # never save a state whose loss was not checked
    checkpointing.save(manager, step, state, pipeline.checkpoint_args_save(iterator),
                       force=force)
    last_good_checkpoint = step

  try:
    with _StopSignal() as stop:
      while step < end and not stop.received:
        batch = sharding.global_batch(next(iterator), mesh)
        state, step_metrics = step_fn(state, batch)
        pending.append((step, step_metrics))
        step += 1
        if step % cfg.log_every == 0:
          flush()
        if step % cfg.checkpoint.every == 0:
          checkpoint()
      if manager.latest_step() != step:
        checkpoint(force=True)
      flush()
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return TrainResult(final_step=step, last_metrics=last, stopped_by_signal=stop.received,
                     workdir=str(workdir))
