"""Train-step throughput: step time, tokens/s, achieved FLOP/s (and MFU on a known GPU).

Not a test: prints numbers for whatever backend JAX finds. Examples:
  python benchmarks/train_step.py --variant tiny --batch 8            # this CPU
  python benchmarks/train_step.py --variant base --batch 64 --bf16   # a GPU node
FLOPs come from XLA's cost analysis of the compiled step (forward, backward, optimizer,
EMA, masking), so they count what actually runs.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from pupujepa_jax import config as config_lib
from pupujepa_jax import sharding, train_step

# Dense bf16 peak FLOP/s per device, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="tiny")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--crop_frames", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--bf16", action="store_true")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--fsdp", type=int, default=1)
  args = parser.parse_args()

  cfg = config_lib.base_config(args.variant)
  cfg.data.batch_size = args.batch
  cfg.data.crop_frames = args.crop_frames
  cfg.mesh.fsdp = args.fsdp
  cfg.compute_dtype = "bfloat16" if args.bf16 else "float32"
  cfg.remat = args.remat
  cfg.total_steps = 1000
  cfg.optim.warmup_steps = 10
  config_lib.validate(cfg, jax.device_count())
  mesh = sharding.mesh_from_config(cfg)
  state = train_step.create_sharded_state(cfg, mesh)
  step_fn = train_step.make_train_step(cfg, mesh)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({"spectrogram": rng.standard_normal(
      (args.batch, args.crop_frames, cfg.frontend.n_mels)).astype(np.float32)}, mesh)

  start = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / args.steps

  flops = train_step.step_flops(cfg, args.batch)
  tokens = args.batch * int(np.prod(config_lib.grid_shape(cfg)))
  device = jax.devices()[0]
  result = {
      "backend": jax.default_backend(), "device": device.device_kind,
      "devices": jax.device_count(), "variant": args.variant, "batch": args.batch,
      "crop_frames": args.crop_frames, "dtype": cfg.compute_dtype, "remat": args.remat,
      "compile_plus_first_step_s": round(compile_s, 2), "step_s": round(step_s, 4),
      "examples_per_s": round(args.batch / step_s, 2),
      "tokens_per_s": round(tokens / step_s, 1),
      "step_gflop": round(flops / 1e9, 1), "per_example_gflop": round(flops / 1e9 / args.batch, 1),
      "achieved_gflop_per_s": round(flops / step_s / 1e9, 1),
  }
  peak = next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)
  if peak:
    result["mfu"] = round(flops / step_s / (peak * jax.device_count()), 4)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
