"""Code-computed checks of generation files: response length and hack-detector rates.

A judge can be gamed; these cannot be optimised against by the policy (training never sees
them), so the final comparison of policies reports them next to the judge's verdicts. They are
the same detectors and the same input text as the in-training evaluation
(`mpo_jax.train.evaluator`), so the two read alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mpo_jax.errors import InvalidValueError
from mpo_jax.evaluation.tables import Cell
from mpo_jax.reward import hacks
from mpo_jax.tasks import get_task
from mpo_jax.train.evaluator import source_text


def detector_summary(task: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """{count, words_mean, hack/<detector>: rate, hack/any: rate} over generation rows ({record, response})."""
    if not rows:
        raise InvalidValueError("no generation rows to check")
    spec = get_task(task)
    flags, words = [], []
    for index, row in enumerate(rows):
        record, response = row.get("record"), row.get("response")
        if not isinstance(response, str) or not isinstance(record, Mapping):
            raise InvalidValueError(f"row #{index} needs a string 'response' and the task 'record' (object)")
        flags.append(hacks.detect_all(spec.prompt_text(record), response, source=source_text(record)))
        words.append(len(response.split()))
    summary: dict[str, float] = {"count": float(len(rows)), "words_mean": float(np.mean(words))}
    summary.update({f"hack/{name}": rate for name, rate in hacks.rates(flags).items()})
    summary["hack/any"] = float(np.mean([any(f.values()) for f in flags]))
    return summary


def detector_cells(summary: Mapping[str, float]) -> dict[str, Cell]:
    """Table cells: mean words, the share flagged by any detector, and each detector that flagged any.

    The cells carry no ranking value: fewer words or flags is not better by itself, so no entry is
    bolded as best.
    """
    cells = {"Words": Cell(f"{summary['words_mean']:.0f}"), "Flagged": Cell(f"{summary['hack/any']:.0%}")}
    for key, rate in summary.items():
        if key.startswith("hack/") and key != "hack/any" and rate > 0:
            cells[key.removeprefix("hack/").replace("_", " ")] = Cell(f"{rate:.0%}")
    return cells
