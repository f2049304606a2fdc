"""`make demo` end to end at toy size: data, pretraining, export, embedding, baselines,
probes, statistics, report and pictures (the real run is `make demo`; its numbers are in
the README)."""
import json

import jax
import numpy as np
import pytest

from data_pipelines.offline import TASK_INFO
from pupujepa_jax import demo, evaluation, export, labels, metrics, models, probe
from pupujepa_jax import train_step
from pupujepa_jax import workdir as workdir_lib

TASKS = ["chord", "instruments", "tempo"]
# 40 clips per task: 14 test clips, so bootstrap intervals have something to resample.
EXAMPLES = 40
NAMES = ("pretrained", "random_init", "baseline_logmel", "baseline_chroma", "baseline_mfcc")


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path):
  out = tmp_path / "demo"
  result = demo.run(out, hours=0.01, config_arg="steps=4,batch=8", tasks=TASKS,
                    examples_per_task=EXAMPLES, n_boot=200)
  results = result["results"]
  assert set(results["tasks"]) == set(TASKS)
  for task in TASKS:
    for name in NAMES:
      for protocol in demo.PROTOCOLS:
        assert set(results["models"][name][task][protocol]) == set(demo.LAYER_KINDS)
  _assert_statistics_are_consistent(out, results)
  _assert_report(out, results)
  for picture in ("curves.png", "probe_scores.png", "masks.png", "attention.png"):
    assert (out / picture).stat().st_size > 10_000, picture
  meta = json.loads((out / "features" / "pretrained" / "tempo" / "meta.json").read_text())
  # 4 blocks: the patch embedding, 4 block outputs and the final (normed) output.
  assert meta["step"] == 4 and meta["L"] == 4
  assert meta["layer_names"] == ["patch_embed", "block_0", "block_1", "block_2", "block_3",
                                 "final"]
  _assert_training_did_something(out)
  # A second run reuses data, checkpoint, exports and features (none of their files is
  # written again), and scores the same.
  reused = _file_stamps(out, ("data", "pretrain/checkpoints", "models", "features"))
  again = demo.run(out, hours=0.01, config_arg="steps=4,batch=8", tasks=TASKS,
                   examples_per_task=EXAMPLES, n_boot=200)
  assert _file_stamps(out, ("data", "pretrain/checkpoints", "models", "features")) == reused
  assert again["results"] == results


def _file_stamps(out, folders):
  """{path: (size, mtime_ns)} of every file under `folders` of `out`."""
  return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for folder in folders
          for f in sorted((out / folder).rglob("*")) if f.is_file()}


