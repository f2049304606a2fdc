"""The trainer: run files, one trainer per workdir, exact resume after SIGKILL, SIGTERM,
damaged checkpoints, divergence and the last good checkpoint, resharding, config mismatch
and failed config changes, multi-process over gloo."""
import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from pupujepa_jax import block_cache, checkpointing, cli, metrics, sharding, train_step, trainer
from pupujepa_jax import config as config_lib
from pupujepa_jax import workdir as workdir_lib
from tests.test_checkpointing import flip_bytes

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


def _digests(workdir, step=STEPS):
  """The array digests written with a checkpoint: equal digests, bitwise equal states."""
  record = pathlib.Path(workdir) / "checkpoints" / str(step) / checkpointing.RECORD_ITEM
  return json.loads((record / "metadata").read_text())["digests"]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")}


@pytest.fixture(scope="module")
def uninterrupted(tone_folder, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  cfg = _config(tone_folder, total_steps=STEPS)
  releases = []
  release = block_cache.release_freed_heap
  with pytest.MonkeyPatch.context() as patch:  # the real one, counted
    patch.setattr(block_cache, "release_freed_heap", lambda: releases.append(release()))
    result = trainer.train(cfg, workdir, progress=False)
  assert result.final_step == STEPS
  assert releases == [True]  # once, between compiling the step and running it
  return workdir


def test_run_files_and_logged_metrics(uninterrupted):
  info = json.loads((uninterrupted / "run_info.json").read_text())
  assert info["packages"]["jax"] == jax.__version__ and info["git_revision"]
  assert info["cpu_block_cache"] is False  # in this process, nothing preloaded
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


def _param_norm(state):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(state["params"]))))


