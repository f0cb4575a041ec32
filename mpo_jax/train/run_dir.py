"""A training run's directory: its layout, finding a run from a path, and restoring its policy.

    RUN_DIR/
      config.json                  the run's TrainConfig, written when the run starts
      provenance.jsonl             one row per start or resume: from which update, on which code
                                   (version, git commit) and devices (`mpo_jax/provenance.py`)
      metrics.jsonl, tensorboard/  per-update metrics (`train/metrics.py`)
      rollouts.jsonl               example rollouts of every update
      eval_samples.jsonl           held-out evaluation samples (`train/evaluator.py`)
      rubric_iter_{t}.txt, rubric_rejected_{attempt}.txt, rubric_history.json
                                   the rubric's versions and rejected proposals (`reward/rubric_history.py`)
      meta_evaluation_{update}.json  one trace per meta step
      checkpoints/<update>/        orbax checkpoints, unless the config's `checkpoint.directory`
                                   (a local path or gs://) puts them elsewhere
      report/                      report.md, report.html and plots (`train/report.py`)

The trainer, export, evaluation and the report find these files through this module. A run can
be named by its directory, its `checkpoints/` folder or one checkpoint `checkpoints/<update>`;
its checkpoints are read from wherever `config.json` says they were written, so a run that
checkpoints to GCS is exported and evaluated like any other. Restoring "the latest" checkpoint
means the newest one that restores: a corrupt one is skipped with a warning.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpo_jax.errors import FileFormatError, InvalidValueError, MissingFileError, MpoError
from mpo_jax.fileio import atomic_write_text, read_jsonl_lenient, truncate_jsonl_after
from mpo_jax.provenance import start_record
from mpo_jax.reward.rubric_history import HISTORY_FILE
from mpo_jax.train.evaluator import EVAL_SAMPLES_FILE
from mpo_jax.train.evaluator import truncate_rows as truncate_eval_rows
from mpo_jax.train.metrics import METRICS_FILE
from mpo_jax.train.model_specs import checkpoint_directory

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from mpo_jax.engine.language_model import LanguageModel
    from mpo_jax.train.checkpoint import Checkpointer
    from mpo_jax.train.config import TrainConfig

__all__ = [
    "CHECKPOINTS_DIR", "CONFIG_FILE", "EVAL_SAMPLES_FILE", "HISTORY_FILE", "METRICS_FILE", "META_EVALUATION_RE",
    "PROVENANCE_FILE", "REPORT_DIR", "ROLLOUTS_FILE", "RUBRIC_FILE_RE", "RestoredPolicy", "RunDirError", "RunLocation",
    "checkpoint_directory", "device_mesh", "discard_after", "find_run", "is_run_dir", "load_run_config",
    "locate_run", "open_checkpointer", "read_provenance", "record_start", "restore_checkpoint", "restore_policy",
    "write_config",
]

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
CHECKPOINTS_DIR = "checkpoints"
REPORT_DIR = "report"
META_EVALUATION_RE = re.compile(r"^meta_evaluation_(\d+)\.json$")
RUBRIC_FILE_RE = re.compile(r"^rubric_iter_(\d+)\.txt$")
_FORMS = ("a run directory written by `mpo-jax train` (it holds config.json), its checkpoints/ folder, "
          "or one checkpoint RUN_DIR/checkpoints/<update>")
_KEEP_ALL = 1 << 30  # a reader's keep-N: opening the checkpoints must never prune one


class RunDirError(MpoError, ValueError):
    """The path is not a run directory (or a checkpoint of one), or its config.json cannot be used."""


# -- finding a run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLocation:
    """A run directory and the checkpoint asked for (None: the newest that restores)."""

    run_dir: Path
    update: int | None


def _trainer_config_data(run_dir: Path) -> dict[str, Any] | None:
    """config.json as a dict when it is a trainer's (a Hugging Face model folder has one too)."""
    try:
        data = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and "policy" in data and "task" in data else None


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds the config.json of a trainer run."""
    return _trainer_config_data(Path(path).expanduser()) is not None


def _check_update(update: int | None) -> None:
    if update is not None and (isinstance(update, bool) or not isinstance(update, int) or update < 0):
        raise InvalidValueError(f"update must be a non-negative integer (a folder name under checkpoints/), "
                                f"got {update!r}")


def find_run(path: str | os.PathLike[str], update: int | None = None) -> RunLocation | None:
    """The run `path` names (run dir, its checkpoints/ folder, or checkpoints/<update>), or None.

    None means `path` is no run (callers may take it for a model folder). A run whose local
    checkpoint folder is missing is an error: it has nothing to restore.
    """
    _check_update(update)
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR and is_run_dir(path.parent.parent):
        named = int(path.name)
        if update is not None and update != named:
            raise RunDirError(f"{path} is the checkpoint of update {named} but update={update} was asked for; "
                              "give one of them (the run directory with --update, or the checkpoint folder)")
        location = RunLocation(path.parent.parent, named)
    elif path.name == CHECKPOINTS_DIR and is_run_dir(path.parent):
        location = RunLocation(path.parent, update)
    elif is_run_dir(path):
        location = RunLocation(path, update)
    else:
        return None
    _check_checkpoint_folder(location.run_dir)
    return location


def _check_checkpoint_folder(run_dir: Path) -> None:
    data = _trainer_config_data(run_dir) or {}
    configured = (data.get("checkpoint") or {}).get("directory") if isinstance(data.get("checkpoint"), dict) else ""
    if configured and "://" in str(configured):
        return  # a bucket: looked at when the checkpoints are opened
    folder = Path(configured).expanduser() if configured else run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        where = (f"its checkpoint.directory {folder} does not exist" if configured
                 else f"it has no {CHECKPOINTS_DIR}/ folder")
        raise MissingFileError(f"run directory {run_dir}: {where}; train it (with checkpoints) first, or pass "
                               "a model path instead")


def locate_run(path: str | os.PathLike[str], update: int | None = None) -> RunLocation:
    """`find_run`, with an error naming the accepted forms when `path` is no run."""
    location = find_run(path, update)
    if location is not None:
        return location
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"{path} does not exist; give {_FORMS}")
    raise RunDirError(f"{path} is not a run directory (no trainer config.json) nor a checkpoint folder of one; "
                      f"give {_FORMS}")


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The run's `TrainConfig` from its config.json."""
    from mpo_jax.train.config import ConfigError, to_train_config

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f"no {CONFIG_FILE} in {run_dir}; give {_FORMS}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FileFormatError(f"{path} is not valid JSON ({err}); `mpo-jax train` writes it when a run starts: "
                              "restore it from the run's original config") from None
    try:
        return to_train_config(data)
    except ConfigError as err:
        raise RunDirError(f"{path} does not describe a run this version can rebuild: {err}") from None


