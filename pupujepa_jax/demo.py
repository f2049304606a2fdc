"""`make demo`: pretrain, export, embed and probe end to end on one CPU machine.

Stages (each reuses what an earlier run already built under `--out`):
  1. render the offline corpus and probe tasks (data_pipelines.offline), ingest the corpus
  2. pretrain experiments/cpu_demo.py (resumes a finished or interrupted run)
  3. export the teacher; write a random-init encoder of the same architecture
  4. embed every probe task with both (every block layer and the final one)
  5. hand-crafted baseline features
  6. probes: the linear probe on every single layer, the MARBLE MLP on the final layer and
     on the best layer (chosen on the validation split), three probe seeds each
  7. statistics (`pupujepa_jax.evaluation`): seed mean +- std, bootstrap intervals over
     test clips, paired verdicts; report.md with the tables, curves and pictures

The protocol is the same for every model and feature set: MARBLE v2 (Adam 1e-3, batch 64,
ReduceLROnPlateau factor 0.5 patience 3, early stopping after 10 epochs without a better
validation main metric, chunk outputs averaged per clip), one learning rate. The best layer
of a model is the one whose linear probes score best on validation (mean over seeds); both
protocols report it, and the best baseline is the feature set with the best validation
score under each protocol. The test split is only ever scored.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time

import numpy as np

MODELS = ("pretrained", "random_init")
PROTOCOLS = ("linear", "mlp")
LAYER_KINDS = ("final", "best")
BASELINE_PREFIX = "baseline_"
CURVES = (("loss", "training loss"), ("learning_rate", "learning rate"),
          (("teacher_std", "student_std"), "feature std (collapse alarm)"),
          ("teacher_rank", "teacher RankMe (effective rank)"),
          ("prediction_cosine", "prediction cosine to targets"),
          ("knn_accuracy", "online kNN monitor (pitch, valid clips)"))
# The online kNN monitor's labelled set: this task's train and valid clips (never its test
# clips), embedded with the teacher every MONITOR_EVERY steps.
MONITOR_TASK = "pitch"
MONITOR_EVERY = 100
ABLATION_MARK = "<!-- ablation table: demo.write_report(..., ablations=[...]) -->"
# The recipe runs behind experiments/cpu_demo.py's defaults (`ablation_run` rows).
ABLATIONS_FILE = pathlib.Path(__file__).parents[1] / "experiments" / "cpu_demo_ablations.json"


def _log(message: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def _stage(name, timings):
  """Logs a stage and records its seconds in `timings` (also when it fails)."""
  _log(f"{name} ...")
  start = time.time()
  try:
    yield
  finally:
    timings[name] = time.time() - start
  _log(f"{name}: done in {timings[name]:.0f} s")


# --------------------------------------------------------------------------- stages

def build_data(out: pathlib.Path, hours: float, seed: int, tasks: list[str],
               examples_per_task: int | None) -> dict:
  from data_pipelines import ingest, offline
  summary = offline.build_offline(str(out / "data"), hours=hours, seed=seed,
                                  tasks=tuple(tasks), examples_per_task=examples_per_task)
  ingest.ingest(out / "data" / "corpus", out / "data" / "corpus_tfds")
  return summary


def monitor_labels(out: pathlib.Path, tasks: list[str]) -> pathlib.Path | None:
  """labels.csv of the kNN monitor (MONITOR_TASK's train and valid rows, paths relative
  to `out`), or None when that task is not built."""
  from pupujepa_jax import labels
  if MONITOR_TASK not in tasks:
    return None
  task_dir = pathlib.Path("data") / "tasks" / MONITOR_TASK
  rows = labels.read_labels_csv(out / task_dir / labels.LABELS_FILE)
  return labels.write_labels_csv(
      [(str(task_dir / r.path), r.label, r.split) for r in rows if r.split != "test"],
      out / "monitor_labels.csv")


def pretrain(out: pathlib.Path, config_arg: str, monitor_csv: pathlib.Path | None = None):
  from pupujepa_jax import config as config_lib
  from pupujepa_jax import trainer
  monitor = f"monitor={monitor_csv},monitor_every={MONITOR_EVERY}" if monitor_csv else ""
  arg = ",".join(filter(None, [f"data={out / 'data' / 'corpus_tfds'}", monitor, config_arg]))
  cfg = config_lib.load_config(f"{pathlib.Path(__file__).parents[1] / 'experiments' / 'cpu_demo.py'}:{arg}")
  return cfg, trainer.train(cfg, out / "pretrain")


def export_models(out: pathlib.Path, cfg, step: int) -> dict:
  """Model dirs of the pretrained teacher at `step` (exported unless already there) and
  of a random-init encoder (same architecture)."""
  import jax
  from pupujepa_jax import export, models
  dirs = {name: out / "models" / name for name in MODELS}
  exported = dirs["pretrained"] / export.CONFIG_FILE
  if not (exported.exists() and export.read_model_dir(dirs["pretrained"]).meta[
      "provenance"]["step"] == step):
    export.export_workdir(out / "pretrain", dirs["pretrained"], step=step,
                          model_id="demo-pretrained")
  if not (dirs["random_init"] / export.CONFIG_FILE).exists():
    from pupujepa_jax import config as config_lib
    params = models.init_encoder(config_lib.architecture(cfg), cfg.frontend.n_mels,
                                 jax.random.key(cfg.seed + 1))
    export.write_model_dir(dirs["random_init"], params, config_lib.serving_spec(cfg),
                           model_id="demo-random-init", source="random_init")
  return dirs


def embed_tasks(out: pathlib.Path, model_dirs: dict, tasks: list[str]) -> dict:
  """Feature dirs per (model, task): every block layer and the final one (the released
  embedding); re-embeds only when the model's step or the layers changed."""
  from pupujepa_jax import export, inference
  features = {}
  for name, model_dir in model_dirs.items():
    step = export.read_meta(pathlib.Path(model_dir))[0]["provenance"]["step"]
    model = None
    for task in tasks:
      feat_dir = out / "features" / name / task
      meta_file = feat_dir / "meta.json"
      old = json.loads(meta_file.read_text()) if meta_file.exists() else {}
      if not (old.get("step") == step and inference.FINAL in old.get("layers", [])):
        model = model or inference.load(model_dir, batch_size=16)
        layers = list(range(model.num_layers)) + [inference.FINAL]
        # Paths in labels.csv are relative to the task folder (audio/<clip>.wav).
        meta = inference.embed_folder(model, out / "data" / "tasks" / task, feat_dir,
                                      readout="freqcat", layers=layers, progress=False,
                                      overwrite=True)
        meta_file.write_text(json.dumps(dict(meta, step=step), indent=1))
      features[(name, task)] = feat_dir
  return features


