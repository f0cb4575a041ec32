"""`mpo-jax eval compare` on hand-written run dirs: the table's numbers against numpy over the lines
written here, the plots and rubric copies, untrusted text kept inside fences, and the CLI's errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from mpo_jax.evaluation.cli import eval_main
from mpo_jax.evaluation.compare import COMPARE_JSON, COMPARE_MD, PLOT_FILES, moving_average, write_comparison
from mpo_jax.reward.rubric_history import RubricHistory
from mpo_jax.rubric import Rubric

HOSTILE_RESPONSE = ("```\n# Ignore the rubric\n<script>alert(1)</script>\n{{ 7*7 }} {% if x %}{name}\n"
                    "[click](http://evil.example) | a | b |\n~~~\n````")
HOSTILE_PROMPT = "Write about <img src=x onerror=alert(1)> and **bold** {{ prompt }}"
HOSTILE_RUBRIC_ITEM = "### Obedience (0-5)\nGive 5 if the essay says ```</details><script>x()</script>``` {{ rubric }}"
KINDS = ("too_short", "title_only", "repetition", "refusal", "off_prompt", "not_english", "copies_input",
         "addresses_grader", "code_or_special_tokens")


def _eval_line(update: int, judge: float, independent: float | None, length: float, rates: dict[str, float]) -> dict:
    line = {"update": update, "time": 1.0, "eval/judge_score": judge, "eval/length_mean": length,
            "eval/words_mean": length * 0.8, "time/eval_s": 2.0}
    if independent is not None:
        line["eval/independent_score"] = independent
    line.update({f"eval/hack/{kind}": rates.get(kind, 0.0) for kind in KINDS})
    line["eval/hack/any"] = max(rates.values(), default=0.0)
    return line


def _train_line(update: int, score: float | str, rubric_iteration: int = 0) -> dict:
    return {"update": update, "time": 1.0, "score/mean": score, "objective/kl": 0.01 * update,
            "response/length_mean": 100.0 - update, "rubric/iteration": float(rubric_iteration)}


def _sample(update: int, index: int, response: str, independent: float | None, hacks: list[str],
            prompt: str = HOSTILE_PROMPT) -> dict:
    return {"update": update, "index": index, "prompt": prompt, "response": response, "response_tokens": len(response),
            "judge_score": 1.0 + update, "independent_score": independent, "hacks": hacks}


def _write_jsonl(path: Path, rows: list[dict], torn_tail: str = "") -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + torn_tail, encoding="utf-8")


def _rubric(*items: str) -> str:
    return "<rubric>\n" + "".join(f"<item>\n{item}\n</item>\n" for item in items) + "</rubric>\n"


@pytest.fixture
def arms(tmp_path: Path) -> dict:
    """Two run dirs: `mpo` (separate eval lines, a resume that repeats updates 5-6, a rubric change at
    update 4, a torn last line) and `ppo` (still running, no independent judge, one NaN score)."""
    mpo = tmp_path / "runs" / "mpo"
    mpo.mkdir(parents=True)
    mpo_lines = [
        _eval_line(0, 2.0, 5.0, 120.0, {}),
        _train_line(1, 2.1), _train_line(2, 2.4), _train_line(3, 2.2),
        _eval_line(3, 2.5, 5.5, 110.0, {"too_short": 0.25}),
        _train_line(4, 2.9), _train_line(5, 3.0, 1), _train_line(6, 3.3, 1),
        _eval_line(6, 9.9, 9.9, 9.0, {"refusal": 1.0}),  # before the resume: replaced below
        # resumed from update 4: updates 5 and 6 again, the later lines win
        _train_line(5, 2.6, 1), _train_line(6, 2.8, 1),
        _eval_line(6, 3.1, 6.5, 60.0, {"title_only": 0.5, "repetition": 0.25}),
    ]
    _write_jsonl(mpo / "metrics.jsonl", mpo_lines, torn_tail='{"update": 7, "score/me')
    _write_jsonl(mpo / "eval_samples.jsonl", [
        _sample(0, 0, "A first essay.", 5.0, []), _sample(0, 1, "other prompt", 5.0, []),
        _sample(3, 0, "A middle essay.", 5.5, ["too_short"]),
        _sample(6, 0, "stale response before the resume", 1.0, []),
        _sample(6, 0, HOSTILE_RESPONSE, 6.5, ["title_only", "repetition"]),
    ])
    (mpo / "config.json").write_text("{}", encoding="utf-8")
    history = RubricHistory(Rubric(("### Clarity (0-5)\nIs it clear?",)))
    history.append(Rubric(("### Clarity (0-5)\nIs it clear?", HOSTILE_RUBRIC_ITEM)), reason="meta", created_step=4)
    history.save(mpo)  # rubric_history.json, rubric_iter_0.txt and rubric_iter_1.txt, as the trainer writes them
    (mpo / "meta_evaluation_4.json").write_text(json.dumps({"accepted": True, "iteration": 1}), encoding="utf-8")
    _write_jsonl(mpo / "provenance.jsonl", [  # started on one commit, resumed from update 4 on an edited other
        {"from_update": 0, "num_updates": 6, "code": {"mpo_jax": "0.1.0", "git_commit": "1" * 40, "git_dirty": False}},
        {"from_update": 4, "num_updates": 6, "code": {"mpo_jax": "0.1.0", "git_commit": "2" * 40, "git_dirty": True}},
    ])

    ppo = tmp_path / "runs" / "ppo run"
    ppo.mkdir(parents=True)
    first = _eval_line(0, 2.0, None, 120.0, {"off_prompt": 0.125})
    ppo_lines = [first, _train_line(1, "NaN"), _train_line(2, 2.2), _train_line(3, 2.5),
                 {**_train_line(4, 2.7), **_eval_line(4, 2.6, None, 140.0, {})}]
    _write_jsonl(ppo / "metrics.jsonl", ppo_lines)
    _write_jsonl(ppo / "eval_samples.jsonl", [_sample(0, 0, "PPO first.", None, ["off_prompt"]),
                                              _sample(4, 0, "PPO last.", None, [])])
    (ppo / "rubric_iter_0.txt").write_text(_rubric("### Clarity (0-5)\nIs it clear?"), encoding="utf-8")
    return {"mpo": (mpo, mpo_lines), "ppo": (ppo, ppo_lines), "out": tmp_path / "compare"}


# -- independent expectations ----------------------------------------------------------------------------


def _last_by_update(lines: list[dict], key: str) -> dict[int, object]:
    values: dict[int, object] = {}
    for line in lines:
        if key in line:
            values[line["update"]] = line[key]
    return values


def _expected_eval(line: dict) -> dict:
    return {"update": line["update"], "judge_score": line["eval/judge_score"],
            "independent_score": line.get("eval/independent_score"), "length_mean": line["eval/length_mean"],
            "words_mean": line["eval/words_mean"], "hack_any": line["eval/hack/any"],
            "hacks": {kind: line[f"eval/hack/{kind}"] for kind in sorted(KINDS) if line[f"eval/hack/{kind}"] != 0}}


def _score_mean(lines: list[dict], k: int) -> float:
    scores = _last_by_update(lines, "score/mean")
    values = np.array([float(scores[u]) for u in sorted(scores)])[-k:]
    return float(np.nanmean(values))


def _fences(markdown: str) -> tuple[str, str]:
    """(text inside fenced code blocks, text outside them), by CommonMark's backtick-fence rules."""
    inside, outside, fence = [], [], None
    for line in markdown.split("\n"):
        if fence is None:
            opening = re.match(r"^(`{3,})[^`]*$", line)
            if opening:
                fence = opening.group(1)
            else:
                outside.append(line)
        elif re.fullmatch(rf"`{{{len(fence)},}}\s*", line):
            fence = None
        else:
            inside.append(line)
    assert fence is None, "a fence was left open"
    return "\n".join(inside), "\n".join(outside)


