"""The text checks on real meta-model outputs (tests/fixtures/mrm_corpus.jsonl) and on fuzzed criteria.

The corpus holds every criterion and rubric the local meta models wrote in docs/results (the
experiment, its pilot, the repair runs), the shipped rubrics found there, and the demo's rubric
from issue 21, each labelled by hand: `usable` means the judge can score with it (a readable
scale, lines that describe the response, levels that can be told apart, nothing cut off after a
score or label); whether it helps the judge is the canary gate's question. `old_checks` records
what the checks before issue 21 found (without the prompts shown, so no copy check).
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mpo_jax.reward.meta import MetaRewardModel, MetaSample
from mpo_jax.reward.rubric_history import RubricHistory
from mpo_jax.reward.sense_check import check_criteria, clean_markup, split_issues
from mpo_jax.rubric import Rubric, ScaleError, item_scale
from mpo_jax.tasks import get_task

CORPUS = [json.loads(line) for line in
          (Path(__file__).parent / "fixtures" / "mrm_corpus.jsonl").read_text(encoding="utf-8").splitlines()]
ITEM = re.compile(r"<item>\s*(.*?)\s*</item>", re.S)


def criteria(entry):
    texts = ITEM.findall(entry["text"]) if entry["kind"] == "rubric" else [entry["text"]]
    return [clean_markup(t)[0] for t in texts]  # as the meta step cleans each criterion


def refused(entry, *, gate):
    """The codes that refuse `entry` under today's checks (with or without a canary gate)."""
    items = criteria(entry)
    try:
        for item in items:
            item_scale(item)
    except ScaleError:
        return ["no_scale"]
    return sorted({i.code for i in split_issues(check_criteria(items, []), gate=gate)[0]})


def test_the_corpus_is_labelled_and_covers_every_shipped_result():
    assert len(CORPUS) >= 80 and all(isinstance(e["usable"], bool) and e["reason"] for e in CORPUS)
    sources = {s.split(":")[0] for e in CORPUS for s in e["sources"]}
    shipped = {str(p) for p in Path("docs/results").rglob("*") if p.name.startswith(("rubric_iter_",
                                                                                        "meta_evaluation_"))}
    shipped |= {str(p) for p in Path("docs/results").rglob("repair.json")}
    assert shipped and shipped <= sources
    assert {e["id"] for e in CORPUS if not e["usable"]} >= {"demo", "c65"}  # the demo's and 1.5B repair's


@pytest.mark.parametrize("entry", CORPUS, ids=[e["id"] for e in CORPUS])
def test_no_unusable_entry_passes_and_every_usable_one_does_with_a_gate(entry):
    found = refused(entry, gate=True)
    assert (not found) == entry["usable"], (entry["reason"], found)
    if not entry["usable"]:  # without a gate the quality heuristics refuse even more
        assert refused(entry, gate=False)


def test_the_new_checks_misjudge_fewer_entries_than_the_old_ones():
    old = sum((not e["old_checks"]) != e["usable"] for e in CORPUS)
    new = sum((not refused(e, gate=True)) != e["usable"] for e in CORPUS)
    passed_unusable_before = [e["id"] for e in CORPUS if not e["usable"] and not e["old_checks"]]
    assert new == 0 and old == 24 and "demo" in passed_unusable_before and len(passed_unusable_before) == 8


# -- fuzz: no invalid rubric is installed, nothing raises -----------------------------------------

WORDS = ("evidence", "the", "response", "clear", "argument", "points", "score", "thesis", "of", "and",
         "specific", "examples", "is", "well", "EOE", "**", "10", "zxq", "lorem", "Write", "essay")


def random_criterion(rng: np.random.Generator) -> str:
    name = rng.choice(["Evidence", "Focus", "Style", "**Tone**", "", "Evidence Evidence"])
    lo = int(rng.integers(0, 12))
    hi = int(rng.integers(0, 12)) if rng.random() < 0.2 else lo + int(rng.integers(1, 11))
    header = rng.choice([f"### {name} ({lo}-{hi})", f"### {name} ({lo} to {hi} points)", f"### {name}",
                         f"{name} ({lo}-{hi})"])
    lines = [header]
    for _ in range(int(rng.integers(0, 7))):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(0, 9))))
        score = int(rng.integers(min(lo, hi) - 2, max(lo, hi) + 3))
        lines.append(str(rng.choice([f"- {score}: {words}", f"- **{score}**: {words}", f"- **Score {score}**:",
                                     f"- {name} ({lo}-{hi} points)", f"- **{words}", f"{words}.", "-",
                                     f"- {words} ({score}-{hi})", f"- {score}-{score - 1}: {words}"])))
    return "\n".join(lines)


class FuzzClient:
    """A scripted meta model that writes one given criterion."""

    def __init__(self, criterion):
        self.criterion = criterion

    def chat_batch(self, conversations, **kw):
        return [self.criterion + "<EOE>" if "criterion #" in c[-1]["content"] else "analysis<EOE>"
                for c in conversations]

    def chat_batch_integer(self, conversations, max_digits=2):
        return [1] * len(conversations)


def fuzz(examples: int) -> None:
    task = get_task("essay")
    rubric = task.initial_rubrics["iter0"]
    samples = [MetaSample(record={"prompt": "Write about school uniforms."}, response="Uniforms help.", score=1.0)]
    rng = np.random.default_rng(21)
    for _ in range(examples):
        text = random_criterion(rng)
        history = RubricHistory(rubric, limits=task.rubric_limits)
        installed: list[Rubric] = []
        result = MetaRewardModel(FuzzClient(text), task=task, num_samples=1).meta_step(rubric, samples, rng=0)
        history.apply(result, created_step=1, install=installed.append)
        if not result.accepted:
            assert history.current is history.versions[0] and result.reason_code
            continue
        (item,) = history.current.items
        lo, hi = item_scale(item)  # independent re-reading of what was installed
        assert 0 <= lo < hi <= 100
        body = item.split("\n", 1)[1] if "\n" in item else ""
        for value in re.findall(r"^[-*]\s*(?:\*\*)?\s*(?:Score\s+)?(-?\d+)\s*(?:\*\*)?\s*:", body, re.M | re.I):
            assert lo <= int(value) <= hi, (item, value)
        for a, b in re.findall(r"\((\d+)\s*(?:-|to)\s*(\d+)(?:\s*points?)?\)", body):
            assert lo <= int(a) <= int(b) <= hi, item
        last = [line for line in item.splitlines() if line.strip()][-1]
        assert not re.fullmatch(r"\s*-\s*", last), item  # a bare bullet: cut off
        assert not re.fullmatch(r"\s*-\s*(\*\*)?\s*(Score\s+)?-?\d+\s*(\*\*)?\s*:\s*", last, re.I), item  # empty level
        bullet = last.lstrip().startswith("-")
        assert not (bullet and last.lstrip("- ").startswith("**") and "**" not in last.lstrip("- ")[2:]), item


def test_fuzzed_criteria_never_install_an_invalid_rubric():
    fuzz(1000)


@pytest.mark.slow
def test_fuzzed_criteria_never_install_an_invalid_rubric_ten_thousand_times():
    fuzz(10_000)
