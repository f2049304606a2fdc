"""Shared test setup: 8 fake CPU devices (set before JAX initialises) and small configs."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a slower test (still runs in CI)")
