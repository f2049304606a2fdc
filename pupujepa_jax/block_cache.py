"""Keeps XLA:CPU's per-step temporaries mapped between steps (`native/block_cache.c`).

On CPUs, XLA allocates each execution's temporaries as one block and frees it at the end;
glibc maps such a block afresh every time and the kernel zeroes it page by page: 1.65 M
page faults and 3.4-3.9 s of kernel CPU per step of released tiny, 87,000 and 0.16-0.23 s
per demo step (README, Speed). `native/block_cache.c`, preloaded, keeps blocks of 64 MiB
and more for the next request and leaves the rest to glibc.

`pupujepa train` and the demo re-execute themselves (`enter`: the same command line,
interpreter options included) with the library preloaded where it helps: Linux with
glibc, JAX on CPUs only (no GPU or TPU plugin installed, or JAX_PLATFORMS=cpu), a C
compiler to build it with (once, into the user's cache). The re-executed process runs
JAX's CPU computations synchronously (`configure_jax`): with asynchronous dispatch XLA
allocates the next step's block before it frees the last one, so two blocks would stay
mapped. PUPUJEPA_BLOCK_CACHE=0 turns it off; library users preload it themselves
(`library()` builds it and gives its path) and call `configure_jax()`.

The other half of the host allocator's business is memory glibc keeps after it is freed:
compiling the step (XLA and LLVM on several threads, each with its own malloc arena)
frees about 0.8 GB that glibc keeps in its arenas, resident, while the step's
temporaries come from fresh mappings beside it. `release_freed_heap()` hands it back to
the kernel; the trainer calls it between compiling the step and running it (released
tiny's peak RSS: 8.18 GB without, 7.35 GB with).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings

SOURCE = pathlib.Path(__file__).parent / "native" / "block_cache.c"
SWITCH = "PUPUJEPA_BLOCK_CACHE"          # "0" turns the re-execution off
REEXECUTED = "PUPUJEPA_BLOCK_CACHE_REEXECUTED"  # set in the re-executed process: once only
# Distributions that give JAX a GPU or TPU backend: with one installed, the step's
# temporaries live on the accelerator and the host allocator is not the step's business.
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


class Unavailable(RuntimeError):
  """The library cannot be built or preloaded here; the message says why."""


def cache_dir(environ=os.environ) -> pathlib.Path:
  base = environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "pupujepa_jax"


def glibc_linux() -> bool:
  """Whether this is Linux with glibc (what the library interposes on)."""
  return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def library(environ=os.environ) -> pathlib.Path:
  """The built library (built on first use with $CC or cc, then reused: its name carries
  the source's hash). Raises `Unavailable` naming what is missing."""
  if not glibc_linux():
    raise Unavailable(f"needs Linux with glibc, not {platform.system()} "
                      f"{'/'.join(platform.libc_ver()) or 'without glibc'}")
  digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
  target = cache_dir(environ) / f"block_cache-{digest}.so"
  if target.exists():
    return target
  compiler = environ.get("CC", "cc")
  if not shutil.which(compiler):
    raise Unavailable(f"no C compiler to build {SOURCE.name} ({compiler!r} not on PATH)")
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built beside its final name and renamed: processes starting together never see half.
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    built = pathlib.Path(scratch) / target.name
    result = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(built),
                             str(SOURCE), "-lpthread"], capture_output=True, text=True,
                            timeout=120)
    if result.returncode:
      raise Unavailable(f"{compiler} failed on {SOURCE}: {result.stderr.strip()[-500:]}")
    os.replace(built, target)
  return target


def active() -> bool:
  """Whether this process runs with the library preloaded."""
  try:
    maps = pathlib.Path("/proc/self/maps").read_text()
  except OSError:
    return False
  return "/block_cache-" in maps


def cpu_only(environ=os.environ) -> bool:
  """Whether JAX can only run on CPUs here (read without starting JAX)."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
  return not any(name.startswith(ACCELERATOR_PLUGINS) for name in names)


def reason_not_to(environ=os.environ) -> str | None:
  """Why this process should not re-execute itself with the library; None: it should."""
  if environ.get(SWITCH, "1") == "0":
    return f"{SWITCH}=0"
  if environ.get(REEXECUTED):
    return "already re-executed once"  # never loop if the preload did not take
  if not glibc_linux():
    return "not Linux with glibc"  # macOS and musl keep their own allocators, quietly
  if not cpu_only(environ):
    return "JAX has a GPU or TPU backend here"
  return None


def preload_environment(environ, library_path: pathlib.Path) -> dict[str, str]:
  """`environ` with the library first in LD_PRELOAD and the re-execution marked."""
  env = dict(environ)
  env["LD_PRELOAD"] = " ".join(filter(None, [str(library_path), environ.get("LD_PRELOAD")]))
  env[REEXECUTED] = "1"
  return env


def reexec_with_block_cache() -> None:
  """Replaces this process by its own command line with the library preloaded, when it
  should (see module docstring); warns, naming the cause, when it should but cannot."""
  if active() or reason_not_to() is not None:
    return
  try:
    path = library()
  except (Unavailable, OSError, subprocess.SubprocessError) as e:
    warnings.warn(f"running without the CPU block cache (README, Speed): {e}")
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, preload_environment(os.environ, path))


def enter() -> None:
  """What a command calls first, before JAX starts: re-executes itself with the library
  where it should, else goes on as it is; then configures JAX for it."""
  reexec_with_block_cache()
  configure_jax()


def configure_jax() -> None:
  """Synchronous CPU dispatch where the library is preloaded (see module docstring).
  Call before JAX starts its CPU backend."""
  if active():
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def release_freed_heap() -> bool:
  """Returns the memory glibc's malloc holds free (in every thread's arena) to the kernel
  (`malloc_trim(0)`): call it after a burst of freeing, such as compiling. False where
  there is no glibc (other allocators return memory by themselves or not at all)."""
  if not glibc_linux():
    return False
  ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc's soname (find_library would fork)
  return True
