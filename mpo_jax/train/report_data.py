"""What the run report reads from a run directory: config, metrics, rubric versions, meta steps, rollouts.

Optional pieces (rubric history, meta evaluations, rollouts, provenance, a metric) may be missing or
unreadable: they are left empty and `RunData.problems` says why, so that the report of a
half-finished run still renders. A folder with neither `metrics.jsonl` nor `config.json` is not a
run dir and raises `ReportError`. File names and patterns come from `train/run_dir.py`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpo_jax.errors import MpoError
from mpo_jax.fileio import read_jsonl_lenient
from mpo_jax.reward.rubric_history import HistoryEvent, RubricHistory
from mpo_jax.rubric import Rubric, RubricError, ScaleError, item_scale
from mpo_jax.train.metrics import read_metrics
from mpo_jax.train.run_dir import (
    CONFIG_FILE,
    HISTORY_FILE,
    META_EVALUATION_RE,
    METRICS_FILE,
    PROVENANCE_FILE,
    ROLLOUTS_FILE,
    RUBRIC_FILE_RE,
    read_provenance,
)

__all__ = ["SCORE_FRACTION", "MetaMarkers", "ReportError", "RunData", "add_score_fractions", "is_number", "load_run",
           "meta_markers", "metric_series", "score_fraction"]


class ReportError(MpoError, ValueError):
    """The folder is not a run dir, or the report cannot be written there."""


@dataclass(frozen=True)
class RunData:
    """Everything the report reads from a run dir; `problems` lists optional pieces that were unreadable."""

    run_dir: Path
    config: dict[str, Any] | None
    metrics: tuple[dict[str, Any], ...]
    versions: tuple[Rubric, ...]
    events: tuple[HistoryEvent, ...]
    meta_evaluations: tuple[tuple[int, dict[str, Any]], ...]  # (update, meta_evaluation_{update}.json), by update
    rollouts: tuple[dict[str, Any], ...]
    problems: tuple[str, ...] = ()
    provenance: tuple[dict[str, Any], ...] = ()  # one row per start or resume (`mpo_jax/provenance.py`)


def _read_config(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append(f"{CONFIG_FILE} could not be read: {err}")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} holds a {type(config).__name__}, not a JSON object")
        return None
    return config


def _read_rubrics(run_dir: Path, problems: list[str]) -> tuple[tuple[Rubric, ...], tuple[HistoryEvent, ...]]:
    """The history if it loads; otherwise whatever `rubric_iter_{t}.txt` files parse (without events)."""
    if (run_dir / HISTORY_FILE).is_file():
        try:
            history = RubricHistory.load(run_dir)
            return history.versions, history.events
        except (OSError, UnicodeDecodeError, RubricError) as err:
            problems.append(f"{HISTORY_FILE} could not be read: {err}")
    versions = []
    for path in sorted(run_dir.glob("rubric_iter_*.txt")):
        match = RUBRIC_FILE_RE.match(path.name)
        if not match:
            continue
        try:
            versions.append(Rubric.parse(path.read_text(encoding="utf-8"), iteration=int(match.group(1))))
        except (OSError, UnicodeDecodeError, RubricError) as err:
            problems.append(f"{path.name} could not be read: {err}")
    return tuple(sorted(versions, key=lambda rubric: rubric.iteration)), ()


def _read_meta_evaluations(run_dir: Path, problems: list[str]) -> tuple[tuple[int, dict[str, Any]], ...]:
    found = []
    for path in run_dir.glob("meta_evaluation_*.json"):
        match = META_EVALUATION_RE.match(path.name)
        if not match:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{path.name} could not be read: {err}")
            continue
        if not isinstance(data, dict):
            problems.append(f"{path.name} holds a {type(data).__name__}, not a JSON object")
            continue
        found.append((int(match.group(1)), data))
    return tuple(sorted(found, key=lambda pair: pair[0]))


def _read_rollouts(path: Path, problems: list[str]) -> tuple[dict[str, Any], ...]:
    rows, bad = read_jsonl_lenient(path)
    if bad:
        problems.append(f"{ROLLOUTS_FILE}: skipped {bad} line(s) that are not JSON objects")
    return tuple(rows)


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run dir; raises `ReportError` if it is not one (neither metrics.jsonl nor config.json)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; pass the run dir the trainer wrote (it holds {METRICS_FILE})")
    if not (root / METRICS_FILE).is_file() and not (root / CONFIG_FILE).is_file():
        raise ReportError(f"{root} is not an mpo-jax run dir: it has neither {METRICS_FILE} nor {CONFIG_FILE}; "
                          f"pass the folder the trainer wrote")
    problems: list[str] = []
    metrics: list[dict[str, Any]] = []
    if (root / METRICS_FILE).is_file():
        try:
            metrics = read_metrics(root)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problems.append(f"{METRICS_FILE} could not be read: {err}")
    config = _read_config(root / CONFIG_FILE, problems)
    versions, events = _read_rubrics(root, problems)
    provenance, bad = read_provenance(root)
    if bad:
        problems.append(f"{PROVENANCE_FILE}: skipped {bad} line(s) that are not JSON objects")
    return RunData(run_dir=root, config=config, metrics=tuple(metrics), versions=versions, events=events,
                   meta_evaluations=_read_meta_evaluations(root, problems),
                   rollouts=_read_rollouts(root / ROLLOUTS_FILE, problems), problems=tuple(problems),
                   provenance=tuple(provenance))


# -- series and markers ---------------------------------------------------------------------------


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_series(metrics: Sequence[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(updates, values) of one metric over the records that have it as a number (NaN kept)."""
    pairs = [(record["update"], float(record[name])) for record in metrics if is_number(record.get(name))]
    updates = np.array([pair[0] for pair in pairs], dtype=np.int64)
    return updates, np.array([pair[1] for pair in pairs], dtype=np.float64)


