"""Ablation sweeps: expand a sweep file into validated runs, run them here, emit cluster
scripts, and collect the finished runs into one markdown table.

A sweep file (`experiments/ablations/*.py`) has `get_config(arg)` (the axis' base config)
and `sweep()`, a list of `{"name": str, "overrides": {"dotted.field": value}}`. Each run's
config is `get_config(arg)` plus its overrides plus the command line's `--config.x=y`
overrides; overrides go through the same `--config.` parser as `pupujepa train`, so an
emitted launch command rebuilds exactly the config validated here. Every run is
validated before anything runs. Run `name` trains in `<sweep_dir>/<name>`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
import shlex
import statistics

from pupujepa_jax import config as config_lib
from pupujepa_jax import metrics as metrics_lib

MANIFEST = "sweep.json"
PROBE_RESULTS = "probe_results.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict        # the sweep file's overrides (dotted field -> value)
  config: object         # the validated ml_collections.ConfigDict
  workdir: str           # `<sweep_dir>/<name>`; a string so gs:// dirs keep their '//'
  train_args: list       # `pupujepa train` arguments (config spec, workdir, overrides)


def _load_module(path: str):
  file = pathlib.Path(path)
  if not file.is_file():
    raise config_lib.ConfigError(f"sweep file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_pupujepa_sweep_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for fn in ("get_config", "sweep"):
    if not hasattr(module, fn):
      raise config_lib.ConfigError(f"sweep file {path!r} has no {fn}() function")
  return module


def _check_entries(entries, path: str) -> None:
  seen = set()
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict) or set(entry) != {"name", "overrides"}:
      raise config_lib.ConfigError(f"{path}: sweep()[{i}] must be a dict with exactly the keys "
                                   f"'name' and 'overrides', got {entry!r}")
    name = entry["name"]
    if not isinstance(name, str) or not _NAME.match(name):
      raise config_lib.ConfigError(f"{path}: sweep()[{i}] name {name!r} must be letters, "
                                   "digits, '_', '-' or '.' (it names a workdir)")
    if name in seen:
      raise config_lib.ConfigError(f"{path}: run name {name!r} appears twice in sweep()")
    seen.add(name)
    if not isinstance(entry["overrides"], dict):
      raise config_lib.ConfigError(f"{path}: run {name!r}: overrides must be a dict")


def expand(spec: str, sweep_dir, extra_overrides=(), only=None) -> list[Run]:
  """Build and validate every run of `spec` (`path/to/ablation.py[:arg]`).

  `extra_overrides` are `--config.x=y` strings applied to every run after its own
  overrides; `only` keeps the named runs. Raises ConfigError naming the run and field.
  """
  path, _, arg = spec.partition(":")
  module = _load_module(path)
  entries = module.sweep()
  _check_entries(entries, path)
  if only:
    unknown = sorted(set(only) - {e["name"] for e in entries})
    if unknown:
      raise config_lib.ConfigError(f"{path}: no runs named {unknown}; known: "
                                   f"{[e['name'] for e in entries]}")
    entries = [e for e in entries if e["name"] in set(only)]
  sweep_dir = str(sweep_dir).rstrip("/")
  runs = []
  for entry in entries:
    args = config_lib.override_args(entry["overrides"]) + list(extra_overrides)
    try:
      cfg = module.get_config(arg) if arg else module.get_config()
      config_lib.apply_overrides(cfg, args)
      config_lib.validate(cfg)
    except (config_lib.ConfigError, TypeError) as e:
      raise config_lib.ConfigError(f"{path}: run {entry['name']!r}: {e}") from e
    workdir = f"{sweep_dir}/{entry['name']}"
    runs.append(Run(entry["name"], dict(entry["overrides"]), cfg, workdir,
                    ["--config", spec, "--workdir", workdir, *args]))
  return runs


def train_command(run: Run) -> str:
  """The one-process `pupujepa train` command line of a run."""
  return shlex.join(["pupujepa", "train", *run.train_args])


def is_finished(run: Run) -> bool:
  """True when the run's metrics.jsonl has logged its last step (total_steps - 1)."""
  path = pathlib.Path(run.workdir) / "metrics.jsonl"
  if not path.exists():
    return False
  records = metrics_lib.read_jsonl(path)
  return bool(records) and records[-1]["step"] + 1 >= run.config.total_steps


