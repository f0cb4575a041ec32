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


# -- `mpo-jax meta` with a scripted remote meta model (and judge) ---------------------------------

DEMO = "### Evidence (0-10)\n- Evidence (0-10 points)\n- Evidence (1-10 points)\n- Evidence (11-10 points)"
BREVITY = ("### Brevity (0-5)\n- 5: the response makes its point in few, well-chosen words.\n"
           "- 2: the response repeats itself or pads its sentences.\n- 0: the response rambles off the topic.")
ESSAYS = [("Should schools require uniforms?",
           "School uniforms help students focus. They remove the daily pressure of choosing clothes, and they "
           "make families spend less. In my school, bullying about brands fell after uniforms came in. Still, "
           "students should be able to choose a coat or a scarf, because comfort matters in winter."),
          ("Should cities build bike lanes?",
           "Cities should build more bike lanes. Lanes make riding safer and cut traffic. When my town painted a "
           "lane on Main Street, twice as many people rode to work. Drivers complained at first, but the lane "
           "stayed and the shops on the street did better than before.")]


def scripted(criterion):
    """MRM turns answered with `criterion`; judge turns scored by the response's length: long is good
    under a rubric without "Brevity", short is good under one with it."""
    import re

    from fake_openai import ok

    essay = get_task("essay")

    def respond(index, seen):
        messages = seen.body["messages"]
        system, last = messages[0]["content"], messages[-1]["content"]
        if system.startswith(essay.judge_system):
            if "single integer" in last:
                words = len(messages[1]["content"].split())
                long = min(5, max(0, (words - 120) // 12))
                return ok(str(5 - long if "Brevity" in system else long))
            return ok("The response is judged.<EOE>")
        if "How many" in last:
            return ok("1")
        if re.search(r"criterion #\d+", last):
            return ok(criterion + "<EOE>")
        return ok("The score is inflated: the response ignores the task.<EOE>")
    return respond


def buffer(tmp_path):
    src = tmp_path / "buffer.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "response": r, "score": 3.0}) + "\n" for p, r in ESSAYS))
    return src


def test_meta_refuses_the_demo_rubric_from_a_remote_meta_model(tmp_path, capsys):
    from fake_openai import FakeServer

    server = FakeServer(scripted(DEMO), max_requests=1000).start()
    try:
        out = tmp_path / "meta"
        assert main(["meta", "--task", "essay", "--base-url", server.url, "--model", "scripted",
                     "--buffer", str(buffer(tmp_path)), "--out", str(out), "--num-samples", "2"]) == 0
    finally:
        server.stop()
    report = json.loads((out / "meta_evaluation_0.json").read_text())
    assert (report["accepted"], report["reason_code"]) == (False, "sense_check")
    assert {i["code"] for i in report["sense_check"]} >= {"no_guidance", "hollow_line", "level_out_of_scale"}
    assert report["canary"] is None  # no judge given: the text checks alone decide
    assert RubricHistory.load(out).current.render() == get_task("essay").initial_rubrics["iter0"].render()
    assert "kept the input rubric [sense_check]" in capsys.readouterr().out


def test_meta_with_a_judge_keeps_a_proposal_that_lowers_the_canary_share(tmp_path, capsys):
    from fake_openai import FakeServer

    server = FakeServer(scripted(BREVITY), max_requests=5000, lifetime_s=120).start()
    try:
        out = tmp_path / "meta"
        assert main(["meta", "--task", "essay", "--base-url", server.url, "--model", "scripted",
                     "--judge-model", "scripted-judge", "--judge-base-url", server.url, "--canary-samples", "2",
                     "--buffer", str(buffer(tmp_path)), "--out", str(out), "--num-samples", "2"]) == 0
    finally:
        server.stop()
    report = json.loads((out / "meta_evaluation_0.json").read_text())
    assert (report["accepted"], report["reason_code"]) == (False, "canary")
    canary = report["canary"]
    # Recompute both shares from the pairs' scores the trace lists.
    current = np.mean([(np.sign(a - d) + 1) / 2 for a, d in (p["current"] for p in canary["details"])])
    proposal = np.mean([(np.sign(a - d) + 1) / 2 for a, d in (p["proposal"] for p in canary["details"])])
    assert canary["current_share"] == pytest.approx(current) and canary["proposal_share"] == pytest.approx(proposal)
    assert proposal < current - 0.02 and canary["answers"] == 2
    assert "kept the input rubric [canary]" in capsys.readouterr().out
    history = RubricHistory.load(out)
    assert history.current.iteration == 0 and history.events[-1].reason.endswith("(canary)")
