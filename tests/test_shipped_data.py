"""The task data that ships in data/: record counts, fields and licence notes per task and split.

Counts and fields are those the data's own READMEs state; the default data folder is this one, so
a clone with nothing beside it can train and evaluate.
"""

import json
from pathlib import Path

import pytest

from mpo_jax.tasks import get_task
from mpo_jax.tasks.data import default_data_dir

DATA = Path(__file__).resolve().parents[1] / "data"
EXPECTED = {  # task -> (folder, {split: records}, fields every record has)
    "essay": ("essay_writing", {"train": 3596, "test": 500}, {"id", "prompt"}),
    "summarization": ("summarization", {"train": 80, "test": 20}, {"id", "title", "text", "clean_text", "summary",
                                                                   "clean_summary"}),
    "ethics": ("ethical_reasoning", {"train": 2254, "test": 1772}, {"id", "title", "text", "action",
                                                                    "binarized_label"}),
    "math": ("math", {"train": 2000, "test": 500}, {"id", "problem", "solution", "subject", "answer", "level"}),
}


def test_the_default_data_folder_is_the_shipped_one():
    assert default_data_dir() == DATA.resolve()


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_each_split_has_its_records_and_fields(task):
    folder, counts, fields = EXPECTED[task]
    assert get_task(task).data_folder == folder
    assert (DATA / folder / "README.md").is_file()  # source and licence
    for split, count in counts.items():
        lines = (DATA / folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        assert len(records) == count, split
        ids = [r["id"] for r in records]
        assert len(set(ids)) == count, f"{split}: duplicate ids"
        for record in records:
            missing = fields - set(record)
            assert not missing, f"{split} record {record.get('id')} lacks {sorted(missing)}"
            assert all(isinstance(record[f], str) and record[f].strip() for f in fields - {"action", "level"})


def test_essay_prompts_carry_no_mojibake():
    """The source file's mis-decoded UTF-8 (e.g. 'â€™' for an apostrophe) was repaired."""
    for split in ("train", "test"):
        text = (DATA / "essay_writing" / f"{split}.jsonl").read_text(encoding="utf-8")
        for marker in ("\u00e2\u20ac", "\u00c3\u00a9", "\u00c3\u00a8"):
            assert marker not in text, (split, marker)
