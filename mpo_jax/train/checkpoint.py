"""Checkpoints of a training run: trainable parameters, optimizer state, step and host state.

A checkpoint holds what cannot be rebuilt from the base model: the trainable parameters (LoRA
adapters, or all weights with full fine-tuning), the optax state and the step, as array
pytrees (orbax `StandardSave`, sharded and multi-host aware), plus a JSON `host_state` (RNG
key data, data-iterator position, rubric history, counters). The frozen weights, the
reference parameters and the graph definitions come from loading the base model again.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-save leaves no checkpoint that `latest_update` would pick. Arrays are stored under
names derived from their pytree paths (`params/policy/layers/q_proj_lora_a/value`), so the
stored layout does not depend on how nnx or optax flatten their containers, and a restore can
name every path where the checkpoint and the freshly built template differ.

Files can still be damaged after a save (a disk fault, a partial copy, bytes flipped). Orbax
detects some of it (an unreadable index or chunk) but restores flipped bytes inside an array's
data silently, so each save also stores two 32-bit sums of every array's bits in the host state,
and a restore recomputes and compares them. A checkpoint that cannot be read back or whose sums
differ raises `CheckpointCorruptError`; `restore_latest` then falls back to the newest one that
restores.

`PreemptionGuard` turns SIGTERM (TPU preemption, `kill`) into a flag the training loop polls
after each update; the loop then saves with `force=True` and exits.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mpo_jax.errors import FileFormatError, InvalidValueError, MissingFileError, MpoError
from mpo_jax.rl.train_state import TrainState

_LOG = logging.getLogger(__name__)

STATE_ITEM = "state"
HOST_ITEM = "host"
# Host-state key of the per-array bit sums written by `save` and checked by `restore`.
FINGERPRINTS_KEY = "_array_fingerprints"
CORRUPT_SUFFIX = ".corrupt"  # a checkpoint set aside by `restore_latest` (orbax ignores the name)
_MAX_LISTED = 12  # mismatching paths shown in an error before "... and N more"


class CheckpointMismatchError(MpoError, ValueError):
    """The checkpoint's arrays do not fit the template state (different model or config)."""


class CheckpointCorruptError(FileFormatError):
    """A checkpoint's files cannot be read back, or its arrays differ from what was saved."""


class NoRestorableCheckpointError(CheckpointCorruptError):
    """Every checkpoint of a directory is corrupt or partial."""


@dataclass(frozen=True)
class RestoredCheckpoint:
    """What `Checkpointer.restore_latest` restored, and the newer checkpoints it had to skip."""

    update: int
    state: TrainState
    host_state: dict[str, Any]
    skipped: tuple[tuple[int, str], ...] = ()  # (update, why it did not restore), newest first


