"""Device mesh, parameter partition rules and batch placement.

The mesh has two axes: "data" (pure data parallelism: parameters replicated) and "fsdp" (data
parallelism whose parameters and optimizer state are split across the axis, ZeRO-3 style). The batch is
split over both axes together, so every device sees `global_batch / device_count` examples.

Partition rules are data: an ordered sequence of `(regex, spec)` pairs matched with `re.search` against
a leaf's path written "a/b/c" (e.g. "trainable/unet/down_blocks_0/resnets_0/conv1/kernel"); the first
match wins. `spec` is a `PartitionSpec`, `None` (replicate) or `FSDP` (split the largest axis whose size
is divisible by the fsdp axis size, for leaves with at least `min_fsdp_size` elements; else replicate).
A leaf no rule matches is replicated.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
FSDP = "fsdp"
DEFAULT_RULES: tuple[tuple[str, Any], ...] = ((r".*", FSDP),)
DEFAULT_MIN_FSDP_SIZE = 2 ** 14

PartitionRules = Sequence[tuple[str, Any]]


def make_mesh(data: int | None = None, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over all devices of all processes (or `devices`).

    data: size of the "data" axis; None = device_count // fsdp. data * fsdp must equal the device count.
    The device order is jax.make_mesh's (topology-aware on TPU); axes are of the Auto type, so jit
    propagates shardings from the in/out shardings it is given.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh fsdp={fsdp}: must be >= 1 and divide the device count {len(devices)}")
    data = len(devices) // fsdp if data is None else data
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp}: expected the device count "
                         f"{len(devices)}")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def path_to_str(path: tuple) -> str:
    """A jax key path as "a/b/c" (dict keys, attribute names and sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> PartitionSpec:
    """Splits the largest axis divisible by `fsdp_size` over "fsdp" (the last one among equals);
    replicated if fsdp_size == 1, the leaf has fewer than `min_fsdp_size` elements, or no axis divides."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
        return PartitionSpec()
    divisible = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda i: (shape[i], i))
    return PartitionSpec(*(FSDP if i == axis else None for i in range(len(shape))))


def leaf_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: PartitionRules = DEFAULT_RULES,
              min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> PartitionSpec:
    """The PartitionSpec of one leaf (path "a/b/c", shape) under `rules` (see module docstring)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            if spec is None:
                return PartitionSpec()
            if spec == FSDP:
                return fsdp_spec(shape, mesh.shape["fsdp"], min_fsdp_size)
            if not isinstance(spec, PartitionSpec) or len(spec) > len(shape):
                raise ValueError(f"partition rule {pattern!r} -> {spec!r} for {path} of shape {tuple(shape)}: "
                                 f"expected None, FSDP or a PartitionSpec of at most {len(shape)} entries")
            return spec
    return PartitionSpec()


def tree_shardings(tree: Any, mesh: Mesh, rules: PartitionRules = DEFAULT_RULES,
                   min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
    """NamedShardings for every array leaf of `tree` (arrays or jax.ShapeDtypeStruct), same structure."""
    def one(path, leaf):
        return NamedSharding(mesh, leaf_spec(path_to_str(path), np.shape(leaf), mesh, rules, min_fsdp_size))
    return jax.tree_util.tree_map_with_path(one, tree)


def shard_params(tree: Any, mesh: Mesh, rules: PartitionRules = DEFAULT_RULES,
                 min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
    """Places a (host or device) pytree on the mesh by `rules`; returns the tree of jax.Arrays.
    Every process must pass the same values (e.g. pretrained weights read from the same files)."""
    return place(tree, tree_shardings(tree, mesh, rules, min_fsdp_size))


def place(tree: Any, shardings: Any) -> Any:
    """Puts each leaf of `tree` (numpy or jax, the same on every process) into its sharding."""
    def one(value, sharding):
        if jax.process_count() == 1:
            return jax.device_put(value, sharding)
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree_util.tree_map(one, tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value every device holds whole."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of batch arrays: leading (example) axis split over ("data", "fsdp")."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch_from_process(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles each process's numpy batch (leading axis = global_batch // process_count) into global
    jax.Arrays sharded by `batch_sharding(mesh)`. Process p's rows become the global rows its devices
    hold (with jax.make_mesh's device order on CPU/GPU: rows [p * b, (p + 1) * b))."""
    sharding = batch_sharding(mesh)
    per_process = mesh.devices.size // jax.process_count()

    def one(x):
        x = np.asarray(x)
        if x.shape[0] % per_process:
            raise ValueError(f"process batch of {x.shape[0]} examples: expected a multiple of the "
                             f"{per_process} local devices of the mesh")
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree_util.tree_map(one, local_batch)


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
    """The global row indices (sorted) this process's devices hold under `batch_sharding(mesh)`;
    `global_batch_from_process` fills them, in order, from this process's local batch."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = {r for (s,) in index_map.values() for r in range(*s.indices(global_batch_size))}
    return np.array(sorted(rows))


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly sharded, multi-process) arrays, the same on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
