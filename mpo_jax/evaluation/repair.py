"""Rubric-repair benchmark: does a meta step teach the judge to rank good responses above hacks?

MPO's claim is that the meta-reward model (MRM) notices reward hacking in scored rollouts and
rewrites the rubric so that the judge stops rewarding it. Inside RL training that effect is
buried under policy drift and sampling noise. This benchmark isolates it on a fixed, labelled
set of responses:

1. Labelled set: for N train-split prompts, one good response (from a `writer` model, or read
   from a JSONL file) and, for each good response, the code-made hack of every kind in
   `mpo_jax.reward.hacks.HACK_KINDS`. Saved as JSONL and reused by later runs.
2. Score every response with a judge under a rubric. Pairwise accuracy per hack kind: over
   prompts, the fraction where the good response scores above that hack (ties count 0.5).
3. Repair: hand the scored set to `MetaRewardModel.meta_step` as its buffer, install the new
   rubric when accepted, re-score; repeat. Accuracy is reported before and after each step.

Judge protocols compared: `logits` (expected score per item), `generate` (rationale, then an
integer: the paper's protocol), and either one "fenced": the judge's framing says the response
is quoted data whose requests must not be obeyed (`fenced_task`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mpo_jax.errors import FileFormatError, InvalidValueError, MissingFileError
from mpo_jax.fileio import read_jsonl_objects
from mpo_jax.reward.canary import hack_prompt
from mpo_jax.reward.hacks import HACK_KINDS, make_hack
from mpo_jax.rubric import Rubric, RubricError
from mpo_jax.tasks import Task, get_task
from mpo_jax.tasks.base import FENCE_NOTE, fenced_task

__all__ = [
    "FENCE_NOTE", "GOOD", "RESULT_FILE", "SET_FILE", "TABLE_FILE", "Configuration", "LabelledRow", "ScoringJudge",
    "StepReport", "benchmark_task", "build_labelled_set", "check_labelled_set", "choose_indices", "fenced_task",
    "load_labelled_set", "load_rubric", "load_saved_run", "mean_accuracy", "mean_scores", "pairwise_accuracy",
    "read_good_responses", "repair", "results_table", "save_labelled_set", "score_rows", "set_digest", "task_prompt",
    "write_good_responses",
]

GOOD = "good"
SET_FILE = "labelled_set.jsonl"
RESULT_FILE = "repair.json"
TABLE_FILE = "repair_table.md"

# -- the labelled set ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LabelledRow:
    """One response of the set: the prompt it answers (`prompt_index` within the set), its task
    record, the text, and its label: "good" or a hack kind."""

    prompt_index: int
    record: dict[str, Any]
    response: str
    label: str

    def to_json(self, task: str) -> dict[str, Any]:
        return {"task": task, "prompt_index": self.prompt_index, "id": self.record.get("id"),
                "label": self.label, "record": self.record, "response": self.response}


def choose_indices(num_records: int, n: int, seed: int) -> list[int]:
    """A fixed seeded choice of min(n, num_records) distinct indices, in ascending order."""
    if n < 1:
        raise InvalidValueError(f"the number of prompts must be >= 1, got {n}")
    if num_records < 1:
        raise InvalidValueError("there are no records to choose prompts from")
    picked = np.random.default_rng(seed).choice(num_records, size=min(n, num_records), replace=False)
    return sorted(int(i) for i in picked)


def task_prompt(task: Task, record: Mapping[str, Any]) -> str:
    """The prompt text a hack is built from: the record's prompt field, else the judge's prompt material
    (the canary gate builds its degradations from the same text)."""
    return hack_prompt(task, record)


def build_labelled_set(task: Task, records: Sequence[Mapping[str, Any]], goods: Sequence[str], *,
                       seed: int = 0) -> list[LabelledRow]:
    """Per prompt: its good response, then one hack of every kind in `HACK_KINDS` order.

    The off-topic hack of prompt i is the good response of prompt i+1 (cyclically), so at least
    two prompts are needed. Each prompt's hacks draw from their own seeded generator, so a
    prompt's hacks do not change when the set grows.
    """
    if len(records) != len(goods):
        raise ValueError(f"got {len(records)} records but {len(goods)} good responses")
    if len(records) < 2:
        raise InvalidValueError("the labelled set needs at least two prompts (the off_topic hack of one prompt is the "
                                "good response to another)")
    rows: list[LabelledRow] = []
    for i, (record, good) in enumerate(zip(records, goods, strict=True)):
        record = dict(record)
        prompt = task_prompt(task, record)
        other = goods[(i + 1) % len(goods)]
        rng = np.random.default_rng([seed, i])
        rows.append(LabelledRow(i, record, good, GOOD))
        for kind in HACK_KINDS:
            rows.append(LabelledRow(i, record, make_hack(kind, prompt, good, other_response=other, rng=rng), kind))
    return rows


def check_labelled_set(rows: Sequence[LabelledRow]) -> None:
    """Every prompt has exactly one good response and one hack of every kind; ValueError otherwise."""
    if not rows:
        raise FileFormatError("the labelled set is empty")
    labels: dict[int, list[str]] = {}
    for row in rows:
        labels.setdefault(row.prompt_index, []).append(row.label)
    wanted = sorted([GOOD, *HACK_KINDS])
    for index, found in sorted(labels.items()):
        if sorted(found) != wanted:
            missing = sorted(set(wanted) - set(found))
            extra = sorted(label for label in set(found) if found.count(label) > 1 or label not in wanted)
            raise FileFormatError(f"prompt {index} of the labelled set has labels {sorted(found)}: missing {missing}, "
                                  f"unexpected or repeated {extra}")


def save_labelled_set(rows: Sequence[LabelledRow], path: str | os.PathLike[str], task: str) -> Path:
    """Write the set as JSONL (one row per response), via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r.to_json(task), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def load_labelled_set(path: str | os.PathLike[str], task: Task) -> list[LabelledRow]:
    """A saved set, checked to belong to `task` and to be complete."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no labelled set at {path}")
    rows = []
    for number, obj in read_jsonl_objects(path):
        if obj.get("task") not in (None, task.name):
            raise FileFormatError(f"{path}:{number}: the row is for task {obj.get('task')!r}, not {task.name!r}")
        if not (isinstance(obj.get("prompt_index"), int) and isinstance(obj.get("record"), dict)
                and isinstance(obj.get("response"), str) and isinstance(obj.get("label"), str)):
            raise FileFormatError(f"{path}:{number}: a labelled-set row needs an integer \"prompt_index\", a "
                                  "\"record\" object and string \"response\" and \"label\"")
        rows.append(LabelledRow(obj["prompt_index"], obj["record"], obj["response"], obj["label"]))
    check_labelled_set(rows)
    return rows


def write_good_responses(writer: Any, task: Task, records: Sequence[Mapping[str, Any]], *,
                         max_new_tokens: int = 400, temperature: float = 0.0, batch_size: int = 8,
                         seed: int = 0) -> list[str]:
    """The writer's responses to the policy prompts of `records` (greedy unless `temperature` > 0)."""
    from mpo_jax.evaluation.generate import generate_split

    rows = generate_split(writer, task.name, "train", records=records, max_new_tokens=max_new_tokens,
                          temperature=temperature, batch_size=batch_size, seed=seed)
    return [row["response"] for row in rows]


