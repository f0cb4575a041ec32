"""Sense checks on the meta-reward model's proposed criteria, before they become the rubric.

A small MRM often writes criteria that parse and fit the limits but cannot grade anything: the
writing prompt or the student's response copied into a criterion, a criterion with no score
levels or no word on how to score, level lines whose points fall outside the criterion's own
scale, one criterion restated as several, one description given for different scores, lines that
restate each other, or a criterion cut off by its token budget after a level's score. A rubric
like that scores noise, so the meta step keeps the previous rubric instead and logs the
`SenseIssue`s found here.

Everything here is a pure function of the text: the criteria are data, read with regexes and
word counts, never evaluated or rendered as templates. The scale itself is read by
`rubric.item_scale` (the header's `(lo-hi)`); a missing scale is the parser's `ScaleError`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

from mpo_jax.errors import InvalidValueError
from mpo_jax.rubric import _TAG_RE, ScaleError, item_scale

__all__ = [
    "COPIED", "CUT_OFF", "DUPLICATE", "LEVEL_OUT_OF_SCALE", "NO_GUIDANCE", "REPEATED_LEVEL", "REPEATED_LINE",
    "SenseIssue", "check_criteria", "clean_markup", "copied_fraction", "cut_off_level", "has_scoring_guidance",
    "level_descriptions", "level_values", "ngrams", "out_of_scale_levels", "repeated_lines",
]

NO_GUIDANCE = "no_guidance"
LEVEL_OUT_OF_SCALE = "level_out_of_scale"
COPIED = "copied"
DUPLICATE = "duplicate"
REPEATED_LEVEL = "repeated_level"
REPEATED_LINE = "repeated_line"
CUT_OFF = "cut_off"

_NUMBER = r"[-\u2212]?\d+(?:\.\d+)?"
# A level line: an optional bullet, an optional "Score" or "Level", a score or a score range,
# optionally "points" and a short label in parentheses, then a colon: `- 4: ...`,
# `* 3-4 points: ...`, `- **5**: ...`, `- 2 (fair): ...`, `5: ...`, `- **Score 4**: ...`.
_LEVEL_RE = re.compile(
    rf"^[ \t]*(?:[-*\u2022][ \t]*)?(?:\*\*)?[ \t]*(?:(?:score|level)[ \t]+)?({_NUMBER})"
    rf"(?:[ \t]*(?:-|\u2013|\u2014|to)[ \t]*({_NUMBER}))?"
    r"[ \t]*(?:points?|pts?)?[ \t]*(?:\([^()\n]{0,40}\))?[ \t]*(?:\*\*)?[ \t]*:",
    re.MULTILINE | re.IGNORECASE)
# A sentence that says how to score: a scoring word and a number in the same sentence.
_SCORING_WORD_RE = re.compile(r"\b(?:scores?|scored|scoring|points?|award(?:s|ed)?|deduct(?:s|ed)?|"
                              r"subtract(?:s|ed)?|give|gives|assign(?:s|ed)?|rate|marks?)\b", re.IGNORECASE)
_DIGIT_RE = re.compile(r"\d")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?;])\s+|\n+")
_WORD_RE = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class SenseIssue:
    """One reason a proposed criterion cannot grade: `code`, the 1-based `item`, a `detail`."""

    code: str
    item: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"criterion #{self.item}: {self.detail}"


# -- markup -------------------------------------------------------------------------------------

# The protocol's end-of-reply marker on a line of its own, with or without its brackets: the
# sampler stops at `<EOE>` and `</EOE>`, but a model may write the bare word instead.
_END_MARKER_RE = re.compile(r"^[ \t]*(?:[-*\u2022][ \t]*)?(?:\*\*)?(?:<\s*/?\s*EOE\s*>|\[/?EOE\]|EOE)(?:\*\*)?[ \t.]*$",
                            re.MULTILINE)


def clean_markup(text: str) -> tuple[str, tuple[str, ...]]:
    """`text` with every rubric tag and end-marker line removed (stripped), and what was removed, in order.

    Each tag becomes a line break, and removal repeats until no tag is left, since removing one
    tag can join its neighbours into a new one (`<it<item>em>`). An end marker (`EOE`, `<EOE>`,
    `[EOE]`, also as a bullet or in bold) is removed only on a line of its own, where it cannot be
    part of the criterion.
    """
    removed: list[str] = []
    while True:
        found = [m.group(0) for m in _TAG_RE.finditer(text)]
        if not found:
            break
        removed.extend(found)
        text = _TAG_RE.sub("\n", text)
    removed.extend(m.group(0).strip() for m in _END_MARKER_RE.finditer(text))
    return _END_MARKER_RE.sub("", text).strip(), tuple(removed)


# -- levels and guidance ------------------------------------------------------------------------

def _number(text: str) -> float:
    return float(text.replace("\u2212", "-"))


def level_values(item: str) -> list[float]:
    """Every score named by the item's level lines (both ends of a `- 3-4:` range), in order."""
    values: list[float] = []
    for match in _LEVEL_RE.finditer(item):
        values.append(_number(match.group(1)))
        if match.group(2) is not None:
            values.append(_number(match.group(2)))
    return values


