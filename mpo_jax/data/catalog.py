"""TFDS catalog datasets that hold a task's full corpus, mapped to the task's record fields.

Only summarization has one: `billsum` (18,949 US train bills, 3,269 US test, 1,237 California
test). Preparing it downloads the BillSum files, so it needs network access; where there is none
the error names the dataset and how to prepare it elsewhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import tensorflow_datasets as tfds

from mpo_jax.errors import InvalidValueError, MpoError
from mpo_jax.tasks import Task, get_task

__all__ = ["CATALOG", "CatalogDataset", "CatalogUnavailableError", "billsum_record", "catalog_data_source",
           "catalog_entry", "clean_bill_text"]

_ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


class CatalogUnavailableError(MpoError, RuntimeError):
    """A TFDS catalog dataset is neither prepared locally nor downloadable here."""


@dataclass(frozen=True)
class CatalogDataset:
    """A TFDS catalog dataset standing in for a task's JSONL: our split -> its split, example -> record."""

    name: str
    splits: Mapping[str, str]
    to_record: Callable[[Mapping[str, Any], str, int], dict[str, Any]] = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", MappingProxyType(dict(self.splits)))


def clean_bill_text(text: str) -> str:
    """BillSum text cleaned as in `summarization/*.jsonl`'s `clean_text` (see that folder's README).

    Quotes ``…'' become "…"; a line ending in a space joins the next; indentation goes; runs of
    spaces collapse; at most one blank line is kept; the ends are stripped.
    """
    text = text.replace("``", '"').replace("''", '"')
    joined: list[str] = []
    pending = ""
    for line in text.split("\n"):
        pending += line
        if not line.endswith(" "):
            joined.append(pending)
            pending = ""
    if pending:
        joined.append(pending)
    lines = [re.sub(r" {2,}", " ", line.lstrip()) for line in joined]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def billsum_record(example: Mapping[str, Any], split: str, index: int) -> dict[str, Any]:
    """A `billsum` example as a summarization record (the fields `summarization/*.jsonl` has)."""
    text, summary, title = (_text(example, key) for key in ("text", "summary", "title"))
    clean_text = clean_bill_text(text)
    return {
        "id": f"billsum-{split}-{index:05d}",
        "title": title,
        "text": text,
        "summary": summary,
        "clean_text": clean_text,
        "clean_summary": clean_bill_text(summary),
        "clean_text_words": len(clean_text.split()),
        "source_split": {"train": "us_train", "test": "us_test"}.get(split, split),
    }


CATALOG: Mapping[str, CatalogDataset] = MappingProxyType({
    "summarization": CatalogDataset("billsum", {"train": "train", "test": "test", "ca_test": "ca_test"},
                                    billsum_record),
})


def catalog_entry(task: str | Task) -> CatalogDataset:
    """The catalog dataset of `task`; ValueError names the tasks that have one."""
    name = (get_task(task) if isinstance(task, str) else task).name
    if name not in CATALOG:
        have = ", ".join(f"{key} ({entry.name})" for key, entry in CATALOG.items())
        raise InvalidValueError(f"no TFDS catalog dataset holds the {name} task's corpus (only {have}); "
                                f"use source='jsonl'")
    return CATALOG[name]


def catalog_data_source(entry: CatalogDataset, split: str, *, tfds_dir: str, download: bool) -> Any:
    """The ArrayRecord data source of `entry`'s split, preparing the dataset first if allowed."""
    if split not in entry.splits:
        raise InvalidValueError(f"{entry.name} has no split {split!r}; choose one of {', '.join(entry.splits)}")
    builder = tfds.builder(entry.name, data_dir=tfds_dir, file_format=_ARRAY_RECORD)
    how = (f"on a machine with internet access run `tfds build {entry.name} --file_format=array_record "
           f"--data_dir DIR`, copy DIR here and pass tfds_dir=DIR, or use source='jsonl'")
    if not builder.is_prepared():
        if not download:
            raise CatalogUnavailableError(
                f"TFDS dataset {entry.name!r} is not prepared in {builder.data_dir} and download=False; {how}")
        try:
            builder.download_and_prepare()
        except Exception as err:  # network, missing download extras, quota: all mean "not here"
            if isinstance(err, ModuleNotFoundError) and err.name:
                how = f"pip install {err.name} (needed by TFDS to download), then retry; or {how}"
            raise CatalogUnavailableError(
                f"could not download and prepare TFDS dataset {entry.name!r} into {tfds_dir} "
                f"({type(err).__name__}: {err}); {how}") from err
    if builder.info.file_format != _ARRAY_RECORD:
        raise CatalogUnavailableError(
            f"TFDS dataset {entry.name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
            f"which has no random access; rebuild it with `tfds build {entry.name} --file_format=array_record "
            f"--data_dir {os.fspath(tfds_dir)}`")
    return builder.as_data_source(entry.splits[split])


def _text(example: Mapping[str, Any], key: str) -> str:
    if key not in example:
        raise KeyError(f"catalog example has no field {key!r} (fields: {', '.join(sorted(example))})")
    value = example[key]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