def baseline_features(out: pathlib.Path, tasks: list[str]) -> dict:
  """{task: folder of its baseline feature sets}."""
  from pupujepa_jax import baselines
  folders = {}
  for task in tasks:
    folders[task] = out / "baselines" / task
    # Reuses the clips' features of an earlier run; rewrites meta.json in today's layout.
    baselines.extract_task(str(out / "data" / "tasks" / task), str(folders[task]))
  return folders


def clear_stale_features(out: pathlib.Path, data_hash: str) -> None:
  """Removes the features of another data build: a rebuilt task may reuse a clip's file
  name for other audio, and features are reused by file name."""
  import shutil
  stamp = out / "features_data.json"
  if stamp.exists() and json.loads(stamp.read_text()).get("args_hash") == data_hash:
    return
  for sub in ("features", "baselines"):
    shutil.rmtree(out / sub, ignore_errors=True)
  stamp.write_text(json.dumps({"args_hash": data_hash}))


# --------------------------------------------------------------------------- probing

def _entry(run: dict, index: int, layer: int, name: str) -> dict:
  return {"layer": int(layer), "layer_name": name,
          "valid": float(np.mean(run["valid"][index])),
          "valid_seeds": [float(v) for v in run["valid"][index]],
          "epochs": [int(e) for e in run["epochs"][index]],
          "outputs": run["test_outputs"][index]}


