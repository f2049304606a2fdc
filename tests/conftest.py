"""Shared test setup: 8 fake CPU devices, a persistent compilation cache, audio fixtures.

The environment is set before JAX initialises; subprocesses started by tests inherit it,
so identical programs (the smoke train step) compile once per test session.
"""
import os
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "pupujepa_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from pupujepa_jax import xla_flags  # noqa: E402  (imports no JAX)

xla_flags.apply()  # as the `pupujepa` command does (8 CPU devices: a flag under jaxlib 0.11)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a slower test (still runs in CI)")


def write_tones(folder, count: int = 8, seconds: float = 1.5, sample_rate: int = 24_000,
                seed: int = 0):
  """Harmonic tones with tremolo, a few seconds of music-like audio per file."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  for i in range(count):
    f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
    wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    wave *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 4) * t)
    soundfile.write(os.path.join(folder, f"tone{i:02d}.wav"), (0.2 * wave).astype(np.float32),
                    sample_rate)
  return str(folder)


@pytest.fixture(scope="session")
def tone_folder(tmp_path_factory):
  return write_tones(tmp_path_factory.mktemp("tones"))
