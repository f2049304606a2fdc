"""The training loop: config -> mesh -> data -> jitted steps -> logs and checkpoints.

`train(cfg, workdir)` is the whole job; the CLI only parses flags and calls it. A workdir
holds `config.json`, `run_info.json` (git revision, package versions), `metrics.jsonl`,
`tb/`, `checkpoints/` and `trainer.lock`. One trainer writes a workdir at a time: a
second one is refused with the holder's pid, and a killed one leaves no stale lock
(`workdir.exclusive`). Restarting with the same workdir resumes exactly: the state and
the Grain iterator come back from the same checkpoint and every random draw is a
function of (seed, step). The checkpoint resumed from is the newest that verifies
(digests and finite values, see `checkpointing`); damaged newer steps are named, moved
to `checkpoints_rejected/`, and the step resumed from is kept through this run's
rotations. SIGTERM (pod preemption) saves a checkpoint and returns normally.

Good checkpoints. The checkpoint of step S (the state after S updates) is *good* when
  1. every array of its state is finite;
  2. its parameter norm is at most DIVERGENCE_FACTOR times that of the previous good
     checkpoint;
  3. the loss computed on it (logged at step S) is finite and at most DIVERGENCE_FACTOR
     times the loss logged just before the previous good checkpoint was written.
The previous good checkpoint is the one this run last confirmed, else the one it
resumed from; when neither carries these numbers (a fresh run, imported weights, a
resume with another `loss`), the run's first logged step stands in. Bounds relative to the previous good checkpoint let
the loss and the weights drift over a long run while a blow-up between two checkpoints
is caught; the price is that a run growing just under tenfold per checkpoint is only
stopped once its loss turns non-finite. A state failing 1 or 2 is never written; a
written checkpoint failing 3 is moved to `checkpoints_rejected/`. Any failure stops the
run with `DivergenceError` (`NonFiniteLossError` for a NaN/Inf loss) naming the last
good checkpoint, which rotation never deletes (resume from it, e.g. with a lower
learning rate and --allow_config_change). A checkpoint whose loss has not been computed
yet (the last one of a run) counts as good once the next run has logged its step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import signal
import time
import warnings

import jax
import numpy as np

from pupujepa_jax import block_cache, checkpointing, metrics as metrics_lib, sharding, train_step
from pupujepa_jax import config as config_lib
from pupujepa_jax import workdir as workdir_lib
from pupujepa_jax import xla_flags

# How far the loss and the parameter norm may grow between good checkpoints.
DIVERGENCE_FACTOR = 10.0


class DivergenceError(RuntimeError):
  """Training diverged; nothing diverged is kept. `last_good_step` names the checkpoint
  to resume from (None when this run confirmed none)."""

  def __init__(self, message: str, last_good_step: int | None):
    super().__init__(message)
    self.last_good_step = last_good_step


class NonFiniteLossError(DivergenceError):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
  final_step: int
  last_metrics: dict
  stopped_by_signal: bool
  workdir: str
  resumed_from: int | None = None
  rejected_checkpoints: dict = dataclasses.field(default_factory=dict)  # {step: reason}
  dataset_changed: bool = False  # resumed on a dataset replaced since the run started


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


def health(record: dict, objective: str) -> dict:
  """The numbers a checkpoint is judged by, from the metrics of the step before it."""
  return {"loss": float(record["loss"]), "param_norm": float(record["param_norm"]),
          "objective": objective}


def _exceeds(value: float, reference: float) -> bool:
  return not math.isfinite(value) or value > DIVERGENCE_FACTOR * reference


def train(cfg, workdir, *, stop_after: int | None = None, progress: bool = True,
          allow_config_change: bool = False) -> TrainResult:
  """Train `cfg` in `workdir` (resuming if it holds a checkpoint) up to cfg.total_steps.

  `stop_after` ends the loop after that many steps of this call (tests, smoke runs);
  the run still checkpoints and can be resumed.
  """
  config_lib.validate(cfg, jax.device_count())
  workdir = pathlib.Path(workdir)
  workdir_lib.check_config(cfg, workdir, allow_config_change)  # refuses before any write
  with workdir_lib.exclusive(workdir), contextlib.ExitStack() as cleanup:
    cleanup.enter_context(xla_flags.single_threaded_host_blas())
    return _train(cfg, workdir, stop_after, progress, cleanup)


def _train(cfg, workdir: pathlib.Path, stop_after, progress, cleanup) -> TrainResult:
  """The run, inside the workdir's lock; `cleanup` closes what it opens, also on errors."""
  from data_pipelines import pipeline  # heavy (grain, tfds): only when training

  mesh = sharding.mesh_from_config(cfg)
  step_fn = train_step.make_train_step(cfg, mesh)
  shardings = train_step.state_shardings(cfg, mesh)
  protected = set()  # steps rotation must keep: resumed-from and last good
  manager = checkpointing.make_manager(workdir, cfg.checkpoint.keep, cfg.checkpoint.keep_period,
                                       protect=protected)
  cleanup.callback(manager.close)
  cleanup.callback(manager.wait_until_finished)  # runs first: callbacks unwind in reverse
  iterator = pipeline.make_pretrain_iterator(cfg.data, config_lib.frontend(cfg),
                                             cfg.model.crop_frames, seed=cfg.seed)
  cleanup.callback(iterator.close)  # stops Grain worker processes
  where = checkpointing.checkpoint_dir(workdir)
  monitor = None
  if cfg.monitor.every and cfg.monitor.labels:
    from pupujepa_jax import monitor as monitor_lib
    monitor = monitor_lib.KnnMonitor(cfg.monitor.labels, config_lib.serving_spec(cfg),
                                     config_lib.runtime(cfg))
  rejected, resumed_from, reference = {}, None, None
  if manager.latest_step() is not None:
    restored = checkpointing.restore(manager, train_step.abstract_state(cfg), shardings,
                                     data_args=pipeline.checkpoint_args_restore(iterator))
    rejected = restored.rejected
    if rejected:
      checkpointing.set_aside(manager, rejected)
    start, state, reference = restored.step, restored.state, restored.health
    if reference and reference.get("objective") != cfg.loss:  # losses of another scale
      reference = None
    resumed_from = start
    protected.add(start)
  else:
    start, state = 0, train_step.create_sharded_state(cfg, mesh)
  dataset = _dataset_identity(cfg.data)
  previous = workdir_lib.read_run_info(workdir).get("dataset_identity")
  dataset_changed = resumed_from is not None and previous not in (None, dataset)
  if dataset_changed:
    warnings.warn(f"resuming {workdir} on a replaced dataset: {cfg.data.path} is not the "
                  "dataset this run started on (it was re-ingested or replaced since)")
  workdir_lib.write_run_files(cfg, workdir,  # only once the state is in hand
                              dataset_identity=dataset)
  end = cfg.total_steps if stop_after is None else min(cfg.total_steps, start + stop_after)
  writer = metrics_lib.MetricWriter(workdir, cfg.total_steps, start,
                                    enabled=jax.process_index() == 0, progress=progress)
  cleanup.callback(writer.close)
  tokens_per_example = int(np.prod(config_lib.grid_shape(cfg)))
  pending, last, step = [], {}, start
  compiled_step = None
  # The checkpoint whose own loss is still to be seen (see "Good checkpoints") and its
  # health; the last good checkpoint.
  unconfirmed = (resumed_from, reference) if resumed_from is not None else None
  good = None
  clock = (time.perf_counter(), start)

  def last_good() -> str:
    return f"Last good checkpoint: {good if good is not None else 'none'} under {where}"

  def judge_loss(s: int, loss: float):
    """Confirm or reject the unconfirmed checkpoint with the loss of its step."""
    nonlocal unconfirmed, good, reference
    ckpt, ckpt_health = unconfirmed
    unconfirmed = None
    if not _exceeds(loss, reference["loss"]):
      previous, good, reference = good, ckpt, ckpt_health or reference
      protected.add(good)  # before releasing the previous one: rotation runs concurrently
      if previous != resumed_from:
        protected.discard(previous)
      return
    why = (f"loss is {loss:.4g} at step {s}, computed on checkpoint {ckpt}"
           + ("" if not math.isfinite(loss) else
              f", more than {DIVERGENCE_FACTOR:g}x the previous good checkpoint's "
              f"{reference['loss']:.4g}"))
    if ckpt != resumed_from:  # written by this run: keep it from being resumed
      checkpointing.set_aside(manager, {ckpt: f"diverged: {why}"})
    error = DivergenceError if math.isfinite(loss) else NonFiniteLossError
    raise error(f"{why}; stopping. {last_good()}", good)

  def flush():
    nonlocal last, clock, reference
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    elapsed = time.perf_counter() - clock[0]
    steps_done = pending[-1][0] + 1 - clock[1]
    rate = steps_done / elapsed if elapsed > 0 else float("nan")
    for (s, _), m in zip(pending, fetched):
      if reference is None:
        reference = health(m, cfg.loss)  # fresh, imported or new objective: first step
      if unconfirmed is not None and unconfirmed[0] == s:
        judge_loss(s, float(m["loss"]))
      elif not np.isfinite(m["loss"]):
        raise NonFiniteLossError(f"loss is {float(m['loss'])} at step {s}; stopping. "
                                 f"{last_good()}", good)
      extra = {"steps_per_second": rate,
               "examples_per_second": rate * cfg.data.batch_size,
               "tokens_per_second": rate * cfg.data.batch_size * tokens_per_example}
      last = writer.write(s, {**m, **extra})
    writer.advance(len(pending))
    pending.clear()
    clock = (time.perf_counter(), steps_done + clock[1])

  def checkpoint(force=False):
    nonlocal unconfirmed
    flush()  # never judge or save a state whose predecessors' losses were not checked
    summary = checkpointing.summarize(state)
    numbers = health(last, cfg.loss) if last.get("step") == step - 1 else None
    if summary.non_finite:
      raise DivergenceError(f"the state at step {step} holds NaN or Inf "
                            f"({', '.join(summary.non_finite[:3])}); not saved. "
                            f"{last_good()}", good)
    if numbers and reference and _exceeds(numbers["param_norm"], reference["param_norm"]):
      raise DivergenceError(
          f"the parameter norm at step {step} is {numbers['param_norm']:.4g}, more than "
          f"{DIVERGENCE_FACTOR:g}x the previous good checkpoint's "
          f"{reference['param_norm']:.4g}; not saved. {last_good()}", good)
    checkpointing.save(manager, step, state, pipeline.checkpoint_args_save(iterator),
                       health=numbers, force=force, summary=summary)
    unconfirmed = (step, numbers)

  with _StopSignal() as stop:
    while step < end and not stop.received:
      batch = sharding.global_batch(next(iterator), mesh)
      if compiled_step is None:  # compiled ahead, so the compiler's garbage goes first
        compiled_step = step_fn.lower(state, batch).compile()
        block_cache.release_freed_heap()
      state, step_metrics = compiled_step(state, batch)
      step += 1
      if monitor is not None and step % cfg.monitor.every == 0:
        step_metrics = {**step_metrics, **monitor.evaluate(state["params"], state["teacher"])}
        block_cache.release_freed_heap()  # its first call compiles, as the step's did
      pending.append((step - 1, step_metrics))
      if step % cfg.log_every == 0:
        flush()
      if step % cfg.checkpoint.every == 0:
        checkpoint()
    if manager.latest_step() != step:
      checkpoint(force=True)
    flush()
  return TrainResult(final_step=step, last_metrics=last, stopped_by_signal=stop.received,
                     workdir=str(workdir), resumed_from=resumed_from,
                     rejected_checkpoints=rejected, dataset_changed=dataset_changed)


def _dataset_identity(data_cfg) -> str | None:
  """The ingested dataset's identity (None for audio folders, read on the fly)."""
  if data_cfg.source != "tfds":
    return None
  from data_pipelines import dataset_format
  return dataset_format.dataset_identity(data_cfg.path)
