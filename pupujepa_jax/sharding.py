"""The device mesh and the sharding rules (one definition, used by trainer, data, inference).

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also
split the parameters, teacher and optimizer state). The batch is split over both axes.
A parameter is split along its largest dimension divisible by the fsdp size; parameters
smaller than `MIN_SHARD_SIZE` elements (biases, norms) stay replicated, as does anything
when fsdp == 1. Axis types are Auto on purpose: the train step is written without sharding
annotations and XLA's partitioner propagates the in/out shardings chosen here.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")
MIN_SHARD_SIZE = 2 ** 12


def make_mesh(data: int, fsdp: int, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
                     f"have {len(devices)}")
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, fsdp), DATA_AXES, axis_types=auto, devices=devices)


def mesh_from_config(cfg) -> jax.sharding.Mesh:
  from pupujepa_jax import config as config_lib
  data, fsdp = config_lib.mesh_shape(cfg, jax.device_count())
  return make_mesh(data, fsdp)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all mesh devices."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape, fsdp_size: int) -> P:
  """FSDP rule for one array: split its largest dim divisible by the fsdp size."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: jax.sharding.Mesh, abstract_tree):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) under the FSDP rule."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp_size)),
                      abstract_tree)


def global_batch(local_batch, mesh: jax.sharding.Mesh):
  """Assemble each process's local NumPy batch into global jax.Arrays on the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