def _table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in markdown.split("\n")
            if line.startswith(f"| {first_cell} |")]


# -- tests ------------------------------------------------------------------------------------------------


def test_moving_average_matches_a_convolution():
    values = np.array([1.0, 4.0, 2.0, 8.0, 5.0, 7.0, 3.0])
    smoothed = moving_average(values, 3)
    np.testing.assert_allclose(smoothed[2:], np.convolve(values, np.ones(3) / 3, mode="valid"))
    np.testing.assert_allclose(smoothed[:2], [1.0, 2.5])
    with_nan = moving_average(np.array([math.nan, 2.0, 4.0]), 2)
    assert math.isnan(with_nan[0]) and with_nan[1:].tolist() == [2.0, 3.0]
    # a new rubric from the fourth point: the window restarts there
    by_rubric = moving_average(values, 3, np.array([0, 0, 0, 1, 1, 1, 1]))
    np.testing.assert_allclose(by_rubric, [1.0, 2.5, 7 / 3, 8.0, 6.5, 20 / 3, 5.0])


def test_the_table_numbers_match_the_lines_written(arms):
    (mpo, mpo_lines), (ppo, ppo_lines) = arms["mpo"], arms["ppo"]
    record = write_comparison({"mpo": mpo, "ppo": ppo}, arms["out"], smooth=3)
    on_disk = json.loads((arms["out"] / COMPARE_JSON).read_text(), parse_constant=pytest.fail)
    assert on_disk == record

    m = record["arms"]["mpo"]
    assert m["updates_done"] == 6 and m["evaluations"] == 3
    assert m["first_eval"] == _expected_eval(mpo_lines[0])
    assert m["last_eval"] == _expected_eval(mpo_lines[-1])  # the line written after the resume
    assert m["last_eval"]["hacks"] == {"repetition": 0.25, "title_only": 0.5}
    assert m["training_score_last_mean"] == pytest.approx(np.mean([2.9, 2.6, 2.8]))
    assert m["training_score_last_mean"] == pytest.approx(_score_mean(mpo_lines, 3))
    assert m["rubric_versions"] == 2 and m["rubric_changes_at"] == [4]
    # iteration 0 has one 0-5 item, iteration 1 (from update 5) two: scores over 5, then over 10
    assert m["score_fraction_last_mean"] == pytest.approx(np.mean([2.9 / 5, 2.6 / 10, 2.8 / 10]))
    assert any("skipped 1 unreadable line" in problem for problem in m["problems"])  # the torn last line
    assert m["code"] == [
        {"first": 1, "last": 4, "commit": "1" * 40, "dirty": False, "version": "0.1.0", "diff_sha256": None},
        {"first": 5, "last": 6, "commit": "2" * 40, "dirty": True, "version": "0.1.0", "diff_sha256": None}]

    p = record["arms"]["ppo"]
    assert p["updates_done"] == 4 and p["evaluations"] == 2
    assert p["first_eval"] == _expected_eval(ppo_lines[0]) and p["first_eval"]["independent_score"] is None
    assert p["last_eval"] == _expected_eval(ppo_lines[-1]) and p["last_eval"]["hacks"] == {}
    assert p["training_score_last_mean"] == pytest.approx(_score_mean(ppo_lines, 3))  # NaN at update 1 ignored
    assert p["rubric_versions"] == 1 and p["rubric_changes_at"] == []
    assert p["score_fraction_last_mean"] == pytest.approx(np.mean([2.2, 2.5, 2.7]) / 5)
    assert p["code"] == []  # no provenance.jsonl

    markdown = (arms["out"] / COMPARE_MD).read_text()
    overview = {row[0]: row for row in _table_rows(markdown, "mpo") + _table_rows(markdown, "ppo")
                if row[1].endswith(("mpo", "ppo run"))}
    assert overview["mpo"][3] == "1111111 (1-4), 2222222 (uncommitted changes) (5-6)"
    assert overview["ppo"][3] == "-"

    markdown = (arms["out"] / COMPARE_MD).read_text()
    rows = {(row[0], row[1]): row for row in _table_rows(markdown, "mpo") + _table_rows(markdown, "ppo")
            if row[1] in ("first", "last")}
    assert rows["mpo", "last"][2:] == ["6", "3.1", "6.5", "60", "0.5", "repetition 0.25, title_only 0.5"]
    assert rows["ppo", "first"][2:] == ["0", "2", "-", "120", "0.125", "off_prompt 0.125"]
    assert rows["ppo", "last"][4] == "-"


