"""Per-update training metrics: `metrics.jsonl`, TensorBoard event files and a console progress bar.

    writer = MetricsWriter(run_dir, enabled=jax.process_index() == 0, total_updates=N,
                           resume_from_update=start)        # None on a fresh run
    writer.write(update, {"objective/kl": 0.01, "score/mean": 0.4, ...})
    writer.write_rubric(rubric, update)                    # TensorBoard text summary
    writer.close()
    records = read_metrics(run_dir)

`metrics.jsonl` holds one JSON object per update, `{"update": int, "time": unix seconds, "<name>": number}`,
flushed line by line so that a killed run loses at most the line being written. JSON has no
non-finite numbers, so NaN, +inf and -inf are written as the strings "NaN", "Infinity" and
"-Infinity" (the spellings Python's and JavaScript's JSON readers use) and `read_metrics` turns them
back into floats. A resumed run (`resume_from_update=n`) first drops every line whose update is >= n
(the updates done after the checkpoint it resumes from), then appends; TensorBoard is told the same
with a SessionLog START event at step n, which makes it discard the orphaned later points.

TensorBoard files are written with `tensorboardX` (pure Python + protobuf, no TensorFlow) under
`RUN_DIR/tensorboard`. Only the process that owns the run dir writes: with `enabled=False` every
method is a no-op, so multi-host code can call the writer unconditionally.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from mpo_jax.errors import FileFormatError, InvalidValueError, MissingDependencyError, MissingFileError
from mpo_jax.fileio import atomic_write_text
from mpo_jax.rubric import Rubric

__all__ = [
    "METRICS_FILE", "NONFINITE_STRINGS", "TENSORBOARD_DIR", "MetricsWriter", "decode_value", "encode_value",
    "markdown_fence", "progress_text", "read_metrics", "tensorboard_tag",
]

_LOG = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS = ("update", "time")
NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

# (label, metric names tried in order) shown in the progress bar's postfix.
DEFAULT_PROGRESS_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("score", ("score/mean", "objective/scores")),
    ("kl", ("objective/kl",)),
    ("rubric", ("rubric/iteration",)),
)

# TensorBoard tags allow letters, digits, '_', '-', '/', '.'; anything else becomes '_'.
_INVALID_TAG_CHARS = re.compile(r"[^-/\w.]")


# -- values ---------------------------------------------------------------------------------------


def encode_value(name: str, value: Any) -> int | float | str:
    """A metric value as JSON: ints stay ints, finite floats stay floats, non-finite become strings.

    Accepts Python numbers, bools (as 0/1), numpy scalars and one-element arrays (jax arrays too).
    """
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
    else:
        try:
            array = np.asarray(value)
        except Exception as err:
            raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}") from err
        if array.size != 1 or array.dtype.kind not in "biuf":
            raise TypeError(f"metric {name!r} must be a real number or a one-element numeric array, got "
                            f"{type(value).__name__} with dtype {array.dtype} and shape {array.shape}")
        if array.dtype.kind in "biu":
            return int(array.reshape(()))
        number = float(array.reshape(()))
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    return number


def decode_value(value: Any) -> Any:
    """Inverse of `encode_value` for one JSON value: the non-finite strings become floats."""
    if isinstance(value, str) and value in NONFINITE_STRINGS:
        return NONFINITE_STRINGS[value]
    return value


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag a metric name is written under (invalid characters become '_')."""
    return _INVALID_TAG_CHARS.sub("_", name).lstrip("/") or "_"


def markdown_fence(text: str, info: str = "") -> str:
    """`text` in a fenced code block whose fence is longer than any backtick run inside it.

    Markdown renders a fenced block literally, so untrusted text inside cannot add markup, links,
    HTML or close the block early.
    """
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def progress_text(metrics: Mapping[str, Any],
                  keys: Sequence[tuple[str, Sequence[str]]] = DEFAULT_PROGRESS_KEYS) -> str:
    """The progress bar's postfix, e.g. 'score=0.512 kl=0.0123 rubric=2' (missing metrics are left out)."""
    parts = []
    for label, names in keys:
        for name in names:
            if name in metrics:
                value = decode_value(metrics[name])
                if isinstance(value, numbers.Integral):
                    parts.append(f"{label}={int(value)}")
                elif isinstance(value, numbers.Real):
                    parts.append(f"{label}={float(value):.4g}")
                break
    return " ".join(parts)