def level_descriptions(item: str) -> list[tuple[str, str]]:
    """(score as written, description) of each level line, descriptions lower-cased, words only."""
    out = []
    for match in _LEVEL_RE.finditer(item):
        end = item.find("\n", match.end())
        text = item[match.end(): len(item) if end < 0 else end]
        out.append((match.group(0).strip(" \t-*\u2022:"), " ".join(_WORD_RE.findall(text.lower()))))
    return out


def has_scoring_guidance(item: str) -> bool:
    """True if the item has a level line, or a sentence with a scoring word and a number.

    Header lines (`#`) are skipped: the scale `(0-5)` says what range exists, not how to score.
    """
    if _LEVEL_RE.search(item):
        return True
    body = "\n".join(line for line in item.splitlines() if not line.lstrip().startswith("#"))
    return any(_SCORING_WORD_RE.search(s) and _DIGIT_RE.search(s) for s in _SENTENCE_END_RE.split(body))


def out_of_scale_levels(item: str, scale: tuple[int, int]) -> list[float]:
    """Level values outside the item's stated `scale` (inclusive), in order of appearance."""
    lo, hi = scale
    return [v for v in level_values(item) if not lo <= v <= hi]


def cut_off_level(item: str) -> str | None:
    """The score of the item's last line when that line is a level with no description, else None.

    That is how a criterion looks when the token budget ran out right after a level's score
    (`- **Score 4**:` and nothing after it): the judge would read a scale whose top is undefined.
    """
    lines = [line for line in item.splitlines() if line.strip()]
    if not lines:
        return None
    last = _LEVEL_RE.match(lines[-1])
    if last is None or _WORD_RE.search(lines[-1][last.end():]):
        return None
    return last.group(0).strip(" \t-*\u2022:")


# -- copying ------------------------------------------------------------------------------------

def ngrams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    """The distinct lower-cased word n-grams of `text` (words are runs of letters and digits)."""
    words = _WORD_RE.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copied_fraction(item: str, source_ngrams: set[tuple[str, ...]], n: int = 4) -> float:
    """The fraction of the item's distinct word n-grams found in `source_ngrams` (0 if it has none)."""
    own = ngrams(item, n)
    return len(own & source_ngrams) / len(own) if own else 0.0


def source_ngrams(sources: Iterable[str], *, exclude: Iterable[str] = (), n: int = 4) -> set[tuple[str, ...]]:
    """The n-grams of the texts shown to the MRM, less those of `exclude` (the current rubric).

    Excluding the rubric in force keeps a criterion that the MRM carried over from counting as
    copied when a response quotes the rubric (a policy that games the judge may do just that).
    """
    shown: set[tuple[str, ...]] = set()
    for text in sources:
        shown |= ngrams(text, n)
    for text in exclude:
        shown -= ngrams(text, n)
    return shown


def repeated_lines(item: str, max_shared_fraction: float, n: int = 4) -> tuple[int, int, float] | None:
    """The first pair of body lines that restate each other (1-based among the lines compared).

    Level lines (`- 4: ...`) are not compared: parallel wording that differs in one word
    ("fails to meet most of the requirements" / "any of") is how good rubrics tell adjacent
    scores apart, and the published MPO rubrics are written that way. Other lines restate each
    other when more than `max_shared_fraction` of their word n-grams are shared (over the union
    of both): sub-criteria that differ only in their subject give the judge nothing to grade.
    """
    lines = [line for line in _body(item).splitlines() if line.strip() and not _LEVEL_RE.match(line)]
    grams = [ngrams(line, n) for line in lines]
    for second in range(len(grams)):
        for first in range(second):
            a, b = grams[first], grams[second]
            if a and b:
                shared = len(a & b) / len(a | b)
                if shared > max_shared_fraction:
                    return first + 1, second + 1, shared
    return None


