"""The meta-reward model (MRM) and the MPO meta step: analyse scored rollouts, refine, merge.

    mrm = MetaRewardModel(model, task="essay", num_samples=16)
    result = mrm.meta_step(rubric, samples, rng, fits=judge.fits)   # result.rubric: in force now

Per selected sample (batched across samples): a meta-analysis of the junior judge's scoring,
then a refinement (how many criteria, then each criterion in turn, each wrapped in `<item>` by
this program). Then one merge conversation joins the refined sets under a word budget and
writes the merged criteria one by one. The proposal must parse under the task's limits (every
criterion states its scale, `### <name> (<lo>-<hi>)`), pass the sense check (`sense_check`),
fit the judge (`fits`, which may keep only a prefix of the criteria) and, when a canary gate is
given (`gate`, `reward/canary.py`), keep the judge ranking the sampled answers above their
degraded copies; otherwise the previous rubric stays in force; either way
`MetaResult.reason_code` and `reason` say why. With a gate, the sense check's quality
heuristics are warnings (`MetaResult.sense_warnings`) and the gate decides. The MRM runs
on its own jitted functions (the model's sampler), separately from the judge and from PPO, and
may be a bigger model or a remote endpoint.

Generated text is data: criteria holding rubric markup are cleaned of the tags (and the cleaning
is logged), never parsed as structure, evaluated or rendered as templates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mpo_jax.engine import chat_session
from mpo_jax.errors import InvalidValueError
from mpo_jax.fileio import atomic_write_text
from mpo_jax.reward.sense_check import SenseIssue, check_criteria, clean_markup, split_issues
from mpo_jax.rubric import Rubric, RubricError, RubricLimits, ScaleError, diff, render_items
from mpo_jax.tasks import Task, get_task
from mpo_jax.tasks.base import PRESCREEN_CHOICES, join_criteria_sets

_LOG = logging.getLogger(__name__)

# `MetaResult.reason_code`: why the step ended as it did.
ACCEPTED = "accepted"  # the merged rubric is in force
TRUNCATED = "truncated"  # accepted, but only the longest prefix of its criteria that fits the judge
NO_SAMPLES = "no_samples"  # no buffered rollouts to analyse
NO_CRITERIA = "no_criteria"  # no refinement, or the merge, produced a usable criterion
INVALID = "invalid"  # the merged rubric failed parsing or the task's size limits
NO_SCALE = "no_scale"  # a merged criterion states no readable score scale
SENSE_CHECK = "sense_check"  # a merged criterion gives no scoring guidance, leaves its scale or copies
DOES_NOT_FIT = "does_not_fit"  # not even the first merged criterion fits the judge
CANARY = "canary"  # the judge ranks answers above their degraded copies less often with the proposal
ACCEPTED_REASONS = (ACCEPTED, TRUNCATED)
KEPT_REASONS = (NO_SAMPLES, NO_CRITERIA, INVALID, NO_SCALE, SENSE_CHECK, DOES_NOT_FIT, CANARY)

Fits = Callable[[Rubric], bool]


class Gate(Protocol):
    """Decides whether a proposal that passed the text checks may replace the current rubric
    (`reward.canary.CanaryGate`)."""

    def evaluate(self, current: Rubric, proposal: Rubric, records: Sequence[dict[str, Any]],
                 responses: Sequence[str], *, step: int | None = None) -> Any: ...


def save_meta_evaluation(directory: str | os.PathLike, step: int, trace: dict[str, Any]) -> Path:
    """Write a meta step's trace to `meta_evaluation_{step}.json` atomically; returns the path.

    Model text in the trace is kept as written; a lone surrogate in it is escaped, not refused.
    """
    path = Path(directory) / f"meta_evaluation_{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(trace, indent=2, ensure_ascii=False), errors="backslashreplace")
    return path


@dataclasses.dataclass(frozen=True)
class MetaSample:
    """One buffered rollout: the task record, the policy's response and the judge's verdict."""

    record: dict[str, Any]
    response: str
    score: float
    rationales: tuple[str, ...] = ()


@dataclasses.dataclass
class MetaResult:
    """A meta step's outcome and its trace, written to `meta_evaluation_{step}.json`.

    `cleaned`: generated criteria whose rubric tags, end-marker lines or unfinished last line
    (cut off by the token budget) were removed ({stage, set, criterion, removed, kept});
    `dropped`: generated criteria left out: empty replies, criteria cut off in their first line,
    criteria that break the task's rubric limits, and the merge's exact repeats ({stage, set,
    criterion, chars, error}); `capped`: criteria counts cut to a limit ({stage, set, asked, kept, limit, by});
    `stopped`: conversations whose criteria turns ended early because the MRM could not take
    another turn ({stage, criterion, error}; criterion 0: not even the count question fit);
    `sense_check`: the issues that rejected the proposal; `sense_warnings`: quality findings
    left to the canary gate; `truncated`: how many criteria were proposed and kept when only a
    prefix fits the judge; `canary`: the gate's report (`CanaryReport.to_json()`), or
    {"enabled": True, "ran": False, ...} when the proposal was refused before it, None without a gate.
    """

    rubric: Rubric  # the rubric in force after the step (the new one, or the previous one)
    accepted: bool
    reason: str
    previous: Rubric
    selected: list[int]
    prescreen: list[str | None]
    analyses: list[str]
    refinements: list[str]
    merged_text: str
    timing: dict[str, float]
    reason_code: str = ""  # one of ACCEPTED_REASONS or KEPT_REASONS; "" means ACCEPTED for an accepted step
    cleaned: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    capped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sense_check: list[SenseIssue] = dataclasses.field(default_factory=list)
    truncated: dict[str, int] | None = None
    dropped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sense_warnings: list[SenseIssue] = dataclasses.field(default_factory=list)
    canary: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.reason_code:
            if not self.accepted:
                raise ValueError(f"a meta step that kept the rubric needs a reason_code, one of {KEPT_REASONS}")
            self.reason_code = ACCEPTED
        allowed = ACCEPTED_REASONS if self.accepted else KEPT_REASONS
        if self.reason_code not in allowed:
            raise ValueError(f"reason_code {self.reason_code!r} is not one of {allowed} "
                             f"(accepted={self.accepted})")

    def diff(self) -> str:
        return diff(self.previous, self.rubric)

    def to_json(self, samples: Sequence[MetaSample]) -> dict[str, Any]:
        return {
            "accepted": self.accepted, "reason_code": self.reason_code, "reason": self.reason,
            "previous_rubric": self.previous.render(), "rubric": self.rubric.render(),
            "iteration": self.rubric.iteration, "merged_text": self.merged_text, "timing_s": self.timing,
            "cleaned": self.cleaned, "dropped": self.dropped, "capped": self.capped, "stopped": self.stopped,
            "sense_check": [issue.to_json() for issue in self.sense_check],
            "sense_check_warnings": [issue.to_json() for issue in self.sense_warnings],
            "canary": self.canary, "truncated": self.truncated,
            "samples": [{"index": i, "prompt": samples[i].record, "response": samples[i].response,
                         "score": samples[i].score, "prescreen": p, "meta_analysis": a, "meta_refinement": r}
                        for i, p, a, r in zip(self.selected, self.prescreen or [None] * len(self.selected),
                                              self.analyses, self.refinements, strict=True)],
            "diff": self.diff(),
        }

    def save(self, directory: str | os.PathLike, step: int, samples: Sequence[MetaSample]) -> Path:
        """Write `meta_evaluation_{step}.json` atomically."""
        return save_meta_evaluation(directory, step, self.to_json(samples))


@dataclasses.dataclass
class _Trace:
    """What a meta step has produced so far, for its `MetaResult` whichever way it ends."""

    selected: list[int] = dataclasses.field(default_factory=list)
    prescreen: list[str | None] = dataclasses.field(default_factory=list)
    analyses: list[str] = dataclasses.field(default_factory=list)
    refinements: list[str] = dataclasses.field(default_factory=list)
    merged_text: str = ""
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    cleaned: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    capped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sense_check: list[SenseIssue] = dataclasses.field(default_factory=list)
    dropped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sense_warnings: list[SenseIssue] = dataclasses.field(default_factory=list)
    canary: dict[str, Any] | None = None

    def result(self, rubric: Rubric, previous: Rubric, code: str, reason: str,
               truncated: dict[str, int] | None = None) -> MetaResult:
        return MetaResult(rubric=rubric, accepted=code in ACCEPTED_REASONS, reason=reason, previous=previous,
                          selected=self.selected, prescreen=self.prescreen, analyses=self.analyses,
                          refinements=self.refinements, merged_text=self.merged_text, timing=self.timing,
                          reason_code=code, cleaned=self.cleaned, capped=self.capped, stopped=self.stopped,
                          sense_check=self.sense_check, truncated=truncated, dropped=self.dropped,
                          sense_warnings=self.sense_warnings, canary=self.canary)


class MetaRewardModel:
    """Runs the meta step on a `LanguageModel` or a remote chat client.

    Budgets follow the original: `analysis_tokens` per meta-analysis, `item_tokens` and
    `item_words` per generated criterion, `merge_words` for joining the refined sets into the
    merge prompt, `guideline_tokens` for MATH's analysis and guideline refinement. There is no
    cap on the merged rubric's total words unless `merged_rubric_words` > 0, and none on the
    number of criteria below the task's `rubric_limits.max_items` unless `max_items` > 0.
    `sense_check` rejects proposals whose criteria give no scoring guidance, name levels outside
    their scale, or copy more than `max_copied_fraction` of their word `copy_ngram`-grams from
    the prompts and responses shown to the MRM.
    """

    def __init__(self, model: Any, *, task: str | Task, num_samples: int = 16, prescreen: bool = False,
                 analysis_words: int = 1000, item_words: int = 300, analysis_tokens: int = 2000,
                 item_tokens: int = 500, max_items: int = 0, merge_words: int = 16_000,
                 merged_rubric_words: int = 0, guideline_tokens: int = 2500, temperature: float = 0.0,
                 sense_check: bool = True, max_copied_fraction: float = 0.5, copy_ngram: int = 4):
        if num_samples < 1:
            raise InvalidValueError(f"num_samples must be >= 1, got {num_samples}")
        for name, value in (("max_items", max_items), ("merged_rubric_words", merged_rubric_words)):
            if value < 0:
                raise InvalidValueError(f"{name} must be >= 0 (0: no cap), got {value}")
        for name, value in (("analysis_tokens", analysis_tokens), ("item_tokens", item_tokens),
                            ("guideline_tokens", guideline_tokens), ("item_words", item_words),
                            ("merge_words", merge_words), ("copy_ngram", copy_ngram)):
            if value < 1:
                raise InvalidValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 < max_copied_fraction <= 1.0:
            raise InvalidValueError(f"max_copied_fraction must be in (0, 1], got {max_copied_fraction}")
        self.model = model
        self.task = get_task(task) if isinstance(task, str) else task
        self.num_samples, self.prescreen = num_samples, prescreen
        self.analysis_words, self.item_words, self.merge_words = analysis_words, item_words, merge_words
        self.merged_rubric_words = merged_rubric_words
        self.analysis_tokens, self.item_tokens, self.max_items = analysis_tokens, item_tokens, max_items
        self.guideline_tokens = guideline_tokens
        self.temperature = temperature
        self.sense_check, self.max_copied_fraction, self.copy_ngram = sense_check, max_copied_fraction, copy_ngram

    # -- selection ------------------------------------------------------------------------------
    def select(self, rubric: Rubric, samples: Sequence[MetaSample], rng: np.random.Generator
               ) -> tuple[list[int], list[str | None]]:
        """n samples uniformly at random; with prescreening, "bad" ones first, then "ok"."""
        n = min(self.num_samples, len(samples))
        if not self.prescreen:
            return sorted(rng.choice(len(samples), size=n, replace=False).tolist()), []
        verdicts = self._prescreen(rubric, samples)
        order = rng.permutation(len(samples))
        rank = {"bad": 0, "ok": 1, "good": 2, None: 3}
        chosen = sorted(order, key=lambda i: rank[verdicts[i]])[:n]
        return sorted(int(i) for i in chosen), [verdicts[i] for i in sorted(chosen)]

    def _prescreen(self, rubric: Rubric, samples: Sequence[MetaSample]) -> list[str | None]:
        rubric_text = rubric.render()
        turns = [[{"role": "user", "content": self.task.prescreen(self._fields(s), rubric_text)}] for s in samples]
        session = chat_session.open_session(self.model, [self._system()] * len(samples))
        return session.say_choice(turns, PRESCREEN_CHOICES)

    # -- the step -------------------------------------------------------------------------------
    def meta_step(self, rubric: Rubric, samples: Sequence[MetaSample], rng: np.random.Generator | int,
                  *, step: int | None = None, fits: Fits | None = None, gate: Gate | None = None) -> MetaResult:
        """One meta step; the returned rubric is the one in force afterwards (logged either way).

        `fits(rubric) -> bool` says whether the judge can take a rubric (e.g. `Judge.fits`); a
        merged rubric that does not fit is cut to the longest prefix of its criteria that does.
        `gate` (a `reward.canary.CanaryGate`) runs last, on the sampled rollouts; with it the
        quality heuristics of the sense check only warn.
        """
        result = self._meta_step(rubric, samples, rng, step, fits, gate)
        if gate is not None and result.canary is None:
            result.canary = {"enabled": True, "ran": False, "decision": "not_run",
                             "reason": f"the proposal was refused before the gate ({result.reason_code})"}
        _LOG.info("meta step %s: %s [%s] (rubric iteration %d, %d items)", step, result.reason, result.reason_code,
                  result.rubric.iteration, len(result.rubric.items))
        return result

    def _meta_step(self, rubric: Rubric, samples: Sequence[MetaSample], rng: np.random.Generator | int,
                   step: int | None, fits: Fits | None, gate: Gate | None) -> MetaResult:
        trace = _Trace()
        if not samples:
            return trace.result(rubric, rubric, NO_SAMPLES, "no buffered rollouts")
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        start = time.perf_counter()
        trace.selected, trace.prescreen = self.select(rubric, samples, rng)
        trace.timing["select"] = time.perf_counter() - start

        start = time.perf_counter()
        chosen = [samples[i] for i in trace.selected]
        trace.analyses, trace.refinements = self._analyse_and_refine(rubric, chosen, trace)
        trace.timing["analyse_refine"] = time.perf_counter() - start

        valid_sets = [r for r in trace.refinements if r]
        if not valid_sets:
            return trace.result(rubric, rubric, NO_CRITERIA, "no refinement produced a valid criterion")
        start = time.perf_counter()
        merged_items = self._merge(valid_sets, trace)
        trace.timing["merge"] = time.perf_counter() - start
        if not merged_items:
            return trace.result(rubric, rubric, NO_CRITERIA, "the merge produced no valid criterion")
        trace.merged_text = render_items(merged_items)
        try:
            proposal = Rubric.parse(trace.merged_text, limits=self.task.rubric_limits)
        except ScaleError as exc:
            return trace.result(rubric, rubric, NO_SCALE, f"merged rubric rejected: {exc}")
        except RubricError as exc:
            return trace.result(rubric, rubric, INVALID, f"merged rubric rejected: {exc}")

        if self.sense_check:
            found = check_criteria(proposal.items, self._shown_texts(chosen), exclude=rubric.items,
                                   max_copied_fraction=self.max_copied_fraction, n=self.copy_ngram)
            trace.sense_check, trace.sense_warnings = split_issues(found, gate=gate is not None)
            if trace.sense_check:
                shown = "; ".join(str(issue) for issue in trace.sense_check[:3])
                more = len(trace.sense_check) - 3
                return trace.result(rubric, rubric, SENSE_CHECK, f"merged rubric rejected by the sense check: {shown}"
                                    + (f"; and {more} more" if more > 0 else ""))

        code, truncated = ACCEPTED, None
        if fits is not None:
            kept = longest_fitting_prefix(proposal, fits)
            if kept is None:
                return trace.result(rubric, rubric, DOES_NOT_FIT,
                                    f"merged rubric rejected: not even the first of its {len(proposal.items)} "
                                    f"criteria fits the judge")
            if len(kept.items) < len(proposal.items):
                code, truncated = TRUNCATED, {"proposed": len(proposal.items), "kept": len(kept.items)}
            proposal = kept
        new = dataclasses.replace(proposal, iteration=rubric.iteration + 1, parent=rubric.iteration,
                                  created_step=step, task=self.task.name)
        reason = (f"accepted: {len(new.items)} criteria" if truncated is None else
                  f"accepted: the first {truncated['kept']} of {truncated['proposed']} criteria, the longest prefix "
                  f"that fits the judge")
        if gate is not None:
            report = gate.evaluate(rubric, new, [s.record for s in chosen], [s.response for s in chosen], step=step)
            trace.canary, trace.timing["canary"] = report.to_json(), report.seconds
            if not report.passed:
                return trace.result(rubric, rubric, CANARY, f"proposal refused by the canary gate: {report.reason}")
            reason += f"; canary: {report.reason}"
        if trace.sense_warnings:
            reason += f"; {len(trace.sense_warnings)} quality warning(s) left to the gate"
        return trace.result(new, rubric, code, reason, truncated)

    def _system(self) -> list[dict]:
        return [{"role": "system", "content": self.task.meta_system}]

    def _fields(self, sample: MetaSample) -> dict[str, Any]:
        return self.task.meta_sample_fields(sample.record, sample.response, sample.score)

    def _shown_texts(self, chosen: Sequence[MetaSample]) -> list[str]:
        """The task description, prompts and responses the MRM saw (what criteria must not copy)."""
        texts = [self.task.task_description]
        for sample in chosen:
            texts += [self.task.prompt_text(sample.record), sample.response]
        return texts

    def _count_limit(self) -> tuple[int, str]:
        """The most criteria one conversation may write, and which setting sets it."""
        task_limit = self.task.rubric_limits.max_items
        if self.max_items and self.max_items < task_limit:
            return self.max_items, "max_items"
        return task_limit, "rubric_limits.max_items"

    def _criteria(self, session: chat_session.ChatSession, count_turn: str, rows: int, stage: str,
                  trace: _Trace) -> list[dict[int, str]]:
        """Ask how many criteria (`count_turn`), then each in turn; per row, the usable item texts
        by the number of the turn that wrote them (in order).

        Counts above the limit are cut to it (logged in `trace.capped`); rubric tags in a reply
        are removed and logged in `trace.cleaned`, the rest of the reply kept; a criterion that
        breaks the task's rubric limits (say, longer than `max_item_chars`) is left out, logged in
        `trace.dropped`. Like the original's
        context guard, the turns stop early, keeping the criteria written so far, when the model
        cannot take another turn (a local sampler refuses a conversation that would outgrow its
        context with a ValueError); `trace.stopped` records it. A criterion that ran out of
        `item_tokens` before its end marker loses its unfinished last line (listed in
        `trace.cleaned`); one with no finished line is left out.
        """
        try:
            answers = session.say_integer([[{"role": "user", "content": count_turn}]] * rows, max_digits=2)
        except ValueError as exc:
            trace.stopped.append({"stage": stage, "criterion": 0, "error": str(exc)})
            _LOG.warning("meta %s: the MRM cannot take the count question, no criteria written: %s", stage, exc)
            return [{} for _ in range(rows)]
        asked = [max(c or 1, 1) for c in answers]
        limit, by = self._count_limit()
        counts = [min(a, limit) for a in asked]
        for row, (a, c) in enumerate(zip(asked, counts, strict=True)):
            if a > c:
                trace.capped.append({"stage": stage, "set": _set_number(stage, row), "asked": a, "kept": c,
                                     "limit": limit, "by": by})
        items: list[dict[int, str]] = [{} for _ in range(rows)]
        for i in range(1, max(counts) + 1):
            turn = [{"role": "user", "content": self.task.meta_item_request(i, self.item_words)}]
            try:
                replies = session.say([turn] * rows, max_tokens=self.item_tokens, stop=("<EOE>", "</EOE>"),
                                      temperature=self.temperature)
            except ValueError as exc:
                trace.stopped.append({"stage": stage, "criterion": i, "error": str(exc)})
                _LOG.warning("meta %s: no turn for criterion #%d, keeping the %d written before: %s", stage, i,
                             i - 1, exc)
                break
            for row, reply in enumerate(replies):
                if i > counts[row]:
                    continue
                text, removed = clean_markup(reply)
                ran_out = session.hit_limit[row]
                if text and ran_out:
                    # Out of tokens mid-line: keep the complete lines (as the published code keeps
                    # the whole reply), never a dangling "- 4:" or half sentence.
                    text, _, partial = text.rpartition("\n")
                    text = text.rstrip()
                    removed += (f"{partial.strip()} [cut off at the {self.item_tokens}-token budget]",)
                problem = _item_problem(text, self.task.rubric_limits) if text else (
                    f"cut off at the {self.item_tokens}-token budget before its first line ended"
                    if ran_out else "empty reply")
                usable = problem is None
                if problem is not None:
                    trace.dropped.append({"stage": stage, "set": _set_number(stage, row), "criterion": i,
                                          "chars": len(text), "error": problem})
                if removed:
                    trace.cleaned.append({"stage": stage, "set": _set_number(stage, row), "criterion": i,
                                          "removed": list(removed), "kept": usable})
                if usable:
                    items[row][i] = text
        return items

    def _analyse_and_refine(self, rubric: Rubric, chosen: Sequence[MetaSample], trace: _Trace
                            ) -> tuple[list[str], list[str]]:
        rubric_text = rubric.render()
        session = chat_session.open_session(self.model, [self._system()] * len(chosen))
        turns = [[{"role": "user", "content": self.task.meta_analysis(self._fields(s), rubric_text,
                                                                      self.analysis_words)}] for s in chosen]
        analyses = session.say(turns, max_tokens=self.analysis_tokens, stop=("<EOE>", "</EOE>"),
                               temperature=self.temperature)
        intro = self.task.meta_refine_intro() + "\n\n" + self.task.meta_count_request()
        items = self._criteria(session, intro, len(chosen), "refinement", trace)
        refinements = [render_items(list(row.values())) if row else "" for row in items]
        return [a.strip() for a in analyses], refinements

    def _merge(self, sets: Sequence[str], trace: _Trace) -> list[str]:
        sets_text = join_criteria_sets(sets, max_words=self.merge_words)
        session = chat_session.open_session(self.model, [self._system()])
        first_turn = (self.task.meta_merge(sets_text, self.merged_rubric_words) + "\n\n"
                      + self.task.meta_merge_count_request())
        written = self._criteria(session, first_turn, 1, "merge", trace)[0]
        unique: list[str] = []
        for turn, item in written.items():
            if item in unique:
                trace.dropped.append({"stage": "merge", "set": None, "criterion": turn, "chars": len(item),
                                      "error": f"an exact repeat of an earlier criterion (kept as #"
                                               f"{unique.index(item) + 1})"})
            else:
                unique.append(item)
        return unique


def longest_fitting_prefix(rubric: Rubric, fits: Fits) -> Rubric | None:
    """The rubric of the longest prefix of `rubric`'s items that `fits`, or None if even one item does not.

    Item order matters to the judge (it scores items in turn in one conversation), so criteria
    are dropped from the end, never picked out of order.
    """
    for count in range(len(rubric.items), 0, -1):
        prefix = dataclasses.replace(rubric, items=rubric.items[:count])
        if fits(prefix):
            return prefix
    return None


def _set_number(stage: str, row: int) -> int | None:
    """The 1-based criteria set a refinement row belongs to (None for the single merge)."""
    return row + 1 if stage == "refinement" else None


def _item_problem(text: str, limits: RubricLimits) -> str | None:
    """Why `text` cannot be a rubric item as it is (tags, whitespace, size), or None if it can.

    The scale is checked on the whole proposal later, so that a missing one is reported as such.
    """
    try:
        Rubric(items=(text,)).validated(dataclasses.replace(limits, require_scale=False))
    except (RubricError, ValueError) as exc:
        return str(exc)
    return None


@dataclasses.dataclass
class GuidelineUpdate:
    """The math meta step's outcome for one (subject[, cluster]) group."""

    group: Any
    guideline: Rubric  # in force after the step
    accepted: bool
    reason: str
    cases: list[dict[str, Any]]
    analysis: str
    refinement: str


