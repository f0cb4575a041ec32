"""Sense checks on the meta-reward model's proposed criteria, before they become the rubric.

Two kinds of finding (`SenseIssue.quality` tells them apart):

- scorability: the judge cannot score with the criterion at all. No line describes a property
  of the response ("scoring guidance", defined positively below); a line says nothing beyond the
  criterion's own name, its numbers and score words (`- Evidence (1-10 points)`); a level or a
  labelled line has no description (`- **Score 4**:`, `- **Conclusion (0-5`, cut off by the token
  budget); a level or a range in the body lies outside the header's scale or runs backwards
  (`(11-10 points)`); at least half of the levels share a description, so the scale cannot be read.
  These always refuse the proposal.
- quality: the criterion can be scored but looks poor: it copies the prompts or responses shown,
  repeats an earlier criterion, gives two scores one description, or has lines that restate each
  other. These heuristics once refused a rubric that measurably helped the judge, so when a judge
  is at hand the canary gate (`reward/canary.py`) decides and they are only warnings; without one
  they still refuse.

Scoring guidance: a level description, a labelled line's description, or a sentence of the body
that holds a describing word: a word that is not an English function word, not a number, not
score vocabulary (score, points, level, award, ...), not a generic name for the graded text
(response, essay, student, ...) and not a word of the criterion's own header. A free sentence
(not a level or labelled line) must also read as English prose: at least one function word.

Everything here is a pure function of the text: the criteria are data, read with regexes and
word lists, never evaluated or rendered as templates. The scale itself is read by
`rubric.item_scale` (the header's `(lo-hi)`); a missing scale is the parser's `ScaleError`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

from mpo_jax.errors import InvalidValueError
from mpo_jax.reward.hacks import FUNCTION_WORDS
from mpo_jax.reward.hacks import words as _words
from mpo_jax.rubric import _TAG_RE, ScaleError, item_scale

__all__ = [
    "COPIED", "CUT_OFF", "DUPLICATE", "EMPTY_LEVEL", "HOLLOW_LINE", "INDISTINCT_LEVELS", "LEVEL_OUT_OF_SCALE",
    "NO_GUIDANCE", "QUALITY_CODES", "REPEATED_LEVEL", "REPEATED_LINE", "SCORABILITY_CODES", "SenseIssue",
    "check_criteria", "clean_markup", "copied_fraction", "cut_off_level", "describing_words", "has_scoring_guidance",
    "level_descriptions", "level_values", "ngrams", "out_of_scale_levels", "repeated_lines", "split_issues",
]

# scorability: always refused
NO_GUIDANCE = "no_guidance"
HOLLOW_LINE = "hollow_line"
EMPTY_LEVEL = "empty_level"
CUT_OFF = "cut_off"
LEVEL_OUT_OF_SCALE = "level_out_of_scale"
INDISTINCT_LEVELS = "indistinct_levels"
# quality: warnings when the canary gate decides, refusals without it
COPIED = "copied"
DUPLICATE = "duplicate"
REPEATED_LEVEL = "repeated_level"
REPEATED_LINE = "repeated_line"
SCORABILITY_CODES = (NO_GUIDANCE, HOLLOW_LINE, EMPTY_LEVEL, CUT_OFF, LEVEL_OUT_OF_SCALE, INDISTINCT_LEVELS)
QUALITY_CODES = (COPIED, DUPLICATE, REPEATED_LEVEL, REPEATED_LINE)

_NUMBER = r"[-\u2212]?\d+(?:\.\d+)?"
# A level line: an optional bullet, an optional "Score" or "Level", a score or a score range,
# optionally "points" and a short label in parentheses, then a colon: `- 4: ...`,
# `* 3-4 points: ...`, `- **5**: ...`, `- 2 (fair): ...`, `5: ...`, `- **Score 4**: ...`.
_LEVEL_RE = re.compile(
    rf"^[ \t]*(?:[-*\u2022][ \t]*)?(?:\*\*)?[ \t]*(?:(?:score|level)[ \t]+)?({_NUMBER})"
    rf"(?:[ \t]*(?:-|\u2013|\u2014|to)[ \t]*({_NUMBER}))?"
    r"[ \t]*(?:points?|pts?)?[ \t]*(?:\([^()\n]{0,40}\))?[ \t]*(?:\*\*)?[ \t]*:",
    re.MULTILINE | re.IGNORECASE)
_BULLET_RE = re.compile(r"^[ \t]*(?:[-*+\u2022]|\d{1,2}[.)])(?=[ \t]|$)[ \t]*")
# A score range in parentheses anywhere in the body: `(0-5)`, `(11-10 points)`, `(1 to 6)`.
_RANGE_RE = re.compile(r"\(\s*(\d+)\s*(?:-|\u2013|\u2014|to)\s*(\d+)\s*(?:points?|pts?)?\s*\)", re.IGNORECASE)
_DIGIT_RE = re.compile(r"\d")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?;])\s+")
_WORD_RE = re.compile(r"\w+")
# Words that say how many points, not what earns them.
_SCORE_VOCABULARY = frozenset("""
score scores scored scoring point points pts pt level levels mark marks grade grades rating ratings rate rated
award awards awarded give gives given assign assigns assigned deduct deducts deducted subtract subtracts total
maximum minimum max min worst best integer number range scale out
""".split())
# Generic names of what is graded: "The response." describes nothing.
_SUBJECT_WORDS = frozenset("""
response responses essay essays answer answers writing text student students criterion criteria rubric item items
submission work
""".split())
# A labelled line: `Label: description`, the label at most this many words.
_MAX_LABEL_WORDS = 6


@dataclasses.dataclass(frozen=True)
class SenseIssue:
    """One reason a proposed criterion cannot grade: `code`, the 1-based `item`, a `detail`."""

    code: str
    item: int
    detail: str

    @property
    def quality(self) -> bool:
        """True for a quality heuristic (a warning where the canary gate decides), False for scorability."""
        return self.code in QUALITY_CODES

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "kind": "quality" if self.quality else "scorability"}

    def __str__(self) -> str:
        return f"criterion #{self.item}: {self.detail}"


def split_issues(issues: Sequence[SenseIssue], *, gate: bool) -> tuple[list[SenseIssue], list[SenseIssue]]:
    """(refusing, warnings): with a gate only scorability refuses and quality issues are warnings."""
    if not gate:
        return list(issues), []
    return [i for i in issues if not i.quality], [i for i in issues if i.quality]


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


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One body line (with its continuation lines): what kind it is, its label and its description."""

    kind: str  # "level" (`- 4: ...`), "label" (`- **Label**: ...`, `- Label: ...`) or "line"
    label: str
    description: str
    bullet: bool
    line: int  # 1-based among the body's non-empty lines


