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
    assert git_state(repo) == (first, False, None)
    (repo / "sub").mkdir()
    assert git_state(repo / "sub") == (first, False, None)  # from a subfolder
    assert git_state(repo / "sub", require_top=True) == (None, None, None)  # e.g. a package installed in a repo

    (repo / "untracked.txt").write_text("not part of the code\n")
    assert git_state(repo)[:2] == (first, False)
    (repo / "a.py").write_text("x = 2\n")
    commit, dirty, edit_2 = git_state(repo)
    assert (commit, dirty) == (first, True) and len(edit_2) == 64
    (repo / "a.py").write_text("x = 3\n")
    assert git_state(repo)[2] not in (None, edit_2)  # another edit, another fingerprint

    _git(repo, "commit", "-q", "-am", "second")
    second = head_from_git_files(repo)
    assert second != first and git_state(repo) == (second, False, None)


def test_outside_a_checkout_there_is_no_commit(tmp_path):
    assert git_state(tmp_path / "missing") == (None, None, None)
    if not any((p / ".git").exists() for p in (tmp_path, *tmp_path.parents)):
        assert git_state(tmp_path) == (None, None, None)


def test_code_version_names_this_package():
    version = code_version()
    assert version["mpo_jax"] == mpo_jax.__version__
    checkout = Path(mpo_jax.__file__).resolve().parent.parent
    expected = head_from_git_files(checkout) if shutil.which("git") else None
    assert version["git_commit"] == expected


def test_a_git_archive_names_its_commit_in_git_commit_txt(tmp_path, monkeypatch):
    from mpo_jax import provenance

    checkout_copy = (Path(mpo_jax.__file__).resolve().parent / "git_commit.txt").read_text().strip()
    assert checkout_copy == "$Format:%H$"  # expanded only by git archive (.gitattributes export-subst)
    attributes = (Path(mpo_jax.__file__).resolve().parent.parent / ".gitattributes").read_text()
    assert "mpo_jax/git_commit.txt export-subst" in attributes.splitlines()

    archive = tmp_path / "mpo_jax"
    archive.mkdir()
    monkeypatch.setattr(provenance, "_ARCHIVE_COMMIT_FILE", archive / "git_commit.txt")
    (archive / "git_commit.txt").write_text("0123456789abcdef0123456789abcdef01234567\n")
    assert code_version(tmp_path)["git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    (archive / "git_commit.txt").write_text("$Format:%H$\n")
    assert code_version(tmp_path)["git_commit"] is None


A, B, C = "a" * 40, "b" * 40, "c" * 40


def _start(update: int, commit: str | None, dirty: bool | None = False, version: str = "0.1.0",
           diff: str | None = None) -> dict:
    return {"started": "2026-11-30T00:00:00+00:00", "from_update": update, "num_updates": 40,
            "code": {"mpo_jax": version, "git_commit": commit, "git_dirty": dirty, "git_diff_sha256": diff}}


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
    # rows without a start are skipped
    ([{"from_update": "x", "code": {}}, {"code": {"git_commit": A}}, _start(0, A)], 3, [(1, 3, A)]),
    # a start whose code is unreadable ran its updates on unknown code
    ([_start(0, A), {"from_update": 20, "code": "junk"}, _start(30, A)], 40, [(1, 20, A), (21, 30, None),
                                                                             (31, 40, A)]),
    # begun before provenance was recorded: updates before the first row are on unknown code
    ([_start(40, B)], 60, [(1, 40, None), (41, 60, B)]),
    # the same commit with two different uncommitted edits is two ranges
    ([_start(0, A, True, diff="1" * 64), _start(5, A, True, diff="2" * 64)], 9, [(1, 5, A), (6, 9, A)]),
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
