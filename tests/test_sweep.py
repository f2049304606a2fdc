"""Ablation sweeps: expansion and validation, dry run, emitted scripts, local runs, report."""
import json
import math
import pathlib
import shlex

import numpy as np
import pytest
import soundfile

from pupujepa_jax import cli
from pupujepa_jax import config as config_lib
from pupujepa_jax import metrics as metrics_lib
from pupujepa_jax import sweep

ABLATIONS = sorted(p for p in pathlib.Path("experiments/ablations").glob("*.py")
                   if p.name != "__init__.py")


def _as_config_value(value):
  return tuple(value) if isinstance(value, list) else value


def _get(cfg, dotted):
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def test_all_axes_have_a_sweep_file():
  assert {p.stem for p in ABLATIONS} >= {"masking", "patch_shape", "positions", "teacher",
                                         "loss", "ema", "predictor"}


@pytest.mark.parametrize("arg", ["", "smoke", "variant=large,batch=2048,fsdp=8"])
@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_ablation_expands_to_valid_distinct_runs(path, arg, tmp_path):
  spec = f"{path}:{arg}" if arg else str(path)
  runs = sweep.expand(spec, tmp_path)
  assert len(runs) >= 2
  assert len({r.name for r in runs}) == len(runs)
  configs = set()
  for run in runs:
    assert run.workdir == str(tmp_path / run.name)
    for key, value in run.overrides.items():
      assert _get(run.config, key) == _as_config_value(value), (run.name, key)
    config_lib.validate(run.config)
    configs.add(run.config.to_json())
  if "smoke" not in arg:  # smoke zeroes the curriculum warm-up: two masking runs coincide
    assert len(configs) == len(runs)  # every run differs from every other


def test_axes_cover_the_issue_variants(tmp_path):
  grids = {config_lib.grid_shape(r.config)
           for r in sweep.expand("experiments/ablations/patch_shape.py", tmp_path)}
  assert grids == {(256, 8), (64, 8), (512, 1)}
  masking = sweep.expand("experiments/ablations/masking.py", tmp_path)
  assert {r.config.mask.strategy for r in masking} == {"curriculum", "random", "block",
                                                       "time_frequency", "multiblock"}
  assert any(r.config.mask.warmup_end == 0 and r.config.mask.strategy == "curriculum"
             for r in masking)
  by_axis = {"positions": ("model.pos_embed", {"rope", "sincos"}),
             "teacher": ("teacher_mode", {"targets_only", "full_grid"}),
             "loss": ("loss", {"smooth_l1", "normalized_mse", "mse"})}
  for axis, (field, values) in by_axis.items():
    runs = sweep.expand(f"experiments/ablations/{axis}.py", tmp_path)
    assert {_get(r.config, field) for r in runs} == values
  ema = sweep.expand("experiments/ablations/ema.py", tmp_path)
  assert (0.99995, 0.99999) in {tuple(r.config.optim.ema) for r in ema}
  # Each released architecture choice against its alternative, one at a time.
  arch = {r.name: config_lib.to_dict(r.config) for r in
          sweep.expand("experiments/ablations/architecture.py", tmp_path)}
  released = config_lib.flatten(arch.pop("released"))
  changed = {name: sorted(config_lib.differences(released, config_lib.flatten(c), ignore=()))
             for name, c in arch.items()}
  assert changed == {"rope_linear_bands": ["model.rope_linear_bands"],
                     "qk_norm": ["model.qk_norm"], "gelu_mlp": ["model.swiglu"],
                     "no_k_bias": ["model.k_bias"],
                     "ema_patch_embed": ["teacher_patch_embed"]}


