"""Sense checks on the meta-reward model's proposed criteria, before they become the rubric.

A small MRM often writes criteria that parse and fit the limits but cannot grade anything: the
writing prompt or the student's response copied into a criterion, a criterion with no score
levels or no word on how to score, or level lines whose points fall outside the criterion's own
scale. A rubric like that scores noise, so the meta step keeps the previous rubric instead and
logs the `SenseIssue`s found here.

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
    "COPIED", "LEVEL_OUT_OF_SCALE", "NO_GUIDANCE", "SenseIssue", "check_criteria", "clean_markup",
    "copied_fraction", "has_scoring_guidance", "level_values", "ngrams", "out_of_scale_levels",
]

NO_GUIDANCE = "no_guidance"
LEVEL_OUT_OF_SCALE = "level_out_of_scale"
COPIED = "copied"

_NUMBER = r"[-\u2212]?\d+(?:\.\d+)?"
# A level line: an optional bullet, a score or a score range, optionally "points" and a short
# label in parentheses, then a colon: `- 4: ...`, `* 3-4 points: ...`, `- **5**: ...`,
# `- 2 (fair): ...`, `5: ...`.
_LEVEL_RE = re.compile(
    rf"^[ \t]*(?:[-*\u2022][ \t]*)?(?:\*\*)?[ \t]*({_NUMBER})"
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

def clean_markup(text: str) -> tuple[str, tuple[str, ...]]:
    """`text` with every rubric tag removed (stripped), and the tags removed, in order.

    Each tag becomes a line break, and removal repeats until no tag is left, since removing one
    tag can join its neighbours into a new one (`<it<item>em>`).
    """
    removed: list[str] = []
    while True:
        found = [m.group(0) for m in _TAG_RE.finditer(text)]
        if not found:
            return text.strip(), tuple(removed)
        removed.extend(found)
        text = _TAG_RE.sub("\n", text)


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


# -- the check ----------------------------------------------------------------------------------

def check_criteria(items: Sequence[str], sources: Iterable[str], *, exclude: Iterable[str] = (),
                   max_copied_fraction: float = 0.5, n: int = 4) -> list[SenseIssue]:
    """Every reason the proposed `items` cannot grade; an empty list means they pass.

    - no scoring guidance: no level line (`- 4: ...`) and no sentence saying how to score;
    - a level value outside the scale in the item's header (items without a readable scale are
      the parser's concern and are not checked here);
    - more than `max_copied_fraction` of the item's word n-grams occur in `sources` (the task
      description, prompts and responses the MRM was shown), less the n-grams of `exclude`.
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
    return issues
