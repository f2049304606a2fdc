"""`make demo`: pretrain, export, embed and probe end to end on one CPU machine.

Stages (each reuses what an earlier run already built under `--out`):
  1. render the offline corpus and probe tasks (data_pipelines.offline), ingest the corpus
  2. pretrain experiments/demo.py (resumes a finished or interrupted run)
  3. export the teacher; write a random-init encoder of the same architecture
  4. embed every probe task with both; hand-crafted baseline features
  5. probe everything with one protocol; results table, report.md and pictures
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

MODELS = ("pretrained", "random_init")


def _log(message: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _stage(name, timings):
  class _Timer:
    def __enter__(self):
      _log(f"{name} ...")
      self.start = time.time()

    def __exit__(self, *exc):
      timings[name] = time.time() - self.start
      if exc[0] is None:
        _log(f"{name}: done in {timings[name]:.0f} s")
  return _Timer()


def build_data(out: pathlib.Path, hours: float, seed: int, tasks: list[str],
               examples_per_task: int | None) -> dict:
  from data_pipelines import ingest, offline
  summary = offline.build_offline(str(out / "data"), hours=hours, seed=seed,
                                  tasks=tuple(tasks), examples_per_task=examples_per_task)
  ingest.ingest(out / "data" / "corpus", out / "data" / "corpus_tfds")
  return summary


def pretrain(out: pathlib.Path, config_arg: str):
  from pupujepa_jax import config as config_lib
  from pupujepa_jax import trainer
  arg = ",".join(filter(None, [f"data={out / 'data' / 'corpus_tfds'}", config_arg]))
  cfg = config_lib.load_config(f"{pathlib.Path(__file__).parents[1] / 'experiments' / 'demo.py'}:{arg}")
  return cfg, trainer.train(cfg, out / "pretrain")


def export_models(out: pathlib.Path, cfg) -> dict:
  """Model dirs of the pretrained teacher and of a random-init encoder (same architecture)."""
  import jax
  from pupujepa_jax import export, models
  dirs = {name: out / "models" / name for name in MODELS}
  export.export_workdir(out / "pretrain", dirs["pretrained"], model_id="demo-pretrained")
  if not (dirs["random_init"] / export.CONFIG_FILE).exists():
    from pupujepa_jax import config as config_lib
    params = models.init_encoder(config_lib.architecture(cfg), cfg.frontend.n_mels,
                                 jax.random.key(cfg.seed + 1))
    export.write_model_dir(dirs["random_init"], params, config_lib.serving_spec(cfg),
                           model_id="demo-random-init", source="random_init")
  return dirs


def embed_tasks(out: pathlib.Path, model_dirs: dict, tasks: list[str]) -> dict:
  """Features per (model, task); re-embeds only when the model's step changed."""
  from pupujepa_jax import export, inference
  features = {}
  for name, model_dir in model_dirs.items():
    step = export.read_model_dir(model_dir).meta["provenance"]["step"]
    model = None
    for task in tasks:
      feat_dir = out / "features" / name / task
      meta_file = feat_dir / "meta.json"
      if not (meta_file.exists() and json.loads(meta_file.read_text()).get("step") == step):
        model = model or inference.load(model_dir, batch_size=16)
        # Paths in labels.csv are relative to the task folder (audio/<clip>.wav).
        meta = inference.embed_folder(model, out / "data" / "tasks" / task, feat_dir,
                                      readout="freqcat", progress=False, overwrite=True)
        meta_file.write_text(json.dumps(dict(meta, step=step), indent=1))
      features[(name, task)] = feat_dir
  return features


def baseline_features(out: pathlib.Path, tasks: list[str]) -> dict:
  from pupujepa_jax import baselines
  features = {}
  for task in tasks:
    task_out = out / "baselines" / task
    # Reuses the clips' features of an earlier run; rewrites meta.json in today's layout.
    baselines.extract_task(str(out / "data" / "tasks" / task), str(task_out))
    for feature_set in baselines.FEATURE_SETS:
      features[(f"baseline_{feature_set}", task)] = task_out / feature_set
  return features


def probe_all(out: pathlib.Path, features: dict, seed: int) -> list[dict]:
  from data_pipelines.offline import TASK_INFO
  from pupujepa_jax import probe
  results = []
  for (name, task), feat_dir in sorted(features.items()):
    labels = out / "data" / "tasks" / task / "labels.csv"
    result = probe.probe_features(str(feat_dir), str(labels), TASK_INFO[task].type,
                                  seed=seed, **probe.SMALL_DATA_PROTOCOL)
    results.append(dict(result, model=name, task_name=task))
    _log(f"probe {name:>20s} {task:>12s}: {result['main_metric']} = {result['score']:.3f}")
  (out / "probe_results.json").write_text(json.dumps(results, indent=1, default=float))
  return results


