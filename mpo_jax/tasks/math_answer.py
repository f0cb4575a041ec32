"""MATH answer extraction and equivalence, following the Hendrycks MATH conventions.

`strip_string` / `is_equiv` reproduce the normalisation of the MATH repository's
`math_equivalence.py` (Hendrycks et al., 2021) step by step, so that accuracies are comparable
with the paper's: drop newlines, `\\!`, `\\left`, `\\right`, degree marks, `\\$`, a trailing
`\\text{ unit}` and `\\%`; tfrac/dfrac -> frac; a leading 0 before '.'; drop a short `x =`
prefix; `\\sqrt3` -> `\\sqrt{3}`; drop spaces; `\\frac12` -> `\\frac{1}{2}`; `0.5` ->
`\\frac{1}{2}`; `a/b` -> `\\frac{a}{b}` for integers.

Where the original raised an exception (two `\\text{ ` units, a bare `\\sqrt` or `\\frac` at
the end), its `is_equiv` fell back to exact string equality; we do the same, explicitly.
Note the conventions' own quirks, kept on purpose: `\\text{ cm}` (with a space) is removed as
a unit, `\\text{cm}` (no space) is not.
"""

from __future__ import annotations

__all__ = [
    "first_boxed_content", "first_boxed_only_string", "is_equiv", "last_boxed_content", "last_boxed_only_string",
    "remove_boxed", "strip_string",
]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


class _Unnormalisable(Exception):
    """Raised where the reference implementation raised; `is_equiv` then compares raw strings."""


def _brace_span(text: str, start: int) -> int | None:
    """Index of the brace closing the first `{` at or after `start`, or None if unbalanced."""
    depth = 0
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
            if depth < 0:
                return None
    return None


def _boxed_only_string(text: str, index: int) -> str | None:
    if index < 0:
        return None
    end = _brace_span(text, index)
    return None if end is None else text[index:end + 1]


def last_boxed_only_string(text: str) -> str | None:
    """The last `\\boxed{…}` (or `\\fbox{…}`) with balanced braces, wrapper included."""
    index = text.rfind("\\boxed")
    if index < 0:
        index = text.rfind("\\fbox")
    return _boxed_only_string(text, index)


def first_boxed_only_string(text: str) -> str | None:
    """The first `\\boxed{…}` (or `\\fbox{…}` if there is no `\\boxed`), wrapper included."""
    index = text.find("\\boxed")
    if index < 0:
        index = text.find("\\fbox")
    return _boxed_only_string(text, index)


def remove_boxed(boxed: str | None) -> str | None:
    """`\\boxed{x}` -> `x` (also `\\fbox{x}`); None if `boxed` is not of that form."""
    if boxed is None:
        return None
    for command in _BOX_COMMANDS:
        left = command + "{"
        if boxed.startswith(left) and boxed.endswith("}"):
            return boxed[len(left):-1]
    return None


def first_boxed_content(text: str) -> str | None:
    """The content of the first brace-matched `\\boxed{…}` in `text` (MPO's answer rule), or None.

    Unlike `first_boxed_only_string`, this looks for the opening brace itself, so a stray
    `\\boxed` without braces earlier in the text does not hide a later `\\boxed{answer}`.
    """
    for command in _BOX_COMMANDS:
        index = text.find(command + "{")
        if index >= 0:
            return remove_boxed(_boxed_only_string(text, index))
    return None


def last_boxed_content(text: str) -> str | None:
    """The content of the last brace-matched box (the data README's `answer` rule), or None."""
    return remove_boxed(last_boxed_only_string(text))


def _fix_fracs(string: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`; braced fracs are left alone."""
    parts = string.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if not part:
            raise _Unnormalisable("\\frac at the end")
        if part[0] == "{":
            out += part
            continue
        if len(part) < 2:
            return string
        numerator, second, rest = part[0], part[1], part[2:]
        if second != "{":
            out += "{" + numerator + "}{" + second + "}" + rest
        else:
            out += "{" + numerator + "}" + second + rest
    return out


def _fix_a_slash_b(string: str) -> str:
    """`3/4` -> `\\frac{3}{4}` when both sides are plain integers."""
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        numerator, denominator = int(parts[0]), int(parts[1])
    except ValueError:
        return string
    if string != f"{numerator}/{denominator}":
        return string
    return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


def _remove_right_units(string: str) -> str:
    """Drop a trailing `\\text{ unit}`; in MATH `\\text{ ` (with a space) only ever marks units."""
    if "\\text{ " not in string:
        return string
    parts = string.split("\\text{ ")
    if len(parts) != 2:
        raise _Unnormalisable("more than one \\text{ unit}")
    return parts[0]


def _fix_sqrt(string: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`."""
    if "\\sqrt" not in string:
        return string
    parts = string.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        if not part:
            raise _Unnormalisable("\\sqrt at the end")
        out += "\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:]
    return out


def strip_string(string: str) -> str:
    """Hendrycks MATH normalisation of an answer string (may raise `_Unnormalisable`)."""
    string = string.replace("\n", "")
    string = string.replace("\\!", "")
    string = string.replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    sides = string.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5", "k=3": drop a short variable prefix
        string = sides[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def is_equiv(first: str | None, second: str | None) -> bool:
    """True when two answers are equal after `strip_string` (exact equality if it cannot apply)."""
    if first is None or second is None:
        return first is None and second is None
    try:
        return strip_string(first) == strip_string(second)
    except _Unnormalisable:
        return first == second
