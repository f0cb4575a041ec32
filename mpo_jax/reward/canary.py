"""The canary gate: a proposed rubric replaces the current one only if the judge, scoring with
it, still ranks each answer above its own degraded copies.

Text checks (`sense_check`) say whether a criterion can be scored; they cannot say whether the
judge grades better with it. The gate measures that on the meta step's own sampled rollouts:
each answer is paired with code-made degradations of itself (`reward/hacks.py`: title only,
truncated, repeated, refusal, another prompt's answer, the prompt restated, a note asking the
grader for full marks, not English), the judge scores every text under the current rubric and
under the proposal, and the measure is the share of (answer, degradation) pairs in which the
answer scores higher, ties counting half. The proposal is installed only if

    proposal share >= current share - tolerance   and   proposal share > floor

otherwise the meta step keeps the previous rubric with reason `canary`.

    gate = CanaryGate(judge, task, CanarySettings(), seed=config.seed)
    report = gate.evaluate(current, proposal, records, responses, step=update)   # report.passed

The canary set is drawn from (seed, step), so a resumed run repeats the decision. Its cost is
two scorings of num_samples x (1 + kinds) texts; `CanarySettings.num_samples` sizes it (the
generate mode writes a rationale per item and text, so give it fewer samples there). The pure
pieces (`pairwise_share`, `shares_by_kind`, `decide`, `build_canary_set`) need no judge.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from mpo_jax.errors import InvalidValueError
from mpo_jax.reward.hacks import HACK_KINDS, make_hack
from mpo_jax.rubric import Rubric, RubricError

__all__ = ["CanaryGate", "CanaryPair", "CanaryReport", "CanarySet", "CanarySettings", "GateJudge",
           "add_canary_arguments", "build_canary_set", "canary_settings_from_args", "decide", "hack_prompt",
           "pairwise_share", "score_canary_set", "shares_by_kind"]


@dataclasses.dataclass(frozen=True)
class CanarySettings:
    """The gate's knobs (the trainer's `meta.canary.*`); validated on construction.

    `tolerance`: how far below the current rubric's share the proposal's may fall; `floor`: the
    share the proposal must exceed (0.5 is what a judge that cannot tell an answer from its
    degradations gets); `num_samples`: answers taken from the meta step's sampled rollouts;
    `kinds`: degradation kinds, () for all of `HACK_KINDS`; `batch_size`: texts per judge call.
    """

    enabled: bool = True
    tolerance: float = 0.02
    floor: float = 0.5
    num_samples: int = 8
    kinds: tuple[str, ...] = ()
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.tolerance <= 1.0:
            raise InvalidValueError(f"canary tolerance must be in [0, 1], got {self.tolerance}")
        if not 0.0 <= self.floor < 1.0:
            raise InvalidValueError(f"canary floor must be in [0, 1), got {self.floor}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise InvalidValueError(f"canary num_samples and batch_size must be >= 1, got {self.num_samples} and "
                                    f"{self.batch_size}")
        unknown = [k for k in self.kinds if k not in HACK_KINDS]
        if unknown:
            raise InvalidValueError(f"unknown canary kinds {unknown}; choose from {', '.join(HACK_KINDS)} "
                                    f"(or none for all)")

    @property
    def resolved_kinds(self) -> tuple[str, ...]:
        return tuple(self.kinds) or tuple(HACK_KINDS)


def add_canary_arguments(parser: Any, *, no_canary_help: str) -> None:
    """The gate's command-line flags (`mpo-jax meta`, `mpo-jax eval repair`), defaults from `CanarySettings`."""
    defaults = CanarySettings()
    parser.add_argument("--no-canary", action="store_true", help=no_canary_help)
    parser.add_argument("--canary-tolerance", type=float, default=defaults.tolerance,
                        help="how far below the current rubric's canary share the proposal's may fall")
    parser.add_argument("--canary-floor", type=float, default=defaults.floor,
                        help="the canary share the proposal must exceed")
    parser.add_argument("--canary-samples", type=int, default=defaults.num_samples,
                        help="sampled answers in each canary set")


def canary_settings_from_args(args: Any, **overrides: Any) -> CanarySettings | None:
    """The settings `add_canary_arguments` parsed; None with `--no-canary`."""
    if args.no_canary:
        return None
    return CanarySettings(tolerance=args.canary_tolerance, floor=args.canary_floor,
                          num_samples=args.canary_samples, **overrides)


# -- the canary set -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CanaryPair:
    """An answer (by index into `CanarySet.answers`) and one degradation of it."""

    answer: int
    kind: str
    degraded: str


@dataclasses.dataclass(frozen=True)
class CanarySet:
    """Answers with their task records, the pairs, and per kind how many degradations were left
    out because they equal their answer (a pair of one text twice says nothing)."""

    records: tuple[dict[str, Any], ...]
    answers: tuple[str, ...]
    pairs: tuple[CanaryPair, ...]
    rollouts: tuple[int, ...]  # index of each answer among the rollouts handed in
    skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)


