"""Training data: TFDS ArrayRecord datasets of the task records and a resumable prompt iterator.

`prepare_task_source(task, split)` builds (or reuses) the task's ArrayRecord dataset from its
JSONL files, or TFDS's own catalog dataset, and returns a random-access `TaskSource`.
`PromptIterator(source, encode, batch_size=..., max_prompt_tokens=..., seed=...)` yields
`PromptBatch`es that are the same on every run, split across processes, and resumable from
`get_state()`.
"""

from mpo_jax.data.builders import (
    BUILDERS,
    JsonlTaskBuilder,
    prepare_jsonl_builder,
    source_fingerprint,
    split_files,
)
from mpo_jax.data.catalog import CATALOG, CatalogDataset, CatalogUnavailableError, billsum_record, clean_bill_text
from mpo_jax.data.iterator import PromptBatch, PromptIterator, RecordSource, epoch_order
from mpo_jax.data.sources import TaskSource, prepare_task_source

__all__ = [
    "BUILDERS", "CATALOG", "CatalogDataset", "CatalogUnavailableError", "JsonlTaskBuilder", "PromptBatch",
    "PromptIterator", "RecordSource", "TaskSource", "billsum_record", "clean_bill_text",
    "epoch_order", "prepare_jsonl_builder", "prepare_task_source", "source_fingerprint", "split_files",
]
