"""Input pipeline throughput vs the train step's consumption (a benchmark, not a test).

Measures, on this machine:
  1. the NumPy front-end (`log_mel_np`) per crop vs `librosa.feature.melspectrogram` on the
     same crop;
  2. pipeline crops/s with 0, 1 and 2 Grain worker processes (10.24 s crops at 24 kHz,
     from a synthetic ArrayRecord dataset of int16 tracks, or --data_dir), reading every
     record from disk (`data.cache_mb=0`) and through the workers' record cache (timed
     after three passes over the dataset per worker: nearly every read is a hit);
  3. the train step's consumption (crops/s) for the tiny variant at the same batch size,
     measured with pupujepa_jax.train_step on audio batches (the step runs the front-end),
     or given with --step_seconds, and the ratio;
  4. with --end_to_end_steps N > 0: seconds per step fed by the pipeline (2 workers, the
     record cache on) vs on a fixed batch (the pipeline shares the CPU with the step;
     this is the real bottleneck test).

    .venv/bin/python benchmarks/input_pipeline.py [--step_seconds 15] [--end_to_end_steps 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

from data_pipelines import dataset_format
from data_pipelines import pipeline
from pupujepa_jax import config as config_lib
from pupujepa_jax import frontend as frontend_lib


def _median_seconds(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def frontend_times(crop_frames: int, repeats: int) -> dict:
  """Median seconds per crop: log_mel_np vs librosa's melspectrogram (magnitude, Slaney)."""
  import librosa
  import threadpoolctl
  fe = frontend_lib.DEFAULT
  crop = (0.1 * np.random.default_rng(0).standard_normal(
      fe.samples_for_frames(crop_frames))).astype(np.float32)

  def ours():
    frontend_lib.log_mel_np(crop, fe)

  def theirs():
    librosa.feature.melspectrogram(y=crop, sr=fe.sample_rate, n_fft=fe.n_fft,
                                   hop_length=fe.hop, n_mels=fe.n_mels, fmin=fe.f_min,
                                   fmax=fe.f_max, power=1.0)

  out = {"log_mel_np_ms": 1e3 * _median_seconds(ours, repeats),
         "librosa_melspectrogram_ms": 1e3 * _median_seconds(theirs, repeats)}
  # As in the Grain workers (one BLAS thread each).
  with threadpoolctl.threadpool_limits(1):
    out["log_mel_np_ms_1_blas_thread"] = 1e3 * _median_seconds(ours, repeats)
    out["librosa_melspectrogram_ms_1_blas_thread"] = 1e3 * _median_seconds(theirs, repeats)
  return out


def synthetic_dataset(data_dir, records: int, seconds: float) -> str:
  rng = np.random.default_rng(0)
  rate = frontend_lib.SAMPLE_RATE

  def examples():
    for i in range(records):
      wave = 0.1 * rng.standard_normal(int(seconds * rate)).astype(np.float32)
      yield f"{i:05d}", {"audio": dataset_format.to_int16(wave), "path": f"noise{i}.wav",
                         "duration": seconds}

  dataset_format.build_array_record_dataset("bench_noise", data_dir, dataset_format.audio_features(),
                                        {"train": examples}, metadata={"sample_rate": rate})
  return str(data_dir)


def bench_data_cfg(path: str, batch_size: int, num_workers: int, cache_mb: int):
  data = config_lib.base_config().data
  data.update(source="tfds", path=path, batch_size=batch_size, num_workers=num_workers,
              prefetch_buffer=2, cache_mb=cache_mb)
  return data


def pipeline_rate(data_cfg, crop_frames: int, batches: int, warm_batches: int) -> dict:
  """Crops/s of the pipeline after `warm_batches` (worker start-up reported apart)."""
  start = time.perf_counter()
  it = pipeline.make_pretrain_iterator(data_cfg, frontend_lib.DEFAULT, crop_frames, seed=0,
                                       process_index=0, process_count=1)
  try:
    for _ in range(warm_batches):
      next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return {"workers": data_cfg.num_workers, "cache_mb": data_cfg.cache_mb,
          "warm_up_s": first, "crops_per_s": batches * data_cfg.batch_size / seconds}


