"""Reading a task's JSONL records from the shared data folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpo_jax.tasks.base import Task

_SPLIT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def default_data_dir() -> Path:
    """`<checkout>/../shared/data`: the project's data lives next to the repository checkout."""
    return (Path(__file__).parents[2] / ".." / "shared" / "data").resolve()


def load_records(task: str | Task, split: str, data_dir: str | os.PathLike[str] | None = None, *,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """The records of `{data_dir}/{task folder}/{split}.jsonl`, in file order (first `limit` if given)."""
    from mpo_jax.tasks import get_task  # late import: the registry imports the task modules

    task_obj = get_task(task) if isinstance(task, str) else task
    if not _SPLIT_RE.fullmatch(split):
        raise ValueError(f"split must be a plain name such as 'train' or 'test', got {split!r}")
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    path = root / task_obj.data_folder / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"no {task_obj.name} data at {path}; pass --data-dir DIR (the folder holding "
            f"{task_obj.data_folder}/{split}.jsonl), or data_dir=DIR in Python")
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records
