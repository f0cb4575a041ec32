"""Which code produced a result: the package version and, in a git checkout, the commit.

A run that is stopped and resumed may finish on different code than it started with (a fix
landed in between). The trainer appends one `start_record` per start to the run dir's
`provenance.jsonl`; `code_ranges` turns those rows into "updates a-b ran at commit c", which
`eval compare` and the report print, so every figure can be traced to the code behind it.
"""

from __future__ import annotations

import datetime
import platform
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CodeRange", "code_ranges", "code_version", "format_code_ranges", "git_state", "start_record"]

_GIT_TIMEOUT_S = 10.0


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


def git_state(root: str | Path) -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes to tracked files) of the checkout holding `root`; (None, None) outside one."""
    root = Path(root)
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None:
        return None, None
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def code_version(root: str | Path | None = None) -> dict[str, Any]:
    """Versions of mpo-jax and its numerical stack, and the git commit when the package runs from a checkout."""
    import flax
    import jax
    import optax

    import mpo_jax

    package_root = Path(mpo_jax.__file__).resolve().parent.parent if root is None else Path(root)
    commit, dirty = git_state(package_root)
    return {"mpo_jax": mpo_jax.__version__, "git_commit": commit, "git_dirty": dirty, "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "python": platform.python_version()}


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
    """Updates `first`..`last` (inclusive) were run by this code."""

    first: int
    last: int
    commit: str | None
    dirty: bool | None
    version: str | None

    @property
    def label(self) -> str:
        if self.commit:
            return self.commit[:7] + (" (uncommitted changes)" if self.dirty else "")
        return f"mpo-jax {self.version}, no git commit" if self.version else "unknown code"


def code_ranges(rows: Sequence[Mapping[str, Any]], updates_done: int) -> list[CodeRange]:
    """Which start ran which updates. A start from update k ran k+1 onwards, until the next start
    redid everything after its own checkpoint; consecutive ranges on the same code are merged.
    Malformed rows are skipped."""
    starts = []
    for row in rows:
        code, start = row.get("code"), row.get("from_update")
        if isinstance(code, Mapping) and isinstance(start, int) and not isinstance(start, bool) and start >= 0:
            starts.append((start, code))
    ranges: list[CodeRange] = []
    for i, (start, code) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else updates_done
        end = min(end, updates_done)
        if end <= start:
            continue  # superseded before it finished an update that was kept
        commit, dirty, version = code.get("git_commit"), code.get("git_dirty"), code.get("mpo_jax")
        span = CodeRange(start + 1, end, commit if isinstance(commit, str) else None,
                         dirty if isinstance(dirty, bool) else None, version if isinstance(version, str) else None)
        # Keep only the part not redone later: a later start from an earlier update overrides it.
        ranges = [r for r in (_clip(r, start) for r in ranges) if r is not None]
        if ranges and (ranges[-1].commit, ranges[-1].dirty, ranges[-1].version) == (span.commit, span.dirty,
                                                                                      span.version):
            ranges[-1] = CodeRange(ranges[-1].first, span.last, span.commit, span.dirty, span.version)
        else:
            ranges.append(span)
    return ranges


def _clip(span: CodeRange, start: int) -> CodeRange | None:
    """The part of `span` that a start from update `start` does not redo."""
    if span.first > start:
        return None
    return CodeRange(span.first, min(span.last, start), span.commit, span.dirty, span.version)


def format_code_ranges(ranges: Sequence[CodeRange]) -> str:
    """'36c9d97 (1-38), 472ccb0 (39-40)'; '-' when nothing is known."""
    if not ranges:
        return "-"
    return ", ".join(f"{r.label} ({r.first}-{r.last})" if r.first != r.last else f"{r.label} ({r.first})"
                     for r in ranges)
