"""The trainer: run files, exact resume after SIGKILL, SIGTERM, non-finite loss, resharding,
config mismatch, multi-process over gloo."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pupujepa_jax import checkpointing, cli, metrics, sharding, train_step, trainer
from pupujepa_jax import config as config_lib
from pupujepa_jax import workdir as workdir_lib

STEPS = 60


def _config(folder, **overrides):
  return config_lib.apply_overrides(
      config_lib.load_config(f"experiments/pupujepa.py:smoke,folder={folder}"),
      [f"--config.{k}={v}" for k, v in overrides.items()])


def _cmd(folder, workdir, *extra):
  return [sys.executable, "-m", "pupujepa_jax.cli", "train", "--config",
          f"experiments/pupujepa.py:smoke,folder={folder}", "--workdir", str(workdir),
          "--no_progress", f"--config.total_steps={STEPS}", *extra]


def _wait_for_step(workdir, step, proc, timeout=240):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early: {proc.communicate()}")
    if path.exists() and any(r["step"] >= step for r in metrics.read_jsonl(path)):
      return
    time.sleep(0.2)
  raise AssertionError(f"no step {step} within {timeout} s")


def _wait_for_checkpoint(workdir, step, timeout=120):
  """Until the (asynchronous) checkpoint of `step` is finalised on disk."""
  final = pathlib.Path(workdir) / "checkpoints" / str(step)
  deadline = time.time() + timeout
  while not final.is_dir():
    assert time.time() < deadline, f"checkpoint {step} not finalised in {timeout} s"
    time.sleep(0.05)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")}


@pytest.fixture(scope="module")
def uninterrupted(tone_folder, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  cfg = _config(tone_folder, total_steps=STEPS)
  result = trainer.train(cfg, workdir, progress=False)
  assert result.final_step == STEPS
  return workdir


def test_run_files_and_logged_metrics(uninterrupted):
  info = json.loads((uninterrupted / "run_info.json").read_text())
  assert info["packages"]["jax"] == jax.__version__ and info["git_revision"]
  saved = json.loads((uninterrupted / "config.json").read_text())
  assert saved["total_steps"] == STEPS and saved["model"]["width"] == 64
  records = metrics.read_jsonl(uninterrupted / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(STEPS))
  for key in ("loss", "learning_rate", "weight_decay", "ema_momentum", "grad_norm",
              "param_norm", "teacher_std", "mask_strategy", "steps_per_second",
              "tokens_per_second"):
    assert key in records[-1], key
  assert records[-1]["mask_strategy"] in ("random", "block", "time_frequency")
  assert list((uninterrupted / "tb").glob("events.out.tfevents.*"))
  manager = checkpointing.make_manager(uninterrupted, read_only=True)
  assert manager.latest_step() == STEPS and STEPS - 5 in manager.all_steps()


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses_and_sigterm_exits_cleanly(
    uninterrupted, tone_folder, tmp_path):
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(tone_folder, killed), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_step(killed, 6, proc)
  _wait_for_checkpoint(killed, 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert checkpointing.make_manager(killed, read_only=True).latest_step() in (5, 10)
  # Resume with a preemption: SIGTERM must checkpoint and exit 0 within seconds.
  proc = subprocess.Popen(_cmd(tone_folder, killed), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_step(killed, 12, proc)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  assert time.time() - sent < 30
  summary = json.loads(out)
  assert summary["stopped_by_signal"] and summary["final_step"] < STEPS
  assert checkpointing.make_manager(killed, read_only=True).latest_step() == summary["final_step"]
  # Finish in-process and compare every step's loss bitwise with the uninterrupted run.
  trainer.train(_config(tone_folder, total_steps=STEPS), killed, progress=False)
  assert _losses(killed) == _losses(uninterrupted)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tone_folder, tmp_path):
  cfg = _config(tone_folder, total_steps=STEPS)
  cfg.optim.lr = 1e30
  cfg.checkpoint.every = 1
  with pytest.raises(trainer.NonFiniteLossError, match="loss is nan at step") as info:
    trainer.train(cfg, tmp_path, progress=False)
  manager = checkpointing.make_manager(tmp_path, read_only=True)
  latest = manager.latest_step()
  assert f"Last good checkpoint: {latest if latest is not None else 'none'}" in str(info.value)
  if latest is not None:
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    _, state = checkpointing.restore(manager, train_step.abstract_state(cfg),
                                     train_step.state_shardings(cfg, mesh))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_restore_onto_other_meshes(uninterrupted, tone_folder):
  cfg = _config(tone_folder, total_steps=STEPS)
  manager = checkpointing.make_manager(uninterrupted, read_only=True)
  states = []
  for data, fsdp in ((4, 2), (2, 2), (1, 1)):
    mesh = sharding.make_mesh(data, fsdp, jax.devices()[:data * fsdp])
    step, state = checkpointing.restore(manager, train_step.abstract_state(cfg),
                                        train_step.state_shardings(cfg, mesh))
    assert step == STEPS and len(state["step"].sharding.device_set) == data * fsdp
    states.append(jax.device_get(state))
  for other in states[1:]:
    jax.tree.map(np.testing.assert_array_equal, states[0], other)


def test_workdir_of_another_config_is_refused(uninterrupted, tone_folder):
  cfg = _config(tone_folder, total_steps=STEPS)
  cfg.model.width = 96
  cfg.mask.ratio = 0.7
  with pytest.raises(workdir_lib.ConfigMismatchError,
                     match=r"mask.ratio.*model.width: 64 -> 96"):
    workdir_lib.check_config(cfg, uninterrupted)
  cfg = _config(tone_folder, total_steps=2 * STEPS, log_every=5)  # resumable changes
  assert workdir_lib.check_config(cfg, uninterrupted) == {}


def test_bad_overrides_and_unwritable_workdir(tone_folder, capsys):
  rc = cli.main(["train", "--config", f"experiments/pupujepa.py:smoke,folder={tone_folder}",
                 "--workdir", "/sys/pupujepa_run", "--config.data.batchsize=4"])
  assert rc == 2 and "data.batchsize: unknown config field" in capsys.readouterr().err
  with pytest.raises(workdir_lib.WorkdirError, match="cannot write to workdir /sys/pupujepa_run"):
    workdir_lib.write_run_files(_config(tone_folder), "/sys/pupujepa_run")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_over_gloo_match_one_process(tone_folder, tmp_path):
  steps = ["--config.total_steps=3", "--config.optim.warmup_steps=1",
           "--config.checkpoint.every=3"]
  base = [sys.executable, "-m", "pupujepa_jax.cli", "train", "--config",
          f"experiments/pupujepa.py:smoke,folder={tone_folder}", "--no_progress", *steps]
  env1 = dict(os.environ, JAX_NUM_CPU_DEVICES="4",
              XLA_FLAGS="--xla_force_host_platform_device_count=4")
  single = subprocess.run(base + ["--workdir", str(tmp_path / "one")], env=env1,
                          capture_output=True, text=True, timeout=400)
  assert single.returncode == 0, single.stderr[-3000:]
  env2 = dict(os.environ, JAX_NUM_CPU_DEVICES="2",
              XLA_FLAGS="--xla_force_host_platform_device_count=2")
  port = _free_port()
  procs = [subprocess.Popen(base + ["--workdir", str(tmp_path / "two"),
                                    "--coordinator", f"127.0.0.1:{port}",
                                    "--num_processes", "2", "--process_id", str(i)],
                            env=env2, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outputs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert sorted(one) == [0, 1, 2]
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                             rtol=1e-5)
  info = json.loads((tmp_path / "two" / "run_info.json").read_text())
  assert info["process_count"] == 2 and info["device_count"] == 4
