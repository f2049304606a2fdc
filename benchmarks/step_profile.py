"""Where one train step's wall time goes, by kind of work, from a profiler trace.

Not a test: prints numbers for whatever backend JAX finds (the categories are XLA:CPU's;
on GPUs the trace's device rows need their own reading).

  python benchmarks/step_profile.py                        # released tiny, batch 8
  python benchmarks/step_profile.py --config experiments/cpu_demo.py

The step (`train_step.pretrain_step`, jitted, as `benchmarks/train_step.py` compiles it)
runs once to warm up and once under `jax.profiler`. Every XLA operation the trace shows
is classed from the compiled program: `matmuls` (dots, convolutions and XLA:CPU's
YNNPACK fusions, which are mostly dots and the work fused into them), `copies` (copies
and transposes, fused or not), `elementwise` (the other fusions) and `other`. Operations
that ran more than once in the step are loop bodies (the blockwise attention's query and
key blocks; the scanned blocks where blocks are scanned) and count as `loops`.
The step's span is then swept once: each instant goes to the first class running then
(loops, matmuls, elementwise, copies, other), or to `untraced` when no traced operation
runs (Eigen's own dots run as thread-pool tasks the trace does not name, and dispatch).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from pupujepa_jax import block_cache, xla_flags  # noqa: E402  (before JAX starts)

xla_flags.apply()
block_cache.configure_jax()

import train_step as step_benchmark  # noqa: E402  (benchmarks/train_step.py)

CLASSES = ("loops", "matmuls", "elementwise", "copies", "other")


def operation_kinds(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
  """HLO instruction name -> matmuls | elementwise | copies | other, and -> the JAX
  operation it came from (its `op_name`, where XLA kept one)."""
  kinds, sources = {}, {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([\w\-]+)\((.*)$", hlo_text, re.M):
    name, opcode, rest = m.groups()
    source = re.search(r'op_name="([^"]*)"', rest)
    if source:
      sources[name] = source.group(1)
    if opcode in ("dot", "convolution") or (opcode == "fusion" and "kind=kCustom" in rest):
      kinds[name] = "matmuls"
    elif opcode in ("copy", "transpose") or (
        opcode == "fusion" and name.startswith(("copy", "transpose"))):
      kinds[name] = "copies"
    elif opcode == "fusion":
      kinds[name] = "elementwise"
    else:
      kinds[name] = "other"
  return kinds, sources


def wall_time_by_class(events: list[dict], kinds: dict[str, str]) -> tuple[dict, float]:
  """Sweep the traced operations' intervals: (seconds per class and `untraced`, span)."""
  runs = collections.Counter(e["name"] for e in events)
  edges = []
  for e in events:
    cls = "loops" if runs[e["name"]] > 1 else kinds[e["name"]]
    edges += [(e["ts"], 1, cls), (e["ts"] + e["dur"], -1, cls)]
  edges.sort()
  active, seconds = collections.Counter(), collections.Counter()
  last = edges[0][0]
  for ts, delta, cls in edges:
    running = [c for c in CLASSES if active[c] > 0]
    seconds[running[0] if running else "untraced"] += (ts - last) / 1e6
    last = ts
    active[cls] += delta
  span = (edges[-1][0] - edges[0][0]) / 1e6
  return {c: round(seconds[c], 3) for c in (*CLASSES, "untraced")}, span


def traced_operations(trace_dir: pathlib.Path, kinds: dict[str, str]) -> list[dict]:
  """Complete events of the trace whose names are instructions of the compiled step."""
  (path,) = trace_dir.rglob("*.trace.json.gz")
  with gzip.open(path) as f:
    trace = json.load(f)
  return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("name") in kinds]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="experiments/pupujepa.py:variant=tiny,batch=8",
                      help="FILE.py[:ARG] (the model, batch and crop come from it)")
  parser.add_argument("--top", type=int, default=10, help="also list this many operations")
  args, overrides = parser.parse_known_args()
  import jax

  from pupujepa_jax import config as config_lib, sharding, train_step
  cfg = step_benchmark.load_config(args.config, overrides)
  config_lib.validate(cfg, jax.device_count())
  mesh = sharding.mesh_from_config(cfg)
  state = train_step.create_sharded_state(cfg, mesh)
  batch, _, compiled, _ = step_benchmark.compile_step(cfg, mesh, state)
  b = cfg.data.batch_size
  kinds, sources = operation_kinds(compiled.as_text())
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      step_s = time.perf_counter() - start
    events = traced_operations(pathlib.Path(tmp), kinds)
  if not events:
    sys.exit("the trace holds no operation of the compiled step (is this backend's "
             "trace laid out differently?)")
  seconds, span = wall_time_by_class(events, kinds)
  by_operation = collections.Counter()
  for e in events:
    by_operation[e["name"]] += e["dur"] / 1e6
  print(json.dumps({
      "backend": jax.default_backend(), "config": args.config, "batch": b,
      "step_s": round(step_s, 3), "traced_span_s": round(span, 3), "seconds": seconds,
      "top_operations": [{"name": n, "class": kinds[n], "seconds": round(s, 3),
                          "source": sources.get(n, "")}
                         for n, s in by_operation.most_common(args.top)]}, indent=1))


if __name__ == "__main__":
  main()
