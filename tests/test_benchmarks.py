"""The benchmark scripts still run against the current APIs (their numbers are not
asserted: they are measurements, printed for people to read)."""
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_input_pipeline_benchmark_reports_cold_and_cached_reads():
  out = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "input_pipeline.py"), "--records", "3",
       "--track_seconds", "2", "--crop_frames", "64", "--batch_size", "2", "--batches", "2",
       "--workers", "0,1", "--cache_mb", "8", "--frontend_repeats", "1",
       "--step_seconds", "1.5"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  results = json.loads(out.strip().splitlines()[-1])
  rows = {(r["workers"], r["cache_mb"]): r for r in results["pipeline"]}
  assert set(rows) == {(0, 0), (0, 8), (1, 0), (1, 8)}
  assert all(r["crops_per_s"] > 0 for r in rows.values())
  assert results["train_step"]["consumes_crops_per_s"] == 2 / 1.5
