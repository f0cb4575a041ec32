"""The judge on a tiny random model: rubric swaps without recompiling, prefix reuse, and
logits-mode scores against an oracle built from plain full-sequence forward passes."""

import types

import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import Tokenizer
from mpo_jax.engine.compilation import count_compilations
from mpo_jax.engine.language_model import LanguageModel, place_params
from mpo_jax.reward.judge import Judge, RubricTooLongError
from mpo_jax.rubric import Rubric, RubricError, ScaleError

TASK = types.SimpleNamespace(
    name="toy",
    judge_system="You grade short answers.",
    judge_intro=lambda record, response: f"Question: {record['prompt']}\nAnswer: {response}",
    item_rationale_request=lambda i, item: f"Item {i}: {item}\nOne sentence of feedback, then <EOE>.",
    item_score_request=lambda: "Score:",
    rule_score=lambda record, response: -10.0 if response == "" else None,
    record_from_prompt=lambda prompt: {"prompt": prompt},
)
RUBRIC_A = Rubric(items=("clarity (0-5)", "accuracy (0-3)"))
RUBRIC_B = Rubric(items=("style and tone, be strict (0 to 5)", "length (1-4)"))


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


def oracle_expected_score(model, judge, prompt, response, item_index, scale):
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

    lo, hi = scale
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
    judge.set_rubric(Rubric(items=("clarity (0-5)", "overall (0 to 12)\nbe strict: 2-3 small slips cost a point")))
    scales = [(0, 5), (0, 12)]
    prompts, responses = ["what is the capital", "yes or no"], ["paris is the capital", "maybe"]
    results = judge.score_detailed(prompts, responses)
    for row in range(2):
        for item in range(2):
            expected = oracle_expected_score(model, judge, prompts[row], responses[row], item, scales[item])
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
        judge.set_rubric(Rubric(items=(("a very long rubric item " * 20).strip() + " (0-5)",)))
    assert judge.rubric == RUBRIC_A  # the previous rubric stays in force


def test_the_judge_refuses_a_too_long_rubric_as_a_rubric_error(model):
    judge = make_judge(model)
    with pytest.raises(RubricError):  # callers may catch either class; both are ValueErrors
        judge.set_rubric(Rubric(items=(("a very long rubric item " * 20).strip() + " (0-5)",)))
    assert issubclass(RubricTooLongError, RubricError) and issubclass(RubricTooLongError, ValueError)


@pytest.mark.parametrize("item, expected", [
    ("clarity (0-5)", "from 0 to 5."),
    ("### Evidence (2-7)\nuses 2-3 examples\n- 30: great\n- 0: poor", "from 2 to 7."),
    ("Ideas (1\u20136 points)", "from 1 to 6."),
    ("overall (10 to 20):", "from 10 to 20."),
])
def test_logits_item_turn_states_the_header_scale(model, item, expected):
    judge = make_judge(model)
    judge.set_rubric(Rubric(items=(item,)))
    assert judge._logits_item_turn(0, item)[0]["content"].endswith(f"Answer with one integer {expected}")


@pytest.mark.parametrize("item", ["clarity 0-5", "### Evidence\nscore (0-10)", "### Evidence (10 points)",
                                  "### Evidence\n- 30: great\n- 20: fair\n- 0: poor"])
def test_a_rubric_without_header_scales_is_refused_and_the_previous_stays(model, item):
    judge = make_judge(model)
    judge.set_rubric(RUBRIC_A)
    bad = Rubric(items=("clarity (0-5)", item))
    assert not judge.fits(bad)
    with pytest.raises(ScaleError, match="rubric item #2"):
        judge.set_rubric(bad)
    assert judge.rubric == RUBRIC_A
    assert judge._logits_item_turn(1, RUBRIC_A.items[1])[0]["content"].endswith("from 0 to 3.")


def test_rubric_tokens_and_fits(model):
    judge = make_judge(model)
    tok = model.tokenizer
    system = f"{TASK.judge_system}\n\nScoring rubric:\n<rubric>\n<item>\nclarity (0-5)\n</item>\n\n" \
             "<item>\naccuracy (0-3)\n</item>\n</rubric>"
    expected = len(tok.encode(tok.apply_chat_template([{"role": "system", "content": system}],
                                                      add_generation_prompt=False), add_bos=False))
    assert judge.rubric_tokens(RUBRIC_A) == expected
    assert judge.fits(RUBRIC_A)
    long = Rubric(items=(("a very long rubric item " * 20).strip() + " (0-5)",))
    assert judge.rubric_tokens(long) > 256 and not judge.fits(long)
    too_many = Rubric(items=tuple(f"item {i} (0-5)" for i in range(5)))  # max_items is 4
    assert not judge.fits(too_many)
    with pytest.raises(RubricTooLongError, match="at most 4"):
        judge.set_rubric(too_many)
    assert judge.rubric is None  # nothing was installed


