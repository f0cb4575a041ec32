"""The meta-reward model (MRM) and the MPO meta step: analyse scored rollouts, refine, merge.

    mrm = MetaRewardModel(model, task="essay", num_samples=16)
    result = mrm.meta_step(rubric, samples, rng)      # result.rubric is the rubric now in force

Per selected sample (batched across samples): a meta-analysis of the junior judge's scoring,
then a refinement (how many criteria, then each criterion in turn, each wrapped in `<item>` by
this program). Then one merge conversation joins the refined sets under a word budget and
writes the merged criteria one by one. The proposal passes `Rubric` validation or the previous
rubric stays in force; either way `MetaResult.reason` says why. The MRM runs on its own jitted
functions (the model's sampler), separately from the judge and from PPO, and may be a bigger
model or a remote endpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpo_jax import chat_session
from mpo_jax.rubric import Rubric, RubricError, diff
from mpo_jax.tasks import Task, get_task
from mpo_jax.tasks.base import PRESCREEN_CHOICES, join_criteria_sets

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MetaSample:
    """One buffered rollout: the task record, the policy's response and the judge's verdict."""

    record: dict[str, Any]
    response: str
    score: float
    rationales: tuple[str, ...] = ()


@dataclasses.dataclass
class MetaResult:
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

    def diff(self) -> str:
        return diff(self.previous, self.rubric)

    def to_json(self, samples: Sequence[MetaSample]) -> dict[str, Any]:
        return {
            "accepted": self.accepted, "reason": self.reason,
            "previous_rubric": self.previous.render(), "rubric": self.rubric.render(),
            "iteration": self.rubric.iteration, "merged_text": self.merged_text, "timing_s": self.timing,
            "samples": [{"index": i, "prompt": samples[i].record, "response": samples[i].response,
                         "score": samples[i].score, "prescreen": p, "meta_analysis": a, "meta_refinement": r}
                        for i, p, a, r in zip(self.selected, self.prescreen or [None] * len(self.selected),
                                              self.analyses, self.refinements, strict=True)],
            "diff": self.diff(),
        }

    def save(self, directory: str | os.PathLike, step: int, samples: Sequence[MetaSample]) -> Path:
        """Write `meta_evaluation_{step}.json` atomically."""
        path = Path(directory) / f"meta_evaluation_{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(samples), indent=2, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
        return path


class MetaRewardModel:
    """Runs the meta step on a `LanguageModel` or a remote chat client."""

    def __init__(self, model: Any, *, task: str | Task, num_samples: int = 16, prescreen: bool = False,
                 analysis_words: int = 1000, item_words: int = 300, analysis_tokens: int = 1024,
                 item_tokens: int = 512, max_items: int = 10, merge_words: int = 16_000,
                 temperature: float = 0.0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.model = model
        self.task = get_task(task) if isinstance(task, str) else task
        self.num_samples, self.prescreen = num_samples, prescreen
        self.analysis_words, self.item_words, self.merge_words = analysis_words, item_words, merge_words
        self.analysis_tokens, self.item_tokens, self.max_items = analysis_tokens, item_tokens, max_items
        self.temperature = temperature

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
                  *, step: int | None = None) -> MetaResult:
        """One meta step; the returned rubric is the one in force afterwards (logged either way)."""
        result = self._meta_step(rubric, samples, rng, step)
        _LOG.info("meta step %s: %s (rubric iteration %d, %d items)", step, result.reason,
                  result.rubric.iteration, len(result.rubric.items))
        return result

    def _meta_step(self, rubric: Rubric, samples: Sequence[MetaSample], rng: np.random.Generator | int,
                   step: int | None) -> MetaResult:
        if not samples:
            return self._keep(rubric, "no buffered rollouts", [], [], [], [], "", {})
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        timing: dict[str, float] = {}
        start = time.perf_counter()
        selected, verdicts = self.select(rubric, samples, rng)
        timing["select"] = time.perf_counter() - start

        start = time.perf_counter()
        analyses, refinements = self._analyse_and_refine(rubric, [samples[i] for i in selected])
        timing["analyse_refine"] = time.perf_counter() - start

        start = time.perf_counter()
        valid_sets = [r for r in refinements if r]
        if not valid_sets:
            return self._keep(rubric, "no refinement produced a valid criterion", selected, verdicts, analyses,
                              refinements, "", timing)
        merged_items = self._merge(valid_sets)
        timing["merge"] = time.perf_counter() - start
        merged_text = "<rubric>\n" + "\n\n".join(f"<item>\n{t}\n</item>" for t in merged_items) + "\n</rubric>"
        try:
            proposal = Rubric.parse(merged_text, limits=self.task.rubric_limits)
        except RubricError as exc:
            return self._keep(rubric, f"merged rubric rejected: {exc}", selected, verdicts, analyses, refinements,
                              merged_text, timing)
        new = dataclasses.replace(proposal, iteration=rubric.iteration + 1, parent=rubric.iteration,
                                  created_step=step, task=self.task.name)
        return MetaResult(rubric=new, accepted=True, reason=f"accepted: {len(new.items)} criteria",
                          previous=rubric, selected=selected, prescreen=verdicts, analyses=analyses,
                          refinements=refinements, merged_text=merged_text, timing=timing)

    def _keep(self, rubric, reason, selected, verdicts, analyses, refinements, merged_text, timing) -> MetaResult:
        return MetaResult(rubric=rubric, accepted=False, reason=reason, previous=rubric, selected=selected,
                          prescreen=verdicts, analyses=analyses, refinements=refinements, merged_text=merged_text,
                          timing=timing)

    def _system(self) -> list[dict]:
        return [{"role": "system", "content": self.task.meta_system}]

    def _fields(self, sample: MetaSample) -> dict[str, Any]:
        return self.task.meta_sample_fields(sample.record, sample.response, sample.score)

    def _criteria(self, session: chat_session.ChatSession, count_turn: str, rows: int) -> list[list[str]]:
        """Ask how many criteria (`count_turn`), then each in turn; the valid item texts per row."""
        counts = session.say_integer([[{"role": "user", "content": count_turn}]] * rows, max_digits=2)
        counts = [min(max(c or 1, 1), self.max_items) for c in counts]
        items: list[list[str]] = [[] for _ in range(rows)]
        for i in range(1, max(counts) + 1):
            turn = [{"role": "user", "content": self.task.meta_item_request(i, self.item_words)}]
            replies = session.say([turn] * rows, max_tokens=self.item_tokens, stop=("<EOE>", "</EOE>"),
                                  temperature=self.temperature)
            for row, text in enumerate(replies):
                text = text.strip()
                if i <= counts[row] and text and _is_clean_item(text):
                    items[row].append(text)
        return items

    def _analyse_and_refine(self, rubric: Rubric, chosen: Sequence[MetaSample]) -> tuple[list[str], list[str]]:
        rubric_text = rubric.render()
        session = chat_session.open_session(self.model, [self._system()] * len(chosen))
        turns = [[{"role": "user", "content": self.task.meta_analysis(self._fields(s), rubric_text,
                                                                      self.analysis_words)}] for s in chosen]
        analyses = session.say(turns, max_tokens=self.analysis_tokens, stop=("<EOE>", "</EOE>"),
                               temperature=self.temperature)
        intro = self.task.meta_refine_intro() + "\n\n" + self.task.meta_count_request()
        items = self._criteria(session, intro, len(chosen))
        refinements = [_render_items(row) if row else "" for row in items]
        return [a.strip() for a in analyses], refinements

    def _merge(self, sets: Sequence[str]) -> list[str]:
        sets_text = join_criteria_sets(sets, max_words=self.merge_words)
        session = chat_session.open_session(self.model, [self._system()])
        first_turn = self.task.meta_merge(sets_text, self.item_words) + "\n\n" + self.task.meta_merge_count_request()
        items = self._criteria(session, first_turn, 1)[0]
        return list(dict.fromkeys(items))  # exact duplicates removed, order kept


def _is_clean_item(text: str) -> bool:
    """Generated criteria are data: one that `Rubric` would read as markup (any spelling of an
    item or rubric tag) is dropped rather than allowed to split or nest items."""
    try:
        Rubric(items=(text,))
    except (RubricError, ValueError):
        return False
    return True


def _render_items(items: Sequence[str]) -> str:
    return "<rubric>\n" + "\n\n".join(f"<item>\n{t}\n</item>" for t in items) + "\n</rubric>"


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


def math_meta_step(mrm: MetaRewardModel, guidelines: dict[Any, Rubric], samples: Sequence[MetaSample],
                   rng: np.random.Generator | int, *, group_of, per_tier: int = 2, max_words: int = 1000,
                   step: int | None = None) -> dict[Any, GuidelineUpdate]:
    """MATH's meta step: per group, analyse low/mid/high-scored cases and rewrite its guidelines.

    There is no merge: each group's refinement becomes its next guideline (when it validates).
    Every group in `guidelines` is analysed, with an empty case list if it saw no rollouts.
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
        max_tokens=mrm.analysis_tokens, stop=("<EOE>", "</EOE>"), temperature=mrm.temperature)
    refinements = session.say([[{"role": "user", "content": task.meta_guidelines_request(a, max_words)}]
                               for a in analyses], max_tokens=mrm.analysis_tokens, stop=("<EOE>", "</EOE>"),
                              temperature=mrm.temperature)
    updates = {}
    for group, analysis, refinement in zip(groups, analyses, refinements, strict=True):
        previous = guidelines[group]
        text = refinement.strip()
        try:
            if not _is_clean_item(text):
                raise RubricError("the guideline contains rubric markup")
            new = Rubric(items=(text,), iteration=previous.iteration + 1, parent=previous.iteration,
                         created_step=step, task=task.name).validated(task.rubric_limits)
            updates[group] = GuidelineUpdate(group, new, True, "accepted", cases[group], analysis.strip(), text)
        except (RubricError, ValueError) as exc:
            updates[group] = GuidelineUpdate(group, previous, False, f"kept: {exc}", cases[group], analysis.strip(),
                                             text)
    return updates
