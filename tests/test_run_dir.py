"""The run directory: path forms, checkpoints kept outside the run (checkpoint.directory), and a corrupt
latest checkpoint that a resumed run, export and evaluation step past.

One tiny 3-update run (checkpoints after every update, written outside its run directory) is shared;
tests that damage checkpoints work on copies of it. The resumed run is checked against the
uninterrupted one: same metrics for the redone update, same rollouts file.
"""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from test_checkpoint import corrupt
from test_trainer import COMPARED, FAST, TINY, metrics_by_update, run_in_process
from tiny import fixture_data_dir

from mpo_jax.errors import MissingFileError, MpoError
from mpo_jax.train.checkpoint import NoRestorableCheckpointError
from mpo_jax.train.config import load_config
from mpo_jax.train.export import export_policy
from mpo_jax.train.run_dir import (
    RunDirError,
    RunLocation,
    checkpoint_directory,
    find_run,
    load_run_config,
    locate_run,
    restore_policy,
)

# TensorStore finishes reads of a failed restore after orbax has closed its event loop; Python reports
# each late callback as an unraisable "Event loop is closed".
LATE_TENSORSTORE_CALLBACKS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def data_arg(tmp_path_factory, cache_env):
    """The override that points a run at the fixture records (tests/fixtures)."""
    return f"--config.data.data_dir={fixture_data_dir(tmp_path_factory.mktemp('data'))}"


def run_args(checkpoints: Path, data_arg: str) -> list[str]:
    return [data_arg, f"--config.checkpoint.directory={checkpoints}", "--config.log.report=false",
            "--config.log.tensorboard=false"]


def trainer_for(run_dir: Path, checkpoints: Path, data_arg: str):
    """The trainer `run_in_process` builds, for a copy of the shared run."""
    from mpo_jax.train.trainer import Trainer

    return Trainer(load_config(TINY, [*FAST, f"--config.run_dir={run_dir}", *run_args(checkpoints, data_arg)]))


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory, data_arg):
    """(run dir, checkpoint dir outside it, the trainer): 3 updates, a checkpoint after each."""
    root = tmp_path_factory.mktemp("elsewhere")
    run_dir, checkpoints = root / "run", root / "bucket" / "checkpoints-of-run"
    trainer = run_in_process(run_dir, *run_args(checkpoints, data_arg))
    return run_dir, checkpoints, trainer


def numbered(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def copy_run(elsewhere, root: Path) -> tuple[Path, Path]:
    run_dir, checkpoints, _ = elsewhere
    shutil.copytree(run_dir, root / "run")
    shutil.copytree(checkpoints, root / "checkpoints-of-run")
    config = json.loads((root / "run" / "config.json").read_text())
    config["run_dir"], config["checkpoint"]["directory"] = str(root / "run"), str(root / "checkpoints-of-run")
    (root / "run" / "config.json").write_text(json.dumps(config))
    return root / "run", root / "checkpoints-of-run"


def lora_leaves(state) -> dict[str, np.ndarray]:
    from flax import nnx

    merged = nnx.state(state.policy.merge(state.params["policy"]))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(merged)[0]
            if "lora" in jax.tree_util.keystr(p)}


# -- path forms -------------------------------------------------------------------------------------


def write_run(root: Path, checkpoint: dict | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"task": "essay", "policy": {"name": "tiny-random"},
                                                  **({"checkpoint": checkpoint} if checkpoint else {})}))
    return root


