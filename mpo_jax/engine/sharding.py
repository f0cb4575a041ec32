"""Device meshes over (`data`, `fsdp`, `tensor`) and the placement of parameters and batches.

Computation runs under `jax.jit` with explicit `NamedSharding`s and GSPMD propagation, so a
mesh built by `jax.make_mesh` (whose axes are `Explicit` by default in jax >= 0.9) is
re-typed to `Auto` with the same devices. Parameters are placed shard by shard, so no device
ever holds the whole model unless its sharding says so: from a host array (`place`), or read
one shard at a time by a callback (`place_shards`), so that the host never holds it either.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mpo_jax.errors import InvalidValueError
from mpo_jax.models.partitioning import CACHE_AXES, logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis -> mesh axes it is split over. Weights: rows over fsdp, heads/mlp/vocab over
# tensor. Activations: batch over data and fsdp.
LOGICAL_TO_MESH: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
}


def make_mesh(shape: Sequence[int] | Mapping[str, int] = (1, 1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (`data`, `fsdp`, `tensor`) mesh; `shape` may be a tuple or a dict of axis sizes."""
    if isinstance(shape, Mapping):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise InvalidValueError(f"unknown mesh axes {unknown}; the axes are {MESH_AXES}")
        shape = tuple(int(shape.get(axis, 1)) for axis in MESH_AXES)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise InvalidValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    devices = list(devices if devices is not None else jax.devices())
    if int(np.prod(shape)) != len(devices):
        raise InvalidValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices but "
            f"{len(devices)} are available; choose sizes whose product is {len(devices)}")
    mesh = jax.make_mesh(shape, MESH_AXES, devices=devices,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return mesh


def as_auto_mesh(mesh: Mesh) -> Mesh:
    """Accept any mesh whose axis names are a subset of (`data`, `fsdp`, `tensor`)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    unknown = sorted(set(mesh.axis_names) - set(MESH_AXES))
    if unknown:
        raise InvalidValueError(f"mesh axes {unknown} are not understood; name the axes from {MESH_AXES}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _mesh_axes_for(logical: str | None, dim: int, mesh: Mesh, used: set[str]) -> str | tuple | None:
    """Mesh axes for one dimension, dropping axes that are absent, used, or do not divide it."""
    if logical is None:
        return None
    chosen: list[str] = []
    size = 1
    for axis in LOGICAL_TO_MESH.get(logical, ()):
        if axis not in mesh.shape or axis in used or mesh.shape[axis] == 1:
            continue
        if dim % (size * mesh.shape[axis]):
            continue
        chosen.append(axis)
        size *= mesh.shape[axis]
    used.update(chosen)
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else tuple(chosen)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    used: set[str] = set()
    return PartitionSpec(*(_mesh_axes_for(a, d, mesh, used) for a, d in zip(axes, shape)))


def param_shardings(shapes: Mapping[str, Sequence[int]], mesh: Mesh) -> dict[str, NamedSharding]:
    return {name: NamedSharding(mesh, spec_for(logical_axes(name), shape, mesh))
            for name, shape in shapes.items()}


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Leading dimension over (`data`, `fsdp`) where it divides, the rest replicated."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, spec_for(CACHE_AXES, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_parallelism(mesh: Mesh | None) -> int:
    """How many ways a batch is split: batch sizes should be multiples of this."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape.get(a, 1) for a in LOGICAL_TO_MESH["batch"]]))


def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Host array -> global jax.Array; each device receives only its own shard."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place_shards(shape: Sequence[int], sharding: jax.sharding.Sharding,
                 read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array whose host data is read one shard at a time: `read(index)` -> that shard.

    Each distinct shard of this process is read once, copied to every local device that holds
    it and dropped before the next is read, so the host holds one shard at a time.
    (`jax.make_array_from_callback` first collects every local shard of the array on the host:
    with 8 devices per host that is the whole tensor.) Replicated shards are not read twice.
    """
    shape = tuple(int(n) for n in shape)
    devices_by_index: dict[tuple[tuple[int, int], ...], list[jax.Device]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        devices_by_index.setdefault(bounds, []).append(device)
    arrays = []
    for bounds, devices in devices_by_index.items():
        data = read(tuple(slice(start, stop) for start, stop in bounds))
        arrays += copy_to_devices(data, devices)
        del data  # freed here, before the next shard is read
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def copy_to_devices(data: np.ndarray, devices: Sequence[jax.Device | None]) -> list[jax.Array]:
    """`data` on each device (None: the default device, uncommitted), with jax's hold on `data` gone.

    jax keeps a host buffer until its transfer completes and lets go of it only on its next
    garbage pass (a `gc` callback), not when the caller drops it; without the pass below the
    host would hold several shards at once. (On CPU, jax may also adopt an aligned buffer as
    the device buffer itself, despite `may_alias=False`: then it is that device's memory.)
    """
    placed = [jax.device_put(data, device, may_alias=False) for device in devices]
    jax.block_until_ready(placed)
    gc.collect(0)  # runs jax's callback that releases the host buffers of finished transfers
    return placed


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on this process; gathered from all hosts when split across them."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
