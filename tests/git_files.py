"""A checkout's HEAD commit read from the files in .git, without git: the independent check of
`mpo_jax.provenance.git_state`."""

from __future__ import annotations

from pathlib import Path


def head_from_git_files(checkout: Path) -> str | None:
    """HEAD's commit read from .git's files (loose ref, packed-refs, worktree gitdir), without git."""
    dot_git = checkout / ".git"
    if dot_git.is_file():  # a worktree: "gitdir: <path>"
        git_dir = (checkout / dot_git.read_text().split(":", 1)[1].strip()).resolve()  # absolute or relative
        common = git_dir / "commondir"
        common_dir = (git_dir / common.read_text().strip()).resolve() if common.is_file() else git_dir
    elif dot_git.is_dir():
        git_dir = common_dir = dot_git
    else:
        return None
    head = (git_dir / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        return head
    ref = head.removeprefix("ref: ")
    for base in (git_dir, common_dir):
        if (base / ref).is_file():
            return (base / ref).read_text().strip()
    packed = common_dir / "packed-refs"
    for line in packed.read_text().splitlines() if packed.is_file() else []:
        parts = line.split()
        if len(parts) == 2 and parts[1] == ref:
            return parts[0]
    return None