@pytest.mark.slow
def test_one_trainer_per_workdir_sigkill_resumes_exactly_sigterm_exits_cleanly(
    uninterrupted, tone_folder, tmp_path):
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(tone_folder, killed), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_step(killed, 6, proc)
  _wait_for_checkpoint(killed, 5)
  # A second trainer on the same workdir is refused while the first one holds it (stopped,
  # so that it cannot finish meanwhile).
  proc.send_signal(signal.SIGSTOP)
  second = subprocess.run(_cmd(tone_folder, killed), capture_output=True, text=True,
                          timeout=240)
  assert second.returncode == 2
  refusal = second.stderr.strip().splitlines()[-1]
  assert f"workdir {killed} is in use by another trainer (pid {proc.pid} " in refusal
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = checkpointing.make_manager(killed, read_only=True).latest_step()
  assert saved is not None and saved % 5 == 0
  # The killed run left no stale lock: a new trainer starts and resumes. SIGTERM (a
  # preemption), sent once it has logged a step of its own, must checkpoint and exit 0.
  proc = subprocess.Popen(_cmd(tone_folder, killed), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_step(killed, max(_losses(killed)) + 2, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err
  summary = json.loads(out)
  assert summary["stopped_by_signal"] and summary["final_step"] < STEPS
  assert summary["resumed_from"] == saved
  assert checkpointing.make_manager(killed, read_only=True).latest_step() == summary["final_step"]
  # The command ran with the CPU block cache (re-executed into it, same pid); the numbers
  # below are the in-process run's without it, bit for bit.
  assert json.loads((killed / "run_info.json").read_text())["cpu_block_cache"] is True
  # Finish in-process and compare every step's loss and the final state bitwise with the
  # uninterrupted run.
  trainer.train(_config(tone_folder, total_steps=STEPS), killed, progress=False)
  assert _losses(killed) == _losses(uninterrupted)
  assert _digests(killed) == _digests(uninterrupted)


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(
    uninterrupted, tone_folder, tmp_path, capsys, caplog):
  workdir = tmp_path / "damaged"
  trainer.train(_config(tone_folder, total_steps=STEPS), workdir, stop_after=30,
                progress=False)
  assert sorted(checkpointing.make_manager(workdir, read_only=True).all_steps()) == [25, 30]
  flip_bytes(workdir / "checkpoints" / "30")
  capsys.readouterr()
  assert cli.main(_cmd(tone_folder, workdir)[3:]) == 0
  captured = capsys.readouterr()
  summary = json.loads(captured.out)
  assert summary["resumed_from"] == 25 and summary["final_step"] == STEPS
  assert list(summary["rejected_checkpoints"]) == ["30"]
  assert "digest mismatch" in summary["rejected_checkpoints"]["30"]
  assert any(r.levelname == "WARNING" and "checkpoint step 30 under" in r.getMessage()
             and "is damaged" in r.getMessage() for r in caplog.records)
  # The damaged step is set aside with its reason; the step resumed from survived the
  # rotations (keep=2) of the resumed run; the resumed run is the uninterrupted one.
  reason = (workdir / "checkpoints_rejected" / "30" / "REASON").read_text()
  assert reason.startswith("checkpoint step 30 under")
  steps = sorted(checkpointing.make_manager(workdir, read_only=True).all_steps())
  assert steps == [25, STEPS - 5, STEPS]
  assert _losses(workdir) == _losses(uninterrupted)
  assert _digests(workdir) == _digests(uninterrupted)
  # Export restores with the same verification: the newest step is good again.
  assert workdir_lib.restore(workdir)[2] == STEPS


def test_divergence_stops_at_the_last_good_checkpoint(tone_folder, tmp_path):
  """Six healthy steps, then a learning rate that blows the weights up (1e30): the run
  stops, names checkpoint 6, saves nothing diverged, and resumes from 6 with a sane lr."""
  def config(lr):
    cfg = _config(tone_folder, total_steps=STEPS)
    cfg.checkpoint.every = 1
    cfg.optim.lr = lr
    return cfg

  sane = config(1e-3)
  trainer.train(sane, tmp_path, stop_after=6, progress=False)
  with pytest.raises(trainer.DivergenceError, match="Last good checkpoint: 6 under") as info:
    trainer.train(config(1e30), tmp_path, progress=False, allow_config_change=True)
  assert info.value.last_good_step == 6
  manager = checkpointing.make_manager(tmp_path, read_only=True)
  assert manager.latest_step() == 6
  first_norm = metrics.read_jsonl(tmp_path / "metrics.jsonl")[0]["param_norm"]
  _, _, step, state = workdir_lib.restore(tmp_path)
  assert step == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
  assert _param_norm(state) <= trainer.DIVERGENCE_FACTOR * first_norm
  # A NaN loss (every=2: no checkpoint catches the weights first) names the same step.
  diverging = config(1e30)
  diverging.checkpoint.every = 2
  with pytest.raises(trainer.NonFiniteLossError,
                     match="loss is nan at step 7; stopping. Last good checkpoint: 6 under"):
    trainer.train(diverging, tmp_path, progress=False, allow_config_change=True)
  assert checkpointing.make_manager(tmp_path, read_only=True).latest_step() == 6
  result = trainer.train(sane, tmp_path, stop_after=2, progress=False,
                         allow_config_change=True)
  assert result.resumed_from == 6 and result.final_step == 8
  assert all(np.isfinite(_losses(tmp_path)[s]) for s in (6, 7))


def test_a_checkpoint_whose_own_loss_explodes_is_set_aside(tone_folder, tmp_path):
  """At lr 30 the loss explodes one step before the weights do (73.8 at step 3 after
  3.6 at step 2): checkpoint 3 passes the checks made when it is written, the loss
  computed on it does not, so it is moved aside and checkpoint 2 is named."""
  cfg = _config(tone_folder, total_steps=40)
  cfg.optim.update(lr=30.0, warmup_steps=40)
  cfg.checkpoint.every = 1
  with pytest.raises(trainer.DivergenceError, match=r"computed on checkpoint 3, more than "
                     r"10x .*Last good checkpoint: 2 under") as info:
    trainer.train(cfg, tmp_path, progress=False)
  assert info.value.last_good_step == 2
  assert checkpointing.make_manager(tmp_path, read_only=True).latest_step() == 2
  reason = (tmp_path / "checkpoints_rejected" / "3" / "REASON").read_text()
  assert reason.startswith("diverged: loss is 73.")
  assert workdir_lib.restore(tmp_path)[2] == 2


def test_restore_onto_other_meshes(uninterrupted, tone_folder):
  cfg = _config(tone_folder, total_steps=STEPS)
  manager = checkpointing.make_manager(uninterrupted, read_only=True)
  states = []
  for data, fsdp in ((4, 2), (2, 2), (1, 1)):
    mesh = sharding.make_mesh(data, fsdp, jax.devices()[:data * fsdp])
    restored = checkpointing.restore(manager, train_step.abstract_state(cfg),
                                     train_step.state_shardings(cfg, mesh))
    state = restored.state
    assert restored.step == STEPS and len(state["step"].sharding.device_set) == data * fsdp
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


def test_failed_config_change_leaves_the_workdir_as_it_was(tone_folder, tmp_path, capsys):
  workdir = tmp_path / "run"
  trainer.train(_config(tone_folder, total_steps=STEPS), workdir, stop_after=5, progress=False)
  before = {name: (workdir / name).read_bytes() for name in ("config.json", "run_info.json")}
  capsys.readouterr()
  changed = _cmd(tone_folder, workdir, "--allow_config_change", "--config.model.width=96",
                 "--config.model.num_heads=2")[3:]
  assert cli.main(changed) == 2
  refusal = capsys.readouterr().err.strip().splitlines()[-1]
  assert refusal.startswith("pupujepa train: error: checkpoint step 5 under")
  assert "params/" in refusal and "this config expects (96" in refusal
  assert {name: (workdir / name).read_bytes() for name in before} == before
  assert not (workdir / "checkpoints_rejected").exists()
  # The original command still resumes, and the workdir still exports.
  assert cli.main(_cmd(tone_folder, workdir, "--stop_after=1")[3:]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["resumed_from"] == 5 and summary["final_step"] == 6
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "m")]) == 0
  assert json.loads(capsys.readouterr().out)["step"] == 6


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


