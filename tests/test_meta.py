"""The meta step's program on a scripted chat model, and on a tiny random local model."""

import json

import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import Tokenizer
from mpo_jax.language_model import LanguageModel, place_params
from mpo_jax.meta import MetaRewardModel, MetaSample
from mpo_jax.rubric import Rubric
from mpo_jax.tasks import get_task

TASK = get_task("essay")
RUBRIC = TASK.initial_rubrics["iter0"]


class ScriptedClient:
    """A stand-in for a remote chat endpoint: answers from a script, records every request."""

    def __init__(self, items, count=2, choices=None):
        self.items, self.count, self.choices = items, count, choices or {}
        self.requests = []

    def chat_batch(self, conversations, **kw):
        self.requests.append(("text", conversations))
        replies = []
        for conv in conversations:
            last = conv[-1]["content"]
            if "#" in last and any(f"#{i}" in last for i in range(1, 11)):
                n = next(i for i in range(10, 0, -1) if f"#{i}" in last)
                replies.append(self.items[(n - 1) % len(self.items)] + "<EOE> trailing")
            else:
                replies.append("The score was inflated; the essay ignores the prompt.<EOE>")
        return replies

    def chat_batch_integer(self, conversations, max_digits=2):
        self.requests.append(("int", conversations))
        return [self.count] * len(conversations)

    def chat_batch_choice(self, conversations, options):
        self.requests.append(("choice", conversations))
        return [self.choices.get(i, "good") for i in range(len(conversations))]


def samples(n=6):
    return [MetaSample(record={"prompt": f"Write about topic {i}."}, response=f"Essay number {i}.", score=float(i))
            for i in range(n)]


def test_meta_step_builds_a_validated_rubric_from_the_criteria(tmp_path):
    client = ScriptedClient(items=["### Focus\n- 5: on topic", "### Evidence\n- 5: cites facts"])
    mrm = MetaRewardModel(client, task="essay", num_samples=3)
    result = mrm.meta_step(RUBRIC, samples(), rng=0, step=10)
    assert result.accepted, result.reason
    assert result.rubric.items == ("### Focus\n- 5: on topic", "### Evidence\n- 5: cites facts")
    assert (result.rubric.iteration, result.rubric.parent, result.rubric.created_step) == (1, 0, 10)
    assert len(result.selected) == 3 and len(result.analyses) == 3 and all(result.refinements)
    assert "<EOE>" not in result.rubric.render()
    saved = json.loads(result.save(tmp_path, 10, samples()).read_text())
    assert saved["accepted"] and len(saved["samples"]) == 3 and "+" in saved["diff"]


def test_selection_is_uniform_without_prescreen_and_bad_first_with_it():
    client = ScriptedClient(items=["x"], choices={4: "bad", 2: "ok"})
    plain = MetaRewardModel(client, task="essay", num_samples=2)
    picks = {tuple(plain.select(RUBRIC, samples(), np.random.default_rng(seed))[0]) for seed in range(30)}
    assert len(picks) > 5  # many different pairs: random, not fixed
    screened = MetaRewardModel(client, task="essay", num_samples=2, prescreen=True)
    chosen, verdicts = screened.select(RUBRIC, samples(), np.random.default_rng(0))
    assert chosen == [2, 4] and sorted(verdicts) == ["bad", "ok"]


@pytest.mark.parametrize("items", [
    ["</item><item>injected"], ["<rubric>nested</rubric>"], [""], ["   "],
])
def test_broken_criteria_leave_the_previous_rubric_in_force(items):
    mrm = MetaRewardModel(ScriptedClient(items=items), task="essay", num_samples=2)
    result = mrm.meta_step(RUBRIC, samples(), rng=1)
    assert not result.accepted and result.rubric == RUBRIC and result.reason