def hack_prompt(task: Any, record: Mapping[str, Any]) -> str:
    """The prompt text a degradation is built from: the record's prompt field, else the judge's material."""
    value = record.get(getattr(task, "prompt_field", "prompt"))
    return value if isinstance(value, str) else task.prompt_text(record)


def build_canary_set(task: Any, records: Sequence[Mapping[str, Any]], responses: Sequence[str], *,
                     kinds: Sequence[str], num_samples: int, rng: np.random.Generator) -> CanarySet:
    """Up to `num_samples` of the (record, response) rollouts, each with one degradation per kind.

    Blank responses are not used. The off-topic degradation of answer i is answer i+1's text
    (cyclically), so it needs two different answers. Each answer's degradations draw from their
    own generator seeded from `rng`, so the set depends only on `rng` and the rollouts.
    """
    if len(records) != len(responses):
        raise ValueError(f"got {len(records)} records but {len(responses)} responses")
    usable = [i for i, text in enumerate(responses) if text.strip()]
    if len(usable) > num_samples:
        usable = sorted(int(i) for i in rng.choice(usable, size=num_samples, replace=False))
    base = int(rng.integers(2 ** 62))
    answers = tuple(responses[i] for i in usable)
    pairs: list[CanaryPair] = []
    skipped: dict[str, int] = {}
    for a, index in enumerate(usable):
        prompt = hack_prompt(task, records[index])
        other = answers[(a + 1) % len(answers)] if len(answers) > 1 else None
        local = np.random.default_rng([base, a])
        for kind in kinds:
            if kind == "off_topic" and (other is None or other.strip() == answers[a].strip()):
                skipped[kind] = skipped.get(kind, 0) + 1
                continue
            degraded = make_hack(kind, prompt, answers[a], other_response=other, rng=local)
            if degraded.strip() == answers[a].strip():
                skipped[kind] = skipped.get(kind, 0) + 1
                continue
            pairs.append(CanaryPair(a, kind, degraded))
    return CanarySet(records=tuple(dict(records[i]) for i in usable), answers=answers, pairs=tuple(pairs),
                     rollouts=tuple(usable), skipped=skipped)


# -- the measure ----------------------------------------------------------------------------------

def pairwise_share(answer_scores: Sequence[float], degraded_scores: Sequence[float]) -> float:
    """The share of pairs where the answer scores strictly higher, ties (exact) counting half; NaN for none."""
    a, d = np.asarray(answer_scores, np.float64), np.asarray(degraded_scores, np.float64)
    if a.shape != d.shape:
        raise ValueError(f"got {a.size} answer scores but {d.size} degraded scores")
    if not a.size:
        return float("nan")
    return float(np.mean(np.where(a > d, 1.0, np.where(a == d, 0.5, 0.0))))


def shares_by_kind(kinds: Sequence[str], answer_scores: Sequence[float], degraded_scores: Sequence[float]
                   ) -> dict[str, float]:
    """`pairwise_share` over the pairs of each kind, kinds in `HACK_KINDS` order (then any others)."""
    if not len(kinds) == len(answer_scores) == len(degraded_scores):
        raise ValueError("kinds, answer scores and degraded scores must have one entry per pair")
    present = list(dict.fromkeys(kinds))
    order = [k for k in HACK_KINDS if k in present] + [k for k in present if k not in HACK_KINDS]
    out = {}
    for kind in order:
        rows = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = pairwise_share([answer_scores[i] for i in rows], [degraded_scores[i] for i in rows])
    return out


def decide(current: float, proposal: float, *, tolerance: float, floor: float) -> tuple[bool, str]:
    """(install, why): the proposal's share must be >= current - tolerance and > floor."""
    if not np.isfinite(proposal) or not np.isfinite(current):
        return False, "no canary pairs could be scored"
    if proposal <= floor:
        return False, (f"the proposal ranks answers above their degraded copies in {proposal:.3f} of pairs, "
                       f"not above the floor {floor:.3f}")
    if proposal < current - tolerance:
        return False, (f"the proposal's share {proposal:.3f} is below the current rubric's {current:.3f} minus the "
                       f"tolerance {tolerance:.3f}")
    return True, (f"the proposal's share {proposal:.3f} against the current rubric's {current:.3f} (tolerance "
                  f"{tolerance:.3f}, floor {floor:.3f})")


ScoreFn = Callable[[Sequence[Mapping[str, Any]], Sequence[str]], Sequence[float]]