def test_logits_scales_the_scorer_cannot_read_are_refused_at_swap_time(model):
    judge = make_judge(model)
    assert judge.fits(Rubric(items=("overall (0-99)",)))  # 100 candidates of one or two digit tokens
    wide = Rubric(items=("overall (0-100)",))  # this tokenizer writes 100 as three digit tokens
    assert not judge.fits(wide)
    with pytest.raises(RubricTooLongError, match="more than two tokens"):
        judge.set_rubric(wide)


def test_generate_mode_without_a_scale_requirement_takes_free_text_items(model):
    judge = make_judge(model, mode="generate", rationale_tokens=4)
    judge.set_rubric(Rubric(items=("clarity, be strict",)))  # the toy task requires no scales
    assert judge.fits(Rubric(items=("clarity, be strict",)))
    normalized = make_judge(model, mode="generate", aggregate="mean_normalized")
    assert not normalized.fits(Rubric(items=("clarity, be strict",)))  # normalising needs the range


class ScriptedMathClient:
    """A remote-chat stand-in: plans and evaluations are fixed text, every score is 3."""

    def __init__(self):
        self.calls = 0
        self.max_tokens: list[int] = []
        self.max_digits: list[int] = []

    def chat_batch(self, conversations, **kw):
        self.calls += 1
        self.max_tokens.append(kw["max_tokens"])
        return ["Step 1: check the algebra.<EOE>" for _ in conversations]

    def chat_batch_integer(self, conversations, max_digits=2):
        self.max_digits.append(max_digits)
        return [3] * len(conversations)


def test_math_judge_mixes_answer_check_and_plan_execute():
    record = {"problem": "What is 2+2?", "solution": "2+2 = \\boxed{4}", "subject": "algebra"}
    reasoning = " ".join(["We add the two numbers carefully and check the result twice."] * 4)
    right, wrong, short = f"{reasoning} \\boxed{{4}}", f"{reasoning} \\boxed{{5}}", "It is \\boxed{4}"
    checker = Judge(ScriptedMathClient(), task="math", mode="generate", llm_probability=0.0)
    checker.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    results = checker.score_detailed([record] * 3, [right, wrong, short])
    assert [r.score for r in results] == [5.0, 0.0, 0.0]
    assert [r.rule for r in results] == ["answer check", "answer check", "rationale gate"]
    client = ScriptedMathClient()
    llm = Judge(client, task="math", mode="generate", llm_probability=1.0)
    llm.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    results = llm.score_detailed([record] * 3, [right, wrong, short])
    assert [r.score for r in results] == [3.0, 3.0, 0.0] and client.calls == 2  # plan, then execute
    mixed = Judge(ScriptedMathClient(), task="math", mode="generate", llm_probability=0.5, seed=1)
    mixed.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    rules = {r.rule for r in mixed.score_detailed([record] * 16, [wrong] * 16)}
    assert rules == {"answer check", None}


MATH_RECORD = {"problem": "What is 2+2?", "solution": "2+2 = \\boxed{4}", "subject": "algebra"}
MATH_ANSWER = " ".join(["We add the two numbers carefully and check the result twice."] * 4) + " \\boxed{5}"


def test_math_plan_and_execute_get_plan_tokens():
    client = ScriptedMathClient()
    judge = Judge(client, task="math", mode="generate", llm_probability=1.0, rationale_tokens=16)
    judge.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    judge.score_detailed([MATH_RECORD], [MATH_ANSWER])
    assert client.max_tokens == [2000, 2000]  # the default: plan, then execute
    client = ScriptedMathClient()
    judge = Judge(client, task="math", mode="generate", llm_probability=1.0, plan_tokens=300)
    judge.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    judge.score_detailed([MATH_RECORD], [MATH_ANSWER])
    assert client.max_tokens == [300, 300]


class RecordingMathClient(ScriptedMathClient):
    """`ScriptedMathClient` that keeps every batch of conversations it was sent."""

    def __init__(self):
        super().__init__()
        self.conversations = []

    def chat_batch(self, conversations, **kw):
        self.conversations.append(conversations)
        return super().chat_batch(conversations, **kw)