def test_dry_run_prints_the_runs(tmp_path, capsys):
  rc = cli.main(["sweep", "--config", "experiments/ablations/loss.py:smoke", "--dry_run",
                 "--sweep_dir", str(tmp_path), "--config.total_steps=20"])
  assert rc == 0
  runs = json.loads(capsys.readouterr().out)
  assert [r["name"] for r in runs] == ["loss_smooth_l1", "loss_normalized_mse", "loss_mse"]
  for r in runs:
    assert r["workdir"] == str(tmp_path / r["name"]) and not r["finished"]
    argv = shlex.split(r["command"])
    assert argv[:2] == ["pupujepa", "train"]
    assert f"--config.loss={r['overrides']['loss']}" in argv
    assert "--config.total_steps=20" in argv
  assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_unknown_or_impossible_fields_fail_naming_them(tmp_path, capsys):
  with pytest.raises(config_lib.ConfigError, match="model.no_such_field: unknown"):
    sweep.expand("experiments/ablations/loss.py:smoke", tmp_path,
                 ["--config.model.no_such_field=1"])
  bad = tmp_path / "bad.py"
  bad.write_text(
      "from experiments import pupujepa\n"
      "def get_config(arg=''):\n  return pupujepa.get_config(arg)\n"
      "def sweep():\n"
      "  return [{'name': 'ok', 'overrides': {'loss': 'mse'}},\n"
      "          {'name': 'typo', 'overrides': {'optim.emma': (0.9, 1.0)}}]\n")
  with pytest.raises(config_lib.ConfigError, match="run 'typo': optim.emma: unknown"):
    sweep.expand(str(bad), tmp_path)
  bad.write_text(bad.read_text().replace("'optim.emma': (0.9, 1.0)", "'model.patch_freq': 48"))
  with pytest.raises(config_lib.ConfigError, match="run 'typo'.*model.patch_freq=48"):
    sweep.expand(str(bad), tmp_path)
  bad.write_text(bad.read_text().replace("'model.patch_freq': 48", "'model': 1"))
  with pytest.raises(config_lib.ConfigError, match="model: is a group"):
    sweep.expand(str(bad), tmp_path)
  assert cli.main(["sweep", "--config", "experiments/ablations/ema.py",
                   "--config.optim.nope=1"]) == 2
  assert "optim.nope: unknown config field" in capsys.readouterr().err


def _train_argv_config(argv, env):
  """The config a `pupujepa train` argv builds, and its parsed arguments."""
  expanded = []
  for a in argv:
    for k, v in env.items():
      a = a.replace(f"${k}", v)
    expanded.append(a)
  assert expanded[:2] == ["pupujepa", "train"], expanded
  args, extra = cli.build_parser().parse_known_args(expanded[1:])
  return cli._load_config(args.config, extra), args