def probe_task(task: str, model_features: dict, baseline_dir: pathlib.Path,
               labels_csv: pathlib.Path) -> dict:
  """Probes of one task for every model and baseline set (test outputs kept for the
  statistics): {"models": {name: {protocol: {"final", "best": entry}}}, "targets",
  "classes", "n_clips"}."""
  from data_pipelines.offline import TASK_INFO
  from pupujepa_jax import baselines, probe
  task_type = TASK_INFO[task].type
  seeds, settings = probe.SMALL_DATA_SEEDS, probe.SMALL_DATA_PROTOCOL
  models, prepared = {}, None
  for name in MODELS:
    data = probe.load_split_features(str(model_features[name]), str(labels_csv), "all")
    names = data["meta"]["layer_names"]
    prepared = probe.prepare(data, task_type)
    linear = probe.probe_layers(prepared, "linear", data["layers"], seeds, **settings)
    final = len(names) - 1
    best = int(np.argmax(linear["valid"].mean(axis=1)))
    mlp_layers = [final] if best == final else [final, best]
    mlp = probe.probe_layers(prepared, "mlp", mlp_layers, seeds, **settings)
    models[name] = {
        "linear": {"final": _entry(linear, final, final, names[final]),
                   "best": _entry(linear, best, best, names[best])},
        "mlp": {"final": _entry(mlp, 0, final, names[final]),
                "best": _entry(mlp, mlp_layers.index(best), best, names[best])}}
  runs, base_prepared = baselines.probe_sets(str(baseline_dir), str(labels_csv), task_type,
                                             seeds)
  for protocol, run in runs.items():
    for i, feature_set in enumerate(baselines.FEATURE_SETS):
      entry = _entry(run, i, 0, feature_set)
      models.setdefault(BASELINE_PREFIX + feature_set, {})[protocol] = {
          "final": entry, "best": entry}
  targets = prepared["splits"]["test"]["y_clip"]
  if not np.array_equal(targets, base_prepared["splits"]["test"]["y_clip"]):
    raise ValueError(f"{task}: baseline and model features list the test clips differently")
  return {"models": models, "targets": targets, "classes": prepared["classes"],
          "n_clips": {s: prepared["splits"][s]["n_clips"] for s in prepared["splits"]}}


def score_task(task: str, probed: dict, n_boot: int, seed: int = 0) -> dict:
  """Statistics of one task's probes (`pupujepa_jax.evaluation`): every entry gets its
  summary, each protocol its valid-chosen best baseline, and the verdicts of pretrained
  against random-init and against that baseline, per layer kind."""
  from data_pipelines.offline import TASK_INFO
  from pupujepa_jax import evaluation, probe
  info = TASK_INFO[task]
  targets, models = probed["targets"], probed["models"]
  weights = evaluation.bootstrap_weights(len(targets), n_boot, seed)
  for by_protocol in models.values():
    for by_kind in by_protocol.values():
      for entry in by_kind.values():
        if "ci" not in entry:  # Baselines share one entry for both kinds.
          entry.update(evaluation.summarize(info.type, entry["outputs"], targets, weights))
  baselines = [n for n in models if n.startswith(BASELINE_PREFIX)]
  best_baseline, verdicts = {}, {}
  for protocol in PROTOCOLS:
    best_baseline[protocol] = max(baselines, key=lambda n: models[n][protocol]["final"]["valid"])
    for kind in LAYER_KINDS:
      pre = models["pretrained"][protocol][kind]["outputs"]
      verdicts[f"{protocol}/{kind}"] = {
          "random_init": evaluation.compare(
              info.type, pre, models["random_init"][protocol][kind]["outputs"], targets,
              weights),
          "best_baseline": dict(evaluation.compare(
              info.type, pre, models[best_baseline[protocol]][protocol]["final"]["outputs"],
              targets, weights), name=best_baseline[protocol])}
  chance = evaluation.chance_level(info.type, targets, len(probed["classes"]), seed=seed)
  return {"type": info.type, "metric": info.main_metric, "chance": chance,
          "classes": list(info.classes), "n_clips": probed["n_clips"],
          "seeds": list(probe.SMALL_DATA_SEEDS), "n_boot": n_boot,
          "best_baseline": best_baseline, "verdicts": verdicts}