def _name_words(item: str) -> set[str]:
    """The words of the item's first line (its header): its own name says nothing new."""
    first = item.strip().splitlines()[0] if item.strip() else ""
    return set(_words(first))


def describing_words(text: str, name_words: Iterable[str] = ()) -> list[str]:
    """The words of `text` that describe something: not function words, numbers, score vocabulary,
    generic names of the graded text (response, essay, ...) or `name_words`."""
    skip = set(name_words)
    return [w for w in _words(text) if not w.isdigit() and w not in FUNCTION_WORDS and w not in _SCORE_VOCABULARY
            and w not in _SUBJECT_WORDS and w not in skip and any(c.isalpha() for c in w)]


def _split_label(rest: str) -> tuple[str, str, bool]:
    """(label, description, labelled) of a bullet's text: `**Label**: d`, `**Label:** d`, `Label: d`."""
    if rest.startswith("**"):
        close = rest.find("**", 2)
        if close < 0:  # `- **Conclusion (0-5`: the label never closed, so nothing describes it
            return rest[2:].strip(), "", True
        label, after = rest[2:close], rest[close + 2:]
        return label.strip(" :"), after.lstrip(" \t:").strip(), True
    head, colon, after = rest.partition(":")
    if colon and len(head.split()) <= _MAX_LABEL_WORDS and not re.search(r"[.!?]", head):
        return head.strip(), after.strip(), True
    return "", rest.strip(), False


