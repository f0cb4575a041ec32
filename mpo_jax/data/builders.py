"""TFDS builders that turn a task's JSONL splits into ArrayRecord files (no TensorFlow needed).

One builder per task (`mpo_essay`, `mpo_summarization`, `mpo_ethics`, `mpo_math`). Each example
holds the record's JSON line verbatim (`json`) and its position among the file's records
(`index`), so `json.loads(example["json"])` equals the JSONL record whatever the task's fields.
Shuffling is disabled: example `i` of a split is record `i` of `{split}.jsonl`.

The builder's description carries a fingerprint of the source files. `prepare_jsonl_builder`
reuses a prepared dataset whose fingerprint matches and rebuilds it when a source file changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import constants as tfds_constants

from mpo_jax.errors import FileFormatError, InvalidValueError, MissingFileError
from mpo_jax.fileio import iter_jsonl_objects
from mpo_jax.tasks import Task, default_data_dir, get_task

__all__ = [
    "BUILDERS", "JsonlTaskBuilder", "MpoEssay", "MpoEthics", "MpoMath", "MpoSummarization",
    "prepare_jsonl_builder", "resolve_tfds_dir", "source_fingerprint", "split_files", "stored_fingerprint",
    "stored_split_sha256",
]

log = logging.getLogger(__name__)

# tfds split names are identifiers; other `*.jsonl` files in a task folder are not splits.
_SPLIT_FILE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_FINGERPRINT_RE = re.compile(r"^source_fingerprint: (sha256:[0-9a-f]{64})$", re.MULTILINE)
_SPLIT_SHA_RE = re.compile(r"^split (\w+) sha256: ([0-9a-f]{64})$", re.MULTILINE)
_ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """Dataset info of a locally built dataset: TFDS's GCS bucket holds nothing to start from."""

    def initialize_from_bucket(self) -> None:  # the base makes a temporary folder on every call
        return None


class JsonlTaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the per-task builders: `{jsonl_dir}/{task folder}/{split}.jsonl` -> one split each.

    `jsonl_dir` is only needed to generate; reading a prepared dataset (for example through
    `tfds.data_source("mpo_essay", ...)`) works without it.
    """

    TASK_NAME = ""
    # tfds 4.9's own lookup of the defining file imports `importlib_resources`, which it declares
    # only for Python < 3.9; naming the file here avoids that import (no checksums file is needed).
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Each record's JSON line verbatim plus its index; file order kept."}

    def __init__(self, *, jsonl_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        self._jsonl_dir = None if jsonl_dir is None else Path(jsonl_dir).expanduser()
        self._split_files = {} if self._jsonl_dir is None else split_files(self.TASK_NAME, self._jsonl_dir)
        self._split_sha256 = {split: _file_sha256(path) for split, path in self._split_files.items()}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        task = get_task(self.TASK_NAME)
        lines = [f"MPO {task.name} records from {task.data_folder}/{{split}}.jsonl, one JSON line per example."]
        if self._split_sha256:
            lines.append(f"source_fingerprint: {self.jsonl_fingerprint}")
            lines += [f"split {split} sha256: {sha}" for split, sha in self._split_sha256.items()]
        return _LocalDatasetInfo(
            builder=self,
            description="\n".join(lines),
            features=tfds.features.FeaturesDict({"index": np.int64, "json": tfds.features.Text()}),
            disable_shuffling=True,
        )

    @property
    def jsonl_fingerprint(self) -> str | None:
        """The fingerprint of the source files this builder generates from (None without `jsonl_dir`)."""
        return _fingerprint(get_task(self.TASK_NAME), self._split_sha256) if self._split_sha256 else None

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        if not self._split_files:
            raise InvalidValueError(f"{self.name} needs jsonl_dir=DIR (the folder holding "
                                    f"{get_task(self.TASK_NAME).data_folder}/{{split}}.jsonl) to generate its splits")
        return {split: self._generate_examples(path) for split, path in self._split_files.items()}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        for index, line in enumerate(_json_object_lines(path)):
            yield index, {"index": index, "json": line}


class MpoEssay(JsonlTaskBuilder):
    """Essay-writing prompts (`essay_writing/{split}.jsonl`)."""

    name = "mpo_essay"
    TASK_NAME = "essay"


class MpoSummarization(JsonlTaskBuilder):
    """US bills with reference summaries (`summarization/{split}.jsonl`)."""

    name = "mpo_summarization"
    TASK_NAME = "summarization"


class MpoEthics(JsonlTaskBuilder):
    """AITA-style anecdotes with RIGHT/WRONG labels (`ethical_reasoning/{split}.jsonl`)."""

    name = "mpo_ethics"
    TASK_NAME = "ethics"


class MpoMath(JsonlTaskBuilder):
    """MATH problems with boxed answers (`math/{split}.jsonl`)."""

    name = "mpo_math"
    TASK_NAME = "math"


BUILDERS: Mapping[str, type[JsonlTaskBuilder]] = MappingProxyType({
    cls.TASK_NAME: cls for cls in (MpoEssay, MpoSummarization, MpoEthics, MpoMath)
})


def resolve_tfds_dir(tfds_dir: str | os.PathLike[str] | None) -> str:
    """`tfds_dir`, or TFDS's default (`$TFDS_DATA_DIR`, else `~/tensorflow_datasets`)."""
    return os.fspath(tfds_constants.get_default_data_dir() if tfds_dir is None else tfds_dir)


