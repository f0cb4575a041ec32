"""Code provenance: the git state read from a checkout (checked against the files in .git), and
which start of a run ran which updates (against ranges written out by hand)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from git_files import head_from_git_files

import mpo_jax
from mpo_jax.provenance import CodeRange, code_ranges, code_version, format_code_ranges, git_state

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                    *args], cwd=cwd, check=True, capture_output=True)


@needs_git
def test_git_state_follows_commits_and_edits_to_tracked_files(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "first")
    first = head_from_git_files(repo)
    assert first is not None and len(first) == 40
    assert git_state(repo) == (first, False)
    (repo / "sub").mkdir()
    assert git_state(repo / "sub") == (first, False)  # from a subfolder

    (repo / "untracked.txt").write_text("not part of the code\n")
    assert git_state(repo) == (first, False)
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(repo) == (first, True)

    _git(repo, "commit", "-q", "-am", "second")
    second = head_from_git_files(repo)
    assert second != first and git_state(repo) == (second, False)


def test_outside_a_checkout_there_is_no_commit(tmp_path):
    assert git_state(tmp_path / "missing") == (None, None)
    if head_from_git_files(tmp_path) is None and not any((p / ".git").exists() for p in tmp_path.parents):
        assert git_state(tmp_path) == (None, None)


def test_code_version_names_this_package():
    version = code_version()
    assert version["mpo_jax"] == mpo_jax.__version__
    checkout = Path(mpo_jax.__file__).resolve().parent.parent
    expected = head_from_git_files(checkout) if shutil.which("git") else None
    assert version["git_commit"] == expected


A, B, C = "a" * 40, "b" * 40, "c" * 40


def _start(update: int, commit: str | None, dirty: bool | None = False, version: str = "0.1.0") -> dict:
    return {"started": "2026-11-30T00:00:00+00:00", "from_update": update, "num_updates": 40,
            "code": {"mpo_jax": version, "git_commit": commit, "git_dirty": dirty}}


@pytest.mark.parametrize(("rows", "done", "expected"), [
    ([_start(0, A)], 40, [(1, 40, A)]),
    # resumed from checkpoint 38 on newer code
    ([_start(0, A), _start(38, B)], 40, [(1, 38, A), (39, 40, B)]),
    # resumed on the same code: one range
    ([_start(0, A), _start(20, A), _start(38, B)], 40, [(1, 38, A), (39, 40, B)]),
    # a start that died before its first checkpoint kept nothing
    ([_start(0, A), _start(38, B), _start(38, C)], 40, [(1, 38, A), (39, 40, C)]),
    # a corrupt checkpoint was set aside: the third start went back to update 10 and redid 11-20
    ([_start(0, A), _start(20, B), _start(10, C)], 30, [(1, 10, A), (11, 30, C)]),
    # still running: updates past the last one done are not claimed
    ([_start(0, A), _start(6, B)], 9, [(1, 6, A), (7, 9, B)]),
    # malformed rows are skipped
    ([{"from_update": "x", "code": {}}, {"code": {"git_commit": A}}, _start(0, A)], 3, [(1, 3, A)]),
    ([], 5, []),
])
def test_code_ranges(rows, done, expected):
    assert [(r.first, r.last, r.commit) for r in code_ranges(rows, done)] == expected


def test_code_range_labels():
    ranges = code_ranges([_start(0, A), _start(38, B, dirty=True)], 40)
    assert format_code_ranges(ranges) == "aaaaaaa (1-38), bbbbbbb (uncommitted changes) (39-40)"
    assert format_code_ranges(code_ranges([_start(0, None, None)], 1)) == "mpo-jax 0.1.0, no git commit (1)"
    assert format_code_ranges([]) == "-"
    assert CodeRange(1, 2, None, None, None).label == "unknown code"
