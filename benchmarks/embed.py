"""Embedding throughput: seconds of audio embedded per second (front-end + teacher + readout).

Not a test. Runs the `inference.Model` path that `pupujepa embed` uses (jitted log-mel
front-end, encoder with all layers, freqcat readout, batches split over local devices) on
random 24 kHz windows with randomly initialised weights, after one warm-up batch.

  python benchmarks/embed.py --variant tiny --batch 8 --batches 5
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from pupujepa_jax import config as config_lib
from pupujepa_jax import inference, models


def run(variant: str, batch: int, batches: int, readout: str, crop_frames: int) -> dict:
  cfg = config_lib.base_config(variant)
  cfg.model.crop_frames = crop_frames
  spec = config_lib.serving_spec(cfg)
  params = jax.jit(lambda k: models.init_encoder(spec.architecture, spec.frontend.n_mels, k))(
      jax.random.key(0))
  model = inference.Model(spec, params, model_id=f"{variant}-random", batch_size=batch)
  windows = np.random.default_rng(0).standard_normal(
      (model.batch_size * batches, model.window_samples)).astype(np.float32)
  start = time.perf_counter()
  model.embed_windows(windows[:model.batch_size], readout)  # compile + first batch
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  feats = model.embed_windows(windows, readout)
  elapsed = time.perf_counter() - start
  audio_s = windows.shape[0] * model.window_seconds
  return {"variant": variant, "backend": jax.default_backend(),
          "devices": jax.local_device_count(), "device_kind": jax.devices()[0].device_kind,
          "batch": model.batch_size, "windows": int(windows.shape[0]),
          "window_seconds": model.window_seconds, "readout": readout,
          "feature_shape": list(feats.shape), "compile_and_first_batch_s": round(compile_s, 2),
          "seconds": round(elapsed, 3),
          "audio_seconds_per_second": round(audio_s / elapsed, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="tiny", choices=sorted(config_lib.VARIANTS))
  parser.add_argument("--batch", type=int, default=8, help="windows per batch")
  parser.add_argument("--batches", type=int, default=5, help="timed batches")
  parser.add_argument("--readout", default="freqcat", choices=inference.READOUTS)
  parser.add_argument("--crop_frames", type=int, default=1024, help="window (1024 = 10.24 s)")
  args = parser.parse_args()
  print(json.dumps(run(args.variant, args.batch, args.batches, args.readout,
                       args.crop_frames), indent=2))


if __name__ == "__main__":
  main()