def _entries(item: str) -> list[_Entry]:
    """The body's lines as entries; a plain line right after a level or label with an empty
    description continues it (`- 5:` with the description on the next line)."""
    entries: list[_Entry] = []
    lines = [line for line in _body(item).splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        level = _LEVEL_RE.match(line)
        bullet = _BULLET_RE.match(line)
        if level:
            entries.append(_Entry("level", level.group(0).strip(" \t-*\u2022:"), line[level.end():].strip(), True,
                                  number))
        elif bullet:
            label, description, labelled = _split_label(line[bullet.end():].strip())
            entries.append(_Entry("label" if labelled or not description else "line", label, description, True,
                                  number))
        elif entries and entries[-1].kind != "line" and not entries[-1].description.strip():
            last = entries[-1]
            entries[-1] = dataclasses.replace(last, description=line.strip())
        else:
            entries.append(_Entry("line", "", line.strip(), False, number))
    return entries


def _describes(entry: _Entry, name_words: set[str]) -> bool:
    """Whether the entry holds scoring guidance (see the module docstring)."""
    if entry.kind != "line":
        return bool(describing_words(entry.description, name_words))
    for sentence in _SENTENCE_END_RE.split(entry.description):
        found = _words(sentence)
        if describing_words(sentence, name_words) and any(w in FUNCTION_WORDS for w in found):
            return True
    return False


def has_scoring_guidance(item: str) -> bool:
    """True if some level, labelled line or sentence of the body describes a property of the response.

    The header is skipped: the scale `(0-5)` and the criterion's name say what range exists and
    what it is called, not what earns a score.
    """
    names = _name_words(item)
    return any(_describes(entry, names) for entry in _entries(item))


def out_of_scale_levels(item: str, scale: tuple[int, int]) -> list[float]:
    """Level values outside the item's stated `scale` (inclusive), in order of appearance."""
    lo, hi = scale
    return [v for v in level_values(item) if not lo <= v <= hi]


def _bad_ranges(item: str, scale: tuple[int, int]) -> list[str]:
    """Score ranges in the body (levels `- 3-4:` and parenthesised `(0-5 points)`) that run
    backwards or leave the scale, as written."""
    lo, hi = scale
    bad = []
    rest = item.strip().partition("\n")[2]  # every line after the header, nested headers included
    for match in _LEVEL_RE.finditer(rest):
        if match.group(2) is not None and _number(match.group(1)) > _number(match.group(2)):
            bad.append(f"{match.group(1)}-{match.group(2)}")
    for match in _RANGE_RE.finditer(rest):
        a, b = int(match.group(1)), int(match.group(2))
        if a > b or not (lo <= a <= hi and lo <= b <= hi):
            bad.append(f"{a}-{b}")
    return bad


def cut_off_level(item: str) -> str | None:
    """The label of the item's last line when that line is a level or a label with no
    description, else None.

    That is how a criterion looks when the token budget ran out right after a level's score
    (`- **Score 4**:`), inside a label (`- **Conclusion (0-5`) or after a bare bullet (`-`):
    the judge would read a scale whose last step is undefined.
    """
    entries = _entries(item)
    if not entries:
        return None
    last = entries[-1]
    if last.kind == "line" and not (last.bullet and not describing_words(last.description, _name_words(item))):
        return None
    if describing_words(last.description, _name_words(item)):
        return None
    return last.label or "-"


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
    """Every finding on the proposed `items`, scorability and quality (`SenseIssue.quality`); [] passes.

    Scorability (the judge cannot score with it):
    - no scoring guidance: nothing in the body describes a property of the response;
    - a hollow line: a line whose words are only the criterion's name, numbers and score words;
    - an empty level: a level or labelled line with no description; at the end: cut off;
    - a level value, or a range in the body, outside the header's scale or running backwards
      (items without a readable scale are the parser's concern and are not checked here);
    - indistinct levels: at least half of the levels share a description with another level.

    Quality (a warning when the canary gate decides):
    - more than `max_copied_fraction` of the item's word n-grams occur in `sources` (the task
      description, prompts and responses the MRM was shown), less the n-grams of `exclude`;
    - a duplicate: more than `max_copied_fraction` of the item's word n-grams (its header left
      out) occur in one earlier item;
    - a repeated level: two level lines give different scores the same description;
    - repeated lines: more than `max_copied_fraction` of the word n-grams of two body lines
      that are not level lines are shared (checked when no level repeats).
    """
    if not 0.0 < max_copied_fraction <= 1.0:
        raise InvalidValueError(f"max_copied_fraction must be in (0, 1], got {max_copied_fraction}")
    shown = source_ngrams(sources, exclude=exclude, n=n)
    issues: list[SenseIssue] = []
    for index, item in enumerate(items, start=1):
        issues += _scorability(index, item)
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
    return issues


def _scorability(index: int, item: str) -> list[SenseIssue]:
    """The scorability findings of one item (see `check_criteria`)."""
    issues: list[SenseIssue] = []
    names = _name_words(item)
    entries = _entries(item)
    if not any(_describes(entry, names) for entry in entries):
        issues.append(SenseIssue(NO_GUIDANCE, index, "no line describes what earns a score: a level or sentence "
                                                     "must name a property of the response beyond the criterion's "
                                                     "name, its numbers and score words"))
    cut = cut_off_level(item)
    body = entries[:-1] if cut is not None else entries
    hollow = [e for e in body if e.kind == "line" and (e.bullet or _DIGIT_RE.search(e.description))
              and not describing_words(e.description, names)]
    empty = [e for e in body if e.kind != "line" and not describing_words(e.description, names)]
    if hollow:
        issues.append(SenseIssue(HOLLOW_LINE, index, f"{len(hollow)} line(s) say nothing beyond the criterion's "
                                                     f"name and numbers, e.g. line {hollow[0].line}: "
                                                     f"{hollow[0].description[:60]!r}"))
    if empty:
        issues.append(SenseIssue(EMPTY_LEVEL, index, f"{len(empty)} level(s) or labelled line(s) have no "
                                                     f"description, e.g. {empty[0].label or '-'!r}"))
    try:
        scale = item_scale(item)
    except ScaleError:
        scale = None
    if scale is not None:
        outside = out_of_scale_levels(item, scale)
        ranges = _bad_ranges(item, scale)
        if outside or ranges:
            named = [f"level values {', '.join(f'{v:g}' for v in outside)}"] if outside else []
            named += [f"ranges {', '.join(ranges)}"] if ranges else []
            issues.append(SenseIssue(LEVEL_OUT_OF_SCALE, index, f"{' and '.join(named)} are outside the stated "
                                                                f"scale ({scale[0]}-{scale[1]}) or run backwards"))
    described = [d for _, d in level_descriptions(item) if d and describing_words(d, names)]
    distinct = len(set(described))
    if len(described) >= 2 and 2 * distinct <= len(described):
        issues.append(SenseIssue(INDISTINCT_LEVELS, index, f"its {len(described)} levels have only {distinct} "
                                                           f"different description(s): the scale cannot be read"))
    if cut is not None:
        issues.append(SenseIssue(CUT_OFF, index, f"it ends at {cut!r} with no description, cut off mid-criterion "
                                                 f"(a larger item token budget lets it finish)"))
    return issues


def _body(item: str) -> str:
    """The item without its header lines (a shared name such as "Evidence" is not a repeat)."""
    return "\n".join(line for line in item.splitlines() if not line.lstrip().startswith("#"))
