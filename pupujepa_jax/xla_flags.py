"""XLA flags the project sets for its users, before JAX starts its backends.

GPU (the JAX GPU performance guide and NVIDIA's JAX-Toolbox for data-parallel and FSDP
training steps): the latency-hiding scheduler overlaps the FSDP all-gathers and
reduce-scatters with compute, pipelined collectives and while-loop double buffering
prefetch the next scanned block's parameters, combine thresholds batch many small
collectives into few, and the collectives get the highest-priority stream.

CPU: no XLA flag; the flags tried on the released tiny's step (fast math, oneDNN,
XNNPACK) are measured in benchmarks/train_step.py and did not pay off (see the README).
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


def merged(existing: str, flags: dict[str, str]) -> str:
  """`existing` XLA_FLAGS text plus every flag of `flags` it does not set already."""
  present = {item.lstrip("-").split("=", 1)[0] for item in existing.split()}
  extra = [f"--{name}={value}" for name, value in flags.items() if name not in present]
  return " ".join(filter(None, [existing.strip(), *extra]))


def apply() -> str:
  """Set the project's flags in the environment (see module docstring); returns XLA_FLAGS.

  GPU flags are harmless elsewhere: XLA accepts every backend's flags on any platform.
  """
  os.environ["XLA_FLAGS"] = merged(os.environ.get("XLA_FLAGS", ""), {**GPU_FLAGS, **CPU_FLAGS})
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