# ---------------------------------------------------------------------------------------------
# pytree <-> nested dict of path names


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _named_leaves(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """(path names, leaves, treedef): names are plain strings so orbax stores nested dicts."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [tuple(_key_name(k) for k in path) for path, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("two leaves of the train state map to the same checkpoint name; "
                         "use distinct dict keys in the parameter and optimizer trees")
    return names, [leaf for _, leaf in pairs], treedef


def _nest(names: Iterable[tuple[str, ...]], leaves: Iterable[Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, leaf in zip(names, leaves):
        node = nested
        for part in name[:-1]:
            node = node.setdefault(part, {})
        node[name[-1]] = leaf
    return nested


def _pick(nested: Mapping[str, Any], name: tuple[str, ...]) -> Any:
    node: Any = nested
    for part in name:
        node = node[part]
    return node


def _flat_metadata(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """'a/b/c' -> (shape, dtype name) for every array in a checkpoint's metadata tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(_key_name(k) for k in path)
        dtype = getattr(leaf, "dtype", None)
        out[name] = (tuple(getattr(leaf, "shape", ())), np.dtype(dtype).name if dtype is not None else "?")
    return out


def _saved_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _restore_target(leaf: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding of a template leaf (a jax.Array or a ShapeDtypeStruct)."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)


# ---------------------------------------------------------------------------------------------
# array fingerprints


def _as_uint32(leaf: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 values (narrower types widened, 64-bit types split in two)."""
    if leaf.dtype == jnp.bool_:
        return leaf.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[jnp.dtype(leaf.dtype).itemsize]
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint_arrays(leaves: list[jax.Array]) -> jax.Array:
    """[n, 2] uint32: per leaf, the sum of its bits and the sum weighted by position (both mod 2**32).

    Integer sums do not depend on the reduction order, so the values are the same on any mesh;
    the weighted sum also changes when values only trade places.
    """
    rows = []
    for leaf in leaves:
        bits = _as_uint32(leaf).reshape(-1)
        weights = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
        rows.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def _fingerprints(names: list[tuple[str, ...]], leaves: list[Any]) -> dict[str, list[int]]:
    sums = np.asarray(jax.device_get(_fingerprint_arrays(list(leaves))))
    return {"/".join(name): [int(a), int(b)] for name, (a, b) in zip(names, sums, strict=True)}


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (each process reads only its own shards)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _short(err: BaseException, limit: int = 300) -> str:
    """The first line of an error, clipped: TensorStore messages run to kilobytes of JSON spec."""
    text = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


# ---------------------------------------------------------------------------------------------
# host state validation


def _check_json(value: Any, where: str = "host_state") -> None:
    """Raise naming the first value JSON would reject or silently change (non-string keys)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}, which JSON cannot store; store it as a string or None")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r} of type {type(key).__name__}; JSON keys must be "
                                 "strings, so convert it with str() (and back when restoring)")
            _check_json(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__name__}, which JSON cannot store; "
                     "convert it to int/float/str/list/dict first (e.g. .tolist() or int())")


# ---------------------------------------------------------------------------------------------
# Checkpointer


def _as_path(directory: str | os.PathLike) -> epath.Path:
    text = os.fspath(directory)
    return epath.Path(text) if "://" in text else epath.Path(Path(text).expanduser().resolve())


