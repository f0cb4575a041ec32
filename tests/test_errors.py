"""One project error type: every error mpo-jax raises on purpose is an `MpoError`; the command-line tools
print those as one `error: ...` line and let anything else (a bug) through with its traceback."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil

import pytest

import mpo_jax
from mpo_jax.cli import main
from mpo_jax.errors import FileFormatError, InvalidValueError, MissingDependencyError, MissingFileError, MpoError
from mpo_jax.evaluation.cli import eval_main
from mpo_jax.rubric import Rubric, RubricError
from mpo_jax.train import export, report

ROW = {"prompt": "write about the fox", "response": "the quick brown fox jumps"}


def _project_errors() -> dict[str, type[BaseException]]:
    """Every public exception class defined in a module of the mpo_jax package."""
    found = {}
    for info in pkgutil.walk_packages(mpo_jax.__path__, prefix="mpo_jax."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException) and not name.startswith("_")
                    and value.__module__ == module.__name__):
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_project_error_is_an_mpo_error():
    errors = _project_errors()
    assert {"mpo_jax.rubric.RubricError", "mpo_jax.train.config.ConfigError", "mpo_jax.reward.judge.RubricTooLongError",
            "mpo_jax.engine.remote.RemoteBackendError", "mpo_jax.engine.presets.PresetNotFoundError",
            "mpo_jax.train.checkpoint.CheckpointMismatchError"} <= set(errors)
    assert [name for name, cls in errors.items() if not issubclass(cls, MpoError)] == []


def test_project_errors_keep_their_builtin_bases():
    """`except ValueError` / `except FileNotFoundError` callers written before MpoError still catch them."""
    assert issubclass(RubricError, ValueError) and issubclass(InvalidValueError, ValueError)
    assert issubclass(FileFormatError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(MissingDependencyError, ImportError)
    with pytest.raises(ValueError):
        Rubric.parse("no items here")


def test_a_bad_rubric_file_is_a_clean_one_line_error(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("<rubric><item>unclosed</rubric>", encoding="utf-8")
    # The rubric is refused before any model loads, so the model name is never used.
    code = main(["score", "--task", "essay", "--model", "no-such-model", "--input", str(rows), "--rubric", str(rubric)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: --rubric {rubric}: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_missing_input_file_is_a_clean_error(tmp_path, capsys):
    assert main(["score", "--task", "essay", "--input", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: no input file {tmp_path / 'none.jsonl'}\n"


def test_a_bad_mesh_option_is_a_clean_error(capsys):
    # The mesh is read before any model loads.
    assert main(["generate", "--model", "no-such-model", "--prompt", "hi", "--mesh", "1,two,4"]) == 2
    assert capsys.readouterr().err == "error: --mesh '1,two,4' must be integers such as 1,2,4 (data,fsdp,tensor)\n"
    assert main(["generate", "--model", "no-such-model", "--prompt", "hi", "--mesh", "1,2"]) == 2
    assert capsys.readouterr().err.startswith("error: mesh shape (1, 2) must have 3 entries")


def _bug(*args, **kwargs):
    raise ValueError("bug")


def test_a_bug_in_the_main_cli_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    monkeypatch.setattr("mpo_jax.reward.offline.read_rows", _bug)
    with pytest.raises(ValueError, match="^bug$"):
        main(["score", "--task", "essay", "--input", str(rows)])
    assert "error:" not in capsys.readouterr().err


def test_a_bug_in_the_eval_cli_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr("mpo_jax.evaluation.cli.parse_generation_specs", _bug)
    with pytest.raises(ValueError, match="^bug$"):
        eval_main(["score", str(tmp_path / "gen.jsonl"), "--task", "ethics"])


def test_a_bug_in_the_report_cli_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "write_report", _bug)
    with pytest.raises(ValueError, match="^bug$"):
        report.report_main([str(tmp_path)])


def test_a_bug_in_the_export_cli_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "export_policy", _bug)
    args = argparse.Namespace(checkpoint=str(tmp_path), out_dir=str(tmp_path / "out"), format="hf", update=None,
                              dtype=None, max_shard_mb=None)
    with pytest.raises(ValueError, match="^bug$"):
        export.run_export(args)
