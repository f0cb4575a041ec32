"""The rubric value: parse, validate, render and diff; each item's score scale.

A rubric is an ordered tuple of free-text items. The judge scores each item in turn and sums
the scores, and the meta-reward model (MRM) rewrites the whole rubric every few PPO updates.
The MRM's output is untrusted text, so everything here treats it as data:

- `Rubric.parse` only ever raises `RubricError`, whatever the input; it never evaluates or
  renders the text as a template, so `{{ }}`, `{% %}` or `{name}` stay literal text.
- Tags are `<rubric>`, `</rubric>`, `<item>`, `</item>`; matching is case-insensitive and
  allows whitespace inside the angle brackets (`< /Item >`). If the text has rubric tags,
  exactly one `<rubric>…</rubric>` block must be present and only its content is read; if it
  has none, the whole text is read (the MRM sometimes omits the wrapper). Text between items
  (preambles, chatter) is dropped and never reaches the judge.
- Nested, unclosed or stray item tags, empty items, and rubrics over the size limits are
  rejected rather than repaired: a rejected rubric leaves the previous one in force
  (`mpo_jax.reward.rubric_history.RubricHistory`), which is safer than guessing what a malformed
  rubric meant.
- A `Rubric` value can never hold an item containing a tag, leading/trailing whitespace or a
  duplicate, so `Rubric.parse(r.render()).items == r.items` for every constructible `r`.

Size limits (`RubricLimits`) are policy and are checked by `validate`; the token budget of
the judge's context depends on its tokenizer and is the judge's check, not this module's.

Score scales: each item's first line (its header) ends with the item's score range in
parentheses, e.g. `### Evidence (0-10)` (`SCALE_FORM`, `item_scale`). Only the header is read:
a range elsewhere in the item ("uses 2-3 examples") never sets the scale. Tasks whose judge
needs the ranges set `RubricLimits(require_scale=True)`, so `validate` rejects a rubric without
them and names the item.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from mpo_jax.errors import InvalidValueError, MpoError

__all__ = [
    "DEFAULT_LIMITS", "MAX_SCALE", "SCALE_FORM", "Rubric", "RubricError", "RubricLimits", "ScaleError", "diff",
    "item_scale", "render_items", "rubric_scales", "validate",
]

# One tag: `<item>`, `</item>`, `<rubric>`, `</rubric>`, any case, optional inner whitespace.
# Written without adjacent optional whitespace runs, so a long run of spaces cannot make it
# backtrack quadratically.
_TAG_RE = re.compile(r"<\s*(?:(/)\s*)?(item|rubric)\s*>", re.IGNORECASE)
_EXCERPT_CHARS = 60


class RubricError(MpoError, ValueError):
    """A rubric (or the text it was parsed from) is malformed or over the limits."""


class ScaleError(RubricError):
    """An item's header does not state a readable score scale (see `SCALE_FORM`).

    `index` is the item's 1-based position when known (None from `item_scale`), `item` its text.
    """

    def __init__(self, message: str, *, index: int | None = None, item: str | None = None) -> None:
        super().__init__(message)
        self.index, self.item = index, item


@dataclass(frozen=True)
class RubricLimits:
    """Size limits that keep a rubric within the judge's context and the MRM's sanity."""

    max_items: int = 20
    max_item_chars: int = 4000
    max_total_chars: int = 40000  # sum of the item lengths
    # Every item's header must state its score scale (`item_scale`); set by tasks whose judge
    # reads per-item ranges. Histories saved before this field existed load with the default.
    require_scale: bool = False

    def __post_init__(self) -> None:
        for name in ("max_items", "max_item_chars", "max_total_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidValueError(f"RubricLimits.{name} must be a positive int, got {value!r}")
        if not isinstance(self.require_scale, bool):
            raise InvalidValueError(f"RubricLimits.require_scale must be a bool, got {self.require_scale!r}")


DEFAULT_LIMITS = RubricLimits()


def _excerpt(text: str) -> str:
    """A short repr of `text` for error messages (untrusted text is shown quoted, never run)."""
    return repr(text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "…")


def _check_item(index: int, item: Any) -> None:
    """The structural invariants every item of a `Rubric` value satisfies (1-based `index`)."""
    if not isinstance(item, str):
        raise RubricError(f"rubric item #{index} must be a str, got {type(item).__name__}")
    if not item.strip():
        raise RubricError(f"rubric item #{index} is empty")
    if item != item.strip():
        raise RubricError(f"rubric item #{index} has leading or trailing whitespace; strip it first")
    tag = _TAG_RE.search(item)
    if tag:
        raise RubricError(f"rubric item #{index} contains the tag {tag.group(0)!r}, which cannot be rendered "
                          f"unambiguously; remove it from the item text")
    try:
        item.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RubricError(f"rubric item #{index} is not valid Unicode text ({err.reason} at {err.start})") from None


def _check_optional_index(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise RubricError(f"Rubric.{name} must be None or an int >= 0, got {value!r}")


@dataclass(frozen=True)
class Rubric:
    """An ordered tuple of rubric items plus where this version came from.

    `iteration` is the version number (0 = initial), `parent` the iteration it was refined
    from, `created_step` the PPO update that produced it, `task` the task name.
    Construction checks the structural invariants (non-empty, stripped, unique, tag-free
    items); size limits are checked by `validate`.
    """

    items: tuple[str, ...]
    iteration: int = 0
    parent: int | None = None
    created_step: int | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        items = self.items
        if isinstance(items, str) or not isinstance(items, Iterable):
            raise RubricError(f"Rubric.items must be a sequence of str, got {type(items).__name__}")
        items = tuple(items)
        object.__setattr__(self, "items", items)
        if not items:
            raise RubricError("a rubric needs at least one item")
        seen: set[str] = set()
        for index, item in enumerate(items, start=1):
            _check_item(index, item)
            if item in seen:
                raise RubricError(f"rubric item #{index} duplicates an earlier item: {_excerpt(item)}")
            seen.add(item)
        if not isinstance(self.iteration, int) or isinstance(self.iteration, bool) or self.iteration < 0:
            raise RubricError(f"Rubric.iteration must be an int >= 0, got {self.iteration!r}")
        _check_optional_index("parent", self.parent)
        _check_optional_index("created_step", self.created_step)
        if self.task is not None and not isinstance(self.task, str):
            raise RubricError(f"Rubric.task must be None or a str, got {type(self.task).__name__}")

    # -- parsing and rendering ---------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, *, limits: RubricLimits = DEFAULT_LIMITS, iteration: int = 0,
              parent: int | None = None, created_step: int | None = None, task: str | None = None) -> Rubric:
        """Read a rubric from (untrusted) text; raises only `RubricError`.

        Items are stripped, exact duplicates are removed keeping the first occurrence (order
        matters: the judge scores items sequentially in one conversation), then the result is
        validated against `limits`.
        """
        if not isinstance(text, str):
            raise RubricError(f"rubric text must be a str, got {type(text).__name__}")
        raw_items = _extract_items(text)
        items: list[str] = []
        seen: set[str] = set()
        for index, raw in enumerate(raw_items, start=1):
            item = raw.strip()
            if not item:
                raise RubricError(f"item #{index} of the rubric text is empty")
            if item not in seen:
                seen.add(item)
                items.append(item)
        rubric = cls(tuple(items), iteration=iteration, parent=parent, created_step=created_step, task=task)
        validate(rubric, limits)
        return rubric

    def render(self) -> str:
        """The canonical text form, the one written to `rubric_iter_{t}.txt` and read by `parse`."""
        return render_items(self.items)

    def validated(self, limits: RubricLimits = DEFAULT_LIMITS) -> Rubric:
        """`self` after checking `limits` (for chaining); raises `RubricError`."""
        validate(self, limits)
        return self

    # -- sizes -------------------------------------------------------------------------------

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def item_chars(self) -> tuple[int, ...]:
        return tuple(len(item) for item in self.items)

    @property
    def total_chars(self) -> int:
        return sum(self.item_chars)

    def __iter__(self) -> Iterator[str]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def render_items(items: Iterable[str]) -> str:
    """`<rubric><item>…</item></rubric>` markup around item texts, as `Rubric.render` writes it.

    For item lists that are not (yet) a `Rubric`, e.g. an MRM's criteria before parsing and
    validation; it does not check the items.
    """
    body = "\n\n".join(f"<item>\n{item}\n</item>" for item in items)
    return f"<rubric>\n{body}\n</rubric>"


def _rubric_scope(text: str) -> tuple[int, int]:
    """The [start, end) span inside the single `<rubric>` block, or the whole text if untagged."""
    tags = [m for m in _TAG_RE.finditer(text) if m.group(2).lower() == "rubric"]
    if not tags:
        return 0, len(text)
    kinds = ["</rubric>" if m.group(1) else "<rubric>" for m in tags]
    if kinds != ["<rubric>", "</rubric>"]:
        opens, closes = kinds.count("<rubric>"), kinds.count("</rubric>")
        raise RubricError(f"expected exactly one <rubric>…</rubric> block, found {opens} opening and "
                          f"{closes} closing rubric tags in that order: {', '.join(kinds[:6])}"
                          + (", …" if len(kinds) > 6 else ""))
    return tags[0].end(), tags[1].start()


def _extract_items(text: str) -> list[str]:
    """The raw content of each `<item>…</item>` in the rubric scope; rejects bad nesting."""
    start, end = _rubric_scope(text)
    items: list[str] = []
    open_at: int | None = None
    for match in _TAG_RE.finditer(text, start, end):
        if match.group(2).lower() != "item":
            continue  # rubric tags can only be the scope's own here
        if match.group(1):  # closing tag
            if open_at is None:
                raise RubricError(f"{match.group(0)!r} at offset {match.start()} has no matching <item>")
            items.append(text[open_at:match.start()])
            open_at = None
        else:
            if open_at is not None:
                raise RubricError(f"nested {match.group(0)!r} at offset {match.start()}: item #{len(items) + 1} "
                                  f"is still open")
            open_at = match.end()
    if open_at is not None:
        raise RubricError(f"item #{len(items) + 1} (opened before offset {open_at}) is never closed with </item>")
    if not items:
        raise RubricError(f"no <item>…</item> blocks found in the rubric text ({len(text)} chars): {_excerpt(text)}")
    return items


def validate(rubric: Rubric, limits: RubricLimits = DEFAULT_LIMITS) -> None:
    """Check `rubric` against `limits` (sizes, and item scales when `limits.require_scale`).

    Raises `RubricError` (`ScaleError` for a missing scale) naming the first violation.
    """
    if not isinstance(rubric, Rubric):
        raise RubricError(f"expected a Rubric, got {type(rubric).__name__}")
    if rubric.num_items > limits.max_items:
        raise RubricError(f"rubric has {rubric.num_items} items; the limit is {limits.max_items}")
    for index, item in enumerate(rubric.items, start=1):
        if len(item) > limits.max_item_chars:
            raise RubricError(f"rubric item #{index} has {len(item)} chars; the limit is {limits.max_item_chars}: "
                              f"{_excerpt(item)}")
    if rubric.total_chars > limits.max_total_chars:
        raise RubricError(f"rubric items total {rubric.total_chars} chars; the limit is {limits.max_total_chars}")
    if limits.require_scale:
        rubric_scales(rubric)


# -- score scales ------------------------------------------------------------------------------

MAX_SCALE = 100
SCALE_FORM = ("Start every criterion with a one-line header that ends with the criterion's score range in "
              "parentheses, lowest and highest integer score from 0 to 100, for example `### Evidence (0-10)` "
              "or `### Evidence (0-10 points)`. The scale is read from that header only.")

# The inside of a header's last parentheses, stripped: "lo-hi" with a hyphen, en dash, em dash or
# "to" between the integers, optional spaces and an optional trailing "point(s)". ASCII digits
# only; no two adjacent optional whitespace runs, so matching stays linear in the header length.
_SCALE_RE = re.compile(r"([0-9]{1,9})\s*(?:-|\u2013|\u2014|to)\s*([0-9]{1,9})(?:\s*points?)?", re.IGNORECASE)
# Characters that may follow the closing parenthesis: markdown emphasis, a colon or full stop.
_HEADER_TAIL = " \t*_:."
# A parenthesised range anywhere, to point at a scale written in the wrong place.
_LOOSE_SCALE_RE = re.compile(r"\(\s*[0-9]+\s*(?:-|\u2013|\u2014|to)\s*[0-9]+(?:\s*points?)?\s*\)", re.IGNORECASE)

# A range ending a header without parentheses ("### Evidence 0-10"), dropped from the fix hint.
# Matches may start only where a run of digits starts, which keeps the search linear.
_BARE_SCALE_RE = re.compile(r"(?<![0-9])[0-9]+\s*(?:-|\u2013|\u2014|to)\s*[0-9]+(?:\s*points?)?\Z", re.IGNORECASE)


def _header(item: str) -> str:
    """An item's first line: the only place its scale is read from."""
    lines = item.strip().splitlines()
    return lines[0].strip() if lines else ""