def test_a_run_is_found_from_each_path_form(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "checkpoints" / "2").mkdir(parents=True)
    assert find_run(run) == RunLocation(run, None)
    assert find_run(run, 2) == RunLocation(run, 2)
    assert find_run(run / "checkpoints") == RunLocation(run, None)
    assert find_run(run / "checkpoints" / "2") == RunLocation(run, 2)
    assert locate_run(run / "checkpoints" / "2", 2) == RunLocation(run, 2)
    with pytest.raises(RunDirError, match="checkpoint of update 2 but update=1"):
        find_run(run / "checkpoints" / "2", 1)
    with pytest.raises(MpoError, match="non-negative integer"):
        find_run(run, -1)

    hf_model = tmp_path / "hf"  # a model folder has a config.json too: not a run
    hf_model.mkdir()
    (hf_model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert find_run(hf_model) is None and find_run(tmp_path / "missing") is None
    with pytest.raises(RunDirError, match="not a run directory"):
        locate_run(hf_model)
    with pytest.raises(MissingFileError, match="does not exist"):
        locate_run(tmp_path / "missing")
    with pytest.raises(MissingFileError, match="no checkpoints/ folder"):
        find_run(write_run(tmp_path / "untrained"))


def test_checkpoint_directory_comes_from_the_config(tmp_path):
    missing = tmp_path / "gone"
    with pytest.raises(MissingFileError, match=f"checkpoint.directory {missing} does not exist"):
        find_run(write_run(tmp_path / "local", {"directory": str(missing)}))
    bucket = write_run(tmp_path / "bucket", {"directory": "gs://a-bucket/runs/one"})
    assert find_run(bucket) == RunLocation(bucket, None)  # a bucket is only opened when restoring


# -- a run that checkpoints elsewhere ---------------------------------------------------------------


def test_a_run_that_checkpoints_elsewhere_is_found_restored_and_exported(elsewhere, tmp_path):
    run_dir, checkpoints, trainer = elsewhere
    assert not (run_dir / "checkpoints").exists() and numbered(checkpoints) == [1, 2, 3]
    config = load_run_config(run_dir)
    assert Path(checkpoint_directory(config, run_dir)) == checkpoints
    assert locate_run(run_dir) == RunLocation(run_dir, None)

    restored = restore_policy(run_dir)
    assert restored.update == 3 and restored.host_state["update"] == 3
    trained, loaded = lora_leaves(trainer.state), lora_leaves(restored.state)
    assert trained.keys() == loaded.keys() and any("lora_b" in k for k in loaded)
    for name, value in trained.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    assert int(restore_policy(run_dir, update=1).host_state["update"]) == 1

    result = export_policy(run_dir, tmp_path / "hf")
    assert result.update == 3 and "model.safetensors" in result.files
    assert json.loads((tmp_path / "hf" / "mpo_export.json").read_text())["update"] == 3


# -- a corrupt latest checkpoint --------------------------------------------------------------------


@LATE_TENSORSTORE_CALLBACKS
def test_a_corrupt_latest_checkpoint_is_skipped_and_the_resumed_run_repeats_the_update(elsewhere, tmp_path,
                                                                                         caplog, data_arg):
    original = elsewhere[0]
    run_dir, checkpoints = copy_run(elsewhere, tmp_path)
    corrupt(checkpoints / "3")
    bad = str(checkpoints / "3")

    # export and evaluation, asked for "the latest", take update 2 and say why
    with caplog.at_level(logging.WARNING):
        assert export_policy(run_dir, tmp_path / "hf").update == 2
    assert any(bad in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert numbered(checkpoints) == [1, 2, 3]  # readers set nothing aside

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        trainer = trainer_for(run_dir, checkpoints, data_arg)
        trainer.run()
    reference = metrics_by_update(original)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f"checkpoint {bad} ") for m in warnings), warnings  # the bad one, named
    iteration = int(reference[3]["rubric/iteration"])  # in force during update 3, so saved with update 2
    assert f"resuming from update 2, rubric iteration {iteration}" in warnings
    assert (checkpoints / "3.corrupt").is_dir() and numbered(checkpoints) == [1, 2, 3]

    after = metrics_by_update(run_dir)
    assert trainer.update == 3 and sorted(after) == [1, 2, 3]
    for name in COMPARED:
        assert after[3][name] == pytest.approx(reference[3][name], rel=1e-4, abs=1e-5), name
    assert (run_dir / "rollouts.jsonl").read_text() == (original / "rollouts.jsonl").read_text()


@LATE_TENSORSTORE_CALLBACKS
def test_no_checkpoint_that_restores_is_one_clear_error(elsewhere, tmp_path, data_arg):
    run_dir, checkpoints = copy_run(elsewhere, tmp_path)
    for update in numbered(checkpoints):
        corrupt(checkpoints / str(update))
    with pytest.raises(NoRestorableCheckpointError, match=f"no checkpoint in {checkpoints} can be restored"):
        export_policy(run_dir, tmp_path / "hf")
    trainer = trainer_for(run_dir, checkpoints, data_arg)
    try:
        with pytest.raises(NoRestorableCheckpointError) as err:
            trainer.run()
    finally:
        trainer.checkpointer.close()
    message = str(err.value)
    assert all(str(checkpoints / str(u)) in message for u in (1, 2, 3)) and "Traceback" not in message
    assert numbered(checkpoints) == [1, 2, 3]
