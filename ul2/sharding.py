"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes:

* ``data``   -- pure data parallelism: parameters replicated, batch split.
* ``fsdp``   -- data parallelism with parameters (and optimiser state) sharded along
  their ``embed`` dimension (ZeRO-3 style); the batch is split over it too.
* ``tensor`` -- Megatron-style model parallelism over ``mlp``, ``heads`` and ``vocab``.

Parameters and activations carry T5X's logical names (``batch, length, embed, mlp,
heads, kv, vocab, relpos_buckets, layers``); `LOGICAL_AXIS_RULES` is the only place
that says which mesh axis each one lives on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the (data, fsdp, tensor) mesh axes; one of them may be -1 (= the rest)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = (self.data, self.fsdp, self.tensor)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh {sizes}: sizes must be positive, at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh (data, fsdp, tensor) = {sizes} does not divide "
                       f"{num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(shape) != num_devices:
      raise ValueError(f"mesh (data, fsdp, tensor) = {shape} uses {math.prod(shape)} "
                       f"devices, but there are {num_devices}")
    return shape


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all (global) devices; axis types Auto so jit propagates shardings."""
  devices = jax.devices() if devices is None else list(devices)
  shape = config.shape(len(devices))
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split along their first dimension over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def platform(mesh: Mesh) -> str:
  """The mesh's device platform ("cpu", "gpu", "tpu")."""
  return mesh.devices.flat[0].platform


def check_batch_size(batch_size: int, mesh: Mesh, num_microbatches: int = 1) -> None:
  """Fails early, before anything compiles, on a batch the mesh cannot split."""
  dp = data_parallel_size(mesh)
  if batch_size % num_microbatches:
    raise ValueError(f"batch size {batch_size} is not divisible by the "
                     f"{num_microbatches} microbatches")
  micro = batch_size // num_microbatches
  if micro % dp:
    raise ValueError(
        f"batch size {batch_size} (microbatch {micro}) is not divisible by the "
        f"{dp} data-parallel devices of mesh {dict(mesh.shape)} (data x fsdp)")
  if batch_size % jax.process_count():
    raise ValueError(f"batch size {batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")


def logical_to_mesh(logical_specs: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  return tuple(names)


def optimizer_state_shardings(abstract_opt_state: Any, abstract_params: Any,
                              param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optax state, derived from the parameters' shardings.

  Optax states hold trees that mirror the parameters (Adam's moments, Adafactor's
  statistics). A leaf whose path ends with a parameter's path and has that
  parameter's shape is sharded like it; anything else (step counts, Adafactor's
  factored row/column statistics, which are small) is replicated.
  """
  by_path = {}
  for (path, leaf), sharding in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params),
      jax.tree_util.tree_leaves(param_shardings)):
    by_path[_path_names(path)] = (leaf.shape, sharding)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    names = _path_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)