def _trailing_group(header: str) -> tuple[str, str | None]:
    """(header before its final parenthesised group, that group's inside) or (header, None)."""
    tail = header.rstrip(_HEADER_TAIL)
    open_at = tail.rfind("(")
    if not tail.endswith(")") or open_at < 0:
        return tail, None
    return tail[:open_at].rstrip(), tail[open_at + 1:-1]


def _scale_fix(header: str) -> str:
    """How to fix a header, in its own words when it has some."""
    name, inner = _trailing_group(header)
    for _ in range(3):  # drop trailing groups, "(0-10) (weight 2)" -> "" (a few: each slice copies)
        if inner is None:
            break
        name, inner = _trailing_group(name)
    if name.rfind("(") > name.rfind(")"):  # and an unclosed one: "Evidence (0-10" -> "Evidence"
        name = name[:name.rfind("(")].rstrip()
    bare = _BARE_SCALE_RE.search(name)  # and a range without parentheses
    name = (name[:bare.start()].rstrip() if bare else name) or "### Evidence"
    name = name if len(name) <= 40 else name[:40] + "…"
    return f"state the scale at the end of the first line, e.g. {name + ' (0-10)'!r}"


def _scale_problem(item: str) -> tuple[tuple[int, int] | None, str]:
    """(scale, "") when the header states one, else (None, what is wrong with it)."""
    header = _header(item)
    _, inner = _trailing_group(header)
    if inner is None:
        elsewhere = _LOOSE_SCALE_RE.search(item)
        if elsewhere:
            return None, (f"its first line does not end with a score scale; {elsewhere.group(0)!r} appears "
                          f"elsewhere in the item, but only the first line's scale is read")
        return None, "its first line does not end with a score scale in parentheses"
    match = _SCALE_RE.fullmatch(inner.strip())
    if match is None:
        return None, f"its first line ends with {_excerpt(f'({inner})')}, which is not a scale of the form (lo-hi)"
    lo, hi = int(match.group(1)), int(match.group(2))
    if not 0 <= lo < hi <= MAX_SCALE:
        return None, f"its scale ({lo}-{hi}) must have 0 <= lowest < highest <= {MAX_SCALE}"
    return (lo, hi), ""


