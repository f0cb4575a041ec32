"""Multi-host helpers: start-up, and moving small host values between processes.

Every process runs the same jitted calls on global arrays; host-side decisions (which prompts,
which rubric) must therefore be identical everywhere. Prompts are read per process and
gathered; the meta step's rubric is computed everywhere and process 0's copy is broadcast.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from mpo_jax.train.config import DistributedSpec


def initialize(spec: DistributedSpec) -> None:
    """`jax.distributed.initialize` from the config (before any other JAX call)."""
    if not spec.initialize:
        return
    if spec.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", spec.cpu_collectives)
    kwargs = {}
    if spec.coordinator_address:
        kwargs["coordinator_address"] = spec.coordinator_address
    if spec.num_processes > 0:
        kwargs["num_processes"] = spec.num_processes
    if spec.process_id >= 0:
        kwargs["process_id"] = spec.process_id
    jax.distributed.initialize(**kwargs)


def is_main() -> bool:
    return jax.process_index() == 0


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows (same shape on each) in process order."""
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def broadcast_text(text: str) -> str:
    """Process 0's `text` on every process."""
    if jax.process_count() == 1:
        return text
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    length = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buffer = np.zeros((length,), np.uint8)
    if is_main():
        buffer[:] = data[:length]
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode("utf-8")


def sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
