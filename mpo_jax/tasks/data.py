"""Reading a task's JSONL records from the data folder that ships with the project."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpo_jax.errors import InvalidValueError, MissingFileError
from mpo_jax.fileio import iter_jsonl_objects

if TYPE_CHECKING:
    from mpo_jax.tasks.base import Task

_SPLIT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def default_data_dir() -> Path:
    """`<checkout>/data`: the task files (JSONL per task and split, with licence notes) ship with the project."""
    return (Path(__file__).parents[2] / "data").resolve()


def load_records(task: str | Task, split: str, data_dir: str | os.PathLike[str] | None = None, *,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """The records of `{data_dir}/{task folder}/{split}.jsonl`, in file order (first `limit` if given)."""
    from mpo_jax.tasks import get_task  # late import: the registry imports the task modules

    task_obj = get_task(task) if isinstance(task, str) else task
    if not _SPLIT_RE.fullmatch(split):
        raise InvalidValueError(f"split must be a plain name such as 'train' or 'test', got {split!r}")
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    path = root / task_obj.data_folder / f"{split}.jsonl"
    if not path.is_file():
        raise MissingFileError(
            f"no {task_obj.name} data at {path}; pass --data-dir DIR (the folder holding "
            f"{task_obj.data_folder}/{split}.jsonl), or data_dir=DIR in Python")
    records: list[dict[str, Any]] = []
    for _, _, record in iter_jsonl_objects(path):
        if limit is not None and len(records) >= limit:
            break
        records.append(record)
    return records
