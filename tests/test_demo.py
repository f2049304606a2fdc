"""`make demo` end to end at toy size: data, pretraining, export, embedding, baselines,
probes, report and pictures (the real run is `make demo`; its numbers are in the README)."""
import json

import pytest

from pupujepa_jax import demo

TASKS = ["chord", "instruments", "tempo"]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path):
  out = tmp_path / "demo"
  result = demo.run(out, hours=0.01, config_arg="steps=4,batch=8", tasks=TASKS,
                    examples_per_task=20)
  rows = {(r["model"], r["task_name"]) for r in result["results"]}
  for task in TASKS:
    for model in ("pretrained", "random_init", "baseline_logmel", "baseline_chroma",
                  "baseline_mfcc"):
      assert (model, task) in rows
  assert set(result["verdict"]["beats_random"]) == set(TASKS)
  report = (out / "report.md").read_text()
  assert "| instruments | roc_auc |" in report
  for picture in ("curves.png", "probe_scores.png", "masks.png", "attention.png"):
    assert (out / picture).stat().st_size > 10_000, picture
  meta = json.loads((out / "features" / "pretrained" / "tempo" / "meta.json").read_text())
  assert meta["step"] == 4 and meta["L"] == 4  # 4 blocks: L + 1 = 5 layers
  # A second run reuses data, checkpoint, exports and features.
  again = demo.run(out, hours=0.01, config_arg="steps=4,batch=8", tasks=TASKS,
                   examples_per_task=20)
  assert again["timings"]["pretraining"] < result["timings"]["pretraining"]
  assert again["timings"]["embedding"] < 0.5 * result["timings"]["embedding"] + 1