# -- reading --------------------------------------------------------------------------------------


def _metrics_path(run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir)
    return path if path.is_file() else path / METRICS_FILE


def _parse_lines(path: Path, text: str) -> list[dict[str, Any]]:
    """Every record of a metrics file; a torn final line (a kill mid-write) is dropped with a warning."""
    lines = text.split("\n")
    complete = text.endswith("\n")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_last = number == len(lines) or (number == len(lines) - 1 and complete)
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            update = record.get("update")
            if not isinstance(update, int) or isinstance(update, bool) or update < 0:
                raise ValueError(f"'update' must be an int >= 0, got {update!r}")
        except ValueError as err:
            if is_last and not complete:
                _LOG.warning("%s: dropping the torn last line %d (%s)", path, number, err)
                continue
            raise FileFormatError(f"{path}:{number} is not a metrics record ({err}); fix or delete that line") from err
        records.append({key: decode_value(value) for key, value in record.items()})
    return records


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of `RUN_DIR/metrics.jsonl` (or of a metrics file given directly), sorted by update.

    Non-finite strings come back as float NaN/inf. If an update appears more than once (a file
    written without resume truncation), the last line wins, since it was written later.
    """
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise MissingFileError(f"no metrics file at {path}; pass a run dir written by the trainer "
                               f"(it holds {METRICS_FILE})")
    by_update: dict[int, dict[str, Any]] = {}
    for record in _parse_lines(path, path.read_text(encoding="utf-8")):
        by_update[record["update"]] = record
    return [by_update[update] for update in sorted(by_update)]


# -- writing --------------------------------------------------------------------------------------


def _truncate_for_resume(path: Path, resume_from_update: int) -> list[dict[str, Any]]:
    """Drop records with update >= `resume_from_update` (atomic rewrite); returns the kept ones."""
    if not path.is_file():
        return []
    records = _parse_lines(path, path.read_text(encoding="utf-8"))
    kept = [record for record in records if record["update"] < resume_from_update]
    if len(kept) != len(records):
        _LOG.info("%s: dropping %d records at or after update %d", path, len(records) - len(kept),
                  resume_from_update)
    atomic_write_text(path, "".join(_dumps(record) + "\n" for record in kept))
    return kept


def _dumps(record: Mapping[str, Any]) -> str:
    encoded = {key: (value if key in RESERVED_KEYS else encode_value(key, decode_value(value)))
               for key, value in record.items()}
    return json.dumps(encoded, allow_nan=False, ensure_ascii=True, separators=(",", ":"))


def _check_update(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidValueError(f"{what} must be an int >= 0, got {value!r}")
    return int(value)


class MetricsWriter:
    """Appends per-update metrics to `metrics.jsonl`, TensorBoard and a tqdm bar, on one process only.

    `resume_from_update=n` means updates >= n are about to be (re)done: older lines for them are
    dropped first. Without it, an existing non-empty `metrics.jsonl` is an error, so that a new run
    never silently mixes into an old run dir. Updates must be written in increasing order.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, enabled: bool | None = None,
                 resume_from_update: int | None = None, total_updates: int | None = None,
                 tensorboard: bool = True, progress: bool = True,
                 progress_keys: Sequence[tuple[str, Sequence[str]]] = DEFAULT_PROGRESS_KEYS,
                 progress_file: IO[str] | None = None) -> None:
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.resume_from_update = None if resume_from_update is None else _check_update(
            resume_from_update, "resume_from_update")
        if total_updates is not None:
            _check_update(total_updates, "total_updates")
        self._progress_keys = tuple(progress_keys)
        self._last_update: int | None = None
        self._handle: IO[str] | None = None
        self._tb: Any = None
        self._bar: Any = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        done = self._open_jsonl()
        if tensorboard:
            self._tb = _open_tensorboard(self.run_dir / TENSORBOARD_DIR, self.resume_from_update)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_updates, initial=done, desc="MPO", unit="update", dynamic_ncols=True,
                             file=progress_file if progress_file is not None else sys.stderr)

    def _open_jsonl(self) -> int:
        """Open the metrics file for appending; returns how many updates it already holds."""
        if self.resume_from_update is not None:
            kept = _truncate_for_resume(self.path, self.resume_from_update)
            done = len({record["update"] for record in kept})
            if kept:
                self._last_update = max(record["update"] for record in kept)
        elif self.path.is_file() and self.path.stat().st_size > 0:
            raise FileExistsError(f"{self.path} already holds metrics; pass resume_from_update=<the update the run "
                                  f"resumes at> to continue that run, or use a new run dir")
        else:
            done = 0
        self._handle = open(self.path, "a", encoding="utf-8", newline="")
        return done

    # -- writing ----------------------------------------------------------------------------------

    def write(self, update: int, metrics: Mapping[str, Any], *, wall_time: float | None = None) -> dict[str, Any]:
        """Record one update's metrics; returns the JSON object written (non-finite values as strings)."""
        update = _check_update(update, "update")
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
        for key in metrics:
            if not isinstance(key, str) or not key:
                raise TypeError(f"metric names must be non-empty str, got {key!r}")
            if key in RESERVED_KEYS:
                raise ValueError(f"metric name {key!r} is reserved (the writer sets it); rename the metric")
        if self._last_update is not None and update <= self._last_update:
            raise ValueError(f"update {update} comes after update {self._last_update} was written; updates must "
                             f"increase (resume with resume_from_update={update} to redo it)")
        record: dict[str, Any] = {"update": update, "time": float(time.time() if wall_time is None else wall_time)}
        record.update({key: encode_value(key, value) for key, value in metrics.items()})
        if not self.enabled:
            return record
        assert self._handle is not None
        self._handle.write(_dumps(record) + "\n")
        self._handle.flush()
        self._last_update = update
        if self._tb is not None:
            self._tb.scalars(update, record["time"], {key: decode_value(record[key]) for key in metrics})
        if self._bar is not None:
            self._bar.set_postfix_str(progress_text(record, self._progress_keys), refresh=False)
            self._bar.update(1)
        return record

    def write_text(self, tag: str, text: str, update: int) -> None:
        """A TensorBoard text summary (rendered as Markdown there, so pass fenced untrusted text)."""
        update = _check_update(update, "update")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.enabled and self._tb is not None:
            self._tb.text(tensorboard_tag(tag), text, update)

    def write_rubric(self, rubric: Rubric, update: int) -> None:
        """The rubric in force from `update` on, as a TensorBoard text summary under 'rubric'."""
        header = f"iteration {rubric.iteration}, {rubric.num_items} items, created at update {rubric.created_step}"
        self.write_text("rubric", f"{header}\n\n{markdown_fence(rubric.render())}", update)

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TensorBoard:
    """A tensorboardX `FileWriter` writing one event per update (all scalars in one Summary)."""

    def __init__(self, writer: Any, summary_cls: Any, text_fn: Any) -> None:
        self._writer = writer
        self._summary = summary_cls
        self._text = text_fn

    def scalars(self, step: int, wall_time: float, values: Mapping[str, float]) -> None:
        summary = self._summary(value=[self._summary.Value(tag=tensorboard_tag(name), simple_value=float(value))
                                       for name, value in values.items()])
        self._writer.add_summary(summary, global_step=step, walltime=wall_time)
        self._writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_summary(self._text(tag, text), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _open_tensorboard(logdir: Path, resume_from_update: int | None) -> _TensorBoard:
    try:
        from tensorboardX import FileWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import text
    except ImportError as err:
        raise MissingDependencyError(f"TensorBoard logging needs the tensorboardX package ({err}); install it with "
                                     f"`pip install 'tensorboardX>=2.6'` or pass tensorboard=False") from err
    logdir.mkdir(parents=True, exist_ok=True)
    # Event file names carry a one-second timestamp; the suffix keeps two writers in the same
    # second (a quick restart) from overwriting each other's file.
    writer = FileWriter(str(logdir), flush_secs=30, filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
    if resume_from_update is not None:
        # TensorBoard drops points with step >= a SessionLog START's step from earlier files.
        writer.add_event(Event(session_log=SessionLog(status=SessionLog.START)), step=resume_from_update)
    return _TensorBoard(writer, Summary, text)