class Checkpointer:
    """Periodic, crash-safe checkpoints of a `TrainState` and a JSON host state, keeping the last `keep`.

    Call `save` after every update: it writes when `update % save_every == 0` (or with `force`).
    All processes of a multi-host run must call `save`, `restore` and `close` together.
    `create=False` opens existing checkpoints for reading without creating the directory.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = False,
                 create: bool = True):
        if not isinstance(save_every, int) or save_every < 1:
            raise InvalidValueError(f"save_every must be a positive integer (updates between checkpoints), "
                                    f"got {save_every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise InvalidValueError(f"keep must be a positive integer (checkpoints kept on disk), got {keep!r}")
        self.directory = _as_path(directory)
        self.save_every = save_every
        self.keep = keep
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=create,
                                               enable_async_checkpointing=async_save)
        handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), HOST_ITEM: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- saving

    def should_save(self, update: int, *, force: bool = False) -> bool:
        return force or update % self.save_every == 0

    def save(self, update: int, state: TrainState, host_state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Write a checkpoint for `update` if due (or forced); False when skipped or already saved.

        `host_state` must be JSON data with string keys; tuples come back as lists.
        """
        if not isinstance(update, (int, np.integer)) or update < 0:
            raise InvalidValueError(f"update must be a non-negative integer, got {update!r}")
        update = int(update)
        if not self.should_save(update, force=force):
            return False
        if not isinstance(host_state, Mapping):
            raise TypeError(f"host_state must be a dict of JSON data, got {type(host_state).__name__}")
        _check_json(host_state)
        steps = self._manager.all_steps()
        if update in steps:
            return False
        if steps and update < max(steps):
            raise InvalidValueError(f"update {update} is older than the latest checkpoint (update {max(steps)}) in "
                                    f"{self.directory}; restore the latest checkpoint before training on, or write "
                                    "to a new directory")
        if FINGERPRINTS_KEY in host_state:
            raise InvalidValueError(f"host_state may not use the key {FINGERPRINTS_KEY!r}; the checkpointer "
                                    "stores the arrays' fingerprints under it")
        names, leaves, _ = _named_leaves(_saved_tree(state))
        host = {**host_state, FINGERPRINTS_KEY: _fingerprints(names, leaves)}
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(_nest(names, leaves)),
                                     HOST_ITEM: ocp.args.JsonSave(host)})
        return bool(self._manager.save(update, args=args, force=True))

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save is on disk and finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and deletions; call before the process exits."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading

    def all_updates(self) -> list[int]:
        """Updates with a finalized checkpoint, oldest first (unfinished temporary saves are not listed)."""
        return sorted(self._manager.all_steps())

    def latest_update(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, update: int | None, template_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """(state, host_state) of a checkpoint (the latest with `update=None`).

        Arrays land with the shapes, dtypes and shardings of `template_state`, a state built
        fresh for this run (its array leaves may be `jax.ShapeDtypeStruct`s with shardings).
        Everything not saved (frozen weights, reference parameters, optimizer) comes from it.
        Raises `CheckpointMismatchError` when the checkpoint belongs to another config and
        `CheckpointCorruptError` when its files cannot be read back or its arrays changed on disk.
        """
        update = self._resolve_update(update)
        where = self.directory / str(update)
        names, leaves, treedef = _named_leaves(_saved_tree(template_state))
        targets = [_restore_target(leaf) for leaf in leaves]
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(_nest(names, targets)),
                                     HOST_ITEM: ocp.args.JsonRestore()})
        failure: Exception | None = None
        try:
            self._check_matches(update, names, targets)
            restored = self._manager.restore(update, args=args)
            arrays = [_pick(restored[STATE_ITEM], name) for name in names]
            host = dict(restored[HOST_ITEM])
        except MpoError:
            raise
        except Exception as err:  # orbax and TensorStore raise ValueError, OSError, KeyError, ...
            failure = err
        if not _all_processes_agree(failure is None):
            reason = _short(failure) if failure is not None else "another process could not read its shards"
            raise CheckpointCorruptError(f"checkpoint {where} cannot be read back ({reason})") from failure
        expected = host.pop(FINGERPRINTS_KEY, None)  # None: written before fingerprints existed
        if expected is not None:
            got = _fingerprints(names, arrays)
            changed = sorted(name for name in got if expected.get(name) != got[name])
            if changed:
                shown = ", ".join(changed[:_MAX_LISTED]) + (f" and {len(changed) - _MAX_LISTED} more"
                                                            if len(changed) > _MAX_LISTED else "")
                raise CheckpointCorruptError(f"checkpoint {where} is corrupt: the contents of {len(changed)} "
                                             f"array(s) differ from what was saved ({shown})")
        tree = jax.tree_util.tree_unflatten(treedef, arrays)
        state = template_state.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])
        return state, host

    def restore_latest(self, template_state: TrainState, *, set_aside: bool = False) -> RestoredCheckpoint | None:
        """The newest checkpoint that restores (None when there is no checkpoint at all).

        A corrupt or partial checkpoint is skipped with a warning naming it. With `set_aside` (a
        run resuming), the skipped ones are renamed to `<update>.corrupt` once an older one
        restored, so the run saves those updates again; nothing is renamed when none restores.
        Raises `NoRestorableCheckpointError` when every checkpoint fails.
        """
        skipped: list[tuple[int, str]] = []
        for update in reversed(self.all_updates()):
            try:
                state, host = self.restore(update, template_state)
            except CheckpointCorruptError as err:
                _LOG.warning("%s; trying the previous checkpoint", err)
                skipped.append((update, str(err)))
                continue
            if skipped and set_aside:
                self._set_aside([bad for bad, _ in skipped])
            return RestoredCheckpoint(update=update, state=state, host_state=host, skipped=tuple(skipped))
        if skipped:
            raise NoRestorableCheckpointError(
                f"no checkpoint in {self.directory} can be restored:\n  " + "\n  ".join(r for _, r in skipped)
                + "\nRestore the files from a copy, or move the folder away to start the run over")
        return None

    def _set_aside(self, updates: list[int]) -> None:
        """Rename bad checkpoints out of orbax's sight (process 0 renames; every process reloads)."""
        if jax.process_index() == 0:
            for update in updates:
                source = self.directory / str(update)
                target = self.directory / f"{update}{CORRUPT_SUFFIX}"
                number = 1
                while target.exists():
                    target = self.directory / f"{update}{CORRUPT_SUFFIX}-{number}"
                    number += 1
                source.rename(target)
                _LOG.warning("moved the unreadable checkpoint %s to %s", source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mpo_jax_checkpoint_set_aside")
        self._manager.reload()

    def _resolve_update(self, update: int | None) -> int:
        available = self.all_updates()
        if not available:
            raise MissingFileError(f"no finished checkpoint in {self.directory}; start the run from scratch, or "
                                   "point the checkpoint directory at the run to resume")
        if update is None:
            return available[-1]
        if update not in available:
            raise MissingFileError(f"no checkpoint for update {update} in {self.directory}; "
                                   f"available updates: {available}")
        return update

    def _check_matches(self, update: int, names: list[tuple[str, ...]], targets: list[jax.ShapeDtypeStruct]) -> None:
        """Raise naming every path whose presence, shape or dtype differs from the checkpoint."""
        stored = _flat_metadata(self._manager.item_metadata(update)[STATE_ITEM])
        wanted = {"/".join(n): (tuple(t.shape), np.dtype(t.dtype).name) for n, t in zip(names, targets)}
        problems = {name: "in the checkpoint but not in this run's state" for name in set(stored) - set(wanted)}
        problems.update({name: "in this run's state but not in the checkpoint" for name in set(wanted) - set(stored)})
        for name in set(stored) & set(wanted):
            (s_shape, s_dtype), (w_shape, w_dtype) = stored[name], wanted[name]
            if s_shape != w_shape or s_dtype != w_dtype:
                problems[name] = f"checkpoint {s_dtype}{list(s_shape)}, this run {w_dtype}{list(w_shape)}"
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(update)} does not fit this run's train state: the config (model, "
                "LoRA rank, critic, optimizer or dtype) differs from the run that wrote the checkpoint. Use the same "
                "config, or a new checkpoint directory. Mismatches:\n  " + "\n  ".join(_summarize(problems)))