def manifest(runs: list[Run], spec: str) -> dict:
  return {"config": spec, "runs": [{"name": r.name, "overrides": r.overrides,
                                    "workdir": r.workdir} for r in runs]}


def write_manifest(runs: list[Run], spec: str, directory) -> pathlib.Path:
  """Write `sweep.json` (run names and overrides, read by `collect_report`)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / MANIFEST
  path.write_text(json.dumps(manifest(runs, spec), indent=2, default=list))
  return path


def run_local(runs: list[Run], spec: str, sweep_dir, *, progress: bool = True,
              stop_after: int | None = None) -> list[dict]:
  """Train the runs here one after another, skipping finished ones; returns a summary."""
  from pupujepa_jax import trainer
  write_manifest(runs, spec, sweep_dir)
  summary = []
  for run in runs:
    if is_finished(run):
      summary.append({"name": run.name, "status": "already finished"})
      continue
    result = trainer.train(run.config, run.workdir, stop_after=stop_after, progress=progress)
    summary.append({"name": run.name, "status": "trained", "final_step": result.final_step,
                    "loss": result.last_metrics.get("loss"),
                    "stopped_by_signal": result.stopped_by_signal})
    if result.stopped_by_signal:
      break  # preempted: leave the rest for the next invocation
  return summary


# ----------------------------------------------------------------------- cluster scripts

@dataclasses.dataclass
class EmitOptions:
  """Cluster settings of emitted scripts (placeholders are ordinary defaults)."""
  nodes: int = 1               # SLURM nodes per run (one process per node, all its GPUs)
  gpus_per_node: int = 8
  cpus_per_task: int = 32
  time: str = "72:00:00"
  partition: str = ""
  account: str = ""
  port: int = 29500            # coordinator port on the first node
  repo_dir: str = ""           # where `pupujepa` runs (SLURM default: the submit dir)
  tpu_name: str = "pupujepa-pod"
  zone: str = "us-central2-b"
  project: str = ""


def slurm_script(run: Run, opts: EmitOptions) -> str:
  """An sbatch script: one task per node; multi-node runs pass the coordinator explicitly."""
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name=pupujepa-{run.name}",
           f"#SBATCH --nodes={opts.nodes}",
           "#SBATCH --ntasks-per-node=1",
           f"#SBATCH --gpus-per-node={opts.gpus_per_node}",
           f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
           f"#SBATCH --time={opts.time}",
           f"#SBATCH --output={run.workdir}/slurm-%j.out",
           # The trainer saves a checkpoint on SIGTERM; requeued jobs resume from it.
           "#SBATCH --signal=TERM@300",
           "#SBATCH --requeue"]
  if opts.partition:
    lines.append(f"#SBATCH --partition={opts.partition}")
  if opts.account:
    lines.append(f"#SBATCH --account={opts.account}")
  repo = shlex.quote(opts.repo_dir) if opts.repo_dir else '"$SLURM_SUBMIT_DIR"'
  lines += ["set -euo pipefail",
            f"cd {repo}"]
  train = ["pupujepa", "train", *run.train_args, "--no_progress"]
  if opts.nodes == 1:
    lines.append(f"srun {shlex.join(train)}")
  else:
    lines += ['MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"export MASTER_ADDR MASTER_PORT={opts.port}"]
    # $SLURM_PROCID differs per task: expand it inside each task, not in this script.
    inner = (shlex.join(train) + ' --coordinator "$MASTER_ADDR:$MASTER_PORT"'
             ' --num_processes "$SLURM_NTASKS" --process_id "$SLURM_PROCID"')
    lines.append(f"srun --kill-on-bad-exit=1 bash -c {shlex.quote('exec ' + inner)}")
  return "\n".join(lines) + "\n"


def tpu_script(run: Run, opts: EmitOptions) -> str:
  """Runs the train command on every worker of a TPU pod (JAX auto-detects the pod)."""
  remote = (f"cd {shlex.quote(opts.repo_dir) if opts.repo_dir else '~/pupujepa_jax'} && "
            + shlex.join(["pupujepa", "train", *run.train_args, "--distributed",
                          "--no_progress"]))
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", opts.tpu_name, f"--zone={opts.zone}"]
  if opts.project:
    ssh.append(f"--project={opts.project}")
  ssh += ["--worker=all", "--command", remote]
  return "#!/bin/bash\nset -euo pipefail\n" + shlex.join(ssh) + "\n"


def emit(runs: list[Run], spec: str, kind: str, out_dir, opts: EmitOptions | None = None
         ) -> list[pathlib.Path]:
  """Write one script per run plus `submit_all.sh` and `sweep.json` into `out_dir`.

  SLURM: `submit_all.sh` sbatches every run. TPU: it runs them one after another on the
  pod. Both copy `sweep.json` into the sweep dir for `pupujepa report`.
  """
  opts = opts or EmitOptions()
  if kind not in ("slurm", "tpu"):
    raise ValueError(f"emit kind {kind!r} not in ('slurm', 'tpu')")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  write_manifest(runs, spec, out_dir)
  sweep_dirs = sorted({r.workdir.rsplit("/", 1)[0] for r in runs})
  submit = ["#!/bin/bash", "set -euo pipefail", 'here="$(cd "$(dirname "$0")" && pwd)"']
  for d in sweep_dirs:
    if d.startswith("gs://"):
      submit.append(f'gcloud storage cp "$here/{MANIFEST}" {shlex.quote(d)}/')
    else:
      submit.append(f'mkdir -p {shlex.quote(d)} && cp "$here/{MANIFEST}" {shlex.quote(d)}/')
  written = []
  for run in runs:
    if kind == "slurm":
      path, text = out_dir / f"{run.name}.sbatch", slurm_script(run, opts)
      # SLURM opens the --output file in the workdir before the job starts.
      submit.append(f'mkdir -p {shlex.quote(run.workdir)} && sbatch "$here/{path.name}"')
    else:
      path, text = out_dir / f"{run.name}.sh", tpu_script(run, opts)
      submit.append(f'bash "$here/{path.name}"')
    path.write_text(text)
    path.chmod(0o755)
    written.append(path)
  submit_path = out_dir / "submit_all.sh"
  submit_path.write_text("\n".join(submit) + "\n")
  submit_path.chmod(0o755)
  return [*written, submit_path]


# -------------------------------------------------------------------------------- report

def _cell(value, fmt="{:.4g}") -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return fmt.format(value)
  return str(value).replace("|", "\\|")


def _run_dirs(sweep_dir: pathlib.Path) -> list[tuple[str, dict | None]]:
  """(name, overrides or None) of each run: the manifest's order, else every run subdir."""
  path = sweep_dir / MANIFEST
  if path.exists():
    return [(r["name"], r["overrides"]) for r in json.loads(path.read_text())["runs"]]
  return [(d.name, None) for d in sorted(sweep_dir.iterdir())
          if (d / "config.json").exists() or (d / "metrics.jsonl").exists()]


