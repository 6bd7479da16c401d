"""Device mesh, parameter shardings, multi-host start-up and global-batch assembly.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism that also
shards parameters and optimizer state). The batch is split over both. Parameter placement comes
from a few regex rules over parameter paths (big_vision style)::

    config.sharding_rules = (('.*', 'fsdp'),)      # or (('.*', 'replicate'),)

``'fsdp'`` shards the largest dimension divisible by the fsdp axis size, ``'replicate'`` keeps a
full copy on every device. The first matching rule wins.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> None:
    """Starts ``jax.distributed`` when the run spans several processes.

    Arguments (or the environment variables ``SSL_JAX_COORDINATOR``, ``SSL_JAX_NUM_PROCESSES``,
    ``SSL_JAX_PROCESS_ID``) name the coordinator explicitly; on Cloud TPU VMs and under SLURM JAX
    discovers them itself when ``SSL_JAX_DISTRIBUTED=auto``. Must run before anything touches the
    backend. A single-process run without any of these does nothing.
    """
    address = coordinator_address or os.environ.get("SSL_JAX_COORDINATOR", "")
    count = num_processes or int(os.environ.get("SSL_JAX_NUM_PROCESSES", "0"))
    index = process_id if process_id >= 0 else int(os.environ.get("SSL_JAX_PROCESS_ID", "-1"))
    if address:
        if count <= 0 or index < 0:
            raise ValueError(
                "a coordinator address needs the process count and index too: set "
                "--num_processes/--process_id or SSL_JAX_NUM_PROCESSES/SSL_JAX_PROCESS_ID"
            )
        jax.distributed.initialize(
            coordinator_address=address, num_processes=count, process_id=index
        )
    elif os.environ.get("SSL_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over all devices (or ``devices``), with Auto axis types."""
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(
            f"config.mesh.fsdp={fsdp} must divide the device count {len(devices)}"
        )
    return jax.make_mesh(
        (len(devices) // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2,
        devices=devices,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _spec_for(shape: tuple[int, ...], rule: str, fsdp_size: int) -> P:
    if rule == "replicate" or fsdp_size == 1:
        return P()
    if rule != "fsdp":
        raise ValueError(f"sharding rule {rule!r} is not one of 'replicate', 'fsdp'")
    order = sorted(range(len(shape)), key=lambda d: -shape[d])
    for dim in order:
        if shape[dim] % fsdp_size == 0 and shape[dim] >= fsdp_size:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(
    tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = ((".*", "replicate"),)
) -> Any:
    """Shardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs) from regex ``rules``
    matched against the leaf's ``/``-joined path. Scalars are always replicated."""
    fsdp_size = mesh.shape["fsdp"]
    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

    def one(path, leaf):
        name = _path_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for pattern, rule in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, _spec_for(shape, rule, fsdp_size))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over devices and processes."""
    devices, processes = mesh.size, jax.process_count()
    if global_batch_size % devices or global_batch_size % processes:
        raise ValueError(
            f"config.batch_size={global_batch_size} is not divisible by the device count "
            f"{devices} (over {processes} process(es)); choose a multiple of {devices}, e.g. "
            f"--config.batch_size={max(devices, global_batch_size // devices * devices)}"
        )


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's share of the batch into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local.items()
    }


def is_main_process() -> bool:
    return jax.process_index() == 0