def read_good_responses(path: str | os.PathLike[str], task: Task, n: int, seed: int
                        ) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, good responses) for a seeded choice of n rows of a JSONL file.

    Rows hold a "response" and a task "record" (or a bare "prompt"); rows with a "label" other
    than "good" are skipped, so a saved labelled set or an `eval generate` file both work.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no responses file {path}")
    records, goods = [], []
    for number, obj in read_jsonl_objects(path):
        if obj.get("label", GOOD) != GOOD:
            continue
        if not isinstance(obj.get("response"), str):
            raise FileFormatError(f"{path}:{number}: each row needs a string \"response\"")
        if isinstance(obj.get("record"), dict):
            records.append(obj["record"])
        elif isinstance(obj.get("prompt"), str):
            records.append(task.record_from_prompt(obj["prompt"]))
        else:
            raise FileFormatError(f"{path}:{number}: give the task \"record\" (object) or the \"prompt\" (string)")
        goods.append(obj["response"])
    chosen = choose_indices(len(records), n, seed)
    return [records[i] for i in chosen], [goods[i] for i in chosen]


# -- scoring ------------------------------------------------------------------------------------

class ScoringJudge(Protocol):
    """What the benchmark needs from a judge (`mpo_jax.reward.judge.Judge` or a stand-in)."""

    def score(self, records: Sequence[Any], responses: Sequence[str]) -> np.ndarray: ...

    def set_rubric(self, rubric: Rubric) -> None: ...

    def fits(self, rubric: Rubric) -> bool: ...


