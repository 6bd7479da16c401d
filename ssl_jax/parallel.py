"""Device mesh, parameter shardings, multi-host start-up and global-batch assembly.

The mesh has two axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallelism that also
shards parameters and optimizer state). The batch is split over both. Parameter placement comes
from a few regex rules over parameter paths (big_vision style)::

    config.sharding_rules = (('.*', 'fsdp'),)      # or (('.*', 'replicate'),)

``'fsdp'`` shards the largest dimension divisible by the fsdp axis size, ``'replicate'`` keeps a
full copy on every device. The first matching rule wins.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssl_jax.config import ConfigError

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
    if address or os.environ.get("SSL_JAX_DISTRIBUTED") == "auto":
        # Collectives between the CPU devices of several processes need a CPU collectives
        # library (gloo is JAX's default; older releases had none).
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        if count <= 0 or index < 0:
            raise ConfigError(
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
        raise ConfigError(
            f"config.mesh.fsdp={fsdp} must divide the device count {len(devices)}: choose a "
            "divisor, e.g. --config.mesh.fsdp=1"
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


def _spec_for(shape: tuple[int, ...], rule: str, fsdp_size: int) -> P:
    if rule == "replicate" or fsdp_size == 1:
        return P()
    if rule != "fsdp":
        raise ConfigError(f"config.sharding_rules: rule {rule!r} is not one of 'replicate', "
                          "'fsdp'")
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
        name = jax.tree_util.keystr(path, simple=True, separator="/")
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
        raise ConfigError(
            f"config.batch_size={global_batch_size} is not divisible by the device count "
            f"{devices} (over {processes} process(es)); choose a multiple of {devices}, e.g. "
            f"--config.batch_size={max(devices, global_batch_size // devices * devices)}"
        )


def process_rows(mesh: Mesh, global_batch_size: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` row ranges of a global batch that this process's devices hold
    (merged where they touch), in order."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    ranges: list[tuple[int, int]] = []
    for start, stop in sorted({(s[0].start or 0, s[0].stop or global_batch_size)
                               for s in index_map.values()}):
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


@functools.cache
def _warn_if_rows_out_of_process_order(mesh: Mesh, global_batch_size: int) -> None:
    local, p = global_batch_size // jax.process_count(), jax.process_index()
    rows = process_rows(mesh, global_batch_size)
    if rows != [(p * local, (p + 1) * local)]:
        logging.warning(
            "process %d's devices hold rows %s of the global batch, not [%d, %d): the global "
            "batch is a permutation of the 1-process one, so per-example random draws differ "
            "from a run on another number of processes (the run is still deterministic)",
            p, rows, p * local, (p + 1) * local)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's share of the batch into global arrays sharded over the mesh.

    Process ``p`` of ``P`` passes rows ``[p * B / P, (p + 1) * B / P)`` of the global batch of
    ``B`` (as ``ssl_jax.data.pipeline.train_loader`` yields them); they land there when the mesh
    lists each process's devices together and in process order (:func:`make_mesh` on CPU does:
    ``tests/test_multihost.py``). Otherwise a warning says so once: the rows are permuted, which
    changes per-example random draws but nothing else."""
    sharding = batch_sharding(mesh)
    if jax.process_count() > 1 and local:
        rows = np.shape(next(iter(local.values())))[0]
        _warn_if_rows_out_of_process_order(mesh, rows * jax.process_count())
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local.items()
    }


def is_main_process() -> bool:
    return jax.process_index() == 0