def _scale_error(item: str, index: int | None, problem: str) -> ScaleError:
    where = "rubric item" if index is None else f"rubric item #{index}"
    return ScaleError(f"{where} {_excerpt(item)}: {problem}; {_scale_fix(_header(item))}. {SCALE_FORM}",
                      index=index, item=item)


def item_scale(item: str) -> tuple[int, int]:
    """The (lo, hi) score scale stated at the end of the item's first line; raises `ScaleError`.

    Nothing but the header is read, so ranges in an item's body ("2-3 examples", "- 30:") never
    set or change the scale.
    """
    if not isinstance(item, str):
        raise ScaleError(f"a rubric item must be a str, got {type(item).__name__}")
    scale, problem = _scale_problem(item)
    if scale is None:
        raise _scale_error(item, None, problem)
    return scale


def rubric_scales(rubric: Rubric) -> tuple[tuple[int, int], ...]:
    """Every item's (lo, hi) scale, in order; `ScaleError` names the first item without one."""
    scales = []
    for index, item in enumerate(rubric.items, start=1):
        scale, problem = _scale_problem(item)
        if scale is None:
            raise _scale_error(item, index, problem)
        scales.append(scale)
    return tuple(scales)


def _describe(rubric: Rubric) -> str:
    parts = [f"iteration {rubric.iteration}"]
    if rubric.parent is not None:
        parts.append(f"parent {rubric.parent}")
    if rubric.created_step is not None:
        parts.append(f"step {rubric.created_step}")
    return f"rubric_iter_{rubric.iteration} ({', '.join(parts)}; {rubric.num_items} items)"


def diff(old: Rubric, new: Rubric, *, context: int = 3) -> str:
    """A unified diff of the rendered rubrics, with a header naming both iterations."""
    lines = list(difflib.unified_diff(old.render().splitlines(), new.render().splitlines(),
                                      fromfile=_describe(old), tofile=_describe(new), n=context, lineterm=""))
    if not lines:
        return f"--- {_describe(old)}\n+++ {_describe(new)}\n(no changes)"
    return "\n".join(lines)