def test_emit_slurm_scripts_hold_the_launch_commands(tmp_path):
  spec = "experiments/ablations/teacher.py:variant=base,batch=512"
  runs = sweep.expand(spec, tmp_path / "sweep")
  out = tmp_path / "launch"
  assert cli.main(["sweep", "--config", spec, "--sweep_dir", str(tmp_path / "sweep"),
                   "--emit", "slurm", "--out", str(out), "--nodes", "2",
                   "--gpus_per_node", "4", "--partition", "gpu"]) == 0
  env = {"MASTER_ADDR": "node001", "MASTER_PORT": "29500", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1"}
  for run in runs:
    text = (out / f"{run.name}.sbatch").read_text()
    header = dict(line[len("#SBATCH "):].partition("=")[::2] for line in text.splitlines()
                  if line.startswith("#SBATCH "))
    assert "--requeue" in header  # preempted jobs come back and resume
    assert header["--nodes"] == "2" and header["--ntasks-per-node"] == "1"
    assert header["--gpus-per-node"] == "4" and header["--partition"] == "gpu"
    assert header["--output"].startswith(run.workdir + "/")
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    outer = shlex.split(srun[0])
    assert outer[:3] == ["srun", "--kill-on-bad-exit=1", "bash"] and outer[3] == "-c"
    inner = shlex.split(outer[4])
    assert inner[0] == "exec"
    cfg, args = _train_argv_config(inner[1:], env)
    assert cfg.to_dict() == run.config.to_dict()
    assert args.workdir == run.workdir
    assert (args.coordinator, args.num_processes, args.process_id) == ("node001:29500", 2, 1)
  submit = (out / "submit_all.sh").read_text()
  assert [f"$here/{r.name}.sbatch" in submit for r in runs] == [True] * len(runs)
  manifest = json.loads((out / "sweep.json").read_text())
  assert [r["name"] for r in manifest["runs"]] == [r.name for r in runs]
  # One node: a plain srun of the train command, no coordinator flags.
  single = sweep.slurm_script(runs[1], sweep.EmitOptions(nodes=1))
  line = next(l for l in single.splitlines() if l.startswith("srun "))
  cfg, args = _train_argv_config(shlex.split(line)[1:], {})
  assert cfg.teacher_mode == "full_grid" and args.coordinator is None


def test_emit_tpu_scripts_run_on_all_workers(tmp_path):
  spec = "experiments/ablations/loss.py:variant=large,batch=1024,fsdp=4"
  runs = sweep.expand(spec, "gs://bucket/sweeps/loss")
  paths = sweep.emit(runs, spec, "tpu", tmp_path,
                     sweep.EmitOptions(tpu_name="my-v4-64", zone="us-central2-b",
                                       project="proj", repo_dir="/opt/pupu"))
  assert [p.name for p in paths] == [f"{r.name}.sh" for r in runs] + ["submit_all.sh"]
  for run in runs:
    lines = (tmp_path / f"{run.name}.sh").read_text().splitlines()
    gcloud = shlex.split(next(l for l in lines if l.startswith("gcloud ")))
    assert gcloud[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-64"]
    assert {"--zone=us-central2-b", "--project=proj", "--worker=all"} <= set(gcloud)
    remote = gcloud[gcloud.index("--command") + 1]
    cd, train = remote.split(" && ", 1)
    assert cd == "cd /opt/pupu"
    cfg, args = _train_argv_config(shlex.split(train), {})
    assert args.distributed and args.workdir == f"gs://bucket/sweeps/loss/{run.name}"
    assert cfg.to_dict() == run.config.to_dict()
  submit = (tmp_path / "submit_all.sh").read_text()
  assert 'gcloud storage cp "$here/sweep.json" gs://bucket/sweeps/loss/' in submit
  assert submit.index(runs[0].name) < submit.index(runs[1].name)  # one after another


def _fake_run(workdir, total_steps, losses, probes=None):
  """A run folder as the trainer leaves it: config.json and metrics.jsonl (+ probes)."""
  cfg = config_lib.load_config("experiments/pupujepa.py:smoke")
  cfg.total_steps = total_steps
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(cfg.to_json())
  writer = metrics_lib.MetricWriter(workdir, total_steps, progress=False)
  for step, loss in enumerate(losses):
    writer.write(step, {"loss": loss, "teacher_std": 0.5 + step, "steps_per_second": 2.0})
  writer.close()
  if probes is not None:
    (workdir / sweep.PROBE_RESULTS).write_text(json.dumps(probes))


def test_report_table_rows_status_and_probe_scores(tmp_path, capsys):
  _fake_run(tmp_path / "a", 3, [1.0, 0.5, 0.25],
            [{"task": "genre", "score": 0.75, "main_metric": "accuracy"}])
  _fake_run(tmp_path / "b", 10, [2.0, 1.5])
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "config.json").write_text("{\"total_steps\": 5}")
  assert cli.main(["report", "--sweep", str(tmp_path)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header == ["run", "overrides", "status", "steps", "loss", "teacher_std", "steps/s",
                    "genre (accuracy)"]
  rows = {r[0]: r for r in ([c.strip() for c in l.strip("|").split("|")] for l in lines[2:])}
  assert rows["a"][2:] == ["finished", "3/3", "0.25", "2.5", "2", "0.75"]
  assert rows["b"][2:] == ["running", "2/10", "1.5", "1.5", "2", "-"]
  assert rows["c"][2:5] == ["not started", "0/5", "-"]


@pytest.mark.slow
def test_local_sweep_trains_non_default_grids_and_reports(tmp_path, capsys):
  """patch 16x16 (4x8 grid) and 2x128 full-band (32x1 grid) train end to end."""
  audio = tmp_path / "audio"
  audio.mkdir()
  rng = np.random.default_rng(0)
  for i in range(4):
    soundfile.write(audio / f"{i}.wav", 0.1 * rng.standard_normal(24_000), 24_000)
  sweep_dir = tmp_path / "sweep"
  argv = ["sweep", "--config", "experiments/ablations/patch_shape.py:smoke",
          "--sweep_dir", str(sweep_dir), "--local", "--no_progress",
          "--only", "patch_16x16,patch_2x128_fullband", "--config.total_steps=3",
          "--config.optim.warmup_steps=1", f"--config.data.path={audio}",
          "--config.data.source=folder"]
  assert cli.main(argv) == 0
  summary = json.loads(capsys.readouterr().out)
  assert [s["status"] for s in summary] == ["trained", "trained"]
  for s in summary:
    assert s["final_step"] == 3 and math.isfinite(s["loss"])
  grids = {json.loads((sweep_dir / n / "config.json").read_text())["model"]["patch_freq"]
           for n in ("patch_16x16", "patch_2x128_fullband")}
  assert grids == {16, 128}
  assert cli.main(argv) == 0  # finished runs are skipped
  assert [s["status"] for s in json.loads(capsys.readouterr().out)] == ["already finished"] * 2
  assert cli.main(["report", "--sweep", str(sweep_dir)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4
  for name, line in zip(("patch_16x16", "patch_2x128_fullband"), lines[2:]):
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == name and cells[2] == "finished" and cells[3] == "3/3"
    assert "model.patch_time=" in cells[1]
    final = metrics_lib.read_jsonl(sweep_dir / name / "metrics.jsonl")[-1]["loss"]
    assert math.isfinite(float(cells[4])) and float(cells[4]) == pytest.approx(final, rel=1e-3)