def _two_processes(command, env):
  """[(returncode, stdout, stderr)] of `command` run as process 0 and 1 of a gloo job.

  Output goes to files, not pipes: a process whose unread pipe fills up (a damaged
  checkpoint's errors run long) would block, and its peer would wait for it forever.
  """
  port = _free_port()
  with contextlib.ExitStack() as files:
    streams = [[files.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2)]
               for _ in range(2)]
    procs = [subprocess.Popen(command + ["--coordinator", f"127.0.0.1:{port}",
                                         "--num_processes", "2", "--process_id", str(i)],
                              env=env, stdout=out, stderr=err, text=True)
             for i, (out, err) in enumerate(streams)]
    try:
      for p in procs:
        p.wait(timeout=400)
    finally:  # a timed-out job leaves no process behind
      for p in procs:
        if p.poll() is None:
          p.kill()
    results = []
    for p, (out, err) in zip(procs, streams):
      out.seek(0), err.seek(0)
      results.append((p.returncode, out.read(), err.read()))
  return results


@pytest.mark.slow
def test_two_processes_over_gloo_match_one_process_and_fall_back_together(tone_folder,
                                                                          tmp_path):
  steps = ["--config.total_steps=6", "--config.optim.warmup_steps=1",
           "--config.checkpoint.every=2", "--config.checkpoint.keep=3"]
  base = [sys.executable, "-m", "pupujepa_jax.cli", "train", "--config",
          f"experiments/pupujepa.py:smoke,folder={tone_folder}", "--no_progress", *steps]
  env1 = dict(os.environ, JAX_NUM_CPU_DEVICES="4",
              XLA_FLAGS="--xla_force_host_platform_device_count=4")
  single = subprocess.run(base + ["--workdir", str(tmp_path / "one")], env=env1,
                          capture_output=True, text=True, timeout=400)
  assert single.returncode == 0, single.stderr[-3000:]
  one = _losses(tmp_path / "one")
  assert sorted(one) == list(range(6))
  env2 = dict(os.environ, JAX_NUM_CPU_DEVICES="2",
              XLA_FLAGS="--xla_force_host_platform_device_count=2")
  two = tmp_path / "two"
  for returncode, _, err in _two_processes(base + ["--workdir", str(two), "--stop_after=5"],
                                           env2):
    assert returncode == 0, err[-3000:]
  np.testing.assert_allclose([_losses(two)[s] for s in range(5)], [one[s] for s in range(5)],
                             rtol=1e-5)
  info = json.loads((two / "run_info.json").read_text())
  assert info["process_count"] == 2 and info["device_count"] == 4
  assert sorted(int(p.name) for p in (two / "checkpoints").iterdir()) == [2, 4, 5]

  # Two newer steps damaged on process 1's side only: step 5's saved data position changed
  # (still valid JSON; process 0's own file is intact) and the array files process 1 wrote
  # for step 4 are gone. Both processes must reject both steps together and resume from
  # step 2 at its exact position (neither resumes alone or hangs waiting for the other):
  # the steps they re-run reproduce the uninterrupted run's losses.
  position = two / "checkpoints" / "5" / "data" / "process_1-of-2.json"
  state = json.loads(position.read_text())
  counter = next(k for k, v in state.items() if isinstance(v, int) and v > 0)
  state[counter] += 1
  position.write_text(json.dumps(state, indent=4))
  written_by_process_1 = list((two / "checkpoints" / "4" / "state").glob("ocdbt.process_1/d/*"))
  assert written_by_process_1
  for path in written_by_process_1:
    path.unlink()
  for returncode, out, err in _two_processes(base + ["--workdir", str(two)], env2):
    assert returncode == 0, err[-3000:]
    summary = json.loads(out[out.index("{"):])  # after gloo's connection messages
    assert summary["resumed_from"] == 2, summary
    assert sorted(map(int, summary["rejected_checkpoints"])) == [4, 5], summary
    assert ("checkpoint step 5 under" in err and "the data pipeline position "
            "(data/process_1-of-2.json) differs from what was written" in err), err[-3000:]
    assert "checkpoint step 4 under" in err and "is damaged: unreadable" in err, err[-3000:]
  np.testing.assert_allclose([_losses(two)[s] for s in range(6)], [one[s] for s in range(6)],
                             rtol=1e-5)