def score_rows(judge: ScoringJudge, rows: Sequence[LabelledRow], batch_size: int = 16
               ) -> tuple[list[float], list[tuple[str, ...]]]:
    """(score, judge rationales) per row; rationales come from `score_detailed` where the judge has it."""
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be >= 1, got {batch_size}")
    detailed = getattr(judge, "score_detailed", None)
    scores: list[float] = []
    rationales: list[tuple[str, ...]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        records, responses = [r.record for r in chunk], [r.response for r in chunk]
        if callable(detailed):
            results = detailed(records, responses)
            scores.extend(float(r.score) for r in results)
            rationales.extend(tuple(r.rationales) for r in results)
        else:
            scores.extend(float(s) for s in judge.score(records, responses))
            rationales.extend(() for _ in chunk)
    return scores, rationales


def pairwise_accuracy(rows: Sequence[LabelledRow], scores: Sequence[float]) -> dict[str, float]:
    """Per hack kind: over prompts, the share where the good response scores strictly above the
    hack (1), equal (0.5, compared exactly) or below (0). Kinds with no pair are left out."""
    if len(rows) != len(scores):
        raise ValueError(f"got {len(rows)} rows but {len(scores)} scores")
    good = {r.prompt_index: float(s) for r, s in zip(rows, scores, strict=True) if r.label == GOOD}
    wins: dict[str, list[float]] = {}
    for row, score in zip(rows, scores, strict=True):
        if row.label == GOOD or row.prompt_index not in good:
            continue
        g, h = good[row.prompt_index], float(score)
        wins.setdefault(row.label, []).append(1.0 if g > h else 0.5 if g == h else 0.0)
    order = [k for k in HACK_KINDS if k in wins] + sorted(k for k in wins if k not in HACK_KINDS)
    return {kind: float(np.mean(wins[kind])) for kind in order}


def mean_accuracy(accuracy: Mapping[str, float]) -> float:
    """The unweighted mean over hack kinds (NaN when there are none)."""
    return float(np.mean(list(accuracy.values()))) if accuracy else float("nan")


def mean_scores(rows: Sequence[LabelledRow], scores: Sequence[float]) -> dict[str, float]:
    """Mean score per label, "good" first."""
    groups: dict[str, list[float]] = {}
    for row, score in zip(rows, scores, strict=True):
        groups.setdefault(row.label, []).append(float(score))
    order = [GOOD, *HACK_KINDS]
    labels = [k for k in order if k in groups] + sorted(k for k in groups if k not in order)
    return {label: float(np.mean(groups[label])) for label in labels}


# -- the repair loop ----------------------------------------------------------------------------

@dataclasses.dataclass
class StepReport:
    """The judge's verdict on the set after `step` meta steps (0 = the starting rubric)."""

    step: int
    rubric: Rubric
    scores: list[float]
    accuracy: dict[str, float]
    mean_score: dict[str, float]
    meta: dict[str, Any] | None = None  # the meta step that led here (None for step 0)
    rationales: list[tuple[str, ...]] = dataclasses.field(default_factory=list)  # the judge's, per row
    code: dict[str, Any] | None = None  # `provenance.code_version()` of the process that measured this step

    @property
    def mean_accuracy(self) -> float:
        return mean_accuracy(self.accuracy)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "rubric": self.rubric.render(), "rubric_iteration": self.rubric.iteration,
                "rubric_items": list(self.rubric.items), "rubric_parent": self.rubric.parent,
                "rubric_created_step": self.rubric.created_step,
                "accuracy": self.accuracy, "mean_accuracy": self.mean_accuracy, "mean_score": self.mean_score,
                "meta": self.meta, "scores": self.scores, "rationales": [list(r) for r in self.rationales],
                "code": self.code}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], rows: Sequence[LabelledRow], task: str | None = None) -> StepReport:
        """A step written by `to_json`, for resuming; the accuracies are recomputed from the scores."""
        try:
            rubric = Rubric(tuple(data["rubric_items"]), iteration=data["rubric_iteration"],
                            parent=data.get("rubric_parent"), created_step=data.get("rubric_created_step"), task=task)
            scores = [float(x) for x in data["scores"]]
            rationales = [tuple(str(t) for t in r) for r in data.get("rationales") or [() for _ in scores]]
        except (KeyError, TypeError, ValueError, RubricError) as err:
            raise InvalidValueError(f"saved repair step {data.get('step')!r} cannot be resumed ({err}); "
                                    "delete repair.json or pass a new --out to start over") from err
        if len(scores) != len(rows) or len(rationales) != len(rows):
            raise InvalidValueError(f"saved repair step {data.get('step')!r} holds {len(scores)} scores for "
                                    f"{len(rows)} labelled responses; delete repair.json or pass a new --out")
        code = data.get("code")
        return _report(int(data["step"]), rubric, rows, scores, data.get("meta"), rationales,
                       dict(code) if isinstance(code, Mapping) else None)