def collect_report(sweep_dir) -> str:
  """A markdown table of each run: overrides, steps, final loss and teacher_std, median
  steps/s, and one column per probe task when the run has `probe_results.json`."""
  sweep_dir = pathlib.Path(sweep_dir)
  if not sweep_dir.is_dir():
    raise FileNotFoundError(f"sweep dir {sweep_dir} does not exist")
  rows, probe_columns = [], {}
  for name, overrides in _run_dirs(sweep_dir):
    workdir = sweep_dir / name
    total = None
    if (workdir / "config.json").exists():
      total = json.loads((workdir / "config.json").read_text()).get("total_steps")
    records = (metrics_lib.read_jsonl(workdir / "metrics.jsonl")
               if (workdir / "metrics.jsonl").exists() else [])
    last = records[-1] if records else {}
    rates = [r["steps_per_second"] for r in records
             if isinstance(r.get("steps_per_second"), (int, float))]
    probes = {}
    if (workdir / PROBE_RESULTS).exists():
      for result in json.loads((workdir / PROBE_RESULTS).read_text()):
        column = f"{result['task']} ({result['main_metric']})"
        probe_columns[column] = None
        probes[column] = result["score"]
    done = last["step"] + 1 if last else 0
    status = ("not started" if not records else
              "finished" if total is not None and done >= total else "running")
    rows.append({
        "run": name,
        "overrides": ("-" if overrides is None else
                      " ".join(f"{k}={config_lib.format_value(v)}" for k, v in overrides.items())
                      or "(base)"),
        "status": status,
        "steps": f"{done}/{total if total is not None else '?'}",
        "loss": last.get("loss"),
        "teacher_std": last.get("teacher_std"),
        "steps/s": statistics.median(rates) if rates else None,
        **probes,
    })
  columns = ["run", "overrides", "status", "steps", "loss", "teacher_std", "steps/s",
             *probe_columns]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines) + "\n"