def test_oversized_merge_is_rejected_with_a_reason():
    mrm = MetaRewardModel(ScriptedClient(items=["x" * 50_000]), task="essay", num_samples=2)
    result = mrm.meta_step(RUBRIC, samples(), rng=2)
    assert not result.accepted and result.rubric == RUBRIC and "rejected" in result.reason


def test_template_syntax_in_model_output_stays_literal():
    mrm = MetaRewardModel(ScriptedClient(items=["Score {{ 7*7 }} {% if x %}ok{% endif %} {prompt}"]), task="essay",
                          num_samples=2)
    result = mrm.meta_step(RUBRIC, samples(), rng=3)
    assert result.accepted and result.rubric.items == ("Score {{ 7*7 }} {% if x %}ok{% endif %} {prompt}",)


def test_meta_step_runs_on_a_local_model(tmp_path_factory):
    tokenizer = Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    config = tiny_config("qwen2", vocab_size=264, max_position_embeddings=8192)
    model = LanguageModel(config, tokenizer, *place_params(config, random_params(config, seed=5), None),
                          prompt_buckets=(64, 256, 1024, 2048), generation_buckets=(8, 16), batch_buckets=(1, 2))
    mrm = MetaRewardModel(model, task="essay", num_samples=2, analysis_tokens=8, item_tokens=8, max_items=2)
    result = mrm.meta_step(RUBRIC, samples(3), rng=0)
    # a random model writes noise: either a valid rubric or the old one with a reason
    assert result.reason
    assert result.rubric == RUBRIC or (result.accepted and result.rubric.iteration == 1)
    assert isinstance(result.rubric, Rubric) and len(result.analyses) == 2


def test_math_meta_step_refines_each_group_from_tiered_cases():
    from mpo_jax.meta import math_meta_step, tiered_cases
    from mpo_jax.tasks.math_reasoning import subject_id

    rng = np.random.default_rng(0)
    picked = tiered_cases([(i, float(s)) for i, s in enumerate([5, 0, 3, 1, 4, 2, 0, 5, 1])], 2, rng)
    scores = [5, 0, 3, 1, 4, 2, 0, 5, 1]
    tiers = [sorted(scores)[:3], sorted(scores)[3:6], sorted(scores)[6:]]
    assert len(picked) == 6 and all(sum(scores[i] in t for i in picked) >= 2 for t in tiers)

    class Client(ScriptedClient):
        def chat_batch(self, conversations, **kw):
            return ["Check units. Award partial credit for correct setup.<EOE>" for _ in conversations]

    math = get_task("math")
    guideline = math.initial_rubrics["iter0"]
    records = [{"problem": f"p{i}", "solution": "\\boxed{1}", "subject": "algebra" if i < 4 else "geometry"}
               for i in range(6)]
    buffered = [MetaSample(record=r, response="x", score=float(i % 3)) for i, r in enumerate(records)]
    mrm = MetaRewardModel(Client(items=["x"]), task="math")
    updates = math_meta_step(mrm, {0: guideline, 2: guideline, 6: guideline}, buffered, 0, group_of=subject_id)
    assert set(updates) == {0, 2, 6}
    assert len(updates[0].cases) == 4 and len(updates[2].cases) == 2 and updates[6].cases == []
    assert all(u.accepted and u.guideline.iteration == 1 for u in updates.values())
    assert updates[0].guideline.items == ("Check units. Award partial credit for correct setup.",)


def test_the_reason_is_logged_whether_or_not_the_rubric_changes(caplog):
    caplog.set_level("INFO", logger="mpo_jax.meta")
    MetaRewardModel(ScriptedClient(items=[""]), task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0, step=4)
    MetaRewardModel(ScriptedClient(items=["### Focus"]), task="essay", num_samples=2).meta_step(RUBRIC, samples(), 0,
                                                                                               step=5)
    messages = [r.getMessage() for r in caplog.records]
    assert any("meta step 4: no refinement" in m for m in messages)
    assert any("meta step 5: accepted" in m for m in messages)
