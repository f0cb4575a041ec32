"""The judge and the meta step on files: `mpo-jax score` and `mpo-jax meta`.

Input rows are JSONL objects with the response and either a task `record` (the dataset's
fields) or a bare `prompt` string; `meta` rows also carry the judge's `score`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mpo_jax.errors import FileFormatError, MissingFileError
from mpo_jax.fileio import read_jsonl_objects
from mpo_jax.reward.judge import Judge
from mpo_jax.reward.meta import Gate, MetaResult, MetaRewardModel, MetaSample
from mpo_jax.reward.rubric_history import RubricHistory
from mpo_jax.rubric import Rubric
from mpo_jax.tasks import Task


def read_rows(path: str | Path, *, need_score: bool = False) -> list[dict[str, Any]]:
    """JSONL rows with `response` and `record` or `prompt` (and `score` when asked)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no input file {path}")
    rows = []
    for number, row in read_jsonl_objects(path):
        if not isinstance(row.get("response"), str):
            raise FileFormatError(f"{path}:{number}: each line must be an object with a string \"response\"")
        if not isinstance(row.get("record"), dict) and not isinstance(row.get("prompt"), str):
            raise FileFormatError(f"{path}:{number}: give the task \"record\" (object) or the \"prompt\" (string)")
        if need_score and not isinstance(row.get("score"), (int, float)):
            raise FileFormatError(f"{path}:{number}: a meta-step buffer row needs the judge's numeric \"score\"")
        rows.append(row)
    if not rows:
        raise FileFormatError(f"{path} holds no rows")
    return rows


def _record(task: Task, row: dict[str, Any]) -> dict[str, Any]:
    return row["record"] if isinstance(row.get("record"), dict) else task.record_from_prompt(row["prompt"])


def _batches(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def score_rows(judge: Judge, rows: list[dict[str, Any]], batch_size: int = 16) -> list[dict[str, Any]]:
    """Each row with `score`, `item_scores`, `rationales`, `parse_failures`, `rule` added."""
    out = []
    for chunk in _batches(rows, batch_size):
        results = judge.score_detailed([_record(judge.task, r) for r in chunk], [r["response"] for r in chunk])
        for row, result in zip(chunk, results, strict=True):
            out.append({**row, "score": result.score, "item_scores": result.item_scores,
                        "rationales": result.rationales, "parse_failures": result.parse_failures,
                        "rule": result.rule})
    return out


def meta_from_rows(mrm: MetaRewardModel, rubric: Rubric, rows: list[dict[str, Any]], out_dir: str | Path, *,
                   seed: int = 0, fits: Callable[[Rubric], bool] | None = None, gate: Gate | None = None,
                   install: Callable[[Rubric], None] | None = None) -> MetaResult:
    """One meta step on buffered rows; writes the rubric history and meta_evaluation_0.json to `out_dir`.

    `fits` (e.g. a `Judge.fits`) cuts a merged rubric to the prefix the judge can take, `gate` (a
    `CanaryGate` on that judge) decides whether it may replace `rubric`, and `install` (the judge's
    `set_rubric`) must take it, as in training. Returns the step's result.
    """
    out_dir = Path(out_dir)
    samples = [MetaSample(record=_record(mrm.task, r), response=r["response"], score=float(r["score"]),
                          rationales=tuple(r.get("rationales") or ())) for r in rows]
    history = RubricHistory(rubric, reason="input rubric", limits=mrm.task.rubric_limits)
    result = mrm.meta_step(rubric, samples, seed, step=0, fits=fits, gate=gate)
    history.apply(result, created_step=0, install=install)
    result.save(out_dir, 0, samples)
    history.save(out_dir)
    return result