def probe_all(out: pathlib.Path, model_features: dict, baseline_dirs: dict,
              tasks: list[str], n_boot: int = 1000) -> dict:
  """Probes and statistics of every task. Writes probe_results.json (all numbers) and
  test_outputs.npz (the test clip outputs per model/task/protocol/layer kind, for paired
  comparisons with other runs on the same clips); returns the results dict:
  {"tasks": {task: score_task(...)}, "models": {name: {task: {protocol: {kind: entry}}}}}."""
  results = {"tasks": {}, "models": {}}
  arrays = {}
  for task in tasks:
    start = time.time()
    probed = probe_task(task, {name: model_features[(name, task)] for name in MODELS},
                        baseline_dirs[task], out / "data" / "tasks" / task / "labels.csv")
    results["tasks"][task] = score_task(task, probed, n_boot)
    for name, by_protocol in probed["models"].items():
      for protocol, by_kind in by_protocol.items():
        for kind, entry in by_kind.items():
          arrays[f"{name}/{task}/{protocol}/{kind}"] = entry["outputs"]
        results["models"].setdefault(name, {}).setdefault(task, {})[protocol] = {
            kind: {k: v for k, v in entry.items() if k != "outputs"}
            for kind, entry in by_kind.items()}
    best = results["models"]["pretrained"][task]["linear"]["best"]
    _log(f"probed {task} in {time.time() - start:.0f} s: pretrained linear final "
         f"{results['models']['pretrained'][task]['linear']['final']['mean']:.3f}, best "
         f"({best['layer_name']}) {best['mean']:.3f}")
  (out / "probe_results.json").write_text(json.dumps(results, indent=1))
  np.savez_compressed(out / "test_outputs.npz", **arrays)
  return results


# --------------------------------------------------------------------------- report

def _cell(entry: dict, layer: bool = False) -> str:
  from pupujepa_jax import evaluation
  text = evaluation.format_score(entry)
  return f"{text} ({entry['layer_name']})" if layer else text


def scores_table(results: dict, protocol: str) -> str:
  """Markdown table task x feature set: seed mean ± std [bootstrap 95% interval]."""
  baselines = sorted(n for n in results["models"] if n.startswith(BASELINE_PREFIX))
  columns = [("pretrained", "final"), ("pretrained", "best"), ("random_init", "final"),
             ("random_init", "best")] + [(n, "final") for n in baselines]
  header = ["pretrained final", "pretrained best layer", "random-init final",
            "random-init best layer"] + [n[len(BASELINE_PREFIX):] for n in baselines]
  lines = ["| task | metric | chance | " + " | ".join(header) + " |",
           "|---|---|---|" + "---|" * len(header)]
  for task, info in results["tasks"].items():
    cells = [_cell(results["models"][n][task][protocol][k], layer=k == "best")
             for n, k in columns]
    lines.append(f"| {task} | {info['metric']} | {info['chance']:.3f} | " + " | ".join(cells)
                 + " |")
  return "\n".join(lines)


def _verdict_cell(cmp: dict, other: str) -> str:
  lo, hi = cmp["ci"]
  who = {"a": "**pretrained**", "b": other, "tie": "tie"}[cmp["verdict"]]
  return f"{who} ({cmp['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}])"


