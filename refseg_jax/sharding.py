"""Device mesh, parameter sharding (FSDP) and global batches from host data.

The mesh comes from the config as `[(axis name, size), ...]` with one size
of -1 for "all remaining devices", big_vision style:

    config.mesh = [('data', -1)]                  # pure data parallel
    config.mesh = [('data', 2), ('fsdp', -1)]     # data parallel x FSDP

Batches are split over every mesh axis (each device holds a different slice
of the batch); parameters are sharded along `fsdp_axis` when they are large
enough and one of their dimensions divides evenly, and replicated otherwise.
Nothing here depends on the number of hosts: the same code runs on a laptop
CPU, a GPU box and a TPU pod.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np


def make_mesh(axes: Sequence[tuple[str, int]],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with the config's named axes.

  Args:
    axes: (name, size) pairs; at most one size may be -1 (the rest).
    devices: the devices to use.

  Raises:
    ValueError: naming the axes when the sizes do not multiply to the
      number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh {list(axes)}: at most one size may be -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh {list(axes)} does not divide '
                       f'{len(devices)} devices.')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'config.mesh {list(axes)} needs {math.prod(sizes)} '
                     f'devices; there are {len(devices)}.')
  # Auto axes: the compiler propagates shardings from the in/out shardings
  # given to jit, as in the Flax and big_vision examples.
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def fsdp_spec(shape: Sequence[int], axis_size: int, axis: str | None,
              min_size: int) -> PartitionSpec:
  """Shards the largest evenly divisible dimension of a big parameter.

  Args:
    shape: the parameter's shape.
    axis_size: devices along the FSDP mesh axis.
    axis: the FSDP mesh axis name; None replicates everything.
    min_size: parameters with fewer elements stay replicated (sharding tiny
      biases costs more communication than it saves memory).
  """
  if axis is None or axis_size == 1 or math.prod(shape) < min_size:
    return PartitionSpec()
  divisible = [d for d in np.argsort(shape)[::-1] if shape[d] % axis_size == 0]
  if not divisible:
    return PartitionSpec()
  spec = [None] * len(shape)
  spec[divisible[0]] = axis
  return PartitionSpec(*spec)


def param_shardings(params_shape: Any, mesh: Mesh, fsdp_axis: str | None,
                    min_size: int = 2**14) -> Any:
  """NamedShardings for a tree of arrays or `jax.ShapeDtypeStruct`s."""
  axis_size = mesh.shape[fsdp_axis] if fsdp_axis else 1
  return jax.tree.map(
      lambda x: NamedSharding(
          mesh, fsdp_spec(x.shape, axis_size, fsdp_axis, min_size)),
      params_shape)


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles the global batch from every host's local slice.

  Each host passes its own `global batch / process count` examples; the
  result is one array per field of the global batch size, sharded over the
  mesh, without any host ever holding the whole batch.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)
