"""The judge on a tiny random model: rubric swaps without recompiling, prefix reuse, and
logits-mode scores against an oracle built from plain full-sequence forward passes."""

import types

import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import Tokenizer
from mpo_jax.compilation import count_compilations
from mpo_jax.judge import Judge, RubricTooLongError, item_score_range
from mpo_jax.language_model import LanguageModel, place_params
from mpo_jax.rubric import Rubric

TASK = types.SimpleNamespace(
    name="toy",
    judge_system="You grade short answers.",
    judge_intro=lambda record, response: f"Question: {record['prompt']}\nAnswer: {response}",
    item_rationale_request=lambda i, item: f"Item {i}: {item}\nOne sentence of feedback, then <EOE>.",
    item_score_request=lambda: "Score:",
    rule_score=lambda record, response: -10.0 if response == "" else None,
    record_from_prompt=lambda prompt: {"prompt": prompt},
)
RUBRIC_A = Rubric(items=("clarity 0-5", "accuracy 0-3"))
RUBRIC_B = Rubric(items=("style and tone, from 0 to 5, be strict", "length 1-4"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tokenizer = Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    config = tiny_config("qwen2", vocab_size=264)
    return LanguageModel(config, tokenizer, *place_params(config, random_params(config, seed=21), None),
                         prompt_buckets=(16, 32, 64, 128, 256), generation_buckets=(8, 16, 32),
                         batch_buckets=(1, 2, 4))


def make_judge(model, **kw):
    return Judge(model, task=TASK, max_rubric_tokens=256, max_items=4, **{"item_turn_tokens": 128, **kw})


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def oracle_expected_score(model, judge, prompt, response, item_index):
    """Expected score from full forward passes over the rendered conversation (no cache)."""
    tok = model.tokenizer
    rubric = judge.rubric
    messages = judge._prefix_messages(rubric) + [{"role": "user", "content": TASK.judge_intro({"prompt": prompt},
                                                                                              response)}]
    messages += judge._logits_item_turn(item_index, rubric.items[item_index])
    prefix_text = tok.apply_chat_template(judge._prefix_messages(rubric), add_generation_prompt=False)
    sample_text = tok.apply_chat_template(messages[:2], add_generation_prompt=False)
    full_text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = (tok.encode(prefix_text, add_bos=False) + tok.encode(sample_text[len(prefix_text):], add_bos=False)
           + tok.encode(full_text[len(sample_text):], add_bos=False))

    def next_logp(seq):
        return log_softmax(np.asarray(model.logits(np.asarray([seq], np.int32)))[0, -1])

    lo, hi = item_score_range(rubric.items[item_index])
    digits = np.array([s.isdigit() and s.isascii() for s in tok.token_strings()] + [False] * 8)[:264]
    first = next_logp(ids)
    weights, values = [], []
    for n in range(lo, hi + 1):
        seq = tok.encode(str(n), add_bos=False)
        logp = first[seq[0]]
        if len(seq) == 2:
            logp += next_logp(ids + seq[:1])[seq[1]]
        elif any(len(tok.encode(str(m), add_bos=False)) == 2 and tok.encode(str(m), add_bos=False)[0] == seq[0]
                 for m in range(lo, hi + 1)):
            logp += np.log1p(-np.exp(next_logp(ids + seq))[digits].sum())
        weights.append(np.exp(logp))
        values.append(n)
    weights = np.array(weights) / np.sum(weights)
    return float(np.dot(weights, values))


def test_logits_scores_match_full_forward_oracle(model):
    judge = make_judge(model)
    judge.set_rubric(Rubric(items=("clarity 0-5", "overall 0 to 12")))
    prompts, responses = ["what is the capital", "yes or no"], ["paris is the capital", "maybe"]
    results = judge.score_detailed(prompts, responses)
    for row in range(2):
        for item in range(2):
            expected = oracle_expected_score(model, judge, prompts[row], responses[row], item)
            assert abs(results[row].item_scores[item] - expected) < 1e-3, (row, item)
        assert results[row].score == pytest.approx(sum(results[row].item_scores), rel=1e-6)
    assert 0 <= results[0].item_scores[0] <= 5 and 0 <= results[0].item_scores[1] <= 12


def test_rubric_swap_compiles_nothing_and_prefix_is_prefilled_once_per_version(model):
    judge = make_judge(model)
    judge.set_rubric(RUBRIC_A)
    prompts, responses = ["what is the capital"] * 3, ["paris", "the answer is no", "good"]
    first = judge.score(prompts, responses)
    judge.score(prompts[::-1], responses)
    assert judge.prefix_prefills == 1
    with count_compilations() as compiled:
        judge.set_rubric(RUBRIC_B)
        second = judge.score(prompts, responses)
    assert compiled == []
    assert judge.prefix_prefills == 2
    assert not np.allclose(first, second)


def test_prefix_reuse_gives_the_same_scores_as_recomputing_it(model):
    reuse, fresh = make_judge(model), make_judge(model, reuse_prefix=False)
    for judge in (reuse, fresh):
        judge.set_rubric(RUBRIC_A)
    prompts, responses = ["what is the capital", "yes"], ["paris", "no"]
    reuse.score(prompts, responses)
    np.testing.assert_allclose(reuse.score(prompts, responses), fresh.score(prompts, responses), atol=1e-5)
    fresh.score(prompts, responses)
    assert reuse.prefix_prefills == 1 and fresh.prefix_prefills == 2


def test_mean_normalized_aggregate_lies_in_unit_interval(model):
    judge = make_judge(model, aggregate="mean_normalized")
    judge.set_rubric(RUBRIC_A)
    result = judge.score_detailed(["q"], ["an answer"])[0]
    expected = np.mean([result.item_scores[0] / 5, result.item_scores[1] / 3])
    assert result.score == pytest.approx(expected, rel=1e-6)


def test_generate_mode_returns_parsed_integer_scores(model):
    judge = make_judge(model, mode="generate", rationale_tokens=8)
    judge.set_rubric(RUBRIC_A)
    results = judge.score_detailed(["what is the capital", "yes"], ["paris", "no"])
    for result in results:
        assert len(result.item_scores) == 2 and len(result.rationales) == 2
        assert all(float(s).is_integer() for s in result.item_scores)
        assert result.score == sum(result.item_scores)


def test_task_rules_bypass_the_model(model):
    judge = make_judge(model)
    judge.set_rubric(RUBRIC_A)
    results = judge.score_detailed(["q", "q"], ["", "some answer"])
    assert results[0].score == -10.0 and results[0].rule == "task rule"
    assert results[1].rule is None


def test_rubric_longer_than_the_maximum_is_refused_at_swap_time(model):
    judge = make_judge(model)
    judge.set_rubric(RUBRIC_A)
    with pytest.raises(RubricTooLongError, match="max_rubric_tokens is 256"):
        judge.set_rubric(Rubric(items=(("a very long rubric item " * 20).strip(),)))
    assert judge.rubric == RUBRIC_A  # the previous rubric stays in force


@pytest.mark.parametrize("text,expected", [("clarity 0-5", (0, 5)), ("Ideas (1–6 points)", (1, 6)),
                                           ("from 0 to 10", (0, 10)), ("no range here", (0, 5)),
                                           ("version 2.0-3.1", (0, 5))])
def test_item_score_range(text, expected):
    assert item_score_range(text) == expected


class ScriptedMathClient:
    """A remote-chat stand-in: plans and evaluations are fixed text, every score is 3."""

    def __init__(self):
        self.calls = 0

    def chat_batch(self, conversations, **kw):
        self.calls += 1
        return ["Step 1: check the algebra.<EOE>" for _ in conversations]

    def chat_batch_integer(self, conversations, max_digits=2):
        return [3] * len(conversations)


def test_math_judge_mixes_answer_check_and_plan_execute():
    record = {"problem": "What is 2+2?", "solution": "2+2 = \\boxed{4}", "subject": "algebra"}
    reasoning = " ".join(["We add the two numbers carefully and check the result twice."] * 4)
    right, wrong, short = f"{reasoning} \\boxed{{4}}", f"{reasoning} \\boxed{{5}}", "It is \\boxed{4}"
    checker = Judge(ScriptedMathClient(), task="math", mode="generate", math_llm_probability=0.0)
    checker.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    results = checker.score_detailed([record] * 3, [right, wrong, short])
    assert [r.score for r in results] == [5.0, 0.0, 0.0]
    assert [r.rule for r in results] == ["answer check", "answer check", "rationale gate"]
    client = ScriptedMathClient()
    llm = Judge(client, task="math", mode="generate", math_llm_probability=1.0)
    llm.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    results = llm.score_detailed([record] * 3, [right, wrong, short])
    assert [r.score for r in results] == [3.0, 3.0, 0.0] and client.calls == 2  # plan, then execute
    mixed = Judge(ScriptedMathClient(), task="math", mode="generate", math_llm_probability=0.5, seed=1)
    mixed.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    rules = {r.rule for r in mixed.score_detailed([record] * 16, [wrong] * 16)}
    assert rules == {"answer check", None}


def test_a_remote_judge_cannot_use_logits_mode():
    with pytest.raises(ValueError, match="remote judge has no logits"):
        Judge(ScriptedMathClient(), task="essay", mode="logits")