def split_files(task: str | Task, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """`{split: path}` for every `{split}.jsonl` in the task's folder under `data_dir`, sorted by split."""
    task_obj = _task(task)
    folder = _data_root(data_dir) / task_obj.data_folder
    if not folder.is_dir():
        raise MissingFileError(f"no {task_obj.name} data folder at {folder}; pass data_dir=DIR, the folder "
                               f"holding {task_obj.data_folder}/train.jsonl (default {default_data_dir()})")
    found = {path.stem: path for path in sorted(folder.glob("*.jsonl"))
             if path.is_file() and _SPLIT_FILE_RE.fullmatch(path.stem)}
    if not found:
        raise MissingFileError(f"no {task_obj.name} splits in {folder}: expected files such as train.jsonl")
    return found


def source_fingerprint(task: str | Task, files: Mapping[str, str | os.PathLike[str]]) -> str:
    """`sha256:…` over the builder version, the task and each split's name and file bytes."""
    return _fingerprint(_task(task), {split: _file_sha256(Path(path)) for split, path in files.items()})


def stored_fingerprint(builder: tfds.core.DatasetBuilder) -> str | None:
    """The fingerprint recorded when `builder`'s dataset was prepared; None if absent or unprepared."""
    match = _FINGERPRINT_RE.search(_stored_description(builder))
    return match.group(1) if match else None


def stored_split_sha256(builder: tfds.core.DatasetBuilder, split: str) -> str | None:
    """The sha256 of the `{split}.jsonl` a prepared split was built from; None if not recorded."""
    found = dict(_SPLIT_SHA_RE.findall(_stored_description(builder)))
    return found.get(split)


def _stored_description(builder: tfds.core.DatasetBuilder) -> str:
    """The description in the prepared `dataset_info.json` (the in-memory one is the code's)."""
    info_path = Path(builder.data_dir) / "dataset_info.json"
    if not info_path.is_file():
        return ""
    return json.loads(info_path.read_text(encoding="utf-8")).get("description", "")


def prepare_jsonl_builder(task: str | Task, split: str, *, data_dir: str | os.PathLike[str] | None = None,
                          tfds_dir: str | os.PathLike[str] | None = None) -> JsonlTaskBuilder:
    """A prepared ArrayRecord builder for `task` whose source files match `data_dir`'s.

    A dataset prepared from identical files is reused; one prepared from other files (or not as
    ArrayRecord) is deleted and rebuilt. `split` is checked to exist before anything is built.
    """
    task_obj = _task(task)
    root = _data_root(data_dir)
    files = split_files(task_obj, root)
    if split not in files:
        raise MissingFileError(
            f"no {task_obj.name} split {split!r}: {root / task_obj.data_folder / f'{split}.jsonl'} does not exist "
            f"(found {', '.join(files)}); pass one of those splits or a data_dir that holds {split}.jsonl")
    out_dir = resolve_tfds_dir(tfds_dir)
    cls = BUILDERS[task_obj.name]
    with _build_lock(out_dir, cls.name):
        builder = cls(jsonl_dir=root, data_dir=out_dir, file_format=_ARRAY_RECORD)
        stale = builder.is_prepared() and (stored_fingerprint(builder) != builder.jsonl_fingerprint
                                           or builder.info.file_format != _ARRAY_RECORD)
        if stale:
            log.info("%s at %s was prepared from other source files; rebuilding", cls.name, builder.data_dir)
        mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if stale
                else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return builder


def _task(task: str | Task) -> Task:
    return get_task(task) if isinstance(task, str) else task


def _fingerprint(task: Task, split_sha256: Mapping[str, str]) -> str:
    digest = hashlib.sha256(f"{BUILDERS[task.name].VERSION}\0{task.name}".encode())
    for split in sorted(split_sha256):
        digest.update(f"\0{split}\0{split_sha256[split]}".encode())
    return f"sha256:{digest.hexdigest()}"


def _data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_object_lines(path: Path) -> Iterator[str]:
    """The non-blank lines of a JSONL file, each checked to be a JSON object (blank lines skipped)."""
    count = 0
    for _, text, _ in iter_jsonl_objects(path):
        count += 1
        yield text
    if count == 0:
        raise FileFormatError(f"{path} holds no records; remove the empty file or fill it")


@contextlib.contextmanager
def _build_lock(tfds_dir: str, name: str) -> Iterator[None]:
    """An exclusive file lock per dataset, so processes sharing a local `tfds_dir` build it once."""
    if "://" in tfds_dir:  # remote file systems have no flock; prepare on one process first there
        yield
        return
    import fcntl

    os.makedirs(tfds_dir, exist_ok=True)
    with open(os.path.join(tfds_dir, f".{name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