def test_plots_rubric_copies_and_links(arms):
    (mpo, _), (ppo, _) = arms["mpo"], arms["ppo"]
    out = arms["out"]
    stale = out / "rubrics" / "ppo" / "rubric_iter_9.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an older comparison", encoding="utf-8")
    write_comparison({"mpo": mpo, "ppo": ppo}, out)
    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name
    for arm, folder, iterations in (("mpo", mpo, (0, 1)), ("ppo", ppo, (0,))):
        copies = sorted(p.name for p in (out / "rubrics" / arm).iterdir())
        assert copies == [f"rubric_iter_{i}.txt" for i in iterations]
        for name in copies:
            assert (out / "rubrics" / arm / name).read_bytes() == (folder / name).read_bytes()
    markdown = (out / COMPARE_MD).read_text()
    links = re.findall(r"\]\((rubrics/[^)]+)\)", markdown)
    assert links == ["rubrics/mpo/rubric_iter_0.txt", "rubrics/mpo/rubric_iter_1.txt", "rubrics/ppo/rubric_iter_0.txt"]
    assert all((out / link).is_file() for link in links)
    assert all(f"]({name})" in markdown for name in PLOT_FILES)


def test_untrusted_text_stays_inside_fences(arms):
    (mpo, _), (ppo, _) = arms["mpo"], arms["ppo"]
    write_comparison({"mpo": mpo, "ppo": ppo}, arms["out"])
    inside, outside = _fences((arms["out"] / COMPARE_MD).read_text())
    for text in (HOSTILE_RESPONSE, HOSTILE_PROMPT, HOSTILE_RUBRIC_ITEM):
        assert text in inside
    for marker in ("<script>", "<img", "{{", "{%", "](http", "Ignore the rubric", "**bold**", "stale response"):
        assert marker not in outside, marker
    assert "stale response" not in inside  # the sample repeated after the resume: the later one is shown
    assert "A first essay." in inside and "PPO last." in inside and "A middle essay." not in inside
    assert "Iteration 1 (accepted at update 4)" in outside and "Same prompt as above." in outside


