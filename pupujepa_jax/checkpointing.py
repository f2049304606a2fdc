"""Orbax checkpoints of a run: the train state and the Grain iterator state, together.

One `CheckpointManager` under `<workdir>/checkpoints`, asynchronous, keeping the last
`keep` checkpoints plus every `keep_period`-th step. The state is restored into the
shardings of the *current* mesh, so a run saved on 8 devices resumes on 4 or 1.
"""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint could not be read or written; the message names the path."""


def checkpoint_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


def make_manager(workdir, keep: int = 3, keep_period: int = 0,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep or None, keep_period=keep_period or None,
      enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_args=None,
         force: bool = False) -> bool:
  """Start (asynchronously) saving `state` (and the iterator's args) at `step`."""
  items = {"state": ocp.args.StandardSave(state)}
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


def restore(manager: ocp.CheckpointManager, abstract_state, shardings, step=None,
            data_args=None):
  """(step, state[, restored iterator]) of `step` (default: latest) on the current mesh."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint under {manager.directory}")
  if step not in manager.all_steps():
    raise CheckpointError(f"no checkpoint for step {step} under {manager.directory}; "
                          f"available: {list(manager.all_steps())}")
  items = {"state": ocp.args.StandardRestore(abstract_with_shardings(abstract_state,
                                                                      shardings))}
  # A checkpoint written by `save_state` (e.g. imported weights) holds no data position:
  # the pipeline then starts from the beginning of its stream.
  if data_args is not None and "data" in _item_names(manager, step):
    items["data"] = data_args
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types for truncated or foreign files
    raise CheckpointError(f"checkpoint step {step} under {manager.directory} is unreadable "
                          f"or does not match this model: {type(e).__name__}: {e}") from e
  return step, restored["state"]


def _item_names(manager: ocp.CheckpointManager, step: int) -> set[str]:
  path = pathlib.Path(manager.directory) / str(step)
  return {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()


def save_state(workdir, step: int, state) -> None:
  """Synchronously write a state (no data position) as checkpoint `step` of `workdir`."""
  manager = make_manager(workdir, async_save=False)
  try:
    save(manager, step, state, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
