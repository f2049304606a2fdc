"""Orbax checkpoints of a run: train state, Grain iterator state and a verification record.

One `CheckpointManager` under `<workdir>/checkpoints`, asynchronous, keeping the last
`keep` checkpoints, every `keep_period`-th step, and any step in the caller's `protect`
set (the trainer protects the last good step while newer ones are unproven). The state
is restored into the shardings of the *current* mesh, so a run saved on 8 devices
resumes on 4 or 1.

Verification. Orbax's own checksums cover only the index of each array shard, not the
array bytes: a flipped byte inside the data restores silently. So every `save` writes a
record next to the state (item `verification`): a 64-bit digest of every array and the
caller's health numbers (loss, parameter norm). The digests are computed on the devices
from each element's bits and global position, so they do not depend on how an array is
sharded, and a state holding NaN or Inf is never written. `restore` returns a state only
after checking that the stored shapes are the model's, the step reads back, every digest
matches and every value is finite. Without an explicit step it returns the newest step
that verifies and names, with reasons, the newer ones that did not (`Restored.rejected`,
also logged as warnings); the trainer, the workdir's single writer, then moves those out
of the way (`set_aside`) into `<workdir>/checkpoints_rejected/`.

The pipeline's position (Grain's item `data`, one JSON file per process) is covered the
same way: the record holds a digest of every process's file, so a damaged position is a
damaged step rather than a resumed run that silently reads other batches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

RECORD_ITEM = "verification"
RECORD_FORMAT = 1
REJECTED_DIR = "checkpoints_rejected"
_SEEDS = (0x243F6A88, 0x85A308D3)  # one 32-bit half of each digest per seed

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint could not be read or written; the message names the path."""


class CheckpointDamagedError(CheckpointError):
  """A checkpoint step reads back wrong (digest, NaN/Inf, unreadable, no record)."""


class CheckpointMismatchError(CheckpointError):
  """The stored arrays have other names or shapes than this config's model."""


class NonFiniteStateError(CheckpointError):
  """Refused to write a state holding NaN or Inf."""


def checkpoint_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


@dataclasses.dataclass
class _Protected(checkpoint_managers.PreservationPolicy):
  """Keeps every step in `steps`, a set its owner may change while the manager lives."""
  steps: set

  def should_preserve(self, checkpoints, *, context):
    return [info.step in self.steps for info in checkpoints]


def make_manager(workdir, keep: int = 3, keep_period: int = 0, async_save: bool = True,
                 read_only: bool = False, protect: set | None = None
                 ) -> ocp.CheckpointManager:
  """The run's manager; steps in `protect` (read at each rotation) are never rotated away."""
  policies = [checkpoint_managers.LatestN(keep or None)]
  if keep_period:
    policies.append(checkpoint_managers.EveryNSteps(keep_period))
  if protect is not None:
    policies.append(_Protected(protect))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


# ---------------------------------------------------------------------- digests of arrays

