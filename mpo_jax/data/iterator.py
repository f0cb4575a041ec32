"""`PromptIterator`: deterministic, resumable, process-sharded batches of prompts.

Every process walks the same global stream: epoch `e` visits the source in the order
`epoch_order(size, seed, e)`, skips records whose prompt is longer than `max_prompt_tokens`
and groups the rest into global batches of `batch_size * process_count`; process `p` takes the
slice `[p * batch_size, (p + 1) * batch_size)` of each. A global batch never spans two epochs
(the epoch's remainder is dropped), so all processes step in lockstep and the state (epoch,
position in the epoch's order) is the same on every process.

Prompt lengths are computed lazily, when the walk first reaches a record, and remembered (one
integer per record); token ids are kept only for the process's own share of a batch.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mpo_jax.errors import InvalidValueError

__all__ = ["STATE_FORMAT", "PromptBatch", "PromptIterator", "RecordSource", "epoch_order"]

log = logging.getLogger(__name__)

STATE_FORMAT = "mpo_jax.PromptIterator/1"
_MASK64 = (1 << 64) - 1
# State fields that must match the iterator a state is restored into (they define the stream).
_STREAM_FIELDS = ("seed", "source_size", "global_batch_size", "shuffle", "max_prompt_tokens", "source_fingerprint")
_POSITION_FIELDS = ("epoch", "position", "step")


@runtime_checkable
class RecordSource(Protocol):
    """What the iterator reads: `len(source)` and `source[i] -> record dict` (a list of dicts will do)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class PromptBatch:
    """One process's share of a global batch: records, their prompt token ids and source indices."""

    records: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    indices: list[int]
    epoch: int
    step: int  # 0-based number of this global batch since the start of the stream


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The visiting order of an epoch: indices sorted by a splitmix64 hash of (seed, epoch, index).

    Plain integer arithmetic, so the order is the same on every machine and numpy version.
    """
    if not shuffle:
        return np.arange(size, dtype=np.int64)
    epoch_key = _splitmix64(np.array([(_splitmix64_int(seed) + epoch) & _MASK64], dtype=np.uint64))
    keys = _splitmix64(np.arange(size, dtype=np.uint64) ^ epoch_key)  # a bijection: all keys differ
    return np.argsort(keys, kind="stable").astype(np.int64)


class PromptIterator:
    """Batches of (record, prompt token ids) for the trainer, repeating epochs with fresh orders.

    `source` is any random-access sequence of record dicts (`len`, `source[i]`), such as a
    `TaskSource`. `encode(record)` returns the prompt's token ids (task template and chat
    template applied by the caller). `batch_size` is per process. `num_epochs=None` repeats forever.
    """

    def __init__(self, source: RecordSource, encode: Callable[[Mapping[str, Any]], Sequence[int]], *,
                 batch_size: int, max_prompt_tokens: int, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, num_epochs: int | None = None) -> None:
        _check_source(source)
        if not callable(encode):
            raise TypeError(f"encode must be a callable record -> token ids, got {type(encode).__name__}")
        self._batch_size = _positive_int("batch_size", batch_size)
        self._max_prompt_tokens = _positive_int("max_prompt_tokens", max_prompt_tokens)
        self._process_count = _positive_int("process_count", process_count)
        self._process_index = _int("process_index", process_index)
        if not 0 <= self._process_index < self._process_count:
            raise InvalidValueError(f"process_index must be in [0, {self._process_count}), got {process_index}")
        self._seed = _int("seed", seed)
        if not 0 <= self._seed <= _MASK64:
            raise InvalidValueError(f"seed must be in [0, 2**64), got {seed}")
        self._num_epochs = None if num_epochs is None else _positive_int("num_epochs", num_epochs)
        self._source, self._encode, self._shuffle = source, encode, bool(shuffle)
        self._size = len(source)
        self._global_batch = self._batch_size * self._process_count
        self._lengths = np.full(self._size, -1, dtype=np.int64)  # prompt length per record, -1 = not yet known
        self._order: tuple[int, np.ndarray] | None = None
        self._epoch = self._position = self._step = 0
        self._reported = False

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[PromptBatch]:
        return self

    def __next__(self) -> PromptBatch:
        return self.next()

    def next(self) -> PromptBatch:
        """This process's share of the next global batch; StopIteration after `num_epochs` epochs."""
        while True:
            if self._num_epochs is not None and self._epoch >= self._num_epochs:
                raise StopIteration
            chosen, end, encoded = self._collect(self._epoch, self._position)
            if len(chosen) == self._global_batch:
                break
            if self._position == 0:
                raise InvalidValueError(self._too_few_message(len(chosen)))
            self._epoch, self._position = self._epoch + 1, 0  # drop the epoch's remainder
        share = chosen[self._process_index * self._batch_size:(self._process_index + 1) * self._batch_size]
        records = [encoded[i][0] if i in encoded else self._record(i) for i in share]
        ids = [encoded[i][1] if i in encoded else self._token_ids(i, record) for i, record in zip(share, records)]
        batch = PromptBatch(records=records, prompt_ids=ids, indices=share, epoch=self._epoch, step=self._step)
        self._position, self._step = end, self._step + 1
        return batch

    # -- state ----------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """A small JSON-serialisable state; `set_state` of it replays the batches that follow it."""
        return {"format": STATE_FORMAT, "epoch": self._epoch, "position": self._position, "step": self._step,
                **self._stream_identity()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (from `get_state` of an iterator over the same stream)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from PromptIterator.get_state, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise InvalidValueError(f"state format is {state.get('format')!r}, expected {STATE_FORMAT!r}; "
                                    f"pass a dict returned by PromptIterator.get_state")
        missing = [key for key in (*_POSITION_FIELDS, *_STREAM_FIELDS) if key not in state]
        if missing:
            raise InvalidValueError(f"state lacks {', '.join(missing)}; pass a dict returned by "
                                    "PromptIterator.get_state")
        mine = self._stream_identity()
        diffs = [f"{key}: state has {state[key]!r}, this iterator has {mine[key]!r}"
                 for key in _STREAM_FIELDS if state[key] != mine[key]]
        if diffs:
            raise InvalidValueError("state belongs to a different prompt stream (" + "; ".join(diffs) + "); build the "
                                    "iterator with the seed, source, batch_size * process_count, shuffle and "
                                    "max_prompt_tokens of the run that saved it")
        epoch, position, step = (_int(f"state[{key!r}]", state[key]) for key in _POSITION_FIELDS)
        if epoch < 0 or step < 0 or not 0 <= position <= self._size:
            raise InvalidValueError(f"state has epoch={epoch}, position={position}, step={step}; expected epoch >= 0, "
                                    f"step >= 0 and 0 <= position <= {self._size}")
        self._epoch, self._position, self._step = epoch, position, step

    # -- filtering statistics -------------------------------------------------------------------

    @property
    def num_checked(self) -> int:
        """Records whose prompt length is known so far (all of them after one full epoch)."""
        return int(np.count_nonzero(self._lengths >= 0))

    @property
    def num_filtered(self) -> int:
        """Records seen so far whose prompt is longer than `max_prompt_tokens` (never yielded)."""
        return int(np.count_nonzero(self._lengths > self._max_prompt_tokens))

    # -- internals ------------------------------------------------------------------------------

    def _stream_identity(self) -> dict[str, Any]:
        fingerprint = getattr(self._source, "fingerprint", None)
        return {"seed": self._seed, "source_size": self._size, "global_batch_size": self._global_batch,
                "shuffle": self._shuffle, "max_prompt_tokens": self._max_prompt_tokens,
                "source_fingerprint": fingerprint if isinstance(fingerprint, str) else None}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self._size, self._seed, epoch, self._shuffle))
        return self._order[1]

    def _collect(self, epoch: int, start: int) -> tuple[list[int], int, dict[int, tuple[dict[str, Any], list[int]]]]:
        """The next global batch's source indices from `start` in the epoch's order, the position
        after it, and the (record, ids) encoded on the way; fewer indices when the epoch runs out."""
        order = self._epoch_order(epoch)
        chosen: list[int] = []
        encoded: dict[int, tuple[dict[str, Any], list[int]]] = {}
        position = start
        while position < self._size and len(chosen) < self._global_batch:
            index = int(order[position])
            position += 1
            if self._lengths[index] < 0:
                record = self._record(index)
                encoded[index] = (record, self._token_ids(index, record))
            if self._lengths[index] <= self._max_prompt_tokens:
                chosen.append(index)
        if position == self._size and not self._reported and self.num_checked == self._size:
            self._reported = True
            log.info("%d of %d prompts are longer than %d tokens and are skipped",
                     self.num_filtered, self._size, self._max_prompt_tokens)
        return chosen, position, encoded

    def _record(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        if not isinstance(record, Mapping):
            raise TypeError(f"source[{index}] is a {type(record).__name__}, expected a record dict")
        return record  # type: ignore[return-value]

    def _token_ids(self, index: int, record: Mapping[str, Any]) -> list[int]:
        ids = self._encode(record)
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
            raise TypeError(f"encode(source[{index}]) returned a {type(ids).__name__}; it must return a list of "
                            f"token ids")
        token_ids = [operator.index(token) for token in ids]
        if not token_ids:
            raise InvalidValueError(f"encode(source[{index}]) returned no token ids; every prompt needs at least "
                                    "one token")
        self._lengths[index] = len(token_ids)
        return token_ids

    def _too_few_message(self, kept: int) -> str:
        return (f"only {kept} of {self._size} records have prompts of at most {self._max_prompt_tokens} tokens "
                f"({self.num_filtered} filtered out), fewer than one global batch of {self._global_batch} "
                f"({self._batch_size} per process x {self._process_count} processes); raise max_prompt_tokens, "
                f"lower batch_size or use a larger source")


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 output function on uint64 arrays (wrapping arithmetic)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _splitmix64_int(value: int) -> int:
    return int(_splitmix64(np.array([value & _MASK64], dtype=np.uint64))[0])


def _check_source(source: Any) -> None:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")) or isinstance(source, (str, bytes)):
        raise TypeError(f"source must be a random-access sequence of record dicts (len() and source[i]), "
                        f"got {type(source).__name__}")
    if len(source) == 0:
        raise InvalidValueError("source holds no records; check the data split or data_dir it was built from")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _positive_int(name: str, value: Any) -> int:
    number = _int(name, value)
    if number < 1:
        raise InvalidValueError(f"{name} must be at least 1, got {value}")
    return number
