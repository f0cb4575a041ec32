"""Random-access record sources over prepared ArrayRecord datasets: `prepare_task_source`."""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from mpo_jax.data.builders import prepare_jsonl_builder, resolve_tfds_dir, stored_split_sha256
from mpo_jax.data.catalog import catalog_data_source, catalog_entry
from mpo_jax.errors import InvalidValueError
from mpo_jax.tasks import Task, get_task

__all__ = ["TaskSource", "prepare_task_source"]

SourceKind = Literal["jsonl", "tfds_catalog"]


class TaskSource:
    """A task split as a random-access sequence of record dicts, decoded from a TFDS data source.

    `fingerprint` identifies the content (the split file's sha256, or the catalog dataset, version
    and split), so a saved iterator state can be checked against the source it is restored on.
    """

    def __init__(self, data_source: Any, decode: Callable[[Mapping[str, Any], int], dict[str, Any]], *,
                 task: str, split: str, origin: str, fingerprint: str) -> None:
        self._data_source = data_source
        self._decode = decode
        self._size = len(data_source)
        self.task, self.split, self.origin, self.fingerprint = task, split, origin, fingerprint

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = operator.index(index)
        if position < 0:
            position += self._size
        if not 0 <= position < self._size:
            raise IndexError(f"record index {index} out of range for {self.task}/{self.split} "
                             f"({self._size} records)")
        return self._decode(self._data_source[position], position)

    def __repr__(self) -> str:
        return f"TaskSource(task={self.task!r}, split={self.split!r}, origin={self.origin!r}, size={self._size})"


def prepare_task_source(task: str | Task, split: str, *, data_dir: str | os.PathLike[str] | None = None,
                        tfds_dir: str | os.PathLike[str] | None = None, source: SourceKind = "jsonl",
                        download: bool = True) -> TaskSource:
    """Prepare (or reuse) the ArrayRecord dataset of `task`'s `split` and return it as a `TaskSource`.

    source="jsonl": our `{data_dir}/{task folder}/{split}.jsonl` (default data dir of
    `mpo_jax.tasks`), records returned exactly as in the file. source="tfds_catalog": TFDS's own
    dataset with the full corpus (summarization: `billsum`), mapped to our record fields; it is
    downloaded into `tfds_dir` when missing and `download` is true. `tfds_dir` defaults to TFDS's
    data dir (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    """
    task_obj = get_task(task) if isinstance(task, str) else task
    out_dir = resolve_tfds_dir(tfds_dir)
    if source == "jsonl":
        builder = prepare_jsonl_builder(task_obj, split, data_dir=data_dir, tfds_dir=out_dir)
        return TaskSource(builder.as_data_source(split), _decode_jsonl_example, task=task_obj.name, split=split,
                          origin=f"{builder.name}:{builder.data_dir}",
                          fingerprint=f"{builder.name}:{split}:sha256:{stored_split_sha256(builder, split)}")
    if source == "tfds_catalog":
        entry = catalog_entry(task_obj)
        data_source = catalog_data_source(entry, split, tfds_dir=out_dir, download=download)
        version = data_source.dataset_info.version
        return TaskSource(data_source, lambda example, i: entry.to_record(example, split, i), task=task_obj.name,
                          split=split, origin=f"tfds:{entry.name}/{version}",
                          fingerprint=f"tfds:{entry.name}/{version}:{entry.splits[split]}:{len(data_source)}")
    raise InvalidValueError(f"source must be 'jsonl' or 'tfds_catalog', got {source!r}")


def _decode_jsonl_example(example: Mapping[str, Any], position: int) -> dict[str, Any]:
    if int(example["index"]) != position:
        raise RuntimeError(f"prepared example {position} holds record {int(example['index'])}: the dataset files "
                           f"are out of order or damaged; delete the prepared dataset folder and prepare it again")
    text = example["json"]
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
