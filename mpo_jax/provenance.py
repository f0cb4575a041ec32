"""Which code produced a result: the package version and, in a git checkout, the commit.

A run that is stopped and resumed may finish on different code than it started with (a fix
landed in between). The trainer appends one `start_record` per start to the run dir's
`provenance.jsonl`; `code_ranges` turns those rows into "updates a-b ran at commit c", which
`eval compare` and the report print, so every figure can be traced to the code behind it.

The commit is read with git only when the package runs from the checkout's own tree (an
editable install or PYTHONPATH); an installed copy inside some other repository is not that
repository's HEAD. A `git archive` of the checkout (how `tpu_scripts/tpu.py --archive` ships it)
carries the commit in `mpo_jax/git_commit.txt` (`export-subst` in .gitattributes).
"""

from __future__ import annotations

import datetime
import hashlib
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CodeRange", "code_ranges", "code_version", "format_code_ranges", "git_state", "start_record"]

_GIT_TIMEOUT_S = 10.0
_ARCHIVE_COMMIT_FILE = Path(__file__).resolve().parent / "git_commit.txt"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _git(root: Path, *args: str) -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run([git, "-C", str(root), *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: str | Path, *, require_top: bool = False) -> tuple[str | None, bool | None, str | None]:
    """(commit, has uncommitted changes to tracked files, SHA-256 of `git diff HEAD` when it has) of
    the checkout holding `root`; all None outside one, or, with `require_top`, when `root` is not
    the checkout's top folder."""
    root = Path(root)
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or (require_top and Path(top).resolve() != root.resolve()):
        return None, None, None
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None else bool(status)
    diff = _git(root, "diff", "HEAD") if dirty else None
    return commit, dirty, (hashlib.sha256(diff.encode("utf-8")).hexdigest() if diff is not None else None)


def _archive_commit() -> str | None:
    """The commit `git archive` wrote into git_commit.txt; None in a checkout (the placeholder is unexpanded)."""
    try:
        text = _ARCHIVE_COMMIT_FILE.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text if _COMMIT.match(text) else None


def code_version(root: str | Path | None = None) -> dict[str, Any]:
    """Versions of mpo-jax and its numerical stack, and the git commit when the package runs from a checkout."""
    import flax
    import jax
    import optax

    import mpo_jax

    package_root = Path(mpo_jax.__file__).resolve().parent.parent if root is None else Path(root)
    commit, dirty, diff_sha = git_state(package_root, require_top=True)
    if commit is None:
        commit = _archive_commit()
    return {"mpo_jax": mpo_jax.__version__, "git_commit": commit, "git_dirty": dirty, "git_diff_sha256": diff_sha,
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "python": platform.python_version()}


def start_record(from_update: int, num_updates: int, *, code: Mapping[str, Any] | None = None,
                 devices: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One provenance row: when a run (re)started, from which update, on which code and devices."""
    row: dict[str, Any] = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                           "from_update": int(from_update), "num_updates": int(num_updates),
                           "code": dict(code_version() if code is None else code)}
    if devices is not None:
        row["devices"] = dict(devices)
    return row


@dataclass(frozen=True)
class CodeRange:
    """Updates `first`..`last` (inclusive) were run by this code (all None: not recorded)."""

    first: int
    last: int
    commit: str | None
    dirty: bool | None
    version: str | None
    diff_sha256: str | None = None  # of the uncommitted changes, so two different edits are two ranges

    @property
    def label(self) -> str:
        if self.commit:
            return self.commit[:7] + (" (uncommitted changes)" if self.dirty else "")
        return f"mpo-jax {self.version}, no git commit" if self.version else "unknown code"

    def same_code(self, other: CodeRange) -> bool:
        return (self.commit, self.dirty, self.version, self.diff_sha256) == (
            other.commit, other.dirty, other.version, other.diff_sha256)


def _span(first: int, last: int, code: Any) -> CodeRange:
    code = code if isinstance(code, Mapping) else {}
    commit, dirty, version, diff = (code.get(k) for k in ("git_commit", "git_dirty", "mpo_jax", "git_diff_sha256"))
    return CodeRange(first, last, commit if isinstance(commit, str) else None,
                     dirty if isinstance(dirty, bool) else None, version if isinstance(version, str) else None,
                     diff if isinstance(diff, str) else None)


def code_ranges(rows: Sequence[Mapping[str, Any]], updates_done: int) -> list[CodeRange]:
    """Which start ran which updates, for the first `updates_done` updates.

    A start from update k runs k+1 onwards, and every update after k that an earlier start ran is
    redone (the files of those updates are discarded on resume). Consecutive ranges on the same
    code are merged. A row whose code is unreadable, and the updates before the first row (a run
    begun before provenance was recorded), give "unknown code" ranges; rows without a valid
    `from_update` are skipped. No rows at all: an empty list."""
    starts = [(row["from_update"], row.get("code")) for row in rows
              if isinstance(row.get("from_update"), int) and not isinstance(row.get("from_update"), bool)
              and row["from_update"] >= 0]
    if not starts:
        return []
    if starts[0][0] > 0:
        starts.insert(0, (0, None))
    ranges: list[CodeRange] = []
    for i, (start, code) in enumerate(starts):
        ranges = [CodeRange(r.first, min(r.last, start), r.commit, r.dirty, r.version, r.diff_sha256)
                  for r in ranges if r.first <= start]  # what this start redoes is no longer the earlier code's
        end = min(starts[i + 1][0] if i + 1 < len(starts) else updates_done, updates_done)
        if end <= start:
            continue  # superseded before it finished an update that was kept
        span = _span(start + 1, end, code)
        if ranges and ranges[-1].same_code(span) and ranges[-1].last == start:
            ranges[-1] = CodeRange(ranges[-1].first, span.last, span.commit, span.dirty, span.version,
                                   span.diff_sha256)
        else:
            ranges.append(span)
    return ranges


def format_code_ranges(ranges: Sequence[CodeRange]) -> str:
    """'36c9d97 (1-38), 472ccb0 (39-40)'; '-' when nothing is known."""
    if not ranges:
        return "-"
    return ", ".join(f"{r.label} ({r.first}-{r.last})" if r.first != r.last else f"{r.label} ({r.first})"
                     for r in ranges)
