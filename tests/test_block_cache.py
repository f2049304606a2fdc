"""The CPU block cache (pupujepa_jax/native/block_cache.c), built with this machine's C
compiler and preloaded into child processes, as `pupujepa train` and the demo run."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from pupujepa_jax import block_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
MB = 1 << 20


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  return block_cache.library({"XDG_CACHE_HOME": str(cache), "PATH": os.environ["PATH"]})


def _run(code: str, env_extra: dict, preload=None) -> dict:
  """Runs `code` in a fresh Python (one JAX CPU device) and returns the JSON it prints."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1", XLA_FLAGS="", PYTHONPATH=str(REPO),
             **env_extra)
  env.pop(block_cache.REEXECUTED, None)
  if preload:
    env = block_cache.preload_environment(env, preload)
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_library_is_built_once_per_source(library, tmp_path):
  assert library.is_file() and library.name.startswith("block_cache-")
  env = {"XDG_CACHE_HOME": str(library.parent.parent), "PATH": os.environ["PATH"]}
  built_at = library.stat().st_mtime_ns
  assert block_cache.library(env) == library
  assert library.stat().st_mtime_ns == built_at


def test_a_missing_compiler_is_named(tmp_path):
  env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": os.environ["PATH"], "CC": "no-such-cc"}
  with pytest.raises(block_cache.Unavailable, match="no-such-cc"):
    block_cache.library(env)


ALLOCATOR_CHECKS = """
  import ctypes, json, resource
  libc = ctypes.CDLL(None)
  libc.malloc.restype = libc.realloc.restype = libc.calloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
  libc.malloc_usable_size.restype = ctypes.c_size_t
  libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
  libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                  ctypes.c_size_t]
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  MB, PAGE = 1 << 20, 4096
  out = {}

  def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

  def rss():
    return int(open("/proc/self/statm").read().split()[1]) * PAGE

  def fill(block, size):
    start = -(-block // PAGE) * PAGE  # 4 KiB pages even where THP is "always"
    libc.madvise(start, (block + size - start) // PAGE * PAGE, 15)  # MADV_NOHUGEPAGE
    ctypes.memset(block, 1, size)

  # Free blocks kept: at most the largest block freed (least recently freed go first).
  # First, while nothing else is kept.
  big, other = libc.malloc(256 * MB), libc.malloc(128 * MB)
  fill(big, 256 * MB); fill(other, 128 * MB)
  both = rss()
  libc.free(big)
  out["kept_after_first_free_mb"] = (both - rss()) / MB
  libc.free(other)
  out["returned_after_second_free_mb"] = (both - rss()) / MB
  again = libc.malloc(128 * MB)
  out["reused_the_kept_one"] = again == other
  libc.free(again)

  # XLA's pattern: one big block malloc'd, filled and freed per step.
  size, rounds = 96 * MB, []
  for _ in range(4):
    before = faults()
    block = libc.malloc(size)
    fill(block, size)
    libc.free(block)
    rounds.append(faults() - before)
  out["faults_per_round"] = rounds
  first = libc.malloc(size); libc.free(first)
  second = libc.malloc(size); libc.free(second)
  out["same_block_again"] = first == second

  # Alignment, usable size, realloc keeping the contents, calloc zeroing.
  block = ctypes.c_void_p()
  out["posix_memalign"] = libc.posix_memalign(ctypes.byref(block), 64, 100 * MB)
  block = block.value
  out["aligned"] = block % 64 == 0
  out["usable_ok"] = libc.malloc_usable_size(block) >= 100 * MB
  ctypes.memset(block, 7, 100 * MB)
  grown = libc.realloc(block, 200 * MB)
  head, tail = ctypes.string_at(grown, 4096), ctypes.string_at(grown + 100 * MB - 4096, 4096)
  out["realloc_kept"] = set(head) == {7} and set(tail) == {7}
  out["realloc_usable_ok"] = libc.malloc_usable_size(grown) >= 200 * MB
  libc.free(grown)
  zeros = libc.calloc(1, 100 * MB)
  out["calloc_zero"] = set(ctypes.string_at(zeros, 4096)) == {0} and set(
      ctypes.string_at(zeros + 100 * MB - 4096, 4096)) == {0}
  libc.free(zeros)
  small = libc.malloc(1000); libc.free(small)
  import os
  child = os.fork()  # a forked child allocates and frees big blocks as its parent does
  if child == 0:
    block = libc.malloc(size); fill(block, size); libc.free(block)
    os._exit(0)
  out["fork_child_exit"] = os.waitpid(child, 0)[1]

  print(json.dumps(out))
"""


def test_big_blocks_are_kept_and_reused_and_everything_else_is_glibcs(library):
  """With the library a block malloc'd, filled and freed each round faults only in the
  first round (without it: every page, every round); the malloc family keeps its
  contracts, in a forked child too; freed blocks held back never exceed the largest one
  freed."""
  pages = 96 * MB // 4096
  cached = _run(ALLOCATOR_CHECKS, {}, preload=library)
  plain = _run(ALLOCATOR_CHECKS, {})
  assert cached["faults_per_round"][0] >= 0.9 * pages
  assert max(cached["faults_per_round"][1:]) < 0.02 * pages
  assert min(plain["faults_per_round"]) >= 0.9 * pages
  assert cached["same_block_again"]
  for result in (cached, plain):
    assert result["posix_memalign"] == 0 and result["aligned"] and result["usable_ok"]
    assert result["realloc_kept"] and result["realloc_usable_ok"] and result["calloc_zero"]
    assert result["fork_child_exit"] == 0
  # The 256 MB block stays mapped when freed alone, and goes when the 128 MB one is freed
  # after it (together they exceed the largest freed); the 128 MB one is reused.
  assert cached["kept_after_first_free_mb"] < 8
  assert 240 < cached["returned_after_second_free_mb"] < 272
  assert cached["reused_the_kept_one"]