def _summarize(problems: Mapping[str, str]) -> list[str]:
    """Parameter paths first; optimizer entries, which mirror the parameters, only when nothing else differs."""
    params = sorted(name for name in problems if not name.startswith("opt_state/"))
    shown = (params or sorted(problems))[:_MAX_LISTED]
    lines = [f"{name}: {problems[name]}" for name in shown]
    if len(problems) > len(shown):
        lines.append(f"... and {len(problems) - len(shown)} more paths (optimizer-state entries included)")
    return lines


# ---------------------------------------------------------------------------------------------
# preemption


class PreemptionGuard:
    """SIGTERM -> a flag polled by the training loop; the previous handlers come back on exit.

    The handler only sets a flag (no I/O, no JAX calls). Single process: poll `requested` after
    each update. Multi-host: every process calls `should_stop(update)` after each update, which
    agrees across processes (any process signalled, or JAX's preemption sync point reached), so
    all of them save the same update together. The guard must be entered on the main thread.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._requested = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once one of the signals arrived in this process."""
        return self._requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered on the main thread (Python only delivers signals "
                               "there); create it in the training loop's thread")
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def should_stop(self, update: int) -> bool:
        """Whether to save and exit after `update`; identical on every process of a multi-host run."""
        if jax.process_count() == 1:
            return self._requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._requested, np.int32))
        try:
            synced = bool(multihost_utils.reached_preemption_sync_point(update))
        except RuntimeError:  # the distributed preemption service is not running
            synced = False
        return bool(np.any(flags)) or synced