def path_name(path) -> str:
  """`params/student/blocks/attn/qkv/kernel` for a pytree key path (dict, list, attribute)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def _mix(h):
  """murmur3's 32-bit finaliser: every input bit changes about half the output bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_summary(x):
  """([2] uint32 digest, all finite) of one array: a sum of per-element hashes of (bits,
  global flat position), exact in any reduction order, hence in any sharding."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  position = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):  # iotas, not a reshape: no resharding of x
    position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(
        stride % 2 ** 32)
    stride *= x.shape[axis]
  digest = jnp.stack([_mix(bits ^ _mix(position ^ jnp.uint32(seed))).sum(dtype=jnp.uint32)
                      for seed in _SEEDS])
  finite = jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return digest, finite


_summaries = jax.jit(lambda leaves: [_leaf_summary(x) for x in leaves])


@dataclasses.dataclass
class Summary:
  """Digest (16 hex digits) of every array of a state, and the arrays holding NaN/Inf."""
  digests: dict[str, str]
  non_finite: list[str]


def summarize(state) -> Summary:
  """Digests and finiteness of every array of `state`, computed where the arrays live."""
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(state))
  results = jax.device_get(_summaries(list(leaves)))
  names = [path_name(p) for p in paths]
  digests = {n: "".join(f"{int(h):08x}" for h in np.asarray(d)) for n, (d, _) in
             zip(names, results)}
  return Summary(digests, [n for n, (_, ok) in zip(names, results) if not ok])


# ------------------------------------------------------------------------- save, restore

def save(manager: ocp.CheckpointManager, step: int, state, data_args=None,
         health: dict | None = None, force: bool = False,
         summary: Summary | None = None) -> bool:
  """Start (asynchronously) saving `state`, its verification record and the iterator args.

  `health` (JSON numbers, e.g. loss and parameter norm) is stored in the record and comes
  back with the state; `summary` avoids recomputing digests the caller already has.
  """
  summary = summarize(state) if summary is None else summary
  if summary.non_finite:
    raise NonFiniteStateError(f"refusing to write checkpoint step {step} under "
                              f"{manager.directory}: NaN or Inf in {_some(summary.non_finite)}")
  record = {"format": RECORD_FORMAT, "step": int(step), "digests": summary.digests,
            "health": health, "data_digests": _data_digests(data_args)}
  items = {"state": ocp.args.StandardSave(state), RECORD_ITEM: ocp.args.JsonSave(record)}
  if data_args is not None:
    items["data"] = data_args
  try:
    return manager.save(step, args=ocp.args.Composite(**items), force=force)
  except OSError as e:
    raise CheckpointError(f"cannot write checkpoint step {step} under "
                          f"{manager.directory}: {e}") from e


def abstract_with_shardings(abstract_state, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


@dataclasses.dataclass
class Restored:
  """A verified checkpoint: its step, state and health record, and the newer steps that
  failed verification ({step: reason}, newest first)."""
  step: int
  state: object
  health: dict | None
  rejected: dict[int, str]


def restore(manager: ocp.CheckpointManager, abstract_state, shardings, step=None,
            data_args=None) -> Restored:
  """The newest checkpoint that verifies (or exactly `step`), on the current mesh.

  Raises CheckpointMismatchError when the stored arrays do not fit this model (a config
  problem: no step is skipped for it) and CheckpointDamagedError when `step` (or every
  step) fails verification.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoint under {manager.directory}")
  if step is not None and step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} under {manager.directory}; "
                          f"available: {sorted(steps)}")
  rejected, mismatched = {}, {}
  for candidate in [step] if step is not None else steps:
    try:
      state, health = _restore_verified(manager, candidate, abstract_state, shardings,
                                        data_args)
    except CheckpointMismatchError as e:
      mismatched[candidate] = rejected[candidate] = str(e)
      continue
    except CheckpointDamagedError as e:
      rejected[candidate] = str(e)
      if step is None:
        log.warning("%s; trying an older step", e)
      continue
    return Restored(candidate, state, health, rejected)
  if len(mismatched) == len(rejected):  # every step has another shape: the config changed
    raise CheckpointMismatchError(next(iter(mismatched.values())))
  if step is not None:
    raise CheckpointDamagedError(rejected[step])
  raise CheckpointDamagedError(f"no checkpoint under {manager.directory} verifies: "
                               + "; ".join(rejected.values()))


def _restore_verified(manager, step, abstract_state, shardings, data_args):
  """(state, health) of `step` once shapes, digests and finiteness are checked."""
  where = f"checkpoint step {step} under {manager.directory}"
  step_dir = pathlib.Path(manager.directory) / str(step)
  items = {p.name for p in step_dir.iterdir() if p.is_dir()}
  if RECORD_ITEM not in items:
    raise CheckpointDamagedError(f"{where} is damaged: it has no verification record")
  _check_shapes(where, step_dir / "state", abstract_state)
  args = {"state": ocp.args.StandardRestore(abstract_with_shardings(abstract_state,
                                                                     shardings)),
          RECORD_ITEM: ocp.args.JsonRestore()}
  # A checkpoint written by `save_state` (e.g. imported weights) holds no data position:
  # the pipeline then starts from the beginning of its stream.
  if data_args is not None and "data" in items:
    args["data"] = data_args
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax and tensorstore raise many types for damaged files
    raise CheckpointDamagedError(f"{where} is damaged: unreadable ({_one_line(e)})") from e
  state, record = restored["state"], restored[RECORD_ITEM]
  if not isinstance(record, dict) or not isinstance(record.get("digests"), dict) \
      or record.get("step") != step:
    raise CheckpointDamagedError(f"{where} is damaged: its verification record is not "
                                 f"the one written with step {step}")
  summary = summarize(state)
  wrong = sorted(n for n, d in summary.digests.items() if record["digests"].get(n) != d)
  if wrong or set(record["digests"]) != set(summary.digests):
    raise CheckpointDamagedError(f"{where} is damaged: the bytes of "
                                 f"{_some(wrong or sorted(record['digests']))} differ from "
                                 "what was written (digest mismatch)")
  if summary.non_finite:  # only a record forged to match NaN could get here
    raise CheckpointDamagedError(f"{where} is damaged: NaN or Inf in "
                                 f"{_some(summary.non_finite)}")
  if "data" in args:
    _check_data_position(where, step_dir / "data", record.get("data_digests"))
  return state, record.get("health")