@dataclass(frozen=True)
class MetaMarkers:
    """Updates to mark on the plots: a new rubric was accepted, or a meta step kept the old one."""

    accepted: tuple[int, ...]
    kept: tuple[int, ...]


def meta_markers(run: RunData) -> MetaMarkers:
    """Accepted: `created_step` of every non-initial rubric version and accepted meta evaluations.

    Kept: the other updates where a meta step ran (`meta/step` != 0 in the metrics, or a
    meta_evaluation file) and the rubric did not change.
    """
    accepted = {rubric.created_step for rubric in run.versions
                if rubric.parent is not None and rubric.created_step is not None}
    accepted |= {update for update, data in run.meta_evaluations if data.get("accepted") is True}
    ran = {record["update"] for record in run.metrics
           if is_number(record.get("meta/step")) and math.isfinite(record["meta/step"]) and record["meta/step"] != 0}
    ran |= {update for update, _ in run.meta_evaluations}
    return MetaMarkers(accepted=tuple(sorted(accepted)), kept=tuple(sorted(ran - accepted)))


# -- the score as a fraction of the rubric's range --------------------------------------------------

SCORE_FRACTION = "score/fraction_of_range"  # derived here: comparable across rubrics with other scales


def score_fraction(score: float, rubric: Rubric, aggregate: str) -> float | None:
    """Where `score` lies in the range the rubric's item scales allow, 0 at the bottom and 1 at the top.

    A "sum" score runs from the sum of the items' lowest to the sum of their highest scores, so a
    rubric the meta step rewrote (say from one 0-5 item to five 0-10 items) moves the raw score to
    another scale; this fraction does not. A "mean_normalized" score is already that fraction.
    None when an item has no readable scale. Task rules (a fixed score for an empty response) may
    fall outside [0, 1]; they are not clipped.
    """
    if aggregate != "sum":
        return score
    try:
        scales = [item_scale(item) for item in rubric.items]
    except ScaleError:
        return None
    low, high = sum(lo for lo, _ in scales), sum(hi for _, hi in scales)
    return (score - low) / (high - low) if high > low else None


def add_score_fractions(run: RunData, problems: list[str]) -> RunData:
    """The run's metrics with `SCORE_FRACTION` added where the score and the rubric in force are known."""
    import dataclasses

    aggregate = ((run.config or {}).get("judge") or {}).get("aggregate", "sum")
    by_iteration = {rubric.iteration: rubric for rubric in run.versions}
    missing: set[int] = set()
    records = []
    for record in run.metrics:
        iteration = record.get("rubric/iteration")
        if is_number(record.get("score/mean")) and is_number(iteration):
            rubric = by_iteration.get(int(iteration))
            fraction = None if rubric is None else score_fraction(float(record["score/mean"]), rubric, aggregate)
            if rubric is None:
                missing.add(int(iteration))
            if fraction is not None:
                record = {**record, SCORE_FRACTION: fraction}
        records.append(record)
    if missing:
        problems.append(f"no rubric file for iteration(s) {sorted(missing)}: their scores have no fraction of range")
    return dataclasses.replace(run, metrics=tuple(records))