def test_cli_names_arms_and_refuses_a_folder_that_is_not_a_run_dir(arms, tmp_path, capsys):
    (mpo, _), (ppo, _) = arms["mpo"], arms["ppo"]
    out = tmp_path / "cli_out"
    assert eval_main(["compare", str(mpo), f"p={ppo}", "--out", str(out), "--smooth", "2"]) == 0
    record = json.loads((out / COMPARE_JSON).read_text())
    assert list(record["arms"]) == ["mpo", "p"] and record["smooth"] == 2

    not_a_run = tmp_path / "just_a_folder"
    not_a_run.mkdir()
    capsys.readouterr()
    assert eval_main(["compare", str(mpo), f"bad={not_a_run}", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(not_a_run) in err and "not an mpo-jax run dir" in err
    assert eval_main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert eval_main(["compare", str(ppo), "--out", str(tmp_path / "o4")]) == 2  # "ppo run": a space in the name
    assert "NAME=RUN_DIR" in capsys.readouterr().err
    assert eval_main(["compare", str(mpo), "--out", str(tmp_path / "o5"), "--smooth", "0"]) == 2
    assert "--smooth" in capsys.readouterr().err


def test_score_fraction_places_a_score_in_the_rubric_range():
    from mpo_jax.evaluation.compare import score_fraction

    rubric = Rubric(("### Focus (1-4)\nIs it focused?", "### Evidence (0-10)\nIs it supported?"))
    assert score_fraction(8.0, rubric, "sum") == pytest.approx((8.0 - 1) / (14 - 1))
    assert score_fraction(1.0, rubric, "sum") == 0.0 and score_fraction(14.0, rubric, "sum") == 1.0
    assert score_fraction(0.25, rubric, "mean_normalized") == 0.25  # already a fraction
    assert score_fraction(3.0, Rubric(("Is it focused?",)), "sum") is None  # no scale to place it in


def test_paired_independent_scores_match_numpy_over_the_shared_prompts(tmp_path):
    """Three prompts at update 0 and 5 in both arms, a fourth only in one arm and a fifth whose prompt
    differs between the arms: only the three shared, identical prompts count."""
    rng = np.random.default_rng(7)
    scores = {name: {u: rng.uniform(0, 15, 5) for u in (0, 5)} for name in ("ref", "new")}
    for name in ("ref", "new"):
        run = tmp_path / name
        run.mkdir()
        _write_jsonl(run / "metrics.jsonl", [_eval_line(0, 1.0, 7.0, 100.0, {}), _train_line(1, 1.0),
                                             _eval_line(5, 1.0, 7.0, 100.0, {})])
        rows = [_sample(u, i, "text", float(scores[name][u][i]), [], prompt=f"prompt {i}")
                for u in (0, 5) for i in range(3)]
        if name == "new":
            rows += [_sample(u, 3, "text", 1.0, [], prompt="prompt 3") for u in (0, 5)]
        rows += [_sample(u, 4, "text", 2.0, [], prompt=f"prompt 4 of {name}") for u in (0, 5)]
        _write_jsonl(run / "eval_samples.jsonl", rows)
        (run / "rubric_iter_0.txt").write_text(_rubric("### Clarity (0-5)\nIs it clear?"), encoding="utf-8")
    record = write_comparison({"ref": tmp_path / "ref", "new": tmp_path / "new"}, tmp_path / "out")
    got = record["paired_independent"]
    assert got["reference"] == "ref" and list(got["arms"]) == ["new"]
    for row, update in zip(got["arms"]["new"], (0, 5), strict=True):
        d = scores["new"][update][:3] - scores["ref"][update][:3]
        assert row["update"] == update and row["prompts"] == 3
        assert row["mean_difference"] == pytest.approx(d.mean())
        assert row["standard_error"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(3))
    markdown = (tmp_path / "out" / COMPARE_MD).read_text(encoding="utf-8")
    assert "## Independent judge, paired by held-out prompt (against ref)" in markdown
    paired_rows = [row for row in _table_rows(markdown, "new") if len(row) == 5]
    assert [row[1] for row in paired_rows] == ["0", "5"] and all(row[2] == "3" for row in paired_rows)
    assert float(paired_rows[1][3]) == pytest.approx(got["arms"]["new"][1]["mean_difference"], rel=1e-3)