def tiered_cases(scored: Sequence[tuple[int, float]], per_tier: int, rng: np.random.Generator) -> list[int]:
    """Indices drawn from the low, mid and high thirds by score (all of them for tiny groups)."""
    if len(scored) < 3:
        return [i for i, _ in scored]
    ordered = [i for i, _ in sorted(scored, key=lambda pair: pair[1])]
    tiers = np.array_split(np.array(ordered), 3)
    chosen: list[int] = []
    for tier in tiers:
        take = min(per_tier, len(tier))
        chosen.extend(int(i) for i in rng.choice(tier, size=take, replace=False))
    return chosen


def group_meta_step(mrm: MetaRewardModel, guidelines: dict[Any, Rubric], samples: Sequence[MetaSample],
                    rng: np.random.Generator | int, *, group_of: Callable[[dict[str, Any]], Any],
                    per_tier: int = 2, max_words: int = 1000, step: int | None = None) -> dict[Any, GuidelineUpdate]:
    """The meta step of a task with per-group guidelines (`Task.rubric_groups`; MATH's, §A.3): per
    group, analyse low/mid/high-scored cases and rewrite its guideline.

    There is no merge: each group's refinement becomes its next guideline when it passes the
    task's `rubric_limits` (MATH's allow a 12,000-char guideline) and holds no rubric markup.
    Every group in `guidelines` is analysed, with an empty case list if it saw no rollouts. The
    analysis and the refinement each get `mrm.guideline_tokens` (the original's 2,500).
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    task = mrm.task
    groups = list(guidelines)
    members: dict[Any, list[tuple[int, float]]] = {g: [] for g in groups}
    for index, sample in enumerate(samples):
        group = group_of(sample.record)
        if group in members:
            members[group].append((index, sample.score))
    cases = {}
    for group in groups:
        picked = tiered_cases(members[group], per_tier, rng)
        cases[group] = [{"problem": samples[i].record.get("problem", ""), "response": samples[i].response,
                         "reference": samples[i].record.get("solution", ""),
                         "feedback": "\n\n".join(samples[i].rationales), "score": samples[i].score} for i in picked]
    session = chat_session.open_session(mrm.model, [mrm._system() for _ in groups])
    analyses = session.say([[{"role": "user", "content": task.meta_cases_analysis(
        cases[g], "\n\n".join(guidelines[g].items), max_words)}] for g in groups],
        max_tokens=mrm.guideline_tokens, stop=("<EOE>", "</EOE>"), temperature=mrm.temperature)
    refinements = session.say([[{"role": "user", "content": task.meta_guidelines_request(a, max_words)}]
                               for a in analyses], max_tokens=mrm.guideline_tokens, stop=("<EOE>", "</EOE>"),
                              temperature=mrm.temperature)
    updates = {}
    for group, analysis, refinement in zip(groups, analyses, refinements, strict=True):
        previous = guidelines[group]
        text = refinement.strip()
        try:
            problem = _item_problem(text, task.rubric_limits)
            if problem is not None:
                raise RubricError(f"the guideline cannot be a rubric item: {problem}")
            new = Rubric(items=(text,), iteration=previous.iteration + 1, parent=previous.iteration,
                         created_step=step, task=task.name).validated(task.rubric_limits)
            updates[group] = GuidelineUpdate(group, new, True, "accepted", cases[group], analysis.strip(), text)
        except (RubricError, ValueError) as exc:
            updates[group] = GuidelineUpdate(group, previous, False, f"kept: {exc}", cases[group], analysis.strip(),
                                             text)
    return updates
