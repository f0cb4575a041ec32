"""Atomic rewrites keep the old file on failure; JSONL errors name the file and line."""

import pytest

from mpo_jax.fileio import atomic_write_text, read_jsonl_lenient, read_jsonl_objects


def test_atomic_write_replaces_the_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_a_failed_write_keeps_the_previous_content(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "bad \udcff surrogate")  # strict encoding refuses a lone surrogate
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    atomic_write_text(path, "kept \udcff", errors="backslashreplace")
    assert path.read_text() == "kept \\udcff"


def test_jsonl_rows_and_errors(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert read_jsonl_objects(path) == [(1, {"a": 1}), (3, {"b": 2})]
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: expected a JSON object, got list"):
        read_jsonl_objects(path)
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not valid JSON"):
        read_jsonl_objects(path)


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic = tmp_path / "atomic.txt"
        atomic_write_text(atomic, "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_truncating_a_per_update_jsonl_keeps_the_updates_up_to_the_checkpoint(tmp_path):
    from mpo_jax.fileio import truncate_jsonl_after

    path = tmp_path / "rows.jsonl"
    path.write_text('{"update": 1, "x": "a"}\n{"update": 3}\nnot json\n{"update": 2}\n{"no": "update"}\n\n')
    truncate_jsonl_after(path, 2)
    assert path.read_text() == '{"update": 1, "x": "a"}\n{"update": 2}\n'
    truncate_jsonl_after(tmp_path / "missing.jsonl", 2)
    assert not (tmp_path / "missing.jsonl").exists()


def test_the_lenient_reader_skips_and_counts_what_a_running_writer_left(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"update": 1}\n\n[1, 2]\n{"update": 2, "score": 0.5}\n{"update": 3, "sco', encoding="utf-8")
    rows, skipped = read_jsonl_lenient(path)
    assert rows == [{"update": 1}, {"update": 2, "score": 0.5}] and skipped == 2  # the list and the torn line
    assert read_jsonl_lenient(tmp_path / "missing.jsonl") == ([], 0)
