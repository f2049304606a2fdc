"""Shared builders for the export / embed / attention tests: a smoke config, synthetic
audio files, and a training workdir holding one checkpoint (written by the project's own
`workdir.write_run_files` and `checkpointing.save_state`, without compiling a train
step)."""
import functools
import pathlib

import jax
import numpy as np
import soundfile

from pupujepa_jax import checkpointing, config as config_lib, models, sharding, train_step
from pupujepa_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def smoke_cfg(audio_dir=""):
  cfg = config_lib.load_config(str(REPO / "experiments/pupujepa.py:smoke"))
  cfg.data.source = "folder"
  cfg.data.path = str(audio_dir)
  return cfg


def write_tone(path, seconds, sample_rate=24_000, channels=1, freq=440.0, seed=0):
  """A noisy tone (distinct per freq/seed) as a wav file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  noise = np.random.default_rng(seed).standard_normal((t.size, channels))
  wave = 0.3 * np.sin(2 * np.pi * freq * t)[:, None] + 0.05 * noise
  soundfile.write(str(path), wave.astype(np.float32).squeeze(), sample_rate)
  return path


def make_workdir(base, step=3):
  """A workdir with a checkpoint at `step` whose teacher differs from the student.

  Reused when `base` already holds one (several test modules share a session's tmp dir).
  """
  base = pathlib.Path(base)
  workdir = base / "workdir"
  if (workdir / "checkpoints" / str(step)).exists():
    return workdir
  audio = base / "train_audio"
  for i in range(2):
    write_tone(audio / f"t{i}.wav", 1.0, freq=300.0 + 100 * i, seed=i)
  cfg = smoke_cfg(audio)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  state = train_step.create_sharded_state(cfg, mesh)
  # A teacher unlike the student, so an export of the wrong subtree is caught.
  leaves, tree = jax.tree.flatten(state["teacher"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state["teacher"] = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                               for x, k in zip(leaves, keys)])
  checkpointing.save_state(workdir, step, state)
  workdir_lib.write_run_files(cfg, workdir)
  return workdir


def init_encoder(cfg, seed=0) -> dict:
  """`models.init_encoder` of cfg's architecture, jitted (eager Flax init is slow on CPU)."""
  return jax.jit(functools.partial(models.init_encoder, config_lib.architecture(cfg),
                                   cfg.frontend.n_mels))(jax.random.key(seed))


def init_params(cfg, seed=0) -> dict:
  """`models.init_params` of cfg, jitted."""
  return jax.jit(functools.partial(models.init_params, config_lib.architecture(cfg),
                                   config_lib.predictor_size(cfg),
                                   cfg.frontend.n_mels))(jax.random.key(seed))
