"""The `pupujepa` command line: parse arguments, call one library function, print JSON.

Every subcommand is a thin shell over importable functions (see each handler's callee);
heavy imports happen inside handlers so `pupujepa --help` stays fast. A refusal (bad
config, damaged file, missing folder) prints one line naming the culprit and exits 2.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

# Subcommands that take `--config.a.b=value` overrides after their own arguments.
TAKES_OVERRIDES = ("info", "masks", "train", "sweep")
# Optional dependencies: the install extra (setup.py) that brings each top-level module.
EXTRA_OF_MODULE = {
    "grain": "train", "tensorflow_datasets": "data", "array_record": "data",
    "etils": "data", "threadpoolctl": "data", "tensorboardX": "train",
    "sklearn": "eval", "mir_eval": "eval", "librosa": "eval", "matplotlib": "eval",
    "music21": "offline", "pretty_midi": "offline", "tinysoundfont": "offline",
    "torch": "reference", "timm": "reference",
}


def missing_dependency_message(error: ModuleNotFoundError) -> str:
  """What to install for a module of an extra; the import error itself otherwise."""
  module = (error.name or "").split(".")[0]
  if module in EXTRA_OF_MODULE:
    extra = EXTRA_OF_MODULE[module]
    hint = " (and: pip install --no-deps tinysoundfont)" if extra == "offline" else ""
    return (f"this command needs {module!r}, an optional dependency: "
            f"pip install 'pupujepa_jax[{extra}]'{hint}")
  return str(error)


def _print_json(obj) -> None:
  print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _load_config(spec: str, overrides=()):
  from pupujepa_jax import config as config_lib
  cfg = config_lib.apply_overrides(config_lib.load_config(spec), list(overrides))
  config_lib.validate(cfg)
  return cfg


# ---------------------------------------------------------------------------- handlers

def cmd_info(args, extra):
  from pupujepa_jax import info
  _print_json(info.model_info(_load_config(args.config, extra)))


def cmd_masks(args, extra):
  from pupujepa_jax import info
  cfg = _load_config(args.config, extra)
  _print_json(info.mask_report(cfg, args.strategy, args.n, args.seed, args.step, args.png))


def cmd_train(args, extra):
  from pupujepa_jax import config as config_lib
  from pupujepa_jax import trainer, workdir
  if args.coordinator or args.num_processes:
    trainer.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  elif args.distributed:
    trainer.initialize_distributed()
  if args.config:
    cfg = _load_config(args.config, extra)
  else:  # continue the run (or imported weights) the workdir holds, with its config
    cfg, _ = workdir.read_config(args.workdir)
    config_lib.apply_overrides(cfg, extra)
    config_lib.validate(cfg)
  result = trainer.train(cfg, args.workdir, stop_after=args.stop_after,
                         progress=not args.no_progress,
                         allow_config_change=args.allow_config_change)
  _print_json({"final_step": result.final_step, "stopped_by_signal": result.stopped_by_signal,
               "workdir": result.workdir, "last_metrics": result.last_metrics,
               "resumed_from": result.resumed_from,
               "rejected_checkpoints": result.rejected_checkpoints,
               "dataset_changed": result.dataset_changed})


def cmd_data_ingest(args, extra):
  from data_pipelines import ingest
  _print_json(ingest.ingest(args.input, args.out, min_seconds=args.min_seconds,
                            overwrite=args.overwrite))


def cmd_data_offline(args, extra):
  from data_pipelines import offline
  _print_json(offline.build_offline(args.out, hours=args.hours, seed=args.seed,
                                    num_workers=args.workers))


def cmd_data_baselines(args, extra):
  from pupujepa_jax import baselines
  print(baselines.format_scores(baselines.compute_baselines(args.tasks, args.out,
                                                            seed=args.seed)))


def cmd_data_build(args, extra):
  import contextlib
  from data_pipelines import builders
  with contextlib.redirect_stdout(sys.stderr):  # TFDS's progress; stdout is the JSON alone
    builder = builders.build(args.dataset, args.manual_dir, args.out)
  summary = {"dataset": args.dataset, "data_dir": str(builder.data_dir),
             "splits": {k: v.num_examples for k, v in builder.info.splits.items()}}
  if args.labels_csv:
    summary["labels_csv"] = str(builders.write_labels_csv(builder, args.labels_csv))
  _print_json(summary)


def cmd_probe(args, extra):
  from pupujepa_jax import probe
  lr = tuple(float(x) for x in args.lr.split(",")) if "," in args.lr else float(args.lr)
  result = probe.probe_features(args.features, args.labels, args.task, probe=args.probe,
                                layer=args.layer, seed=args.seed, lr=lr, out=args.out)
  print(probe.format_table([result]))
  _print_json({k: result[k] for k in ("task", "probe", "layer", "main_metric", "score",
                                      "valid", "test")})


def cmd_sweep(args, extra):
  from pupujepa_jax import sweep
  only = args.only.split(",") if args.only else None
  sweep_dir = args.sweep_dir or str(pathlib.Path("sweeps") /
                                    pathlib.Path(args.config.partition(":")[0]).stem)
  runs = sweep.expand(args.config, sweep_dir, extra, only=only)
  if args.dry_run or not (args.local or args.emit):
    _print_json([{"name": r.name, "workdir": str(r.workdir), "overrides": r.overrides,
                  "finished": sweep.is_finished(r), "command": sweep.train_command(r)}
                 for r in runs])
  elif args.local:
    _print_json(sweep.run_local(runs, args.config, sweep_dir, progress=not args.no_progress,
                                stop_after=args.stop_after))
  else:
    if not args.out:
      raise ValueError("--emit needs --out DIR for the scripts")
    opts = sweep.EmitOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                             time=args.time, partition=args.partition, account=args.account,
                             repo_dir=args.repo_dir, tpu_name=args.tpu_name, zone=args.zone,
                             project=args.project)
    _print_json([str(p) for p in sweep.emit(runs, args.config, args.emit, args.out, opts)])


def cmd_report(args, extra):
  from pupujepa_jax import sweep
  table = sweep.collect_report(args.sweep)
  if args.out:
    pathlib.Path(args.out).write_text(table)
  print(table, end="")


def cmd_export(args, extra):
  if args.format == "release":
    from pupujepa_jax import release
    _print_json(release.export_release(args.workdir, args.out, step=args.step))
  else:
    from pupujepa_jax import export
    _print_json(export.export_workdir(args.workdir, args.out, step=args.step,
                                      model_id=args.model_id))


def cmd_import_torch(args, extra):
  from pupujepa_jax import release
  _print_json(release.import_release(args.weights, args.args, out=args.out,
                                     workdir=args.workdir, model_id=args.model_id))


def parse_layers(text: str):
  """`all`, `last`, `final` or comma-separated block indices and/or `final`."""
  if text in ("all", "last", "final"):
    return text
  try:
    return [x if x == "final" else int(x) for x in text.split(",")]
  except ValueError:
    raise ValueError(f"--layers {text!r}: expected all, last, final or comma-separated "
                     "layer indices") from None


def cmd_embed(args, extra):
  from pupujepa_jax import inference
  model = inference.load(args.model, batch_size=args.batch_size, short_policy=args.short_policy)
  meta = inference.embed_folder(model, args.input, args.out, readout=args.readout,
                                layers=parse_layers(args.layers),
                                window_seconds=args.window_seconds,
                                hop_seconds=args.hop_seconds, progress=not args.no_progress,
                                overwrite=args.overwrite)
  _print_json({k: meta[k] for k in ("D", "L", "layer_names", "readout", "n_files", "failed",
                                    "model_id")})
  if not meta["n_files"]:
    raise ValueError(f"no file under {args.input} could be embedded "
                     f"({len(meta['failed'])} failed; reasons in {args.out}/meta.json)")


def cmd_attention(args, extra):
  from data_pipelines import audio
  from pupujepa_jax import inference, viz
  if (args.model is None) == (args.workdir is None):
    raise ValueError("give exactly one of --model (encoder attention) or --workdir "
                     "(predictor attention from a training checkpoint)")
  query = tuple(int(x) for x in args.query.split(",")) if args.query else None
  if args.model is not None:
    model = inference.load(args.model)
    wave = audio.load_audio(args.audio, model.sample_rate)
    info = viz.encoder_attention_png(model, wave, model.sample_rate, args.out, args.layer,
                                     query, args.start_seconds)
  else:  # decoded at the released rate; the picture resamples to the run's front-end
    from pupujepa_jax import frontend
    wave = audio.load_audio(args.audio, frontend.SAMPLE_RATE)
    info = viz.predictor_attention_png(args.workdir, wave, frontend.SAMPLE_RATE, args.out,
                                       args.layer, query, args.step, args.seed)
  _print_json(info)


# ------------------------------------------------------------------------------ parser

def _add_model_commands(sub) -> None:
  p = sub.add_parser("info", help="parameter counts, token grid and rate of a config")
  p.add_argument("--config", required=True)
  p.set_defaults(func=cmd_info)

  p = sub.add_parser("masks", help="statistics (and a picture) of sampled masks")
  p.add_argument("--config", required=True)
  p.add_argument("--strategy", default="random",
                 help="curriculum (the schedule at --step) or one strategy: random, block, "
                      "time_frequency, multiblock")
  p.add_argument("--n", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, default=0, help="curriculum step (strategy=curriculum)")
  p.add_argument("--png", default=None)
  p.set_defaults(func=cmd_masks)

  p = sub.add_parser("train", help="train a config in a workdir (resumes if it exists)")
  p.add_argument("--config", default=None,
                 help="FILE.py[:ARG]; default: the config the workdir holds")
  p.add_argument("--workdir", required=True)
  p.add_argument("--stop_after", type=int, default=None,
                 help="stop after this many steps of this invocation")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--allow_config_change", action="store_true")
  p.add_argument("--distributed", action="store_true",
                 help="multi-host with the platform's auto-detection (TPU pods, SLURM)")
  p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.set_defaults(func=cmd_train)


def _add_data_commands(sub) -> None:
  data = sub.add_parser("data", help="datasets: ingest, offline corpus, baselines, builders")
  dsub = data.add_subparsers(dest="data_command", required=True)
  p = dsub.add_parser("ingest", help="audio folder -> TFDS ArrayRecord dataset")
  p.add_argument("--input", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--min_seconds", type=float, default=1.0)
  p.add_argument("--overwrite", action="store_true",
                 help="replace a dataset in --out that was ingested from another folder")
  p.set_defaults(func=cmd_data_ingest)
  p = dsub.add_parser("offline", help="render the offline music corpus and probe tasks")
  p.add_argument("--out", required=True)
  p.add_argument("--hours", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=2)
  p.set_defaults(func=cmd_data_offline)
  p = dsub.add_parser("baselines", help="hand-crafted feature baselines on probe tasks")
  p.add_argument("--tasks", required=True)
  p.add_argument("--out", default=None)
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=cmd_data_baselines)
  p = dsub.add_parser("build", help="build a MARBLE dataset from a local copy")
  p.add_argument("--dataset", required=True)
  p.add_argument("--manual_dir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--labels_csv", default=None, help="also write path,label,split here")
  p.set_defaults(func=cmd_data_build)


def _add_sweep_commands(sub) -> None:
  p = sub.add_parser("sweep", help="expand an ablation sweep; run it here or emit scripts")
  p.add_argument("--config", required=True, help="experiments/ablations/X.py[:ARG]")
  p.add_argument("--sweep_dir", default=None, help="runs go to SWEEP_DIR/<name> "
                 "(default sweeps/<file stem>)")
  p.add_argument("--only", default=None, help="comma-separated run names to keep")
  p.add_argument("--dry_run", action="store_true", help="print the runs (the default)")
  p.add_argument("--local", action="store_true", help="train the runs here, one by one")
  p.add_argument("--stop_after", type=int, default=None)
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--emit", choices=["slurm", "tpu"], default=None)
  p.add_argument("--out", default=None, help="directory for emitted scripts")
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=8)
  p.add_argument("--time", default="72:00:00")
  p.add_argument("--partition", default="")
  p.add_argument("--account", default="")
  p.add_argument("--repo_dir", default="", help="checkout on the cluster/TPU VMs")
  p.add_argument("--tpu_name", default="pupujepa-pod")
  p.add_argument("--zone", default="us-central2-b")
  p.add_argument("--project", default="")
  p.set_defaults(func=cmd_sweep)

  p = sub.add_parser("report", help="markdown table of a sweep's runs")
  p.add_argument("--sweep", required=True, help="the sweep dir")
  p.add_argument("--out", default=None, help="also write the table here")
  p.set_defaults(func=cmd_report)


def _add_model_dir_commands(sub) -> None:
  p = sub.add_parser("export", help="a workdir checkpoint -> model dir (or release layout)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--out", required=True, help="directory to write")
  p.add_argument("--format", choices=["model_dir", "release"], default="model_dir",
                 help="model_dir: patch embedding + teacher for embedding; release: the "
                      "whole state dict as model.safetensors + args.json")
  p.add_argument("--model_id", default=None)
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("import-torch", help="released PyTorch checkpoint -> model dir / workdir")
  p.add_argument("--weights", required=True, help="model.safetensors of the release")
  p.add_argument("--args", required=True, help="args.json of the release")
  p.add_argument("--out", default=None, help="model dir to write (for embedding)")
  p.add_argument("--workdir", default=None,
                 help="training workdir to write (continue pretraining / fine-tune)")
  p.add_argument("--model_id", default=None)
  p.set_defaults(func=cmd_import_torch)


def _add_inference_commands(sub) -> None:
  p = sub.add_parser("embed", help="audio folder or file -> MARBLE feature layout")
  p.add_argument("--model", required=True, help="model dir (export / import-torch)")
  p.add_argument("--input", required=True, help="audio folder or file")
  p.add_argument("--out", required=True, help="feature dir")
  p.add_argument("--readout", default="freqcat", choices=["freqcat", "mean"])
  p.add_argument("--layers", default="all",
                 help="all (patch embedding + every block), last, final (the released "
                      "embedding, after the final norm) or comma-separated indices")
  p.add_argument("--window_seconds", type=float, default=None,
                 help="must equal the training window (default: it)")
  p.add_argument("--hop_seconds", type=float, default=None, help="default: the window")
  p.add_argument("--short_policy", default="loop", choices=["loop", "pad"])
  p.add_argument("--batch_size", type=int, default=8, help="windows per batch")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--overwrite", action="store_true",
                 help="replace another model's features in --out (only the files its "
                      "meta.json lists are removed)")
  p.set_defaults(func=cmd_embed)

  p = sub.add_parser("probe", help="MARBLE-protocol probe on exported features")
  p.add_argument("--features", required=True)
  p.add_argument("--labels", required=True)
  p.add_argument("--task", required=True,
                 choices=["multiclass", "multilabel", "regression", "key"])
  p.add_argument("--probe", default="mlp", choices=["mlp", "linear"])
  p.add_argument("--layer", default="all")
  p.add_argument("--lr", default="1e-3", help="a rate or a comma-separated grid")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  p.set_defaults(func=cmd_probe)

  p = sub.add_parser("attention", help="attention maps over the log-mel spectrogram (PNG)")
  p.add_argument("--model", default=None, help="model dir: the encoder's attention")
  p.add_argument("--workdir", default=None, help="training workdir: the predictor's attention")
  p.add_argument("--audio", required=True)
  p.add_argument("--out", required=True, help="PNG file")
  p.add_argument("--layer", type=int, default=-1, help="block index (default: last)")
  p.add_argument("--query", default=None, help="TIME,FREQ token of the query (default: centre)")
  p.add_argument("--start_seconds", type=float, default=0.0, help="window start (--model)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (--workdir)")
  p.add_argument("--seed", type=int, default=0, help="mask seed (--workdir)")
  p.set_defaults(func=cmd_attention)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="pupujepa", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for add in (_add_model_commands, _add_data_commands, _add_sweep_commands,
              _add_model_dir_commands, _add_inference_commands):
    add(sub)
  return parser


def main(argv=None) -> int:
  from pupujepa_jax import xla_flags
  xla_flags.apply()  # before any handler starts JAX
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if extra and args.command not in TAKES_OVERRIDES:
    parser.error(f"unrecognised arguments: {' '.join(extra)}")
  if args.command == "train" and argv is None:  # the command line, not a caller's list
    from pupujepa_jax import block_cache
    block_cache.enter()
  try:
    args.func(args, extra)
  except ModuleNotFoundError as e:
    print(f"pupujepa {args.command}: error: {missing_dependency_message(e)}", file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as e:
    print(f"pupujepa {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