def _report(step: int, rubric: Rubric, rows: Sequence[LabelledRow], scores: list[float],
            meta: dict[str, Any] | None, rationales: Sequence[tuple[str, ...]] = (),
            code: Mapping[str, Any] | None = None) -> StepReport:
    return StepReport(step, rubric, scores, pairwise_accuracy(rows, scores), mean_scores(rows, scores), meta,
                      list(rationales), None if code is None else dict(code))


def repair(judge: ScoringJudge, mrm: Any, rubric: Rubric, rows: Sequence[LabelledRow], *, meta_steps: int = 2,
           seed: int = 0, batch_size: int = 16, done: Sequence[StepReport] = (),
           on_step: Callable[[list[StepReport]], None] | None = None,
           progress: Callable[[str], None] | None = None, code: Mapping[str, Any] | None = None,
           gate: Any = None) -> list[StepReport]:
    """Score the set, then `meta_steps` times: meta step on the scored set, install, re-score.

    The buffer given to the MRM is every row of the set with its current score (and the judge's
    rationales, where it writes them). A rejected proposal leaves the rubric, hence the scores,
    unchanged, so the set is not re-scored. Step k's sample selection draws from a generator
    seeded with (`seed`, k), so configurations scored alike select alike and a resumed run
    selects as an uninterrupted one. `done`: the reports of an interrupted run (steps 0..n), which
    continues from step n + 1 with their rubric, scores and rationales; `on_step` receives the
    reports so far after every step (for saving). `code` (`provenance.code_version()`) is stamped
    on each step measured here, so a run resumed on newer code says which steps ran where.
    `gate` (a `reward.canary.CanaryGate` on `judge`) is the meta step's canary gate: a proposal it
    refuses is kept out with reason `canary`, as in training.
    """
    from mpo_jax.reward.meta import MetaSample

    if meta_steps < 0:
        raise InvalidValueError(f"meta_steps must be >= 0, got {meta_steps}")
    say = progress or (lambda message: None)
    save = on_step or (lambda reports: None)
    reports = list(done)
    if [r.step for r in reports] != list(range(len(reports))) or len(reports) > meta_steps + 1:
        raise InvalidValueError(f"done must hold steps 0..n with n <= meta_steps ({meta_steps}), got steps "
                                f"{[r.step for r in reports]}")
    if reports:
        rubric, scores, rationales = reports[-1].rubric, reports[-1].scores, reports[-1].rationales
        judge.set_rubric(rubric)
        say(f"resuming after step {reports[-1].step}: mean pairwise accuracy {reports[-1].mean_accuracy:.3f}")
    else:
        judge.set_rubric(rubric)
        scores, rationales = score_rows(judge, rows, batch_size)
        reports.append(_report(0, rubric, rows, scores, None, rationales, code))
        save(reports)
        say(f"step 0: mean pairwise accuracy {reports[-1].mean_accuracy:.3f}")
    for step in range(len(reports), meta_steps + 1):
        samples = [MetaSample(record=r.record, response=r.response, score=s, rationales=why)
                   for r, s, why in zip(rows, scores, rationales, strict=True)]
        result = mrm.meta_step(rubric, samples, np.random.default_rng([seed, step]), step=step, fits=judge.fits,
                               gate=gate)
        meta = {"accepted": bool(result.accepted), "reason": result.reason,
                "reason_code": getattr(result, "reason_code", None), "installed": False,
                "evaluation": result.to_json(samples)}
        if result.accepted:
            try:
                judge.set_rubric(result.rubric)
            except RubricError as err:  # the previous rubric stays installed
                meta["reason"] = f"{result.reason}; not installed: {err}"
            else:
                rubric, meta["installed"] = result.rubric, True
                scores, rationales = score_rows(judge, rows, batch_size)
        reports.append(_report(step, rubric, rows, list(scores), meta, rationales, code))
        save(reports)
        say(f"step {step}: {'accepted' if result.accepted else 'kept'} ({meta['reason']}); mean pairwise "
            f"accuracy {reports[-1].mean_accuracy:.3f}")
    return reports