def score_table(results: list[dict]) -> tuple[str, dict]:
  """Markdown table tasks x models of the main test metric, and the verdicts."""
  tasks = sorted({r["task_name"] for r in results})
  names = [n for n in ("pretrained", "random_init")] + sorted(
      {r["model"] for r in results} - set(MODELS))
  score = {(r["model"], r["task_name"]): r["score"] for r in results}
  metric = {r["task_name"]: r["main_metric"] for r in results}
  lines = ["| task | metric | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  verdict = {"beats_random": {}, "beats_best_baseline": {}}
  for task in tasks:
    lines.append(f"| {task} | {metric[task]} | " +
                 " | ".join(f"{score.get((n, task), float('nan')):.3f}" for n in names) + " |")
    best_baseline = max(score[(n, task)] for n in names if n.startswith("baseline_"))
    verdict["beats_random"][task] = score[("pretrained", task)] > score[("random_init", task)]
    verdict["beats_best_baseline"][task] = score[("pretrained", task)] > best_baseline
  return "\n".join(lines), verdict


def draw_pictures(out: pathlib.Path, cfg, model_dirs: dict, results: list[dict]) -> dict:
  import functools

  import jax
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from data_pipelines import audio
  from pupujepa_jax import config as config_lib
  from pupujepa_jax import inference, masking, metrics, viz
  pictures = {}
  records = metrics.read_jsonl(out / "pretrain" / "metrics.jsonl")
  steps = [r["step"] for r in records]
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
  for ax, key, title in zip(axes, ("loss", "teacher_std", "learning_rate"),
                            ("training loss (smooth-L1)", "teacher feature std (collapse alarm)",
                             "learning rate")):
    ax.plot(steps, [r[key] for r in records])
    ax.set_title(title)
    ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out / "curves.png", dpi=90)
  plt.close(fig)
  pictures["curves"] = "curves.png"

  tasks = sorted({r["task_name"] for r in results})
  names = sorted({r["model"] for r in results}, key=lambda n: (n not in MODELS, n))
  score = {(r["model"], r["task_name"]): r["score"] for r in results}
  fig, ax = plt.subplots(figsize=(12, 4))
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    ax.bar(np.arange(len(tasks)) + i * width, [score[(name, t)] for t in tasks], width,
           label=name)
  ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
  ax.set_xticklabels([f"{t}\n({next(r['main_metric'] for r in results if r['task_name'] == t)})"
                      for t in tasks])
  ax.set_ylabel("test score (main metric)")
  ax.legend(fontsize=8, ncol=2)
  ax.set_title("probe scores: pretrained vs random-init vs hand-crafted baselines")
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
  clip = sorted((out / "data" / "tasks" / "instruments" / "audio").glob("*.wav"))[0]
  wave = audio.load_audio(clip, model.sample_rate)
  viz.encoder_attention_png(model, wave, model.sample_rate, out / "attention.png")
  pictures["attention"] = "attention.png"
  return pictures


def write_report(out: pathlib.Path, table: str, verdict: dict, timings: dict,
                 pictures: dict, data_summary: dict, train_metrics: dict) -> str:
  beats_random = all(verdict["beats_random"].values())
  n_baseline = sum(verdict["beats_best_baseline"].values())
  lines = [
      "# PupuJEPA CPU demo report", "",
      "Pretrained on the offline corpus rendered from music21 scores, then probed on five",
      "offline tasks with one protocol (MARBLE-style MLP probe, learned layer weights,",
      "lr grid) for the pretrained teacher, the same architecture with random",
      "weights, and hand-crafted features (log-mel, chroma, MFCC mean/std).", "",
      "## Probe scores (test split, main metric)", "", table, "",
      f"- pretrained beats random-init on every task: **{beats_random}** "
      f"({sum(verdict['beats_random'].values())}/{len(verdict['beats_random'])})",
      f"- pretrained beats the best baseline on {n_baseline} task(s): "
      f"{[t for t, v in verdict['beats_best_baseline'].items() if v]} (target: at least 2)",
      "", f"![probe scores]({pictures['probe_scores']})", "",
      "## Training", "",
      f"Steps trained: {train_metrics.get('step', -1) + 1}; last loss "
      f"{train_metrics.get('loss', float('nan')):.4f}, "
      f"teacher feature std {train_metrics.get('teacher_std', float('nan')):.3f}.", "",
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
        tasks: list[str] | None = None, examples_per_task: int | None = None) -> dict:
  from data_pipelines.offline import TASKS
  out = pathlib.Path(out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  tasks = list(tasks or TASKS)
  timings = {}
  with _stage("offline corpus and probe tasks", timings):
    data_summary = build_data(out, hours, seed, tasks, examples_per_task)
  with _stage("pretraining", timings):
    cfg, _ = pretrain(out, config_arg)
  with _stage("export", timings):
    model_dirs = export_models(out, cfg)
  with _stage("embedding", timings):
    features = embed_tasks(out, model_dirs, tasks)
  with _stage("baseline features", timings):
    features.update(baseline_features(out, tasks))
  with _stage("probing", timings):
    results = probe_all(out, features, seed)
  table, verdict = score_table(results)
  with _stage("pictures", timings):
    pictures = draw_pictures(out, cfg, model_dirs, results)
  from pupujepa_jax import metrics
  train_metrics = metrics.read_jsonl(out / "pretrain" / "metrics.jsonl")[-1]
  write_report(out, table, verdict, timings, pictures, data_summary, train_metrics)
  print(table)
  _log(f"report: {out / 'report.md'}; total {sum(timings.values()):.0f} s")
  return {"table": table, "verdict": verdict, "timings": timings, "results": results}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="demo_out")
  parser.add_argument("--hours", type=float, default=2.0)
  parser.add_argument("--config_arg", default="", help="argument for experiments/demo.py")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  run(args.out, args.hours, args.config_arg, args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
