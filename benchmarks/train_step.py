"""Train-step throughput: step time, peak memory, FLOP/s and MFU, optionally side by side
with the same step in PyTorch.

Not a test: prints numbers for whatever backend JAX finds.

  python benchmarks/train_step.py                                   # released tiny, batch 8
  python benchmarks/train_step.py --side_by_side                    # ... and PyTorch's step
  python benchmarks/train_step.py --config experiments/cpu_demo.py --side_by_side
  python benchmarks/train_step.py --config experiments/pupujepa.py:variant=base,batch=64,bf16
  python benchmarks/train_step.py --config experiments/cpu_demo.py --side_by_side \
      --block_cache                       # ours with the CPU block cache, as it trains

`--side_by_side` runs each side in its own process, one after the other (so each peak
RSS is its own): ours (`train_step.pretrain_step`, jitted) and PyTorch's (the
release-built reference of tests/release_reference.py: timm EvaBlocks with fused SDPA
attention, our smooth-L1 loss, AdamW, EMA), on the same spectrogram shapes, then prints
the ratio. `--env KEY=VALUE` sets a variable in both sides' processes from their start
(settings read once at process start, such as glibc's malloc tunables); `--block_cache`
preloads `pupujepa_jax/native/block_cache.c` in ours, as `pupujepa train` and the demo
run on CPUs (`pupujepa_jax.block_cache`), and leaves PyTorch's side as its users run it.
Ours returns the compiler's freed heap to the kernel before its first step, as the
trainer does (`block_cache.release_freed_heap`). Each side also reports its kernel CPU
time and minor page faults per step, and whether the block cache was preloaded. FLOPs are analytic
(`pupujepa_jax.models.flops`: the matmuls and attention that a step needs, no
recomputation), so MFU measures useful work; XLA's own count is printed beside it (it
counts each while-loop body once: the scanned blocks and the blockwise attention loops
are undercounted, which is why MFU does not use it).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pupujepa_jax import block_cache, xla_flags  # noqa: E402  (before JAX starts)

xla_flags.apply()
block_cache.configure_jax()  # as `pupujepa train` runs where the block cache is preloaded

# Dense peak FLOP/s per device by compute dtype (vendor datasheets; bf16 = tensor cores,
# float32 = TF32 tensor cores on NVIDIA, which XLA uses for f32 matmuls by default).
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float32": 60e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}


def peak_flops(device_kind: str, dtype: str):
  """Peak FLOP/s of one device of this kind, or None when unknown (CPUs)."""
  for name, peaks in PEAK_FLOPS.items():
    if name in device_kind:
      return peaks[dtype]
  return None


def load_config(spec: str, overrides: list[str]):
  from pupujepa_jax import config as config_lib
  cfg = config_lib.apply_overrides(config_lib.load_config(str(REPO / spec)), overrides)
  cfg.total_steps = max(cfg.total_steps, 1000)
  cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, 10)  # a real, non-zero step
  return cfg


def analytic_flops(cfg) -> dict:
  from pupujepa_jax import config as config_lib, masking
  from pupujepa_jax.models import flops
  grid = config_lib.grid_shape(cfg)
  return flops.train_step_flops(config_lib.architecture(cfg), config_lib.predictor_size(cfg),
                                grid, masking.num_targets(grid, cfg.mask.ratio),
                                cfg.data.batch_size, cfg.teacher_mode)


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)


def _cpu_seconds() -> float:
  """CPU time of this process (all threads): less sensitive than wall time to other
  processes competing for the cores of a shared machine."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _timed(step, sync, steps: int) -> dict:
  """Best and median wall time of `steps` steps, their least CPU time, and the kernel's
  share of the CPU time with the minor page faults per step (memory the allocator got
  fresh from the kernel, which zeroes every page on first touch)."""
  wall, cpu = [], []
  before = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    sync(step())
    wall.append(time.perf_counter() - start)
    cpu.append(_cpu_seconds() - start_cpu)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {"step_s": round(min(wall), 4), "step_s_median": round(sorted(wall)[len(wall) // 2], 4),
          "cpu_s_per_step": round(min(cpu), 2),
          "kernel_cpu_s_per_step": round((after.ru_stime - before.ru_stime) / steps, 3),
          "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / steps),
          "cpu_block_cache": block_cache.active()}


def attention_kernels_run(cfg) -> dict:
  """The kernel the encoder's and the predictor's attention run on this backend (the
  config's `attention` may fall back, e.g. cudnn for float32 or a head dim over 128)."""
  import jax
  from pupujepa_jax import config as config_lib, models
  from pupujepa_jax.models import attention
  arch, runtime = config_lib.architecture(cfg), config_lib.runtime(cfg)
  specs = {"encoder": models.block_spec(arch, runtime),
           "predictor": models.block_spec(arch, runtime, config_lib.predictor_size(cfg))}
  return {part: attention.resolve_kernel(spec.attention, jax.default_backend(),
                                         cfg.compute_dtype, spec.head_dim)[0]
          for part, spec in specs.items()}


def fit_batch(batch: int, lower, limit: int | None, multiple: int, fraction: float = 0.95):
  """(batch, lowered step, compiled step, bytes it needs): `batch`, halved while XLA's
  memory analysis of the compiled step exceeds `fraction` of `limit` bytes (an
  accelerator's memory; None on CPUs, which report none: the batch stays) and the half is
  still a multiple of `multiple` (the devices). `lower(b)` lowers the step for batch b."""
  while True:
    lowered = lower(batch)
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    needed = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
              - m.alias_size_in_bytes)  # donated inputs are written in place
    if not limit or needed <= fraction * limit or batch % (2 * multiple):
      return batch, lowered, compiled, needed
    print(f"batch {batch}: the step needs {needed / 2**30:.1f} GiB of the device's "
          f"{limit / 2**30:.1f} GiB; halving", file=sys.stderr)
    batch //= 2


def compile_step(cfg, mesh, state, inputs: str = "spectrogram"):
  """The jitted train step compiled for `cfg` at the largest batch up to cfg's that fits
  the device (cfg.data.batch_size is set to it), and a random batch to run it on; the
  compiler's freed heap is returned before it runs, as the trainer does.
  -> (batch, lowered, compiled, bytes the step needs)."""
  import jax
  import numpy as np

  from pupujepa_jax import config as config_lib, sharding, train_step
  step_fn = train_step.make_train_step(cfg, mesh)
  if inputs == "audio":
    example = (config_lib.frontend(cfg).samples_for_frames(cfg.model.crop_frames),)
  else:
    example = (cfg.model.crop_frames, cfg.frontend.n_mels)
  key = "audio" if inputs == "audio" else "spectrogram"
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  b, lowered, compiled, needed = fit_batch(cfg.data.batch_size, lambda b: step_fn.lower(
      state, {key: jax.ShapeDtypeStruct((b, *example), np.float32)}), limit,
      jax.device_count())
  cfg.data.batch_size = b  # the FLOPs and examples/s reported are per this batch
  block_cache.release_freed_heap()
  scale = 0.1 if inputs == "audio" else 1.0
  local = {key: (scale * np.random.default_rng(0).standard_normal((b, *example))
                 ).astype(np.float32)}
  return sharding.global_batch(local, mesh), lowered, compiled, needed


def run_jax(cfg, steps: int, inputs: str) -> dict:
  import jax

  from pupujepa_jax import config as config_lib, sharding, train_step
  config_lib.validate(cfg, jax.device_count())
  mesh = sharding.mesh_from_config(cfg)
  state = train_step.create_sharded_state(cfg, mesh)
  requested = cfg.data.batch_size
  start = time.perf_counter()
  batch, lowered, compiled, needed = compile_step(cfg, mesh, state, inputs)
  b = cfg.data.batch_size
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  xla_flops = train_step.lowered_flops(lowered)  # the step that ran, not a second lowering

  def step():
    nonlocal state, metrics
    state, metrics = compiled(state, batch)
    return metrics

  timing = _timed(step, jax.block_until_ready, steps)
  device = jax.devices()[0]
  memory = device.memory_stats() or {}  # accelerators report their peak; CPUs do not
  return {"side": "jax", "backend": jax.default_backend(), "device": device.device_kind,
          "devices": jax.device_count(), "attention": cfg.attention,
          "attention_ran": attention_kernels_run(cfg), "remat": cfg.remat,
          "dtype": cfg.compute_dtype, "inputs": inputs, "batch": b,
          "requested_batch": requested, "xla_step_memory_gb": round(needed / 1e9, 2),
          "compile_plus_first_step_s": round(first, 2), **timing,
          "xla_counted_gflop": round(xla_flops / 1e9, 1),
          "loss": float(metrics["loss"]), "peak_rss_gb": round(_peak_rss_gb(), 2),
          "peak_device_gb": round(memory.get("peak_bytes_in_use", 0) / 1e9, 2) or None}


def run_torch(cfg, steps: int) -> dict:
  import numpy as np
  import torch
  import torch.nn.functional as F

  from pupujepa_jax import config as config_lib, masking, optim
  from tests import release_reference
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  m, p = cfg.model, cfg.predictor
  model = release_reference.PupuJEPA(m.width, m.depth, m.num_heads, p.width, p.depth,
                                     p.num_heads, (m.patch_time, m.patch_freq))
  trained = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
  decay = [q for n, q in trained if q.ndim >= 2 and "mask_token" not in n]
  rest = [q for n, q in trained if not (q.ndim >= 2 and "mask_token" not in n)]
  lr = float(optim.learning_rate(cfg)(10))
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.04},
                           {"params": rest, "weight_decay": 0.0}], lr=lr,
                          betas=(cfg.optim.b1, cfg.optim.b2))
  grid = config_lib.grid_shape(cfg)
  n_tokens, n_targets = grid[0] * grid[1], masking.num_targets(grid, cfg.mask.ratio)
  b = cfg.data.batch_size
  x = torch.randn(b, 1, m.crop_frames, cfg.frontend.n_mels)

  def step():
    order = torch.argsort(torch.rand(b, n_tokens), dim=1)
    context, target = order[:, :n_tokens - n_targets], order[:, n_tokens - n_targets:]
    pred, tgt = model(x, context, target)
    loss = F.smooth_l1_loss(pred, F.layer_norm(tgt, tgt.shape[-1:]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(list(model.teacher.parameters()), list(model.student.parameters()),
                           0.004)
    return float(loss.detach())

  start = time.perf_counter()
  loss = step()
  first = time.perf_counter() - start
  timing = _timed(step, lambda x: x, steps)
  return {"side": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "first_step_s": round(first, 2), **timing, "loss": loss,
          "peak_rss_gb": round(_peak_rss_gb(), 2)}


def with_flops(result: dict, cfg) -> dict:
  flops = analytic_flops(cfg)
  result["analytic_gflop_per_step"] = round(flops["step"] / 1e9, 1)
  result["attention_share_of_flops"] = round(flops["attention_share"], 3)
  result["achieved_gflop_per_s"] = round(flops["step"] / result["step_s"] / 1e9, 1)
  result["examples_per_s"] = round(cfg.data.batch_size / result["step_s"], 2)
  if result["side"] == "jax":
    peak = peak_flops(result["device"], cfg.compute_dtype)
    if peak:
      result["mfu"] = round(flops["step"] / result["step_s"] / (peak * result["devices"]), 4)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/pupujepa.py:variant=tiny,batch=8",
                      help="FILE.py[:ARG] (the model, batch and crop come from it)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (the best counts)")
  parser.add_argument("--side", choices=["jax", "torch"], default="jax")
  parser.add_argument("--side_by_side", action="store_true")
  parser.add_argument("--rounds", type=int, default=1,
                      help="side by side: alternate the two sides this many times and keep "
                           "each side's best round (machine noise hits both alike)")
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="side by side: set this environment variable in both sides' "
                           "processes (repeatable)")
  parser.add_argument("--block_cache", action="store_true",
                      help="side by side: ours with the CPU block cache preloaded")
  parser.add_argument("--inputs", choices=["spectrogram", "audio"], default="spectrogram",
                      help="audio: the jitted step also runs the front-end")
  args, overrides = parser.parse_known_args()
  cfg = load_config(args.config, overrides)
  if (args.env or args.block_cache) and not args.side_by_side:
    parser.error("--env and --block_cache need --side_by_side (this process has already "
                 "started)")
  env = dict(os.environ)
  for item in args.env:
    key, sep, value = item.partition("=")
    if not sep or not key:
      parser.error(f"--env {item!r}: expected KEY=VALUE")
    env[key] = value
  if args.side_by_side:
    # Ours with the block cache as `pupujepa train` runs; PyTorch as its users run it (its
    # own big tensors through the cache fault more, not less: its backward frees many).
    env_of = {"torch": env, "jax": block_cache.preload_environment(
        env, block_cache.library()) if args.block_cache else env}
    best = {}
    for _ in range(args.rounds):
      for side in ("torch", "jax"):
        cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
               "--side", side, "--inputs", args.inputs, *overrides]
        result = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                           env=env_of[side], check=True).stdout)
        if side not in best or result["step_s"] < best[side]["step_s"]:
          best[side] = result
    torch_r, jax_r = best["torch"], best["jax"]
    print(json.dumps({"torch": torch_r, "jax": jax_r, "env": args.env,
                      "block_cache": args.block_cache,
                      "step_time_ratio_jax_over_torch": round(jax_r["step_s"] /
                                                              torch_r["step_s"], 3),
                      "cpu_time_ratio_jax_over_torch": round(jax_r["cpu_s_per_step"] /
                                                             torch_r["cpu_s_per_step"], 3),
                      "peak_rss_ratio_jax_over_torch": round(jax_r["peak_rss_gb"] /
                                                             torch_r["peak_rss_gb"], 3)},
                     indent=2))
    return
  if args.side == "jax":
    with xla_flags.single_threaded_host_blas():  # as the trainer runs the step
      result = run_jax(cfg, args.steps, args.inputs)
  else:
    result = run_torch(cfg, args.steps)
  print(json.dumps(with_flops(result, cfg), indent=2))


if __name__ == "__main__":
  main()
