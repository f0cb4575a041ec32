"""Jitting the updates with explicit shardings over the (data, fsdp, tensor) mesh.

The train state keeps the shardings its parameters were loaded with (partition rules); the
optimizer state follows them. Batches are split over (`data`, `fsdp`) on their leading axis.
`jax.jit` gets these as `in_shardings`/`out_shardings` and donates the state, so an update
runs in place and new data of the same shapes reuses the compiled executable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mpo_jax.engine import sharding as sharding_lib
from mpo_jax.errors import InvalidValueError, MpoError
from mpo_jax.rl.batch import RolloutBatch, validate_batch
from mpo_jax.rl.train_state import TrainState


def batch_spec(mesh: Mesh) -> NamedSharding:
    axes = tuple(a for a in sharding_lib.LOGICAL_TO_MESH["batch"] if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """The state's own shardings; leaves not yet on the mesh (counters, scalars) are replicated."""
    replicated = sharding_lib.replicated(mesh)

    def sharding_of(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated

    return jax.tree.map(sharding_of, state)


def place_state(state: TrainState, mesh: Mesh | None) -> TrainState:
    if mesh is None:
        return state
    return jax.device_put(state, state_shardings(state, mesh))


def place_batch(batch: RolloutBatch, mesh: Mesh | None) -> RolloutBatch:
    """Host arrays -> device arrays split over the batch axes (checked first)."""
    validate_batch(batch)
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, batch)
    parallel = sharding_lib.batch_parallelism(mesh)
    if batch.batch_size % parallel:
        raise InvalidValueError(f"batch size {batch.batch_size} must be a multiple of data x fsdp = {parallel}")
    spec = batch_spec(mesh)
    return jax.tree.map(lambda x: sharding_lib.place(np.asarray(x), spec), batch)


def abstract_rows(shape: tuple[int, ...], dtype, mesh: Mesh) -> jax.ShapeDtypeStruct:
    """A per-rollout array as `place_batch` lays it out (leading axis over data x fsdp), as shapes."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_spec(mesh))


def abstract_batch(batch: int, query_len: int, response_len: int, mesh: Mesh) -> RolloutBatch:
    """The `RolloutBatch` the trainer places for an update, as shapes and shardings (`mpo_jax.plan`)."""
    b, p, r = batch, query_len, response_len
    i32, f32, bool_ = np.int32, np.float32, np.bool_
    return RolloutBatch(query=abstract_rows((b, p), i32, mesh), query_mask=abstract_rows((b, p), bool_, mesh),
                        response=abstract_rows((b, r), i32, mesh), response_mask=abstract_rows((b, r), bool_, mesh),
                        logprobs=abstract_rows((b, r), f32, mesh), ref_logprobs=abstract_rows((b, r), f32, mesh),
                        values=abstract_rows((b, r), f32, mesh), scores=abstract_rows((b,), f32, mesh),
                        contains_eos=abstract_rows((b,), bool_, mesh))


def compile_update(update_fn: Callable, state: TrainState, mesh: Mesh | None) -> Callable:
    """jit(update) with in/out shardings and the state donated."""
    if mesh is None:
        return jax.jit(update_fn, donate_argnums=(0,))
    state_s = state_shardings(state, mesh)
    replicated = sharding_lib.replicated(mesh)
    return jax.jit(update_fn, in_shardings=(state_s, batch_spec(mesh), replicated),
                   out_shardings=(state_s, replicated), donate_argnums=(0,))


def compile_rollout_stats(stats_fn: Callable, state: TrainState, mesh: Mesh | None) -> Callable:
    if mesh is None:
        return jax.jit(stats_fn)
    rows = batch_spec(mesh)
    return jax.jit(stats_fn, in_shardings=(state_shardings(state, mesh), rows, rows, rows, rows),
                   out_shardings=rows)


class NonFiniteUpdateError(MpoError, FloatingPointError):
    """An update produced NaN/inf and the config says to stop."""


def check_finite(metrics: dict[str, Any], update_index: int, mode: str) -> dict[str, float]:
    """Metrics to host floats; with mode="raise", stop naming the update and offending metrics."""
    host = {name: float(value) for name, value in jax.device_get(metrics).items()}
    bad = sorted(name for name, value in host.items() if not np.isfinite(value))
    if host.get("nonfinite/inputs"):
        bad.insert(0, "inputs (scores, log-probs or values)")
    if host.get("skipped_steps"):
        bad.append(f"skipped_steps={int(host['skipped_steps'])}")
    if bad and mode == "raise":
        raise NonFiniteUpdateError(f"update {update_index}: non-finite values in {', '.join(bad)}; "
                                   "the parameters of the failing steps were not changed")
    return host
