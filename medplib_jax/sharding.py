"""Device mesh, logical-axis sharding rules, and host<->global array helpers.

The mesh has four named axes, always in this order: ``data`` (pure data parallelism), ``fsdp``
(data parallelism with parameters sharded), ``expert`` (MoE experts), ``tensor`` (within-layer
model parallelism). Modules annotate parameters and activations with *logical* names (``embed``,
``mlp``, ``heads``, ``batch`` ...); the rules table in the config maps those to mesh axes.
"""

import math
import os
from collections.abc import Mapping, Sequence

import flax
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")


class MeshError(ValueError):
  """A mesh shape that cannot be built on the visible devices."""


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the sizes of (data, fsdp, expert, tensor); one axis may be -1 ("the rest")."""
  sizes = []
  for axis in MESH_AXES:
    size = int(mesh_cfg.get(axis, 1))
    if size == 0 or size < -1:
      raise MeshError(f"mesh axis {axis!r} has size {size}; use a positive size or -1 for the rest")
    sizes.append(size)
  unknown = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(unknown) > 1:
    raise MeshError(f"only one mesh axis may be -1, got {unknown}")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise MeshError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes use {known} devices, which does not "
          f"divide the {num_devices} visible devices")
    sizes[MESH_AXES.index(unknown[0])] = num_devices // known
  elif known != num_devices:
    raise MeshError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {known} devices but {num_devices} are visible; "
        "set one axis to -1 to take the rest")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, expert, tensor) mesh with Auto axes over all (or the given) devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_tuple(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Normalises a rules table from a ConfigDict (lists after overrides) to tuples."""
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def _fit_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops the mesh axes of any dimension they do not divide (e.g. a 32267-row vocabulary on
  2 tensor shards): that dimension is replicated instead of failing to shard."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if size == 1 or dim % size == 0 else None)
  return PartitionSpec(*fitted)


def logical_to_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a pytree whose leaves may carry linen `LogicallyPartitioned` boxes.

  Leaves without annotations are replicated; dimensions that a mesh axis does not divide are
  replicated along it.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))
  shapes = strip_boxes(abstract_tree)
  return jax.tree.map(lambda sh, x: NamedSharding(mesh, _fit_spec(sh.spec, x.shape, mesh)),
                      shardings, shapes)


def strip_boxes(tree):
  """Removes linen partitioning boxes without applying sharding constraints (unlike nn.unbox,
  which constrains under active rules and so fails on abstract shapes)."""
  is_box = lambda x: isinstance(x, flax.core.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rank: int, rules=None) -> NamedSharding:
  """Sharding of a [B, ...] batch array: the leading axis over the `batch` rule's mesh axes."""
  axes = dict(rules_tuple(rules)).get("batch", ("data", "fsdp")) if rules else ("data", "fsdp")
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (rank - 1))))


def mesh_axis_sizes() -> dict[str, int]:
  """{axis: size} of the mesh being traced under (`jax.set_mesh`); {} when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  return {} if mesh.empty else dict(mesh.shape)


def batch_shards() -> int:
  """Devices the `batch` logical axis is split over under the current mesh and logical rules
  (1 when there is no mesh)."""
  sizes = mesh_axis_sizes()
  axes = dict(nn.get_logical_axis_rules()).get("batch")
  if not sizes or axes is None:
    return 1
  axes = axes if isinstance(axes, (tuple, list)) else (axes,)
  return int(np.prod([sizes.get(a, 1) for a in axes]))


def host_to_global(batch, mesh: Mesh, rules=None):
  """Turns this process's slice of a batch (numpy pytree) into global jax.Arrays.

  Each process passes its own `[B_local, ...]` arrays; the global batch is their concatenation
  over processes, sharded on the leading axis.
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)
  return jax.tree.map(one, batch)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when the job is multi-process; returns whether it did.

  Multi-process is detected from explicit arguments, from MEDPLIB_COORDINATOR /
  MEDPLIB_NUM_PROCESSES / MEDPLIB_PROCESS_ID, from SLURM (SLURM_NTASKS > 1) or from a TPU pod
  (TPU_WORKER_HOSTNAMES with several hosts), where JAX finds the rest by itself.
  """
  env = os.environ
  coordinator = coordinator or env.get("MEDPLIB_COORDINATOR")
  if num_processes is None and env.get("MEDPLIB_NUM_PROCESSES"):
    num_processes = int(env["MEDPLIB_NUM_PROCESSES"])
  if process_id is None and env.get("MEDPLIB_PROCESS_ID"):
    process_id = int(env["MEDPLIB_PROCESS_ID"])
  if coordinator and num_processes and num_processes > 1:
    # Only affects the CPU backend (and must be set before any backend starts).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    jax.distributed.initialize()
    return True
  return False
