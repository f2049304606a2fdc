"""XLA flags the project sets for its users, before JAX starts its backends.

GPU (the JAX GPU performance guide and NVIDIA's JAX-Toolbox for data-parallel and FSDP
training steps): the latency-hiding scheduler overlaps the FSDP all-gathers and
reduce-scatters with compute, pipelined collectives and while-loop double buffering
prefetch the next scanned block's parameters, combine thresholds batch many small
collectives into few, and the collectives get the highest-priority stream.

CPU: no XLA flag for one device; the flags tried on the released tiny's step (fast math,
oneDNN, XNNPACK) are measured in benchmarks/train_step.py and did not pay off (see the
README). Where one process holds several CPU devices (the tests' 8, a sharding check on a
laptop) under jaxlib 0.11 or newer, XLA's shared intra-op Eigen pool is turned off and
each device's program runs on its own thread: with it, JAX 0.11.2 (what Python 3.12 gets)
deadlocked the train step with the in-step front-end over 2 or 8 CPU devices on a 2-core
machine, every thread idle before the first step ended (PyAutoFit reports the same wedged
pool, avoided the same way: github.com/PyAutoLabs/PyAutoFit/issues/1530). JAX 0.10.2 does
not deadlock, and there the flag would cost: the test suite took 835 s with it, 681 s
without (both compiling afresh).
What does pay on CPUs is `single_threaded_host_blas()` around training: XLA's own thread
pool fills the cores, and the host BLAS (OpenBLAS, behind jaxlib's LAPACK kernels) keeps
its threads spinning after each call, so one small `eigvalsh` per step (the RankMe
monitor) took cores from XLA: the demo's step ran 12-16% slower.

`apply()` adds each flag to XLA_FLAGS unless the user already set that flag (theirs
wins). It must run before JAX initialises a backend: the `pupujepa` command calls it
first thing; library users call it before their first JAX computation.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os

GPU_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_all_gather_combine_threshold_bytes": str(512 << 20),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(512 << 20),
    "xla_gpu_all_reduce_combine_threshold_bytes": str(512 << 20),
}
CPU_FLAGS: dict[str, str] = {}
# Only where one process holds several CPU devices (tests, sharding checks on one box)
# and the installed jaxlib is one that deadlocked there without them.
MULTI_DEVICE_CPU_FLAGS = {"xla_cpu_multi_thread_eigen": "false"}
DEADLOCKING_JAXLIB = (0, 11)


def merged(existing: str, flags: dict[str, str]) -> str:
  """`existing` XLA_FLAGS text plus every flag of `flags` it does not set already."""
  present = {item.lstrip("-").split("=", 1)[0] for item in existing.split()}
  extra = [f"--{name}={value}" for name, value in flags.items() if name not in present]
  return " ".join(filter(None, [existing.strip(), *extra]))


def cpu_device_count(environ) -> int:
  """CPU devices an environment asks JAX for (JAX_NUM_CPU_DEVICES, else XLA's
  --xla_force_host_platform_device_count); 1 when it asks for none."""
  if environ.get("JAX_NUM_CPU_DEVICES"):
    return int(environ["JAX_NUM_CPU_DEVICES"])
  for item in environ.get("XLA_FLAGS", "").split():
    name, _, value = item.lstrip("-").partition("=")
    if name == "xla_force_host_platform_device_count":
      return int(value)
  return 1


def installed_jaxlib() -> tuple[int, int]:
  """(major, minor) of the installed jaxlib, read without importing it."""
  try:
    return tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return (0, 0)


def cpu_flags(environ, jaxlib_version: tuple[int, int]) -> dict[str, str]:
  """The CPU flags for an environment and jaxlib (see module docstring)."""
  if cpu_device_count(environ) > 1 and jaxlib_version >= DEADLOCKING_JAXLIB:
    return {**CPU_FLAGS, **MULTI_DEVICE_CPU_FLAGS}
  return dict(CPU_FLAGS)


def apply() -> str:
  """Set the project's flags in the environment (see module docstring); returns XLA_FLAGS.

  GPU flags are harmless elsewhere: XLA accepts every backend's flags on any platform.
  """
  flags = {**GPU_FLAGS, **cpu_flags(os.environ, installed_jaxlib())}
  os.environ["XLA_FLAGS"] = merged(os.environ.get("XLA_FLAGS", ""), flags)
  return os.environ["XLA_FLAGS"]


def single_threaded_host_blas():
  """A context in which the host BLAS/LAPACK libraries run one thread each, when JAX runs
  on CPUs (a no-op elsewhere, where the host BLAS is not on the step's path)."""
  import jax
  if jax.default_backend() != "cpu":
    return contextlib.nullcontext()
  import scipy.linalg.cython_lapack  # noqa: F401  (jaxlib's LAPACK; loaded, so limited)
  import threadpoolctl
  return threadpoolctl.threadpool_limits(1, user_api="blas")