def write_config(run_dir: str | os.PathLike[str], config: TrainConfig) -> None:
    """Write config.json: what export, evaluation and a resumed run rebuild the run from."""
    from mpo_jax.train.config import to_dict

    atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(to_dict(config), indent=2) + "\n")


def record_start(run_dir: str | os.PathLike[str], from_update: int, num_updates: int,
                 devices: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append this start's provenance row (never rewritten: a resume adds a row, it does not replace one)."""
    row = start_record(from_update, num_updates, devices=devices)
    with (Path(run_dir) / PROVENANCE_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def read_provenance(run_dir: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """(rows, lines that were not JSON objects); no rows for runs written before provenance was recorded."""
    return read_jsonl_lenient(Path(run_dir) / PROVENANCE_FILE)


# -- files of updates that a resumed run redoes ---------------------------------------------------


def discard_after(run_dir: str | os.PathLike[str], update: int, iteration: int) -> None:
    """Drop what was written after the checkpoint a run resumes from (or by a run that never reached its
    first checkpoint, `update` 0): those updates and rubric iterations will be redone."""
    root = Path(run_dir)
    for path in root.glob("meta_evaluation_*.json"):
        match = META_EVALUATION_RE.match(path.name)
        if match and int(match.group(1)) > update:
            path.unlink()
    for path in root.glob("rubric_iter_*.txt"):
        match = RUBRIC_FILE_RE.match(path.name)
        if match and int(match.group(1)) > iteration:
            path.unlink()
    truncate_jsonl_after(root / ROLLOUTS_FILE, update)
    truncate_eval_rows(root, update if update else -1)  # a fresh run redoes its update-0 evaluation


# -- checkpoints ----------------------------------------------------------------------------------


def open_checkpointer(config: TrainConfig, run_dir: str | os.PathLike[str], *, read_only: bool = False
                      ) -> Checkpointer:
    """The run's `Checkpointer`: as configured for training, or for reading (never prunes, never creates)."""
    from mpo_jax.train.checkpoint import Checkpointer

    directory = checkpoint_directory(config, run_dir)
    if read_only:
        return Checkpointer(directory, save_every=1, keep=_KEEP_ALL, create=False)
    spec = config.checkpoint
    return Checkpointer(directory, save_every=spec.every, keep=spec.keep, async_save=spec.async_save)


def _check_available(checkpointer: Checkpointer, update: int | None) -> None:
    available = checkpointer.all_updates()
    if not available:
        raise MissingFileError(f"no finished checkpoint in {checkpointer.directory}; the trainer saves every "
                               "checkpoint.every updates and at the end of a run, so train further first")
    if update is not None and update not in available:
        raise MissingFileError(f"no checkpoint for update {update}; available updates: {available} (in "
                               f"{checkpointer.directory})")


def restore_checkpoint(checkpointer: Checkpointer, template_state: Any, update: int | None = None
                       ) -> tuple[int, Any, dict[str, Any]]:
    """(update, state, host state) of checkpoint `update`, or of the newest one that restores."""
    _check_available(checkpointer, update)
    if update is not None:
        state, host = checkpointer.restore(update, template_state)
        return update, state, host
    restored = checkpointer.restore_latest(template_state)
    assert restored is not None  # there are checkpoints: one restored or restore_latest raised
    return restored.update, restored.state, restored.host_state


# -- the policy -----------------------------------------------------------------------------------


def device_mesh(shape: Sequence[int] | None) -> Mesh | None:
    """A (data, fsdp, tensor) mesh over the first devices, or None for one device."""
    import jax

    from mpo_jax.engine import sharding as sharding_lib

    if shape is None:
        return None
    shape = tuple(int(s) for s in shape)
    size = math.prod(shape)
    if size == 1:
        return None
    if size > jax.device_count():
        raise InvalidValueError(f"mesh {shape} needs {size} devices but {jax.device_count()} are available; pass a "
                                "smaller mesh (e.g. --mesh 1,1,1)")
    return sharding_lib.make_mesh(shape, devices=jax.devices()[:size])


@dataclass(frozen=True)
class RestoredPolicy:
    """A run's policy with a checkpoint's parameters in its sampler, and what it came from."""

    model: LanguageModel
    state: Any  # the restored TrainState
    config: TrainConfig
    update: int
    run_dir: Path
    host_state: dict[str, Any]


def restore_policy(path: str | os.PathLike[str], *, update: int | None = None,
                   mesh: Sequence[int] | None = None) -> RestoredPolicy:
    """The trained policy of the run `path` names, at checkpoint `update` (default: the newest that restores).

    The policy is rebuilt as the trainer builds it (`build_policy_and_state`), so the checkpoint
    restores into the same parameter tree. `mesh` is a (data, fsdp, tensor) shape; None uses the
    run's own mesh.
    """
    from mpo_jax.train.config import ConfigError
    from mpo_jax.train.model_specs import build_policy_and_state, check_model_available, install_policy_params

    location = locate_run(path, update)
    config = load_run_config(location.run_dir)
    try:
        check_model_available(config.policy, "policy")
        if config.critic.name and config.algorithm != "grpo":
            check_model_available(config.critic, "critic")
    except ConfigError as err:
        raise RunDirError(f"the base model of {location.run_dir} is needed to rebuild its policy: {err}") from None
    with open_checkpointer(config, location.run_dir, read_only=True) as checkpointer:
        _check_available(checkpointer, location.update)  # before the models are built
        policy, _, template = build_policy_and_state(config, device_mesh(config.mesh if mesh is None else mesh))
        restored_update, state, host = restore_checkpoint(checkpointer, template, location.update)
    install_policy_params(policy, state)
    return RestoredPolicy(model=policy, state=state, config=config, update=restored_update,
                          run_dir=location.run_dir, host_state=host)