# -- the check ----------------------------------------------------------------------------------

def check_criteria(items: Sequence[str], sources: Iterable[str], *, exclude: Iterable[str] = (),
                   max_copied_fraction: float = 0.5, n: int = 4) -> list[SenseIssue]:
    """Every reason the proposed `items` cannot grade; an empty list means they pass.

    - no scoring guidance: no level line (`- 4: ...`) and no sentence saying how to score;
    - a level value outside the scale in the item's header (items without a readable scale are
      the parser's concern and are not checked here);
    - more than `max_copied_fraction` of the item's word n-grams occur in `sources` (the task
      description, prompts and responses the MRM was shown), less the n-grams of `exclude`;
    - a duplicate: more than `max_copied_fraction` of the item's word n-grams (its header's name
      and scale left out) occur in one earlier item, so the rubric grades one thing twice;
    - a repeated level: two level lines of the item give different scores the same description,
      so the item cannot tell those scores apart;
    - repeated lines: more than `max_copied_fraction` of the word n-grams of two body lines
      that are not level lines are shared (checked when no level repeats);
    - cut off: the item ends with a level that has no description (`- **Score 4**:`), so its
      generation stopped at the token budget mid-criterion.
    """
    if not 0.0 < max_copied_fraction <= 1.0:
        raise InvalidValueError(f"max_copied_fraction must be in (0, 1], got {max_copied_fraction}")
    shown = source_ngrams(sources, exclude=exclude, n=n)
    issues: list[SenseIssue] = []
    for index, item in enumerate(items, start=1):
        if not has_scoring_guidance(item):
            issues.append(SenseIssue(NO_GUIDANCE, index, "no score levels (`- <score>: ...`) and no sentence "
                                                         "that says how to score"))
        try:
            scale = item_scale(item)
        except ScaleError:
            scale = None
        if scale is not None:
            outside = out_of_scale_levels(item, scale)
            if outside:
                issues.append(SenseIssue(LEVEL_OUT_OF_SCALE, index,
                                         f"level values {', '.join(f'{v:g}' for v in outside)} are outside the "
                                         f"stated scale ({scale[0]}-{scale[1]})"))
        fraction = copied_fraction(item, shown, n)
        if fraction > max_copied_fraction:
            issues.append(SenseIssue(COPIED, index, f"{fraction:.0%} of its word {n}-grams copy the prompts or "
                                                    f"responses shown (limit {max_copied_fraction:.0%})"))
        for earlier in range(1, index):
            shared = copied_fraction(_body(item), ngrams(_body(items[earlier - 1]), n), n)
            if shared > max_copied_fraction:
                issues.append(SenseIssue(DUPLICATE, index, f"{shared:.0%} of its word {n}-grams repeat criterion "
                                                           f"#{earlier} (limit {max_copied_fraction:.0%})"))
                break
        seen: dict[str, str] = {}
        for score, description in level_descriptions(item):
            if description and seen.get(description, score) != score:
                issues.append(SenseIssue(REPEATED_LEVEL, index, f"levels {seen[description]} and {score} have the "
                                                                f"same description"))
                break
            seen.setdefault(description, score)
        else:
            pair = repeated_lines(item, max_copied_fraction, n)
            if pair is not None:
                issues.append(SenseIssue(REPEATED_LINE, index, f"lines {pair[0]} and {pair[1]} restate each other: "
                                                               f"{pair[2]:.0%} of their word {n}-grams are shared "
                                                               f"(limit {max_copied_fraction:.0%})"))
        cut = cut_off_level(item)
        if cut is not None:
            issues.append(SenseIssue(CUT_OFF, index, f"it ends at level {cut!r} with no description, cut off "
                                                     f"mid-criterion (a larger item token budget lets it finish)"))
    return issues


def _body(item: str) -> str:
    """The item without its header lines (a shared name such as "Evidence" is not a repeat)."""
    return "\n".join(line for line in item.splitlines() if not line.lstrip().startswith("#"))