def _assert_statistics_are_consistent(out, results):
  """The report's numbers against independent recomputations from the saved outputs."""
  saved = json.loads((out / "probe_results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  outputs = np.load(out / "test_outputs.npz")
  for task, info in results["tasks"].items():
    assert info["n_clips"]["test"] == 14 and info["seeds"] == [0, 1, 2]
    task_type = TASK_INFO[task].type
    targets = _test_targets(out, task)
    for name in NAMES:
      for protocol in demo.PROTOCOLS:
        for kind, entry in results["models"][name][task][protocol].items():
          seeds = outputs[f"{name}/{task}/{protocol}/{kind}"]
          assert seeds.shape[:2] == (3, 14)
          # Per-seed scores are the probe's own (scikit-learn) metrics of the outputs.
          want = [probe.metrics_for(task_type, o, targets, TASK_INFO[task].classes)[
              info["metric"]] for o in seeds]
          np.testing.assert_allclose(entry["seeds"], want, atol=1e-9)
          assert entry["mean"] == pytest.approx(np.mean(want))
          assert entry["std"] == pytest.approx(np.std(want, ddof=1))
          lo, hi = entry["ci"]
          assert lo <= hi and entry["level"] == 0.95 and entry["n_boot"] == 200
          if task_type == "multiclass":  # A mean's percentile interval holds the mean.
            assert lo <= entry["mean"] <= hi
    assert info["chance"] == {"chord": 0.25, "instruments": 0.5, "tempo": 0.0}[task]
    for key, verdicts in info["verdicts"].items():
      protocol, kind = key.split("/")
      for other, cmp in verdicts.items():
        other_name = cmp.get("name", other)
        a = results["models"]["pretrained"][task][protocol][kind]["mean"]
        b = results["models"][other_name][task][protocol][
            kind if other == "random_init" else "final"]["mean"]
        assert cmp["diff"] == pytest.approx(a - b)
        lo, hi = cmp["ci"]
        assert cmp["verdict"] == ("a" if lo > 1e-9 else "b" if hi < -1e-9 else "tie")
    for protocol, name in info["best_baseline"].items():
      # Chosen on validation, never on test.
      valid = {n: results["models"][n][task][protocol]["final"]["valid"]
               for n in NAMES if n.startswith("baseline_")}
      assert name == max(valid, key=valid.get)


def _test_targets(out, task):
  rows = labels.read_labels_csv(out / "data" / "tasks" / task / "labels.csv")
  encoded, _ = probe.encode_targets(TASK_INFO[task].type, {
      split: [r.label for r in rows if r.split == split] for split in ("train", "test")})
  return encoded["test"]


def _assert_report(out, results):
  report = (out / "report.md").read_text()
  for heading in ("## Tasks and their difficulty", "### Linear probe",
                  "### MARBLE MLP probe", "## Verdicts (paired bootstrap, 95%)",
                  "## Ablations of pretraining runs", "## Training", "## Time per stage (s)"):
    assert heading in report, heading
  assert demo.ABLATION_MARK in report and "No ablation runs were passed" in report
  entry = results["models"]["pretrained"]["chord"]["linear"]["final"]
  assert f"| chord | accuracy | 0.250 | {evaluation.format_score(entry)} |" in report
  counts = demo.verdict_counts(results)
  c = counts["linear/final"]["random_init"]
  assert sum(c.values()) == len(TASKS)
  assert (f"pretrained beats random-init on **{c['a']}/{len(TASKS)}** tasks "
          f"(ties {c['tie']}, losses {c['b']})") in report
  # The lead's ablation table: rows from finished runs, in the per-model format.
  runs = [demo.ablation_run(out, "reference", "-"),
          dict(demo.ablation_run(out, "no curriculum", "mask curriculum off"),
               scores={"chord": results["models"]["random_init"]["chord"]})]
  table = demo.ablation_table(runs, "mlp", "best")
  lines = table.splitlines()
  assert lines[0] == ("| run | change | chord | instruments | tempo | "
                      "beats random-init / best baseline |")
  best = results["models"]["random_init"]["chord"]["mlp"]["best"]
  wins = counts["mlp/best"]
  assert lines[3] == (f"| no curriculum | mask curriculum off | "
                      f"{evaluation.format_score(best)} ({best['layer_name']}) | - | - | "
                      f"{wins['random_init']['a']}/3 / {wins['best_baseline']['a']}/3 |")
  saved = out / "ablations.json"
  saved.write_text(json.dumps(runs))
  assert demo.read_ablations(saved) == json.loads(json.dumps(runs))
  saved.write_text(json.dumps([{"name": "x"}]))
  with pytest.raises(ValueError, match="ablations.json: expected a list of runs"):
    demo.read_ablations(saved)
  text = demo.write_report(out, results, {"probes": 1.0}, {
      "probe_scores": "p.png", "curves": "c.png", "masks": "m.png", "attention": "a.png"},
      {}, {}, ablations=runs)
  assert demo.ablation_table(runs, "linear", "final") in text


def _max_change(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_training_did_something(out):
  """Values that would not change if training did nothing (no update, no EMA)."""
  # The loss fell. Measured: 0.622, 0.623, 0.481, 0.432 (step 0 runs at lr 0, so steps 0
  # and 1 use the same params on different batches: batch noise ~0.2%).
  records = metrics.read_jsonl(out / "pretrain" / "metrics.jsonl")
  assert [r["step"] for r in records] == [0, 1, 2, 3]
  losses = [r["loss"] for r in records]
  assert losses[-1] < 0.85 * losses[0], losses
  # The curves the report draws are logged at every step.
  for key in ("student_std", "teacher_std", "teacher_rank", "prediction_cosine"):
    assert all(np.isfinite(r[key]) for r in records), key
  # The exported encoder is not the one training started from (same config, same seed):
  # the shared patch embedding took Adam steps of ~lr each (measured max change 3.1e-3,
  # the logged learning rates sum to 3.0e-3), the teacher moved by its EMA share of the
  # student's steps (1 - m = 0.004: measured 1.3e-5).
  cfg, _ = workdir_lib.read_config(out / "pretrain")
  init = jax.device_get(train_step.init_state(cfg))
  start = models.encoder_params(init["params"], init["teacher"])
  exported = export.read_model_dir(out / "models" / "pretrained").params
  lr_sum = sum(r["learning_rate"] for r in records)
  patch_move = _max_change(exported["patch_embed"], start["patch_embed"])
  teacher_move = _max_change({k: exported[k] for k in ("blocks", "norm")},
                             {k: start[k] for k in ("blocks", "norm")})
  assert patch_move > 0.3 * lr_sum, (patch_move, lr_sum)
  assert 1e-6 < teacher_move < 0.05 * patch_move, (teacher_move, patch_move)
  # Pretrained and random-init features of the same clips differ (measured: mean
  # absolute difference 0.93 against a mean absolute feature of 0.68).
  for task in ("tempo",):
    folders = [out / "features" / name / task for name in ("pretrained", "random_init")]
    metas = [json.loads((f / "meta.json").read_text()) for f in folders]
    assert metas[0]["files"] == metas[1]["files"] and metas[0]["files"]
    relpath = metas[0]["files"][0]
    pre, rnd = (np.load(f / (relpath + ".npy")) for f in folders)
    assert pre.shape == rnd.shape
    assert np.abs(pre - rnd).mean() > 0.1 * np.abs(pre).mean()


def test_the_knn_monitor_sees_train_and_valid_clips_never_test(tmp_path):
  """make demo's monitor set: the monitor task's train and valid rows, paths that resolve
  from the csv's folder, and the config that turns the monitor on."""
  from pupujepa_jax import config as config_lib
  task_dir = tmp_path / "data" / "tasks" / demo.MONITOR_TASK
  rows = [(f"audio/{i}.wav", "C", split) for i, split in enumerate(labels.SPLITS * 2)]
  for path, _, _ in rows:
    (task_dir / path).parent.mkdir(parents=True, exist_ok=True)
    (task_dir / path).write_bytes(b"")
  labels.write_labels_csv(rows, task_dir / labels.LABELS_FILE)
  csv = demo.monitor_labels(tmp_path, [demo.MONITOR_TASK])
  got = labels.read_labels_csv(csv)
  assert sorted(r.split for r in got) == ["train", "train", "valid", "valid"]
  assert all((csv.parent / r.path).is_file() for r in got)
  assert demo.monitor_labels(tmp_path, ["chord"]) is None
  cfg = config_lib.load_config(f"experiments/cpu_demo.py:data=x,monitor={csv},monitor_every=7")
  assert (cfg.monitor.labels, cfg.monitor.every) == (str(csv), 7)
  assert config_lib.load_config("experiments/cpu_demo.py:data=x").monitor.every == 0


def test_a_metric_logged_on_some_steps_is_drawn_through_its_own_points():
  """The kNN monitor logs every N steps: its curve joins those points (NaN gaps between
  them would draw nothing)."""
  records = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)]
  records[1]["knn_accuracy"], records[4]["knn_accuracy"] = 0.2, 0.3
  assert demo.curve_points(records, "knn_accuracy") == [(1, 0.2), (4, 0.3)]
  assert len(demo.curve_points(records, "loss")) == 5
  assert demo.curve_points(records, "absent") == []
