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
import pathlib
import signal
import time

import jax
import numpy as np

from pupujepa_jax import checkpointing, metrics as metrics_lib, sharding, train_step
from pupujepa_jax import config as config_lib
from pupujepa_jax import workdir as workdir_lib

class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


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
  workdir = pathlib.Path(workdir)
  workdir_lib.check_config(cfg, workdir, allow_config_change)  # refuses before any write
  mesh = sharding.mesh_from_config(cfg)
  step_fn = train_step.make_train_step(cfg, mesh)
  shardings = train_step.state_shardings(cfg, mesh)
  manager = checkpointing.make_manager(workdir, cfg.checkpoint.keep, cfg.checkpoint.keep_period)
  iterator = pipeline.make_pretrain_iterator(cfg.data, config_lib.frontend(cfg),
                                             cfg.model.crop_frames, seed=cfg.seed)
  if manager.latest_step() is not None:
    start, state = checkpointing.restore(manager, train_step.abstract_state(cfg), shardings,
                                         data_args=pipeline.checkpoint_args_restore(iterator))
  else:
    start, state = 0, train_step.create_sharded_state(cfg, mesh)
  workdir_lib.write_run_files(cfg, workdir)  # only once the state is in hand
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