JAX_STEPS = """
  import json, resource
  from pupujepa_jax import block_cache
  block_cache.configure_jax()
  import jax, jax.numpy as jnp, numpy as np

  @jax.jit
  def step(x):  # temporaries well above 64 MiB, as a train step's
    y = jnp.cumsum(x, axis=0)
    z = jnp.cumsum(y[::-1] * 0.5, axis=1)
    return (jnp.tanh(z) * x).sum(axis=0)

  x = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 4096)), jnp.float32)
  temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
  results, faults = [], []
  for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    results.append(np.asarray(step(x)))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  print(json.dumps({"temp_bytes": temp, "faults": faults, "sum": float(results[-1].sum()),
                    "same": all((r == results[0]).all() for r in results),
                    "active": block_cache.active(),
                    "async": jax.config.values["jax_cpu_enable_async_dispatch"],
                    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_a_jitted_step_reuses_its_temporaries_with_the_same_results(library):
  """XLA:CPU's temporaries land in one kept block under the library: later calls no
  longer fault on their pages, compute the same numbers, and (dispatch synchronous) the
  peak memory stays that of one block."""
  cached = _run(JAX_STEPS, {}, preload=library)
  plain = _run(JAX_STEPS, {})
  assert cached["temp_bytes"] >= 128 * MB
  assert cached["active"] and not plain["active"]
  assert cached["async"] is False and plain["async"] is True
  assert cached["same"] and plain["same"] and cached["sum"] == plain["sum"]
  temp_pages = cached["temp_bytes"] // 4096
  # Each call under glibc faults on every page of the temporaries (and on buffers of its
  # own below 64 MiB); with the library those of the temporaries are gone.
  assert min(plain["faults"][1:]) > 0.9 * temp_pages
  assert min(plain["faults"][1:]) - max(cached["faults"][2:]) > 0.9 * temp_pages
  assert cached["peak_rss"] < 1.15 * plain["peak_rss"]


FREED_HEAP = """
  import ctypes, json, threading
  from pupujepa_jax import block_cache
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]

  def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / (1 << 20)

  out = {}
  def compile_like():  # many small blocks on a worker thread (its own arena), most freed
    chunks = [libc.malloc(64 << 10) for _ in range(4096)]  # 256 MiB
    for c in chunks:
      ctypes.memset(c, 1, 64 << 10)
    out["filled"] = resident_mb()
    for i, c in enumerate(chunks):
      if i % 64:  # every 64th stays live, as long-lived objects among a compiler's garbage
        libc.free(c)
  worker = threading.Thread(target=compile_like)
  worker.start(); worker.join()
  out["freed"] = resident_mb()
  out["released"] = block_cache.release_freed_heap()
  out["after_release"] = resident_mb()
  print(json.dumps(out))
"""


def test_freed_heap_is_held_by_glibc_until_released():
  """Memory a worker thread frees among live blocks stays resident under glibc (what
  compiling the step leaves behind) until `release_freed_heap` returns it."""
  result = _run(FREED_HEAP, {})
  freed_mb = 256 * 63 / 64
  assert result["released"]
  assert result["filled"] - result["freed"] < 0.1 * freed_mb  # glibc kept it all
  assert result["freed"] - result["after_release"] > 0.8 * freed_mb


REEXEC = """
  import json, os, sys
  from pupujepa_jax import block_cache
  block_cache.enter()
  print(json.dumps({"argv": sys.argv[1:], "active": block_cache.active(),
                    "marked": os.environ.get(block_cache.REEXECUTED),
                    "optimize": sys.flags.optimize}))
"""


@pytest.mark.parametrize("env, reexecuted", [
    ({}, True),
    ({block_cache.SWITCH: "0"}, False),
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({block_cache.REEXECUTED: "1"}, False),  # a re-executed process never loops
])
def test_commands_reexecute_themselves_with_the_library(library, tmp_path, env, reexecuted):
  """The same command line (interpreter options and arguments) comes back preloaded, once;
  not where it is switched off, JAX has an accelerator, or it was re-executed already."""
  (tmp_path / "reexec_probe.py").write_text(textwrap.dedent(REEXEC))
  run_env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}",
                 XDG_CACHE_HOME=str(library.parent.parent))
  run_env.pop(block_cache.REEXECUTED, None)
  run_env.update(env)
  result = subprocess.run([sys.executable, "-O", "-m", "reexec_probe", "a b", "--x=1"],
                          env=run_env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout)
  assert out["argv"] == ["a b", "--x=1"] and out["optimize"] == 1
  assert out["active"] is reexecuted
  assert out["marked"] == ("1" if reexecuted or env.get(block_cache.REEXECUTED) else None)


def test_jax_platforms_and_plugins_decide_cpu_only():
  assert block_cache.cpu_only({"JAX_PLATFORMS": "cpu"})
  assert not block_cache.cpu_only({"JAX_PLATFORMS": "cuda,cpu"})


def test_other_systems_are_left_alone_quietly(monkeypatch):
  monkeypatch.setattr(block_cache.platform, "system", lambda: "Darwin")
  assert block_cache.reason_not_to({}) == "not Linux with glibc"
  with pytest.raises(block_cache.Unavailable, match="Darwin"):
    block_cache.library({})
