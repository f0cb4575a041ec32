"""Task metrics of generated test responses: ROUGE F1 (summarization), verdict accuracy (ethics),
MATH accuracy (math), following the paper's evaluation scripts (reference §G.3, §G.4).

Responses are untrusted model output: they are only searched with fixed patterns and compared
as strings; nothing in them is evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpo_jax.errors import InvalidValueError, MissingDependencyError
from mpo_jax.tasks.ethics import extract_verdict
from mpo_jax.tasks.math_answer import first_boxed_content, is_equiv
from mpo_jax.tasks.math_reasoning import gold_answer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
VERDICTS = ("RIGHT", "WRONG")
_BARE_VERDICT = {v: re.compile(rf"\b{v}\b") for v in VERDICTS}


@dataclass(frozen=True)
class PRF:
    """Precision, recall and F1 (0-1) of one ROUGE type for one (prediction, reference) pair."""

    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class RougeResult:
    """Mean F1 of each ROUGE type over the scored pairs, in percent (the paper's scale)."""

    f1: Mapping[str, float]
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, **{name: self.f1[name] for name in ROUGE_TYPES}}


@dataclass(frozen=True)
class AccuracyResult:
    """correct / total, plus how many responses gave no usable prediction at all."""

    correct: int
    total: int
    unanswered: int = 0

    @property
    def accuracy(self) -> float:
        """Percent correct (0 when there is nothing to score)."""
        return 100.0 * self.correct / self.total if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "unanswered": self.unanswered}


def _rouge_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise MissingDependencyError(f"ROUGE needs the rouge-score package ({err}); install it with "
                                     "`pip install 'rouge-score>=0.1.2'`") from err
    # Sentences for rougeLsum are the lines of each text (the package default, as in the paper).
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_per_pair(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, PRF]]:
    """Precision, recall and F1 of every ROUGE type for each (prediction, reference) pair."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    scorer = _rouge_scorer()
    out = []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str) or not isinstance(reference, str):
            raise ValueError(f"pair #{index}: prediction and reference must both be strings")
        scores = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
        out.append({name: PRF(float(scores[name].precision), float(scores[name].recall),
                              float(scores[name].fmeasure)) for name in ROUGE_TYPES})
    return out


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> RougeResult:
    """Mean ROUGE-1/2/L/Lsum F1 x 100 with Porter stemming (reference §G.3)."""
    pairs = rouge_per_pair(predictions, references)
    if not pairs:
        raise InvalidValueError("ROUGE needs at least one (prediction, reference) pair")
    return RougeResult(f1={name: 100.0 * float(np.mean([p[name].f1 for p in pairs])) for name in ROUGE_TYPES},
                       count=len(pairs))


def predict_verdict(response: str) -> str | None:
    """The verdict a response gives: the first `<verdict>RIGHT|WRONG</verdict>` tag; without one, the
    only bare word RIGHT or WRONG that occurs; None when both or neither occur (reference §G.4)."""
    tagged = extract_verdict(response)
    if tagged is not None:
        return tagged
    present = [v for v in VERDICTS if _BARE_VERDICT[v].search(response)]
    return present[0] if len(present) == 1 else None


def verdict_accuracy(responses: Sequence[str], gold_labels: Sequence[str]) -> AccuracyResult:
    """Share of responses whose verdict equals the gold RIGHT/WRONG label (no verdict counts wrong)."""
    if len(responses) != len(gold_labels):
        raise ValueError(f"got {len(responses)} responses for {len(gold_labels)} gold labels")
    correct = unanswered = 0
    for index, (response, gold) in enumerate(zip(responses, gold_labels)):
        if gold not in VERDICTS:
            raise InvalidValueError(f"gold label #{index} is {gold!r}; expected RIGHT or WRONG")
        predicted = predict_verdict(response)
        unanswered += predicted is None
        correct += predicted == gold
    return AccuracyResult(correct=correct, total=len(responses), unanswered=unanswered)


def math_prediction(response: str) -> str | None:
    """The content of the first `\\boxed{…}` of a solution, the answer MPO scores."""
    return first_boxed_content(response)


def math_correct(response: str, gold: str) -> bool:
    """Whether the first boxed answer equals `gold` after Hendrycks MATH normalisation."""
    predicted = math_prediction(response)
    return predicted is not None and is_equiv(predicted, gold)


def math_accuracy(responses: Sequence[str], gold_answers: Sequence[str]) -> AccuracyResult:
    """Share of solutions whose first boxed answer is equivalent to the gold answer."""
    if len(responses) != len(gold_answers):
        raise ValueError(f"got {len(responses)} responses for {len(gold_answers)} gold answers")
    correct = unanswered = 0
    for index, (response, gold) in enumerate(zip(responses, gold_answers)):
        if not isinstance(gold, str):
            raise InvalidValueError(f"gold answer #{index} must be a string, got {type(gold).__name__}")
        unanswered += math_prediction(response) is None
        correct += math_correct(response, gold)
    return AccuracyResult(correct=correct, total=len(responses), unanswered=unanswered)


# -- whole generation files --------------------------------------------------------------------

def _reference_summary(record: Mapping[str, Any], where: str) -> str:
    for key in ("clean_summary", "summary"):
        if isinstance(record.get(key), str):
            return record[key]
    raise InvalidValueError(f"{where}: the summarization record has no reference summary ('clean_summary' or "
                            "'summary')")


def _gold_verdict(record: Mapping[str, Any], where: str) -> str:
    label = record.get("binarized_label")
    if label not in VERDICTS:
        raise InvalidValueError(f"{where}: the ethics record needs 'binarized_label' RIGHT or WRONG, got {label!r}")
    return label


def _gold_math(record: Mapping[str, Any], where: str) -> str:
    gold = gold_answer(record)
    if gold is None:
        raise InvalidValueError(f"{where}: the math record has no gold answer (no boxed 'solution' and no 'answer')")
    return gold


def score_generations(task: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The task's reference metrics over generation rows ({record, response}), as a JSON-ready dict.

    Keys: summarization `rouge1`, `rouge2`, `rougeL`, `rougeLsum` (F1 x 100); ethics and math
    `accuracy` (percent), `correct`, `total`, `unanswered`; always `count`.
    """
    from mpo_jax.tasks import get_task

    name = get_task(task).name
    if not rows:
        raise InvalidValueError("no generation rows to score")
    responses, records = [], []
    for index, row in enumerate(rows):
        if not isinstance(row.get("response"), str) or not isinstance(row.get("record"), Mapping):
            raise InvalidValueError(f"row #{index} needs a string 'response' and the task 'record' (object)")
        responses.append(row["response"])
        records.append(row["record"])
    where = [f"row #{i}" for i in range(len(rows))]
    if name == "summarization":
        refs = [_reference_summary(r, w) for r, w in zip(records, where)]
        return rouge_scores(responses, refs).to_json()
    if name == "ethics":
        gold = [_gold_verdict(r, w) for r, w in zip(records, where)]
        return {"count": len(rows), **verdict_accuracy(responses, gold).to_json()}
    if name == "math":
        gold = [_gold_math(r, w) for r, w in zip(records, where)]
        return {"count": len(rows), **math_accuracy(responses, gold).to_json()}
    raise InvalidValueError(f"the {name} task has no reference answers to score against; compare its models with "
                            "`mpo-jax eval elo` instead")


__all__ = ["PRF", "ROUGE_TYPES", "VERDICTS", "AccuracyResult", "RougeResult", "math_accuracy", "math_correct",
           "math_prediction", "predict_verdict", "rouge_per_pair", "rouge_scores", "score_generations",
           "verdict_accuracy"]