def verdict_table(results: dict) -> str:
  """Markdown table of the paired verdicts per task, protocol and layer kind."""
  lines = ["| task | probe | final: vs random-init | final: vs best baseline | "
           "best layer: vs random-init | best layer: vs best baseline |",
           "|---|---|---|---|---|---|"]
  for task, info in results["tasks"].items():
    for protocol in PROTOCOLS:
      cells = []
      for kind in LAYER_KINDS:
        v = info["verdicts"][f"{protocol}/{kind}"]
        cells += [_verdict_cell(v["random_init"], "random-init"),
                  _verdict_cell(v["best_baseline"],
                                v["best_baseline"]["name"][len(BASELINE_PREFIX):])]
      lines.append(f"| {task} | {protocol} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def verdict_counts(results: dict) -> dict:
  """{"protocol/kind": {"random_init" | "best_baseline": {"a", "b", "tie": count}}}."""
  counts = {}
  for info in results["tasks"].values():
    for key, by_other in info["verdicts"].items():
      for other, cmp in by_other.items():
        c = counts.setdefault(key, {}).setdefault(other, {"a": 0, "b": 0, "tie": 0})
        c[cmp["verdict"]] += 1
  return counts


def design_table(results: dict) -> str:
  """The task design check: clips per split, chance, and the best hand-crafted baseline
  (chosen on validation) per protocol, which must lie in [chance + 0.1, 0.9]."""
  lines = ["| task | metric | classes | train / valid / test clips | chance | "
           "best baseline, linear | best baseline, MLP | in [chance + 0.1, 0.9] |",
           "|---|---|---|---|---|---|---|---|"]
  for task, info in results["tasks"].items():
    cells, inside = [], []
    for protocol in PROTOCOLS:
      name = info["best_baseline"][protocol]
      entry = results["models"][name][task][protocol]["final"]
      cells.append(f"{entry['mean']:.3f} ({name[len(BASELINE_PREFIX):]})")
      inside.append(info["chance"] + 0.1 <= entry["mean"] <= 0.9)
    n = info["n_clips"]
    lines.append(f"| {task} | {info['metric']} | {len(info['classes']) or '-'} | "
                 f"{n['train']} / {n['valid']} / {n['test']} | {info['chance']:.3f} | "
                 + " | ".join(cells) + f" | {'yes' if all(inside) else 'NO'} |")
  return "\n".join(lines)


def ablation_run(out_dir, name: str, change: str) -> dict:
  """An ablation table row from a finished demo run's probe_results.json: the pretrained
  model's per-task results (the format of `probe_all`'s results["models"][name])."""
  results = json.loads((pathlib.Path(out_dir) / "probe_results.json").read_text())
  table_fields = ("mean", "std", "ci", "layer_name")  # what `ablation_table` shows
  scores = {task: {protocol: {kind: {k: entry[k] for k in table_fields}
                              for kind, entry in by_kind.items()}
                   for protocol, by_kind in by_protocol.items()}
            for task, by_protocol in results["models"]["pretrained"].items()}
  return {"name": name, "change": change, "scores": scores,
          "verdicts": verdict_counts(results)}


def ablation_table(runs: list[dict], protocol: str = "linear", layer: str = "final") -> str:
  """Markdown table of pretraining runs: one row per run, one column per task.

  Args:
    runs: dicts {"name", "change" (what differs from the reference run), "scores":
      {task: {protocol: {layer kind: entry}}}, optionally "verdicts" (`verdict_counts`)},
      an entry as in `probe_all`'s results (at least "mean", "std", "ci", "layer_name");
      see `ablation_run`.
    protocol, layer: which probe ("linear" | "mlp") and layer kind ("final" | "best").
  """
  tasks = sorted({t for run in runs for t in run["scores"]})
  lines = [f"| run | change | " + " | ".join(tasks) + " | beats random-init / best baseline |",
           "|---|---|" + "---|" * (len(tasks) + 1)]
  for run in runs:
    cells = [_cell(run["scores"][t][protocol][layer], layer=layer == "best")
             if t in run["scores"] else "-" for t in tasks]
    counts = run.get("verdicts", {}).get(f"{protocol}/{layer}")
    wins = "-" if not counts else " / ".join(
        f"{counts[other]['a']}/{sum(counts[other].values())}"
        for other in ("random_init", "best_baseline"))
    lines.append(f"| {run['name']} | {run['change']} | " + " | ".join(cells) + f" | {wins} |")
  return "\n".join(lines)


def read_ablations(path) -> list[dict]:
  """Ablation rows saved by earlier demo runs (a JSON list of `ablation_run` dicts)."""
  path = pathlib.Path(path)
  try:
    runs = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read the ablation runs ({e})") from e
  if not isinstance(runs, list) or not all(
      isinstance(r, dict) and {"name", "change", "scores"} <= set(r) for r in runs):
    raise ValueError(f"{path}: expected a list of runs with name, change and scores")
  return runs


def curve_points(records: list[dict], key: str) -> list[tuple]:
  """(step, value) of the metrics records that hold `key`, in step order."""
  return sorted((r["step"], r[key]) for r in records if key in r)


def draw_curves(out: pathlib.Path) -> str:
  """curves.png: the training curves of CURVES from the run's metrics.jsonl. A metric
  logged only on some steps (the kNN monitor) is drawn through its own points."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from pupujepa_jax import metrics
  records = metrics.read_jsonl(out / "pretrain" / "metrics.jsonl")
  fig, axes = plt.subplots(2, 3, figsize=(14, 7))
  for ax, (keys, title) in zip(axes.flat, CURVES):
    for key in (keys,) if isinstance(keys, str) else keys:
      points = curve_points(records, key)
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 50 else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    if not isinstance(keys, str):
      ax.legend(fontsize=8)
  for ax in axes.flat[len(CURVES):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(out / "curves.png", dpi=90)
  plt.close(fig)
  return "curves.png"


def draw_pictures(out: pathlib.Path, cfg, model_dirs: dict, results: dict,
                  tasks: list[str]) -> dict:
  import functools

  import jax
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from data_pipelines import audio
  from pupujepa_jax import config as config_lib
  from pupujepa_jax import inference, masking, viz
  pictures = {"curves": draw_curves(out)}

  names = list(MODELS) + sorted(n for n in results["models"] if n.startswith(BASELINE_PREFIX))
  fig, axes = plt.subplots(1, len(results["tasks"]), figsize=(3.2 * len(results["tasks"]), 4),
                           squeeze=False)
  width = 0.8 / len(names)
  for ax, (task, info) in zip(axes[0], results["tasks"].items()):
    for i, name in enumerate(names):
      entries = [results["models"][name][task][p]["final"] for p in PROTOCOLS]
      means = np.array([e["mean"] for e in entries])
      err = np.abs(np.array([e["ci"] for e in entries]).T - means)
      ax.bar(np.arange(len(PROTOCOLS)) + i * width, means, width, yerr=err, capsize=2,
             label=name.replace(BASELINE_PREFIX, ""))
    ax.axhline(info["chance"], color="k", ls="--", lw=1)
    ax.set_xticks(np.arange(len(PROTOCOLS)) + 0.4 - width / 2)
    ax.set_xticklabels(PROTOCOLS)
    ax.set_title(f"{task} ({info['metric']})")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("final layer, test split: seed mean and bootstrap 95% interval; dashed: chance")
  fig.tight_layout()
  fig.savefig(out / "probe_scores.png", dpi=90)
  plt.close(fig)
  pictures["probe_scores"] = "probe_scores.png"

  grid = config_lib.grid_shape(cfg)
  masks = []
  for strategy in masking.STRATEGIES:
    sample = jax.jit(functools.partial(masking.sample_target_mask, strategy=strategy,
                                       grid=grid, mask_cfg=config_lib.mask(cfg)))
    masks.append(np.asarray(sample(jax.random.key(0))))
  masking.draw_masks_png(np.stack(masks), grid, str(out / "masks.png"),
                         titles=list(masking.STRATEGIES))
  pictures["masks"] = "masks.png"

  model = inference.load(model_dirs["pretrained"])
  task = "instruments" if "instruments" in tasks else tasks[0]
  clip = sorted((out / "data" / "tasks" / task / "audio").glob("*.wav"))[0]
  wave = audio.load_audio(clip, model.sample_rate)
  viz.encoder_attention_png(model, wave, model.sample_rate, out / "attention.png")
  pictures["attention"] = "attention.png"
  return pictures


def write_report(out: pathlib.Path, results: dict, timings: dict, pictures: dict,
                 data_summary: dict, train_metrics: dict,
                 ablations: list[dict] | None = None) -> str:
  from pupujepa_jax import probe
  counts = verdict_counts(results)
  n_tasks = len(results["tasks"])

  def summary(key: str) -> str:
    r, b = counts[key]["random_init"], counts[key]["best_baseline"]
    return (f"- {key.replace('/', ', ')} layer: pretrained beats random-init on "
            f"**{r['a']}/{n_tasks}** tasks (ties {r['tie']}, losses {r['b']}); beats the "
            f"best baseline on **{b['a']}/{n_tasks}** (ties {b['tie']}, losses {b['b']})")

  ablation_text = "No ablation runs were passed to this report."
  if ablations:
    ablation_text = (
        "Pretraining recipes measured on the same data and test clips (earlier demo runs, "
        f"`{ABLATIONS_FILE.name}`; not rerun by this one). Last column: tasks where the "
        "pretrained model wins the paired bootstrap.\n\n" + "\n\n".join(
            f"{protocol} probe, final layer:\n\n"
            f"{ablation_table(ablations, protocol, 'final')}" for protocol in PROTOCOLS))
  lines = [
      "# PupuJEPA CPU demo report", "",
      "Pretrained on the offline corpus rendered from music21 scores, then probed on the",
      "offline tasks for the pretrained teacher, the same architecture with random weights,",
      "and hand-crafted features (log-mel, chroma with its interval spectrum, MFCC; mean",
      "and std over time), all with one protocol:", "",
      "- **linear probe** on a single layer (the paper's linear-probe tables) and the",
      "  **MARBLE MLP** (512 hidden, ReLU, dropout 0.2); Adam 1e-3, batch 64,",
      "  ReduceLROnPlateau, early stopping on the validation main metric; chunk outputs",
      "  averaged per clip;",
      "- **final layer**: the released embedding (after the final LayerNorm); **best layer**:",
      "  the layer whose linear probes score best on the validation split (mean over seeds),",
      "  used by both probes; the best baseline is the feature set with the best validation",
      "  score;",
      f"- scores: mean ± std over {len(probe.SMALL_DATA_SEEDS)} probe seeds, and [a "
      "bootstrap 95% interval]",
      "  over test clips of the seed-mean score (each resample scores every seed's",
      "  predictions on the same resampled clips and averages them);",
      "- verdicts: paired bootstrap of the difference of seed-mean scores on the same",
      "  resamples for both; a model beats another only when the 95% interval of the",
      "  difference excludes 0, otherwise **tie**.", "",
      "## Tasks and their difficulty", "",
      "Chance: 1/classes (accuracy), 0.5 (ROC-AUC), 0 (R^2), and for the key score the",
      "score of shuffled test labels. Splits are by source piece.", "",
      design_table(results), "",
      "## Probe scores (test split)", "",
      "### Linear probe", "", scores_table(results, "linear"), "",
      "### MARBLE MLP probe", "", scores_table(results, "mlp"), "",
      f"![probe scores]({pictures['probe_scores']})", "",
      "## Verdicts (paired bootstrap, 95%)", "",
      "Cells: the winner (or tie), then pretrained minus the other, with its interval.", "",
      verdict_table(results), "",
      *[summary(f"{p}/{k}") for p in PROTOCOLS for k in LAYER_KINDS], "",
      "## Ablations of pretraining runs", "", ABLATION_MARK, "", ablation_text, "",
      "## Training", "",
      f"Steps trained: {train_metrics.get('step', -1) + 1}; last loss "
      f"{train_metrics.get('loss', float('nan')):.4f}, teacher feature std "
      f"{train_metrics.get('teacher_std', float('nan')):.3f}, student feature std "
      f"{train_metrics.get('student_std', float('nan')):.3f}, teacher RankMe "
      f"{train_metrics.get('teacher_rank', float('nan')):.1f}, prediction cosine "
      f"{train_metrics.get('prediction_cosine', float('nan')):.3f}.", "",
      *([f"Online kNN monitor ({MONITOR_TASK} valid clips, teacher's released embedding): "
         f"accuracy {train_metrics['knn'][0][1]:.3f} at step {train_metrics['knn'][0][0]}, "
         f"{train_metrics['knn'][-1][1]:.3f} at step {train_metrics['knn'][-1][0]}.", ""]
        if train_metrics.get("knn") else []),
      f"![training curves]({pictures['curves']})", "",
      "## Masks (one sample per strategy; dark = target)", "", f"![masks]({pictures['masks']})",
      "", "## Attention of the pretrained teacher", "", f"![attention]({pictures['attention']})",
      "", "## Data", "", "```", json.dumps(data_summary, indent=1, default=str)[:3000], "```",
      "", "## Time per stage (s)", "",
      "| stage | seconds |", "|---|---|",
      *[f"| {k} | {v:.0f} |" for k, v in timings.items()],
      f"| total | {sum(timings.values()):.0f} |",
  ]
  text = "\n".join(lines) + "\n"
  (out / "report.md").write_text(text)
  return text


def run(out, hours: float = 2.0, config_arg: str = "", seed: int = 0,
        tasks: list[str] | None = None, examples_per_task: int | None = None,
        n_boot: int = 1000, ablations: list[dict] | None = None) -> dict:
  from data_pipelines.offline import TASKS
  out = pathlib.Path(out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  tasks = list(tasks or TASKS)
  timings = {}
  with _stage("offline corpus and probe tasks", timings):
    data_summary = build_data(out, hours, seed, tasks, examples_per_task)
    clear_stale_features(out, data_summary["args_hash"])
  with _stage("pretraining", timings):
    cfg, trained = pretrain(out, config_arg, monitor_labels(out, tasks))
  with _stage("export", timings):
    model_dirs = export_models(out, cfg, trained.final_step)
  with _stage("embedding", timings):
    features = embed_tasks(out, model_dirs, tasks)
  with _stage("baseline features", timings):
    baseline_dirs = baseline_features(out, tasks)
  with _stage("probes and statistics", timings):
    results = probe_all(out, features, baseline_dirs, tasks, n_boot)
  with _stage("pictures", timings):
    pictures = draw_pictures(out, cfg, model_dirs, results, tasks)
  from pupujepa_jax import metrics
  records = metrics.read_jsonl(out / "pretrain" / "metrics.jsonl")
  train_metrics = dict(records[-1], knn=[(r["step"], r["knn_accuracy"]) for r in records
                                         if "knn_accuracy" in r])
  write_report(out, results, timings, pictures, data_summary, train_metrics, ablations)
  print(verdict_table(results))
  _log(f"report: {out / 'report.md'}; total {sum(timings.values()):.0f} s")
  return {"results": results, "timings": timings}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="demo_out")
  parser.add_argument("--hours", type=float, default=2.0)
  parser.add_argument("--config_arg", default="", help="argument for experiments/cpu_demo.py")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--ablations", default=str(ABLATIONS_FILE),
                      help="JSON list of earlier runs (`ablation_run`) for the report's "
                           "ablation table; '' for none")
  args = parser.parse_args(argv)
  if argv is None:  # the command line: re-executed with the block cache where it helps
    from pupujepa_jax import block_cache
    block_cache.enter()
  ablations = read_ablations(args.ablations) if args.ablations else None
  run(args.out, args.hours, args.config_arg, args.seed, ablations=ablations)
  return 0


if __name__ == "__main__":
  sys.exit(main())
