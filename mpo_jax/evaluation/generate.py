"""Test-split generation from a model or from a trainer run's checkpoint (reference §G.1).

`model_or_run` is one of
- a `LanguageModel` already in memory;
- a preset name, a `.gguf` file, a Hugging Face checkpoint folder, or "tiny-random";
- a trainer run directory (its `config.json`), its `checkpoints/` folder, or one checkpoint
  `checkpoints/<update>`. `train/run_dir.py` rebuilds the policy as the trainer builds it (same
  base model, LoRA and value-head settings, same train-state layout) and restores the
  checkpoint's trainable parameters into it (from the config's `checkpoint.directory` when set;
  without an update, the newest checkpoint that restores), so the sampler runs the trained policy.

Every row of the output JSONL is `{index, id, task, prompt, record, response, finished,
response_tokens, model}`: `index` is the record's position in the split file, `prompt` the
policy's user message, `record` the dataset record the metrics and the pairwise judge read.
Decoding is greedy by default (the paper samples at temperature 0.01, which is nearly greedy).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpo_jax.engine.language_model import LanguageModel
from mpo_jax.engine.sampling import SamplingParams
from mpo_jax.errors import FileFormatError, InvalidValueError, MissingFileError
from mpo_jax.fileio import read_jsonl_objects
from mpo_jax.train.run_dir import RestoredPolicy, device_mesh, find_run
from mpo_jax.train.run_dir import restore_policy as load_policy_from_run

_LOG = logging.getLogger(__name__)
TINY = "tiny-random"


def check_model_name(name: str, what: str = "model") -> None:
    """Fail early, naming the accepted forms, when `name` is no preset, path or tiny-random."""
    if name == TINY:
        return
    from mpo_jax.engine import presets

    try:
        presets.resolve(name)
    except (FileNotFoundError, ValueError) as err:
        hint = f"; a trainer run directory or {TINY!r} also works" if what == "model" else f" ({what})"
        raise MissingFileError(f"{err}{hint}") from None


def load_generation_model(model_or_run: LanguageModel | str | os.PathLike[str], *, dtype: str = "float32",
                          update: int | None = None, mesh: Sequence[int] | None = None
                          ) -> tuple[LanguageModel, str, str | None]:
    """(model, label, the run's task or None) for any accepted `model_or_run`."""
    if isinstance(model_or_run, LanguageModel):
        return model_or_run, "model", None
    if not isinstance(model_or_run, (str, os.PathLike)):
        raise TypeError(f"model_or_run must be a LanguageModel, a model name/path or a run directory, got "
                        f"{type(model_or_run).__name__}")
    run = find_run(model_or_run, update)
    if run is not None:
        restored = load_policy_from_run(run.run_dir, update=run.update, mesh=mesh)
        label = f"{run.run_dir.name}@{restored.update}"
        return restored.model, label, restored.config.task
    if update is not None:
        raise InvalidValueError(f"update={update} applies to trainer run directories only; {model_or_run} is not one")
    from mpo_jax.train.config import ModelSpec
    from mpo_jax.train.model_specs import build_model

    name = os.fspath(model_or_run)
    check_model_name(name)
    return build_model(ModelSpec(name=name, dtype=dtype, remat=False), device_mesh(mesh)), name, None


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def _write_jsonl(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def generate_split(model_or_run: LanguageModel | str | os.PathLike[str], task: str | None, split: str = "test", *,
                   max_new_tokens: int = 400, temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
                   limit: int | None = None, out_path: str | os.PathLike[str] | None = None,
                   data_dir: str | os.PathLike[str] | None = None, seed: int = 0, update: int | None = None,
                   dtype: str = "float32", mesh: Sequence[int] | None = None,
                   records: Sequence[Mapping[str, Any]] | None = None, label: str | None = None
                   ) -> list[dict[str, Any]]:
    """One response per record of `split` (first `limit`), batched through the sampler.

    `task` None takes the run's task. `records` replaces the split file. Rows are returned and,
    with `out_path`, written as JSONL (atomically, once every batch is done).
    """
    from mpo_jax.tasks import get_task, load_records

    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InvalidValueError(f"limit must be a positive integer (or None for the whole split), got {limit!r}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    model, default_label, run_task = load_generation_model(model_or_run, dtype=dtype, update=update, mesh=mesh)
    if task is None:
        if run_task is None:
            raise InvalidValueError("task is required unless model_or_run is a trainer run directory")
        task = run_task
    elif run_task is not None and get_task(task).name != get_task(run_task).name:
        _LOG.warning("the run was trained on %s but is generating for %s", run_task, task)
    task_obj = get_task(task)
    if records is None:
        records = load_records(task_obj, split, data_dir, limit=limit)
    else:
        records = list(records)[:limit]
    if not records:
        raise InvalidValueError(f"no {task_obj.name} records to generate for (split {split!r})")
    label = label or default_label
    rows: list[dict[str, Any]] = []
    for number, chunk in enumerate(_batches(records, batch_size)):
        messages = [task_obj.policy_prompt(record) for record in chunk]
        prompt_ids = [model.encode_prompt(m) for m in messages]
        batch_params = params if temperature == 0 else SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed * 1_000_003 + number)
        out = model.sampler.generate(prompt_ids, batch_params)
        for offset, (record, message) in enumerate(zip(chunk, messages)):
            index = len(rows)
            rows.append({"index": index, "id": record.get("id"), "task": task_obj.name,
                         "prompt": message[-1]["content"], "record": dict(record), "response": out.texts[offset],
                         "finished": bool(out.finished[offset]), "response_tokens": int(out.mask[offset].sum()),
                         "model": label})
        _LOG.info("generated %d/%d responses", len(rows), len(records))
    if out_path is not None:
        _write_jsonl(rows, Path(out_path))
    return rows


# -- reading generation files ------------------------------------------------------------------

def read_generations(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a generation JSONL, each checked for a string `response` and a `record` object."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"no generation file {path}; write one with `mpo-jax eval generate`")
    rows = []
    for number, row in read_jsonl_objects(path):
        if not isinstance(row.get("response"), str):
            raise FileFormatError(f"{path}:{number}: each line must be an object with a string \"response\"")
        if not isinstance(row.get("record"), dict):
            raise FileFormatError(f"{path}:{number}: the row needs the task \"record\" (an object), as "
                                  "`mpo-jax eval generate` writes it")
        rows.append(row)
    if not rows:
        raise FileFormatError(f"{path} holds no generation rows")
    return rows


def row_key(row: Mapping[str, Any]) -> str:
    """What pairs two models' rows on the same prompt: the record id, else the split index."""
    record_id = row["record"].get("id", row.get("id"))
    if isinstance(record_id, (str, int)) and not isinstance(record_id, bool):
        return f"id:{record_id}"
    if isinstance(row.get("index"), int):
        return f"index:{row['index']}"
    raise FileFormatError("a generation row has neither a record id nor an integer index to pair it by")


def dedupe_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int]:
    """Rows with repeated prompts removed (the first kept), and how many were dropped."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = row_key(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


__all__ = ["RestoredPolicy", "check_model_name", "dedupe_rows", "device_mesh", "generate_split",
           "load_generation_model", "load_policy_from_run", "read_generations", "row_key"]
