"""The benchmark scripts still run against the current APIs (their numbers are not
asserted: they are measurements, printed for people to read)."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _step_benchmark():
  """benchmarks/train_step.py as a module (it is a script, not a package)."""
  spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "train_step.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  return bench


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


@pytest.mark.slow
def test_device_check_script_runs_end_to_end_on_cpus(tmp_path):
  """The one-shot GPU script (benchmarks/device_check.sh) is only ever run in a short
  device lease: its plumbing is checked here at smoke size, the cudnn runs falling back."""
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu",
             DEVICE_CHECK_RUNS="tiny:8", DEVICE_CHECK_CONFIG="smoke",
             DEVICE_CHECK_TESTS="-k 410-64-128", DEVICE_CHECK_WHEELS=str(tmp_path / "none"))
  out = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600).stdout
  assert "1 passed" in out, out
  rows = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
  assert [(r["attention"], r.get("failed")) for r in rows] == [("cudnn", None), ("xla", None)]
  assert rows[0]["attention_ran"] == {"encoder": "blockwise", "predictor": "blockwise"}
  assert rows[1]["attention_ran"] == {"encoder": "xla", "predictor": "xla"}
  assert all(r["step_s"] > 0 and r["dtype"] == "bfloat16" for r in rows)
  assert "blockwise/blockwise" in out.splitlines()[-2] and "xla/xla" in out.splitlines()[-1]


def test_fit_batch_halves_until_the_compiled_step_fits():
  """The device check fills a GPU without knowing each model's memory: a real XLA
  compilation whose memory grows with the batch, against a limit the CPU cannot report."""
  import jax
  import jax.numpy as jnp

  bench = _step_benchmark()

  def lower(b):  # b x b float32 temporaries: 4 b^2 bytes
    return jax.jit(lambda x: (x @ x.T).sum()).lower(jax.ShapeDtypeStruct((b, 64), jnp.float32))

  need_64 = bench.fit_batch(64, lower, None, 1)[3]
  assert need_64 >= 4 * 64 * 64
  b, lowered, compiled, needed = bench.fit_batch(256, lower, int(need_64 / 0.95) + 1, 1)
  assert b == 64 and needed == need_64 and lowered.in_avals[0][0].shape == (64, 64)
  assert float(compiled(jnp.ones((64, 64), jnp.float32))) == 64 * 64 * 64
  assert bench.fit_batch(256, lower, 1, 32)[0] == 32  # halves no further than the devices
  assert bench.fit_batch(256, lower, None, 1)[0] == 256


def test_step_timing_counts_the_memory_the_kernel_hands_out_fresh():
  """The step benchmark reports page faults and kernel time per step: what an allocator
  that returns big blocks to the kernel costs (it zeroes every page again on first touch).
  A step that mallocs, fills and frees a block above glibc's largest mmap threshold (as
  XLA:CPU does with its temp buffer) faults on every page; one that refills a kept block
  does not."""
  import ctypes

  bench = _step_benchmark()
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  size, page, no_huge_pages = 64 << 20, 4096, 15  # MADV_NOHUGEPAGE

  def fresh_block():
    block = libc.malloc(size)
    start = -(-block // page) * page  # 4 KiB pages even where THP is "always"
    libc.madvise(start, (block + size - start) // page * page, no_huge_pages)
    ctypes.memset(block, 1, size)
    libc.free(block)

  kept = libc.malloc(size)
  ctypes.memset(kept, 0, size)  # its pages are mapped from here on
  try:
    fresh = bench._timed(fresh_block, lambda x: x, 3)
    reused = bench._timed(lambda: ctypes.memset(kept, 1, size), lambda x: x, 3)
  finally:
    libc.free(kept)
  assert fresh["page_faults_per_step"] >= 0.9 * size / 4096
  assert reused["page_faults_per_step"] < 0.1 * size / 4096
  assert fresh["kernel_cpu_s_per_step"] > reused["kernel_cpu_s_per_step"]


@pytest.mark.slow
def test_side_by_side_preloads_the_block_cache_in_ours_only():
  """`--side_by_side --block_cache` runs ours with the CPU block cache and PyTorch as is
  (each side says which); a malformed `--env` is refused before anything runs."""
  script = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--side_by_side",
            "--config", "experiments/pupujepa.py:smoke", "--steps", "1"]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", XLA_FLAGS="")
  bad = subprocess.run(script + ["--env", "NOVALUE"], capture_output=True, text=True,
                       env=env, timeout=120)
  assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr
  out = subprocess.run(script + ["--block_cache", "--env", "A=1"], capture_output=True,
                       text=True, env=env, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout[out.stdout.index("{"):])
  assert result["block_cache"] and result["env"] == ["A=1"]
  assert result["jax"]["cpu_block_cache"] is True
  assert result["torch"]["cpu_block_cache"] is False
  assert result["step_time_ratio_jax_over_torch"] > 0


def _step_profile():
  """benchmarks/step_profile.py as a module."""
  spec = importlib.util.spec_from_file_location(
      "step_profile", REPO / "benchmarks" / "step_profile.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_step_profile_gives_each_instant_to_the_first_class_running():
  """Overlaps go to the earlier class (matmuls before elementwise), an operation run more
  than once is a loop body, and gaps are `untraced`."""
  profile = _step_profile()
  kinds = {"dot.1": "matmuls", "fusion.2": "elementwise", "fusion.3": "elementwise"}
  second = 1e6  # trace times are in microseconds
  events = [{"name": "dot.1", "ts": 0, "dur": 10 * second},
            {"name": "fusion.2", "ts": 5 * second, "dur": 15 * second},
            {"name": "fusion.3", "ts": 25 * second, "dur": 5 * second},
            {"name": "fusion.3", "ts": 32 * second, "dur": 3 * second}]
  seconds, span = profile.wall_time_by_class(events, kinds)
  assert span == 35
  assert seconds == {"loops": 8, "matmuls": 10, "elementwise": 10, "copies": 0, "other": 0,
                     "untraced": 7}


@pytest.mark.slow
def test_step_profile_accounts_for_the_traced_demo_step():
  """On the demo model the classes add up to the traced span, its blockwise attention
  shows as loops, and the top operations are the compiled step's, with their JAX source."""
  out = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "step_profile.py"),
       "--config", "experiments/cpu_demo.py", "--top", "5"],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env=dict(os.environ, JAX_NUM_CPU_DEVICES="1", XLA_FLAGS=""))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout[out.stdout.index("{"):])
  seconds = result["seconds"]
  assert min(seconds.values()) >= 0
  assert abs(sum(seconds.values()) - result["traced_span_s"]) <= 0.01
  assert seconds["matmuls"] > 0 and seconds["loops"] > 0
  assert 0 < result["traced_span_s"] <= result["step_s"]
  top = result["top_operations"]
  assert len(top) == 5 and all(op["class"] in seconds for op in top)
  assert any(op["source"].startswith("jit(pretrain_step)") for op in top)
