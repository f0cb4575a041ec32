"""Small file helpers shared by run-directory writers and JSONL readers.

Run-directory files are rewritten atomically (temp file in the same folder, fsync, rename) so
a run killed mid-write leaves the previous version, never a truncated one. JSONL inputs are read
with errors that name the file and line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mpo_jax.errors import FileFormatError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: str | os.PathLike[str], text: str, *, errors: str = "strict") -> None:
    """Write `text` to a temp file next to `path`, fsync it, then rename it over `path`.

    The file gets the permissions a plain `open(path, "w")` would (0666 less the umask), not the
    owner-only mode of the temporary file, so run-directory files stay readable as before.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8", errors=errors, newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def iter_jsonl_objects(path: str | os.PathLike[str]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, stripped line, object) for every non-blank line; a line that is not a JSON
    object is an error naming the file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise FileFormatError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise FileFormatError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, text, row


def read_jsonl_objects(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line (see `iter_jsonl_objects`)."""
    return [(number, row) for number, _, row in iter_jsonl_objects(path)]


def read_jsonl_lenient(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """(objects, number of skipped lines) of a JSONL file another process may still be writing.

    Lines that are not JSON objects (a torn last line, a stray value) are skipped and counted
    rather than raised, for readers that report on a run in progress; a missing file is empty.
    """
    path = Path(path)
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def truncate_jsonl_after(path: str | os.PathLike[str], last_update: int) -> None:
    """Keep only the lines of a per-update JSONL file whose `update` is <= `last_update`.

    A resumed run redoes the updates after its checkpoint, so what was written for them goes;
    unreadable lines go too. A missing file is left missing.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if line.strip() and int(json.loads(line)["update"]) <= last_update:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))
