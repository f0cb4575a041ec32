"""`mpo-jax score` and `mpo-jax meta` on files, with a tiny model exported as a HF checkpoint folder."""

import json
import shutil

import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax.cli import main
from mpo_jax.engine.language_model import load_model
from mpo_jax.models.hf_checkpoint import export_hf_checkpoint
from mpo_jax.reward.judge import Judge
from mpo_jax.reward.rubric_history import RubricHistory
from mpo_jax.tasks import get_task


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    tok = tiny_tokenizer_dir(root / "tok")
    config = tiny_config("qwen2", vocab_size=264)
    export_hf_checkpoint(config, random_params(config, seed=31), root / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, root / "ckpt" / name)
    return root / "ckpt"


ROWS = [{"prompt": "write about the fox", "response": "the quick brown fox jumps"},
        {"record": {"prompt": "an essay on dogs"}, "response": "the lazy dog is good"},
        {"prompt": "what is the capital", "response": "paris is the capital"}]


def test_score_writes_the_judge_scores_of_each_row(model_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out.jsonl"
    code = main(["score", "--task", "essay", "--model", str(model_dir), "--input", str(src), "--output", str(out),
                 "--max-rubric-tokens", "1024", "--batch-size", "2"])
    assert code == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in scored] == [r["response"] for r in ROWS]
    judge = Judge(load_model(model_dir), task="essay", max_rubric_tokens=1024)
    judge.set_rubric(get_task("essay").initial_rubrics["iter0"])
    task = get_task("essay")
    records = [task.record_from_prompt(r["prompt"]) if "prompt" in r else r["record"] for r in ROWS]
    expected = judge.score(records, [r["response"] for r in ROWS])
    np.testing.assert_allclose([r["score"] for r in scored], expected, atol=1e-4)
    assert all(0 <= r["score"] <= 5 for r in scored)


def test_meta_runs_one_step_on_a_saved_buffer(model_dir, tmp_path):
    src = tmp_path / "buffer.jsonl"
    src.write_text("".join(json.dumps({**r, "score": float(i)}) + "\n" for i, r in enumerate(ROWS)))
    out = tmp_path / "meta"
    assert main(["meta", "--task", "essay", "--model", str(model_dir), "--buffer", str(src), "--out", str(out),
                 "--num-samples", "2", "--analysis-tokens", "8", "--item-tokens", "6"]) == 0
    report = json.loads((out / "meta_evaluation_0.json").read_text())
    assert len(report["samples"]) == 2 and report["previous_rubric"].startswith("<rubric>")
    history = RubricHistory.load(out)
    assert history.versions[0].render() == get_task("essay").initial_rubrics["iter0"].render()
    assert len(history.events) == 2  # the step's outcome is logged, accepted or not


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p"}', "string \"response\""),
    ('{"response": "r"}', "\"record\""),
    ("not json", "not valid JSON"),
])
def test_bad_rows_are_named_by_line(model_dir, tmp_path, capsys, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    assert main(["score", "--task", "essay", "--model", str(model_dir), "--input", str(src)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and message in err


def test_meta_buffer_rows_need_scores(model_dir, tmp_path, capsys):
    src = tmp_path / "buffer.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n")
    assert main(["meta", "--task", "essay", "--model", str(model_dir), "--buffer", str(src), "--out",
                 str(tmp_path / "o")]) == 2
    assert "numeric \"score\"" in capsys.readouterr().err
