"""Many hosts: one process per host on JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program. The mesh spans the devices of all processes, ordered by
process, so each process's devices hold one contiguous block of rows of every global batch;
a process builds only those rows (`process_rows`) and `global_batch` joins them into one global
array. With one process (no `initialize`) every function here is the identity of the
single-host case, so the training loop is the same code either way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# How long the others wait for a process that stopped answering before they stop too: long
# enough for a loaded host, short enough that a preempted run does not hold the rest of a pod.
HEARTBEAT_TIMEOUT_S = 60


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join a run of several processes: the given ones, or, with all three None, what
    `jax.distributed.initialize` detects (a TPU pod slice, SLURM, Open MPI)."""
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)


def is_main_process() -> bool:
    """Whether this process prints and writes the run's files (process 0; the only one by default)."""
    return jax.process_index() == 0


def process_count() -> int:
    return jax.process_count()


def global_devices() -> list:
    """Every process's devices, ordered by process (then id), so each process holds a block of a batch."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of a global batch of `batch_size` that this process's devices hold on `mesh`."""
    index_map = NamedSharding(mesh, P(mesh.axis_names[0])).addressable_devices_indices_map((batch_size,))
    starts = [index[0].indices(batch_size) for index in index_map.values()]
    first, last = min(s[0] for s in starts), max(s[1] for s in starts)
    if last - first != len(starts) * (batch_size // mesh.devices.size):
        raise ValueError(f"This process's devices do not hold one block of rows of the mesh {mesh}; build it "
                         "with global_devices().")
    return slice(first, last)


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Global arrays split over `mesh`'s axis from this process's rows of them (numpy, leading axis)."""
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    share = mesh.devices.size // len(mesh.local_devices)  # the global batch per local row

    def place(rows: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(sharding, rows, (len(rows) * share, *np.shape(rows)[1:]))

    return jax.tree_util.tree_map(place, local)


def broadcast_path(path: str | os.PathLike | None, limit: int = 4096) -> Path:
    """Process 0's `path`, on every process (the run directory only process 0 names)."""
    if process_count() == 1:
        return Path(path)
    from jax.experimental import multihost_utils

    encoded = np.zeros(limit, np.uint8)
    if is_main_process():
        raw = os.fsencode(path)
        encoded[:len(raw)] = np.frombuffer(raw, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
    return Path(os.fsdecode(received.tobytes().rstrip(b"\0")))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing with one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# What JAX's collectives and coordination service raise when another process of the run is gone.
_LOST_PROCESS = re.compile(r"Gloo .* failed|Connection closed by peer|Connection reset by peer|heartbeat timeout|"
                           r"coordination service|tasks are unhealthy|Barrier failed", re.IGNORECASE)


def lost_another_process(error: BaseException) -> bool:
    """Whether `error` says that another process of a multi-process run stopped or lost contact."""
    return process_count() > 1 and bool(_LOST_PROCESS.search(str(error)))