# ------------------------------------------------------------- the pipeline's position

def _data_file(process_index: int, process_count: int) -> str:
  """The file Grain's orbax handler writes for one process, holding
  `json.dumps(iterator.get_state(), indent=4)`."""
  return f"process_{process_index}-of-{process_count}.json"


def _text_digest(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _data_digests(data_args) -> list[str] | None:
  """Every process's digest of the position it saves (`data_args`: Grain's
  CheckpointSave), gathered because one process writes the record."""
  if data_args is None:
    return None
  local = _text_digest(json.dumps(data_args.item.get_state(), indent=4))
  if jax.process_count() == 1:
    return [local]
  words = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(local), np.uint32))
  return [np.asarray(row, np.uint32).tobytes().hex() for row in words]


def _check_data_position(where: str, data_dir: pathlib.Path, digests) -> None:
  """CheckpointDamagedError unless every process's restored position file is the one
  written (all processes decide together, so they fall back to the same step)."""
  if digests is None:  # saved without a position, or before positions were recorded
    return
  index, count = jax.process_index(), jax.process_count()
  try:
    intact = (len(digests) == count
              and _text_digest((data_dir / _data_file(index, count)).read_text())
              == digests[index])
  except OSError:
    intact = False
  flags = np.array([intact])
  if count > 1:
    flags = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1)
  damaged = [_data_file(i, count) for i in np.flatnonzero(~flags)]
  if damaged:
    raise CheckpointDamagedError(f"{where} is damaged: the data pipeline position "
                                 f"(data/{_some(damaged)}) differs from what was written "
                                 "(digest mismatch)")


def _check_shapes(where: str, state_dir: pathlib.Path, abstract_state) -> None:
  """CheckpointMismatchError naming the arrays whose stored name/shape/dtype differ."""
  try:
    stored = ocp.StandardCheckpointHandler().metadata(state_dir).tree
    stored = {path_name(p): (tuple(m.shape), np.dtype(m.dtype))
              for p, m in jax.tree_util.tree_leaves_with_path(stored)}
  except Exception as e:  # a damaged _METADATA file: the step is unreadable, not foreign
    raise CheckpointDamagedError(f"{where} is damaged: its array metadata is unreadable "
                                 f"({_one_line(e)})") from e
  expected = {path_name(p): (tuple(a.shape), np.dtype(a.dtype))
              for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
  order = lambda n: (not n.startswith("params/"), n)  # the model's own arrays first
  problems = [f"{n} is missing" for n in sorted(set(expected) - set(stored), key=order)]
  problems += [f"{n} is not in this model" for n in sorted(set(stored) - set(expected),
                                                             key=order)]
  problems += [f"{n} has shape {stored[n][0]} {stored[n][1]}, this config expects "
               f"{expected[n][0]} {expected[n][1]}" for n in sorted(expected, key=order)
               if n in stored and stored[n] != expected[n]]
  if problems:
    raise CheckpointMismatchError(
        f"{where} holds another model than this config ({len(problems)} differences: "
        + "; ".join(problems[:3]) + "); the model's shape cannot change when resuming")


def _one_line(error: Exception, limit: int = 300) -> str:
  """`Type: message` on one line (refusals are one line), cut to `limit` characters."""
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit] + " ..."


def _some(names: list[str], limit: int = 3) -> str:
  return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if
                                     len(names) > limit else "")


def set_aside(manager: ocp.CheckpointManager, reasons: dict[int, str]) -> list[pathlib.Path]:
  """Move rejected steps to `<workdir>/checkpoints_rejected/<step>[.n]` with a REASON file.

  They then neither count for rotation nor block a new save of the same step. Process 0
  moves (and returns the new paths); every process waits for it and rereads the steps.
  """
  manager.wait_until_finished()  # a step still being written cannot be moved
  root = pathlib.Path(manager.directory)
  moved = []
  for step, reason in reasons.items() if jax.process_index() == 0 else ():
    dest = root.parent / REJECTED_DIR / str(step)
    n = 0
    while dest.exists():
      n += 1
      dest = root.parent / REJECTED_DIR / f"{step}.{n}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    (root / str(step)).rename(dest)
    (dest / "REASON").write_text(reason + "\n")
    moved.append(dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("pupujepa_set_aside_checkpoints")
  manager.reload()
  return moved


def save_state(workdir, step: int, state) -> None:
  """Synchronously write a state (no data position) as checkpoint `step` of `workdir`."""
  manager = make_manager(workdir, async_save=False)
  try:
    save(manager, step, state, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
