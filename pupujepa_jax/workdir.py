"""Run directories: their files, the guard against mixing runs, and restoring their state.

A workdir holds `config.json` (the run's config), `run_info.json` (git revision, package
versions, devices), `metrics.jsonl`, `tb/`, `checkpoints/` (orbax) and `trainer.lock`.
The trainer checks a new config against the stored one before anything is written
(`check_config`), holds the workdir's lock for the whole run (`exclusive`: one writer
per workdir), and writes the config and run info only once the state has been restored
or initialised (`write_run_files`), so a refused or failed start leaves config.json and
run_info.json as they were. Export, the release exporter and pictures read a workdir
through `read_config` and `restore`, which verifies checkpoints as the trainer does.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import subprocess
from importlib import metadata

import jax
import numpy as np

from pupujepa_jax import block_cache
from pupujepa_jax import checkpointing
from pupujepa_jax import config as config_lib

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "trainer.lock"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy",
            "ml-collections", "tensorflow-datasets")


class WorkdirError(RuntimeError):
  """A workdir is missing, unreadable or holds another run; the message says which."""


class ConfigMismatchError(WorkdirError):
  """A workdir holds a run of a different config."""


class WorkdirBusyError(WorkdirError):
  """Another trainer holds the workdir's lock."""


def _git_revision() -> str:
  try:
    here = pathlib.Path(__file__).resolve().parent
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def run_info(**extra) -> dict:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return {"git_revision": _git_revision(), "packages": versions,
          "process_count": jax.process_count(), "device_count": jax.device_count(),
          "backend": jax.default_backend(), "cpu_block_cache": block_cache.active(), **extra}


def read_config(workdir):
  """(config, its JSON text) of a workdir; WorkdirError naming the file if unusable."""
  file = pathlib.Path(workdir) / CONFIG_FILE
  if not file.is_file():
    raise WorkdirError(f"{file}: missing (not a training workdir)")
  try:
    text = file.read_text()
    values = json.loads(text)
  except (OSError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{file}: unreadable ({e})") from e
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{file}: not valid JSON ({e})") from e
  try:
    cfg = config_lib.from_dict(values)
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise WorkdirError(f"{file}: {e}") from e
  return cfg, text


def holds_run(workdir) -> bool:
  """True when the workdir has a config and a checkpoint folder (a run to resume)."""
  workdir = pathlib.Path(workdir)
  return (workdir / CONFIG_FILE).is_file() and checkpointing.checkpoint_dir(workdir).exists()


# Fields that shape the train state: they must match a stored state even before training.
STATE_FIELDS = ("model.", "predictor.", "frontend.", "teacher_patch_embed")


def check_config(cfg, workdir, allow_change: bool = False) -> dict:
  """Refuse a config that differs from the workdir's run (unless `allow_change`).

  A workdir that has not trained yet (no metrics.jsonl: e.g. imported release weights)
  accepts any change except to the fields that shape its stored state. Writes nothing.
  Returns the differences {field: (old, new)} (empty for a new workdir).
  """
  if not holds_run(workdir):
    return {}
  old, _ = read_config(workdir)
  diff = config_lib.differences(config_lib.to_dict(old), config_lib.to_dict(cfg))
  if not (pathlib.Path(workdir) / METRICS_FILE).exists():
    diff = {k: v for k, v in diff.items() if k.startswith(STATE_FIELDS)}
  if diff and not allow_change:
    details = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:10])
    raise ConfigMismatchError(
        f"{workdir} holds a run with a different config ({details}). Use a new workdir, "
        "or pass --allow_config_change to resume it with the new values.")
  return diff


@contextlib.contextmanager
def exclusive(workdir):
  """Hold `<workdir>/trainer.lock` for the block: one trainer per workdir.

  Process 0 takes an flock, which the kernel drops when the holder exits however it
  exits (SIGKILL included), so a crashed run never leaves the workdir locked; the file
  names the holder for the refusal message. Every process learns whether process 0 got
  the lock, so a refused multi-process job stops everywhere. Creates the workdir.
  """
  workdir = pathlib.Path(workdir)
  handle, holder = None, ""
  if jax.process_index() == 0:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      handle = open(workdir / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as e:
      raise WorkdirError(f"cannot write to workdir {workdir}: {e.strerror or e}") from e
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip()
      handle.close()
      handle = None
    else:
      handle.seek(0)
      handle.truncate()
      since = datetime.datetime.now().isoformat(timespec="seconds")
      handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
      handle.flush()
  locked = handle is not None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(locked)))
  if not locked:
    raise WorkdirBusyError(f"workdir {workdir} is in use by another trainer "
                           f"({holder or 'holder unknown'}); wait for it to end or stop it")
  try:
    yield
  finally:
    if handle is not None:
      fcntl.flock(handle, fcntl.LOCK_UN)
      handle.close()


def read_run_info(workdir) -> dict:
  """The run_info.json a workdir holds ({} when there is none or it is unreadable)."""
  try:
    return json.loads((pathlib.Path(workdir) / RUN_INFO_FILE).read_text())
  except (OSError, ValueError):
    return {}


def write_run_files(cfg, workdir, **info) -> None:
  """Write config.json and run_info.json (process 0), creating the workdir if needed."""
  if jax.process_index() != 0:
    return
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(workdir / CONFIG_FILE, json.dumps(config_lib.to_dict(cfg), indent=2,
                                                    sort_keys=True))
    _write_atomic(workdir / RUN_INFO_FILE, json.dumps(run_info(**info), indent=2))
  except OSError as e:
    raise WorkdirError(f"cannot write to workdir {workdir}: {e.strerror or e}") from e


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def restore(workdir, step: int | None = None):
  """(config, config JSON, step, full train state) of a workdir checkpoint, on one device.

  The checkpoint is verified (`checkpointing.restore`): without `step`, the newest one
  that verifies (damaged newer ones are named in warnings); a damaged `step` is an error.
  """
  from pupujepa_jax import sharding, train_step
  cfg, text = read_config(workdir)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  manager = checkpointing.make_manager(workdir, read_only=True, async_save=False)
  try:
    restored = checkpointing.restore(manager, train_step.abstract_state(cfg),
                                     train_step.state_shardings(cfg, mesh), step)
  finally:
    manager.close()
  return cfg, text, restored.step, restored.state