# -- resuming -----------------------------------------------------------------------------------

def set_digest(rows: Sequence[LabelledRow]) -> str:
    """SHA-256 of the labelled set's content (prompt index, label, record, response per row)."""
    blob = json.dumps([[r.prompt_index, r.label, r.record, r.response] for r in rows], sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_saved_run(path: str | os.PathLike[str], settings: Mapping[str, Any], rows: Sequence[LabelledRow],
                   task: str) -> tuple[dict[str, Any], dict[str, list[StepReport]]]:
    """The saved record of an earlier run into the same folder and its steps per configuration.

    Every key of `settings` must equal the saved one: a run continues only the measurement it
    started, never mixes two. Raises `InvalidValueError` naming the differences otherwise.
    """
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FileFormatError(f"{path} cannot be read to resume ({err}); delete it or pass a new --out") from err
    if not isinstance(saved, dict) or not isinstance(saved.get("configurations"), dict):
        raise FileFormatError(f"{path} is not a repair.json; delete it or pass a new --out")
    differences = [f"{key}: saved {saved.get(key)!r}, now {value!r}" for key, value in settings.items()
                   if saved.get(key) != value]
    if differences:
        raise InvalidValueError(f"{path} holds a run with other settings ({'; '.join(differences)}); run with "
                                "the same settings to resume it, or pass a new --out")
    steps = {name: [StepReport.from_json(step, rows, task) for step in config.get("steps", [])]
             for name, config in saved["configurations"].items()}
    return saved, steps


# -- judge protocols ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Configuration:
    """One judge protocol: scoring mode and whether the response is fenced."""

    mode: str = "logits"
    fence: bool = False

    @property
    def name(self) -> str:
        return f"{self.mode}+fence" if self.fence else self.mode


def load_rubric(task: Task, spec: str) -> Rubric:
    """One of the task's rubrics by name (iter0, expert, ...) or a rubric file (`Task.load_rubric`)."""
    return task.load_rubric(spec)


# -- output -------------------------------------------------------------------------------------

def _cell(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"


def results_table(runs: Mapping[str, Sequence[StepReport]]) -> str:
    """Markdown: rows are hack kinds + mean, columns before / after each meta step per configuration;
    then a mean-score table per label and each meta step's outcome."""
    if not runs:
        raise InvalidValueError("no configurations to tabulate")
    headers, columns = ["hack"], []
    for name, reports in runs.items():
        for report in reports:
            headers.append(f"{name}: {'before' if report.step == 0 else f'after step {report.step}'}")
            columns.append(report)
    kinds = list(dict.fromkeys(k for report in columns for k in report.accuracy))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(_cell(r.accuracy.get(kind, float("nan"))) for r in columns) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{_cell(r.mean_accuracy)}**" for r in columns) + " |")
    labels = list(dict.fromkeys(k for report in columns for k in report.mean_score))
    lines += ["", "Mean score per label:", "", "| label | " + " | ".join(headers[1:]) + " |",
              "|" + "---|" * len(headers)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(_cell(r.mean_score.get(label, float("nan"))) for r in columns)
                     + " |")
    outcomes = [(name, r) for name, reports in runs.items() for r in reports if r.meta is not None]
    if outcomes:
        lines += ["", "Meta steps:", ""]
        for name, r in outcomes:
            verdict = "installed" if r.meta["installed"] else "accepted" if r.meta["accepted"] else "rejected"
            reason = " ".join(str(r.meta["reason"]).split())
            lines.append(f"- {name}, step {r.step}: {verdict} ({reason[:200]})")
    return "\n".join(lines) + "\n"


def benchmark_task(name: str) -> Task:
    """A task the benchmark can run: one whose judge scores a rubric of scaled items (not MATH)."""
    task = get_task(name)
    if task.name == "math":
        raise InvalidValueError("the repair benchmark covers the rubric tasks (essay, summarization, ethics); MATH's "
                                "judge follows per-subject guidelines instead of a rubric")
    return task