def train_step_seconds(batch_size: int, crop_frames: int, steps: int, data_cfg=None) -> dict:
  """Seconds per tiny train step on a fixed audio batch (and, with data_cfg, fed by the
  pipeline)."""
  import jax
  from pupujepa_jax import sharding, train_step
  cfg = config_lib.base_config("tiny")
  cfg.data.batch_size = batch_size
  cfg.model.crop_frames = crop_frames
  mesh = sharding.make_mesh(jax.device_count(), 1)
  step = train_step.make_train_step(cfg, mesh)
  state = train_step.create_sharded_state(cfg, mesh)
  samples = frontend_lib.DEFAULT.samples_for_frames(crop_frames)
  local = {"audio": (0.1 * np.random.default_rng(0).standard_normal(
      (batch_size, samples))).astype(np.float32)}
  batch = sharding.global_batch(local, mesh)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  out = {"compile_and_first_step_s": time.perf_counter() - start}
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  out["step_s_fixed_batch"] = (time.perf_counter() - start) / steps
  if data_cfg is not None:
    it = pipeline.make_pretrain_iterator(data_cfg, frontend_lib.DEFAULT, crop_frames, seed=0,
                                         process_index=0, process_count=1)
    try:
      state, metrics = step(state, sharding.global_batch(next(it), mesh))  # workers start
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = step(state, sharding.global_batch(next(it), mesh))
      jax.block_until_ready(metrics)
      out["step_s_fed_by_pipeline"] = (time.perf_counter() - start) / steps
    finally:
      it.close()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default="", help="TFDS dataset dir (default: synthetic)")
  parser.add_argument("--records", type=int, default=16)
  parser.add_argument("--track_seconds", type=float, default=30.0)
  parser.add_argument("--crop_frames", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=6, help="timed batches per worker count")
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--cache_mb", type=int, default=config_lib.base_config().data.cache_mb,
                      help="the record cache of the cached runs (the uncached use 0)")
  parser.add_argument("--frontend_repeats", type=int, default=20)
  parser.add_argument("--step_seconds", type=float, default=0.0,
                      help="seconds per tiny train step; 0 measures it (compiles the step)")
  parser.add_argument("--steps", type=int, default=2, help="timed train steps")
  parser.add_argument("--end_to_end_steps", type=int, default=0,
                      help="also time this many steps fed by the pipeline (2 workers)")
  args = parser.parse_args()

  results = {"frontend": frontend_times(args.crop_frames, args.frontend_repeats)}
  fe = results["frontend"]
  print(f"front-end per {args.crop_frames}-frame crop: log_mel_np {fe['log_mel_np_ms']:.1f} ms "
        f"({fe['log_mel_np_ms_1_blas_thread']:.1f} ms with 1 BLAS thread), librosa "
        f"melspectrogram {fe['librosa_melspectrogram_ms']:.1f} ms "
        f"({fe['librosa_melspectrogram_ms_1_blas_thread']:.1f} ms)", flush=True)

  with tempfile.TemporaryDirectory() as tmp:
    path = args.data_dir or synthetic_dataset(tmp, args.records, args.track_seconds)
    results["pipeline"] = []
    # Each worker has its own cache and sees every worker_count-th batch; three passes
    # per worker leave few records it has not read.
    one_pass = -(-args.records // args.batch_size)
    for workers in (int(w) for w in args.workers.split(",")):
      for cache_mb in (0, args.cache_mb):
        warm_up = 1 + 3 * one_pass * max(1, workers) * (cache_mb > 0)
        r = pipeline_rate(bench_data_cfg(path, args.batch_size, workers, cache_mb),
                          args.crop_frames, args.batches, warm_up)
        results["pipeline"].append(r)
        print(f"pipeline, {workers} workers, cache {cache_mb} MiB: {r['crops_per_s']:.1f} "
              f"crops/s (after {r['warm_up_s']:.1f} s of start-up)", flush=True)

    if args.step_seconds:
      results["train_step"] = {"step_s_fixed_batch": args.step_seconds, "given": True}
    else:
      e2e_cfg = (bench_data_cfg(path, args.batch_size, 2, args.cache_mb)
                 if args.end_to_end_steps else None)
      results["train_step"] = train_step_seconds(args.batch_size, args.crop_frames,
                                                 max(args.steps, args.end_to_end_steps),
                                                 e2e_cfg)
  step_s = results["train_step"]["step_s_fixed_batch"]
  consumption = args.batch_size / step_s
  results["train_step"]["consumes_crops_per_s"] = consumption
  print(f"tiny train step, batch {args.batch_size}: {step_s:.2f} s/step = "
        f"{consumption:.2f} crops/s"
        + (" (given)" if args.step_seconds else ""))
  for r in results["pipeline"]:
    r["ratio_to_train_step"] = r["crops_per_s"] / consumption
    print(f"  {r['workers']} workers, cache {r['cache_mb']} MiB: pipeline / train step = "
          f"{r['ratio_to_train_step']:.1f}x")
  if "step_s_fed_by_pipeline" in results["train_step"]:
    print(f"step fed by the pipeline (2 workers): "
          f"{results['train_step']['step_s_fed_by_pipeline']:.2f} s vs {step_s:.2f} s "
          "on a fixed batch")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
