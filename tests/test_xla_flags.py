"""The project's XLA flags: merged under the user's, and accepted by the installed XLA."""
import os
import subprocess
import sys

import jax
import jaxlib.version

from pupujepa_jax import xla_flags


def test_user_flags_win_and_nothing_is_added_twice():
  merged = xla_flags.merged("--xla_gpu_enable_latency_hiding_scheduler=false --foo=1",
                            {"xla_gpu_enable_latency_hiding_scheduler": "true", "bar": "2"})
  assert merged == "--xla_gpu_enable_latency_hiding_scheduler=false --foo=1 --bar=2"
  assert xla_flags.merged(merged, {"bar": "3"}) == merged


def test_several_cpu_devices_under_jaxlib_0_11_turn_off_the_shared_eigen_pool(monkeypatch):
  for environ, count in [({}, 1), ({"JAX_NUM_CPU_DEVICES": "8"}, 8),
                         ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, 2),
                         ({"JAX_NUM_CPU_DEVICES": "1",
                           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, 1)]:
    assert xla_flags.cpu_device_count(environ) == count
  off = {"xla_cpu_multi_thread_eigen": "false"}
  assert xla_flags.cpu_flags({"JAX_NUM_CPU_DEVICES": "2"}, (0, 11)) == off
  assert xla_flags.cpu_flags({"JAX_NUM_CPU_DEVICES": "2"}, (1, 0)) == off
  assert xla_flags.cpu_flags({"JAX_NUM_CPU_DEVICES": "2"}, (0, 10)) == {}
  assert xla_flags.cpu_flags({"JAX_NUM_CPU_DEVICES": "1"}, (0, 11)) == {}
  installed = jaxlib.version.__version__.split(".")[:2]
  assert xla_flags.installed_jaxlib() == tuple(map(int, installed))
  monkeypatch.setattr(xla_flags, "installed_jaxlib", lambda: (0, 11))
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")
  monkeypatch.setenv("XLA_FLAGS", "")
  assert "--xla_cpu_multi_thread_eigen=false" in xla_flags.apply()
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")  # the user's wins
  assert "--xla_cpu_multi_thread_eigen=false" not in xla_flags.apply()


def test_the_installed_xla_accepts_every_flag_we_set():
  """XLA aborts at start-up on an unknown flag: a JAX computation in a fresh process
  with the project's flags must run."""
  env = dict(os.environ, XLA_FLAGS=xla_flags.merged("", xla_flags.MULTI_DEVICE_CPU_FLAGS))
  code = ("from pupujepa_jax import xla_flags; flags = xla_flags.apply(); import jax; "
          "print(int(jax.numpy.ones(3).sum()), flags)")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.startswith("3 ")
  for name in [*xla_flags.GPU_FLAGS, *xla_flags.MULTI_DEVICE_CPU_FLAGS]:
    assert f"--{name}=" in out.stdout


def test_host_blas_runs_one_thread_inside_the_context_only():
  import threadpoolctl
  from jax import numpy as jnp
  jax.jit(jnp.linalg.eigvalsh)(jnp.eye(3)).block_until_ready()  # jaxlib's LAPACK loaded

  def blas_threads():
    return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"}

  before = blas_threads()
  with xla_flags.single_threaded_host_blas():
    inside = blas_threads()
  assert inside and set(inside.values()) == {1}
  assert blas_threads() == before
