"""`make demo` end to end at toy size: data, pretraining, export, embedding, baselines,
probes, report and pictures (the real run is `make demo`; its numbers are in the README)."""
import json

import jax
import numpy as np
import pytest

from pupujepa_jax import demo, export, metrics, models, train_step
from pupujepa_jax import workdir as workdir_lib

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
  _assert_training_did_something(out)
  # A second run reuses data, checkpoint, exports and features.
  again = demo.run(out, hours=0.01, config_arg="steps=4,batch=8", tasks=TASKS,
                   examples_per_task=20)
  assert again["timings"]["pretraining"] < result["timings"]["pretraining"]
  assert again["timings"]["embedding"] < 0.5 * result["timings"]["embedding"] + 1


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