def test_math_plans_follow_the_guideline_of_the_record_subject():
    from mpo_jax.tasks.math_reasoning import MATH_SUBJECTS

    client = RecordingMathClient()
    judge = Judge(client, task="math", mode="generate", llm_probability=1.0)
    judge.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    algebra = Rubric(items=("Check the algebra twice.",))
    judge.set_guidelines({MATH_SUBJECTS.index("algebra"): algebra})
    geometry = {**MATH_RECORD, "subject": "geometry"}
    judge.score_detailed([MATH_RECORD, geometry], [MATH_ANSWER, MATH_ANSWER])
    plans = [conversation[-1]["content"] for conversation in client.conversations[0]]
    assert "Check the algebra twice." in plans[0] and "Evaluate the correctness" not in plans[0]
    assert "Evaluate the correctness" in plans[1] and "Check the algebra" not in plans[1]  # no geometry guideline
    assert dict(judge.guidelines) == {0: algebra}
    with pytest.raises(TypeError):
        judge.guidelines[1] = algebra  # read-only: set_guidelines replaces them
    with pytest.raises(TypeError, match="must be a Rubric"):
        judge.set_guidelines({0: "Check the algebra twice."})


def test_reseeding_the_judge_repeats_the_math_coin():
    judge = Judge(ScriptedMathClient(), task="math", mode="generate", llm_probability=0.5, seed=0)
    judge.set_rubric(Rubric(items=("Evaluate the correctness of the student response.",)))
    rules = []
    for _ in range(2):
        judge.reseed([3, 1, 1])
        rules.append([r.rule for r in judge.score_detailed([MATH_RECORD] * 16, [MATH_ANSWER] * 16)])
    # one draw per sample: under 0.5 the LLM judges (no rule), otherwise the answer check
    expected = [None if u < 0.5 else "answer check" for u in np.random.default_rng([3, 1, 1]).random(16)]
    assert rules[0] == rules[1] == expected


def test_a_math_guideline_needs_no_scale_even_in_logits_mode(model):
    judge = Judge(model, task="math", max_rubric_tokens=256, max_items=4)
    guideline = Rubric(items=("Evaluate the correctness of the student response.",))
    assert judge.fits(guideline)
    judge.set_rubric(guideline)


def test_a_remote_essay_judge_reads_header_scales():
    client = ScriptedMathClient()
    judge = Judge(client, task="essay", mode="generate", rationale_tokens=16)
    assert judge.rubric_tokens(Rubric(items=("### A (0-5)",))) is None  # the server's tokenizer is unknown here
    with pytest.raises(ScaleError, match="rubric item #1"):
        judge.set_rubric(Rubric(items=("Judge the discourse from 0 to 5.",)))
    judge.set_rubric(Rubric(items=("### Discourse (0-5)\nuses 2-3 examples", "### Overall (0-100)")))
    result = judge.score_detailed(["Write about rivers."], ["Rivers carry water to the sea."])[0]
    assert result.item_scores == [3.0, 3.0] and result.score == 6.0
    assert client.max_tokens == [16, 16] and client.max_digits == [2, 3]  # "100" needs three digits


def test_a_remote_judge_cannot_use_logits_mode():
    with pytest.raises(ValueError, match="remote judge has no logits"):
        Judge(ScriptedMathClient(), task="essay", mode="logits")


def test_a_generate_mode_judge_scores_twice_under_one_rubric(model):
    """The rubric prefix is reused across calls; the sampler must not consume its buffers."""
    judge = make_judge(model, mode="generate", rationale_tokens=4)
    judge.set_rubric(RUBRIC_A)
    first = judge.score_detailed(["what is the capital"], ["paris"])[0]
    second = judge.score_detailed(["what is the capital"], ["paris"])[0]
    assert (first.item_scores, first.rationales) == (second.item_scores, second.rationales)  # greedy, same prefix
    assert judge.prefix_prefills == 1


def test_generate_mode_conversations_start_after_the_rubric_tokens_only(model):
    """A 1024-token prefix budget: the conversations start from a 256-slot prefix and read the same
    rationales and scores as conversations prefilled from scratch (no prefix cache at all)."""
    model = LanguageModel(model.config, model.tokenizer, model.graphdef, model.params,
                          generation_buckets=(8, 16), batch_buckets=(2,))  # default prompt buckets: up to 8192
    judge = Judge(model, task=TASK, mode="generate", max_rubric_tokens=1024, max_items=4, item_turn_tokens=128,
                  rationale_tokens=6)
    judge.set_rubric(RUBRIC_A)
    prompts, responses = ["what is the capital", "yes"], ["paris", "no"]
    session = judge._generate_session(list(zip([{"prompt": p} for p in prompts], responses, strict=True)))
    assert session.conversation.state.cursor == 256 == session.conversation.state.cache.capacity
    compact = judge.score_detailed(prompts, responses)
    scratch = Judge(model, task=TASK, mode="generate", max_rubric_tokens=1024, max_items=4, item_turn_tokens=128,
                    rationale_tokens=6)
    scratch.set_rubric(RUBRIC_A)
    scratch.local = False  # conversations opened on the model itself: the whole text prefilled on the first turn
    from_scratch = scratch.score_detailed(prompts, responses)
    assert [(r.item_scores, r.rationales) for r in compact] == [(r.item_scores, r.rationales) for r in from_scratch]
