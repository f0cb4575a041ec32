"""The rubric's history: every version in order and every rejected proposal, saved to the run directory.

The meta-reward model proposes a new rubric every few updates; `RubricHistory` validates each
proposal against the task's limits before it takes effect, logs the attempt (accepted or not)
and writes `rubric_iter_{t}.txt`, `rubric_rejected_{attempt}.txt` and `rubric_history.json`.
The rubric value itself (`Rubric`, parsing, limits, scales) is `mpo_jax.rubric`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpo_jax.errors import MissingFileError
from mpo_jax.fileio import atomic_write_text
from mpo_jax.rubric import DEFAULT_LIMITS, Rubric, RubricError, RubricLimits, validate

if TYPE_CHECKING:
    from mpo_jax.reward.meta import MetaResult

__all__ = ["HISTORY_FILE", "HISTORY_FORMAT", "JUDGE_REFUSED", "HistoryEvent", "RubricHistory", "rubric_file_name"]

HISTORY_FILE = "rubric_history.json"
HISTORY_FORMAT = "mpo-jax.rubric_history/1"
# `RubricHistory.apply`'s answer when the meta step accepted a rubric that the judge refused.
JUDGE_REFUSED = "judge_refused"
# Model text may hold lone surrogates: they are written escaped rather than refused.
_TEXT_ERRORS = "backslashreplace"


def rubric_file_name(iteration: int) -> str:
    return f"rubric_iter_{iteration}.txt"


def _rejected_file_name(attempt: int) -> str:
    return f"rubric_rejected_{attempt}.txt"


@dataclass(frozen=True)
class HistoryEvent:
    """One attempt to set the rubric: an accepted version or a rejected proposal.

    `attempt` numbers all events from 0. For an accepted event `iteration` is the new version
    and `parent` the version it replaced; a rejected event has `iteration=None`, `parent` set to
    the version that stayed current, and `error` saying why. `raw` is a rejected proposal's
    text (saved next to the history so that failures can be read later).
    """

    attempt: int
    accepted: bool
    reason: str
    iteration: int | None
    parent: int | None
    created_step: int | None = None
    task: str | None = None
    error: str | None = None
    num_items: int | None = None
    item_chars: tuple[int, ...] = ()
    total_chars: int | None = None
    file: str | None = None
    raw: str | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["raw"]
        data["item_chars"] = list(self.item_chars)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HistoryEvent:
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        kwargs = {key: value for key, value in data.items() if key in names}
        kwargs["item_chars"] = tuple(kwargs.get("item_chars") or ())
        return cls(**kwargs)


class RubricHistory:
    """Every rubric version in order, plus a log of every attempt, accepted or rejected.

    `append` validates before accepting; a proposal that fails is logged as rejected and the
    current rubric stays in force. Saving writes `rubric_iter_{t}.txt` per version,
    `rubric_rejected_{attempt}.txt` per rejected proposal with text, and `rubric_history.json`
    last, each atomically (temp file + rename), so a crash never leaves a half-written file or
    a log that names a missing version.
    """

    def __init__(self, initial: Rubric | None = None, *, reason: str = "initial rubric",
                 limits: RubricLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._versions: list[Rubric] = []
        self._events: list[HistoryEvent] = []
        if initial is not None:
            self.append(initial, reason=reason)

    @property
    def versions(self) -> tuple[Rubric, ...]:
        return tuple(self._versions)

    @property
    def events(self) -> tuple[HistoryEvent, ...]:
        return tuple(self._events)

    @property
    def current(self) -> Rubric:
        if not self._versions:
            raise LookupError("the rubric history is empty; append an initial rubric first")
        return self._versions[-1]

    def __len__(self) -> int:
        return len(self._versions)

    def append(self, rubric: Rubric, *, reason: str, created_step: int | None = None) -> Rubric:
        """Validate and add `rubric` as the next version; returns it re-stamped.

        The new version's `iteration` is the current one + 1 (the first version keeps its own)
        and its `parent` the current iteration. If validation fails, the attempt is logged as
        rejected and the `RubricError` is re-raised; the current rubric does not change.
        """
        step = rubric.created_step if created_step is None else created_step
        try:
            validate(rubric, self.limits)
        except RubricError as err:
            self.reject(rubric.render(), reason=reason, error=str(err), created_step=step)
            raise
        if self._versions:
            previous = self.current
            stamped = dataclasses.replace(rubric, iteration=previous.iteration + 1, parent=previous.iteration,
                                          created_step=step, task=rubric.task or previous.task)
        else:
            stamped = dataclasses.replace(rubric, created_step=step)
        self._versions.append(stamped)
        self._events.append(HistoryEvent(
            attempt=len(self._events), accepted=True, reason=reason, iteration=stamped.iteration,
            parent=stamped.parent, created_step=step, task=stamped.task, num_items=stamped.num_items,
            item_chars=stamped.item_chars, total_chars=stamped.total_chars,
            file=rubric_file_name(stamped.iteration)))
        return stamped

    def propose(self, text: str, *, reason: str, created_step: int | None = None,
                install: Callable[[Rubric], None] | None = None, refused_reason: str | None = None) -> Rubric | None:
        """Parse untrusted MRM output and append it; on failure log the rejection and return None.

        `install` (e.g. `Judge.set_rubric`) must take the parsed rubric before it is appended and
        then gets the appended version; a `RubricError` from it is a failure like a parse error.
        Failures are logged with `refused_reason` when given, else `reason`.
        """
        try:
            rubric = Rubric.parse(text, limits=self.limits,
                                  task=self._versions[-1].task if self._versions else None)
            if install is not None:
                install(rubric)
        except RubricError as err:
            self.reject(text if isinstance(text, str) else repr(text), reason=refused_reason or reason,
                        error=str(err), created_step=created_step)
            return None
        stamped = self.append(rubric, reason=reason, created_step=created_step)
        if install is not None:
            install(stamped)
        return stamped

    def apply(self, result: MetaResult, *, created_step: int | None = None, proposal: str | None = None,
              install: Callable[[Rubric], None] | None = None) -> str | None:
        """Record a meta step's outcome; None when its rubric is now current, else why the current one stays.

        The new rubric is read back from text: `proposal` where the caller's processes agreed on
        one (a run broadcasts process 0's), else `result.rubric.render()` for an accepted step; so
        the version recorded is what a saved history reloads. `install` must take it first (see
        `propose`): a refusal is logged as rejected and answered `JUDGE_REFUSED`. A step that
        kept the rubric is logged with its merged text and answered with `result.reason_code`.
        """
        if proposal is None:
            proposal = result.rubric.render() if result.accepted else ""
        if not proposal:
            self.reject(result.merged_text or None, reason=f"meta step kept the rubric ({result.reason_code})",
                        error=result.reason, created_step=created_step)
            return result.reason_code
        new = self.propose(proposal, reason=result.reason, created_step=created_step, install=install,
                           refused_reason="the judge cannot take the new rubric")
        return None if new is not None else JUDGE_REFUSED

    def reject(self, raw: str | None, *, reason: str, error: str, created_step: int | None = None) -> HistoryEvent:
        """Log a failed attempt (bad MRM output, MRM call error) without changing the current rubric."""
        attempt = len(self._events)
        current = self._versions[-1] if self._versions else None
        event = HistoryEvent(
            attempt=attempt, accepted=False, reason=reason, iteration=None,
            parent=current.iteration if current else None, created_step=created_step,
            task=current.task if current else None, error=error,
            file=_rejected_file_name(attempt) if raw is not None else None, raw=raw)
        self._events.append(event)
        return event

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write every version, every rejected proposal and the JSON log; returns the JSON path."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for rubric in self._versions:
            atomic_write_text(out / rubric_file_name(rubric.iteration), rubric.render() + "\n", errors=_TEXT_ERRORS)
        for event in self._events:
            if event.file and event.raw is not None and not event.accepted:
                atomic_write_text(out / event.file, event.raw, errors=_TEXT_ERRORS)
        payload = {
            "format": HISTORY_FORMAT,
            "limits": dataclasses.asdict(self.limits),
            "current": self._versions[-1].iteration if self._versions else None,
            "events": [event.to_json() for event in self._events],
        }
        path = out / HISTORY_FILE
        atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=True) + "\n", errors=_TEXT_ERRORS)
        return path

    def to_json(self) -> dict[str, Any]:
        """Everything `save` writes, as one JSON value (a checkpoint carries it)."""
        return {"format": HISTORY_FORMAT, "limits": dataclasses.asdict(self.limits),
                "versions": [rubric.render() for rubric in self._versions],
                "events": [dict(event.to_json(), raw=event.raw) for event in self._events]}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> RubricHistory:
        """The history `to_json` described; every version is re-parsed and re-validated."""
        if payload.get("format") != HISTORY_FORMAT:
            raise RubricError(f"unknown rubric history format {payload.get('format')!r}, expected {HISTORY_FORMAT!r}")
        history = cls(limits=RubricLimits(**payload["limits"]))
        texts = iter(payload["versions"])
        for item in payload["events"]:
            event = dataclasses.replace(HistoryEvent.from_json(item), raw=item.get("raw"))
            if event.accepted:
                history._versions.append(Rubric.parse(next(texts), limits=history.limits, iteration=event.iteration,
                                                      parent=event.parent, created_step=event.created_step,
                                                      task=event.task))
            history._events.append(event)
        return history

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, limits: RubricLimits | None = None) -> RubricHistory:
        """Read a history written by `save`; the rubric files are re-parsed and re-validated."""
        src = Path(directory)
        path = src / HISTORY_FILE
        if not path.is_file():
            raise MissingFileError(f"no rubric history at {path} (expected {HISTORY_FILE} written by "
                                   f"RubricHistory.save)")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.get("format") != HISTORY_FORMAT:
                raise RubricError(f"{path}: unknown format {payload.get('format')!r}, expected {HISTORY_FORMAT!r}")
            saved_limits = RubricLimits(**payload["limits"]) if payload.get("limits") else DEFAULT_LIMITS
            events = [HistoryEvent.from_json(item) for item in payload["events"]]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
            if isinstance(err, RubricError):
                raise
            raise RubricError(f"{path} is not a valid rubric history: {err}") from err
        history = cls(limits=limits or saved_limits)
        for event in events:
            if event.accepted:
                history._versions.append(_load_version(src, event, history.limits))
            elif event.file and (src / event.file).is_file():
                event = dataclasses.replace(event, raw=(src / event.file).read_text(encoding="utf-8"))
            history._events.append(event)
        return history


def _load_version(src: Path, event: HistoryEvent, limits: RubricLimits) -> Rubric:
    if event.iteration is None:
        raise RubricError(f"accepted history event #{event.attempt} has no iteration")
    file = src / (event.file or rubric_file_name(event.iteration))
    if not file.is_file():
        raise MissingFileError(f"rubric history names {file.name}, which is missing from {src}")
    try:
        return Rubric.parse(file.read_text(encoding="utf-8"), limits=limits, iteration=event.iteration,
                            parent=event.parent, created_step=event.created_step, task=event.task)
    except RubricError as err:
        raise RubricError(f"{file}: {err}") from err