def score_canary_set(score: ScoreFn, canary: CanarySet, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(answer score per pair, degraded score per pair): every distinct (answer, text) scored once."""
    texts: dict[tuple[int, str], int] = {}
    order: list[tuple[int, str]] = []
    for a, answer in enumerate(canary.answers):
        order.append((a, answer))
    order += [(p.answer, p.degraded) for p in canary.pairs]
    for key in order:
        texts.setdefault(key, len(texts))
    keys = list(texts)
    values: list[float] = []
    for start in range(0, len(keys), batch_size):
        chunk = keys[start:start + batch_size]
        values.extend(float(v) for v in score([canary.records[a] for a, _ in chunk], [t for _, t in chunk]))
    if len(values) != len(keys):
        raise ValueError(f"the judge returned {len(values)} scores for {len(keys)} texts")
    answer_scores = np.array([values[texts[(p.answer, canary.answers[p.answer])]] for p in canary.pairs])
    degraded_scores = np.array([values[texts[(p.answer, p.degraded)]] for p in canary.pairs])
    return answer_scores.reshape(-1), degraded_scores.reshape(-1)


# -- the gate -------------------------------------------------------------------------------------

class GateJudge(Protocol):
    """What the gate needs from a judge (`reward.judge.Judge` or a stand-in)."""

    rubric: Rubric | None

    def score(self, records: Sequence[Any], responses: Sequence[str]) -> Sequence[float]: ...

    def set_rubric(self, rubric: Rubric) -> None: ...


@dataclasses.dataclass
class CanaryReport:
    """One gate decision: both shares overall and per kind, the pairs' scores, and the cost."""

    passed: bool
    reason: str
    current_share: float
    proposal_share: float
    current_by_kind: dict[str, float]
    proposal_by_kind: dict[str, float]
    answers: int
    pairs: int
    skipped: dict[str, int]
    seconds: float
    tolerance: float
    floor: float
    details: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"enabled": True, "ran": True, "decision": "install" if self.passed else "keep",
                **dataclasses.asdict(self)}


class CanaryGate:
    """Scores the canary set under the current rubric and under a proposal with one judge.

    The judge ends with the current rubric installed whatever happens; installing the proposal
    is the caller's (`RubricHistory.apply`, `eval repair`), after `evaluate` says it passed.
    """

    def __init__(self, judge: GateJudge, task: Any, settings: CanarySettings | None = None, *, seed: int = 0):
        self.judge, self.task = judge, task
        self.settings = settings or CanarySettings()
        self.seed = seed

    def canary_set(self, records: Sequence[Mapping[str, Any]], responses: Sequence[str],
                   step: int | None) -> CanarySet:
        """The set for meta step `step`, drawn from (seed, step)."""
        rng = np.random.default_rng([self.seed, 0 if step is None else step, 3])
        return build_canary_set(self.task, records, responses, kinds=self.settings.resolved_kinds,
                                num_samples=self.settings.num_samples, rng=rng)

    def _install(self, rubric: Rubric) -> None:
        if getattr(self.judge, "rubric", None) != rubric:
            self.judge.set_rubric(rubric)

    def evaluate(self, current: Rubric, proposal: Rubric, records: Sequence[Mapping[str, Any]],
                 responses: Sequence[str], *, step: int | None = None) -> CanaryReport:
        start = time.perf_counter()
        settings = self.settings
        canary = self.canary_set(records, responses, step)
        kinds = [p.kind for p in canary.pairs]
        try:
            self._install(current)
            cur_a, cur_d = score_canary_set(self.judge.score, canary, settings.batch_size)
            try:
                self.judge.set_rubric(proposal)
            except RubricError as err:
                prop_a = prop_d = np.full_like(cur_a, np.nan)
                refused = f"the judge cannot take the proposal: {err}"
            else:
                prop_a, prop_d = score_canary_set(self.judge.score, canary, settings.batch_size)
                refused = None
        finally:
            self._install(current)
        current_share, proposal_share = pairwise_share(cur_a, cur_d), pairwise_share(prop_a, prop_d)
        if refused is None:
            passed, reason = decide(current_share, proposal_share, tolerance=settings.tolerance,
                                    floor=settings.floor)
        else:
            passed, reason = False, refused
        details = [{"answer": canary.rollouts[p.answer], "kind": p.kind, "current": [float(a), float(d)],
                    "proposal": [float(b), float(e)]}
                   for p, a, d, b, e in zip(canary.pairs, cur_a, cur_d, prop_a, prop_d, strict=True)]
        return CanaryReport(passed=passed, reason=reason, current_share=current_share,
                            proposal_share=proposal_share,
                            current_by_kind=shares_by_kind(kinds, cur_a, cur_d),
                            proposal_by_kind=shares_by_kind(kinds, prop_a, prop_d),
                            answers=len(canary.answers), pairs=len(canary.pairs), skipped=dict(canary.skipped),
                            seconds=time.perf_counter() - start, tolerance=settings.tolerance,
                            floor=settings.floor, details=details)
