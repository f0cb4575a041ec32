"""The meta step's program on a scripted chat model, and on a tiny random local model."""

import dataclasses
import json
import re

import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import Tokenizer
from mpo_jax.engine.language_model import LanguageModel, place_params
from mpo_jax.reward.meta import KEPT_REASONS, MetaRewardModel, MetaSample
from mpo_jax.reward.sense_check import clean_markup, copied_fraction, level_values, ngrams
from mpo_jax.rubric import SCALE_FORM, Rubric, RubricLimits
from mpo_jax.tasks import get_task

TASK = get_task("essay")
RUBRIC = TASK.initial_rubrics["iter0"]


CRITERION_RE = re.compile(r"criterion #(\d+)")
FOCUS = ("### Focus (0-5)\nJudge whether the writing answers the instruction it was given.\n"
         "- 5: every paragraph serves the instruction; example: an essay on uniforms argues about uniforms.\n"
         "- 2: the topic is touched but the writing drifts; example: half the essay is about lunch menus.\n"
         "- 0: the writing ignores the instruction.")
EVIDENCE = ("### Evidence (0-10)\nJudge the support for the central claim.\n"
            "- 10: specific, relevant examples back every main point.\n"
            "- 5: some points are supported, others are bare assertions.\n"
            "- 0: no support at all.")


class ScriptedClient:
    """A stand-in for a remote chat endpoint: answers from a script, records every request.

    Criterion requests (`criterion #i`) get `items[i-1]` (cycling), or `merge_items` in the merge
    conversation when given; integer requests get `count`; anything else gets an analysis.
    """

    def __init__(self, items, count=2, choices=None, merge_items=None):
        self.items, self.count, self.choices, self.merge_items = items, count, choices or {}, merge_items
        self.requests = []

    def chat_batch(self, conversations, **kw):
        self.requests.append(("text", conversations, kw))
        replies = []
        for conv in conversations:
            found = CRITERION_RE.search(conv[-1]["content"])
            if found:
                merging = any("[Start of Criteria Sets]" in m["content"] for m in conv)
                items = self.merge_items if merging and self.merge_items is not None else self.items
                replies.append(items[(int(found.group(1)) - 1) % len(items)] + "<EOE> trailing")
            else:
                replies.append("The score was inflated; the essay ignores the prompt.<EOE>")
        return replies

    def chat_batch_integer(self, conversations, max_digits=2):
        self.requests.append(("int", conversations, {}))
        return [self.count] * len(conversations)

    def chat_batch_choice(self, conversations, options):
        self.requests.append(("choice", conversations, {}))
        return [self.choices.get(i, "good") for i in range(len(conversations))]

    def turns(self, kind):
        """The last user turn of every conversation sent with a request of `kind`."""
        return [conv[-1]["content"] for k, convs, _ in self.requests if k == kind for conv in convs]


def samples(n=6):
    return [MetaSample(record={"prompt": f"Write about topic {i}."}, response=f"Essay number {i}.", score=float(i))
            for i in range(n)]


PROMPT = "Write an essay arguing whether schools should require uniforms, using examples from your own experience."
RESPONSE = ("Schools should not require uniforms because students learn to express themselves through the "
            "clothes they choose every morning.")


def uniform_samples(n=4):
    return [MetaSample(record={"prompt": PROMPT}, response=RESPONSE, score=3.0) for _ in range(n)]


def test_meta_step_builds_a_validated_rubric_from_the_criteria(tmp_path):
    client = ScriptedClient(items=[FOCUS, EVIDENCE])
    mrm = MetaRewardModel(client, task="essay", num_samples=3)
    result = mrm.meta_step(RUBRIC, samples(), rng=0, step=10)
    assert result.accepted, result.reason
    assert result.reason_code == "accepted" and result.sense_check == [] and result.cleaned == []
    assert result.rubric.items == (FOCUS, EVIDENCE)
    assert (result.rubric.iteration, result.rubric.parent, result.rubric.created_step) == (1, 0, 10)
    assert len(result.selected) == 3 and len(result.analyses) == 3 and all(result.refinements)
    assert "<EOE>" not in result.rubric.render()
    saved = json.loads(result.save(tmp_path, 10, samples()).read_text())
    assert saved["accepted"] and len(saved["samples"]) == 3 and "+" in saved["diff"]
    assert saved["reason_code"] == "accepted" and saved["cleaned"] == [] and saved["sense_check"] == []
    assert saved["truncated"] is None and saved["capped"] == []


def test_budgets_default_to_the_original():
    client = ScriptedClient(items=[FOCUS])
    MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    text = [(convs[0][-1]["content"], kw["max_tokens"]) for k, convs, kw in client.requests if k == "text"]
    analysis_budgets = {t for c, t in text if "critical, meta-level analysis" in c}
    item_budgets = {t for c, t in text if CRITERION_RE.search(c)}
    assert analysis_budgets == {2000} and item_budgets == {500}
    assert all("under 300 words" in c for c, _ in text if CRITERION_RE.search(c))


def test_prompts_ask_for_the_scale_form():
    client = ScriptedClient(items=[FOCUS])
    MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    header = "### <name of the criterion> (<lowest score>-<highest score>)"
    count_turns = client.turns("int")
    refine, merge = count_turns[0], count_turns[-1]
    assert "[Start of Criteria Sets]" in merge and "[Start of Criteria Sets]" not in refine
    for turn in (refine, merge):
        assert header in turn and "- <score>:" in turn and SCALE_FORM in turn
    item_turns = [t for t in client.turns("text") if CRITERION_RE.search(t)]
    assert item_turns and all("(<lowest score>-<highest score>)" in t and "- <score>:" in t for t in item_turns)


def test_selection_is_uniform_without_prescreen_and_bad_first_with_it():
    client = ScriptedClient(items=["x"], choices={4: "bad", 2: "ok"})
    plain = MetaRewardModel(client, task="essay", num_samples=2)
    picks = {tuple(plain.select(RUBRIC, samples(), np.random.default_rng(seed))[0]) for seed in range(30)}
    assert len(picks) > 5  # many different pairs: random, not fixed
    screened = MetaRewardModel(client, task="essay", num_samples=2, prescreen=True)
    chosen, verdicts = screened.select(RUBRIC, samples(), np.random.default_rng(0))
    assert chosen == [2, 4] and sorted(verdicts) == ["bad", "ok"]


@pytest.mark.parametrize("items, code", [
    (["</item><item>injected"], "no_scale"),  # cleaned to "injected", which states no scale
    (["<rubric>nested</rubric>"], "no_scale"),
    ([""], "no_criteria"),
    (["   "], "no_criteria"),
    (["### Focus\n- 5: on topic"], "no_scale"),
    (["- 5: on topic\n### Focus (0-5)"], "no_scale"),  # the scale must be on the first line
])
def test_broken_criteria_leave_the_previous_rubric_in_force(items, code):
    mrm = MetaRewardModel(ScriptedClient(items=items), task="essay", num_samples=2)
    result = mrm.meta_step(RUBRIC, samples(), rng=1)
    assert not result.accepted and result.rubric is RUBRIC and result.reason
    assert result.reason_code == code and code in KEPT_REASONS


def test_a_rubric_without_scales_is_rejected_as_no_scale(tmp_path):
    client = ScriptedClient(items=["### Focus\n- 5: on topic\n- 0: off topic", EVIDENCE])
    result = MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert (result.accepted, result.reason_code, result.rubric) == (False, "no_scale", RUBRIC)
    assert "#1" in result.reason and "scale" in result.reason
    saved = json.loads(result.save(tmp_path, 3, samples()).read_text())
    assert saved["reason_code"] == "no_scale" and saved["rubric"] == RUBRIC.render()


def test_oversized_criteria_never_reach_the_merge():
    mrm = MetaRewardModel(ScriptedClient(items=["### Focus (0-5)\n- 5: " + "x" * 50_000]), task="essay",
                          num_samples=2)
    result = mrm.meta_step(RUBRIC, samples(), rng=2)
    assert (result.accepted, result.reason_code, result.rubric) == (False, "no_criteria", RUBRIC)
    assert [(d["stage"], d["criterion"]) for d in result.dropped] == [("refinement", 1), ("refinement", 1),
                                                                     ("refinement", 2), ("refinement", 2)]
    assert all("50021 chars" in d["error"] for d in result.dropped)


def test_template_syntax_in_model_output_stays_literal():
    text = "### Score {{ 7*7 }} (0-5)\n- 5: {% if x %}ok{% endif %} {prompt} <<prompt>>\n- 0: none"
    mrm = MetaRewardModel(ScriptedClient(items=[text]), task="essay", num_samples=2)
    result = mrm.meta_step(RUBRIC, samples(), rng=3)
    assert result.accepted and result.rubric.items == (text,)


# -- sense check -----------------------------------------------------------------------------------

def test_prompt_text_copied_into_criteria_is_rejected_by_the_sense_check(tmp_path):
    # What a 135M MRM writes: the essay prompt copied into three criteria. The prompt is English
    # that names what to write, so it counts as guidance; copying it is a quality finding, which
    # refuses without a canary gate.
    copied = [f"### {name} (0-10)\n{PROMPT}" for name in ("Writing Prompt", "Instruction", "Task")]
    client = ScriptedClient(items=copied, count=3)
    result = MetaRewardModel(client, task="essay", num_samples=4).meta_step(RUBRIC, uniform_samples(), rng=0)
    assert (result.accepted, result.reason_code, result.rubric) == (False, "sense_check", RUBRIC)
    found = {(issue.code, issue.item) for issue in result.sense_check}
    assert found == ({("copied", item) for item in (1, 2, 3)}
                     | {("duplicate", 2), ("duplicate", 3)})  # the same prompt in each: also repeats
    assert all(issue.quality for issue in result.sense_check)
    saved = json.loads(result.save(tmp_path, 1, uniform_samples()).read_text())
    assert saved["reason_code"] == "sense_check"
    assert {(i["code"], i["item"]) for i in saved["sense_check"]} == found
    assert "criterion #1" in result.reason


def test_copying_is_measured_on_word_four_grams_against_the_threshold():
    # Header words "uniforms 0 5 5" then the 15-word prompt: 19 words, 16 distinct 4-grams, of which the
    # 12 starting at "write" occur in the prompt: 12/16 = 0.75 copied.
    item = f"### Uniforms (0-5)\n- 5: {PROMPT}"
    assert copied_fraction(item, ngrams(PROMPT)) == pytest.approx(12 / 16)
    strict = MetaRewardModel(ScriptedClient(items=[item], count=1), task="essay", num_samples=1)
    result = strict.meta_step(RUBRIC, uniform_samples(1), rng=0)
    assert result.reason_code == "sense_check" and [i.code for i in result.sense_check] == ["copied"]
    assert "75%" in result.reason
    lenient = MetaRewardModel(ScriptedClient(items=[item], count=1), task="essay", num_samples=1,
                              max_copied_fraction=0.8)
    assert lenient.meta_step(RUBRIC, uniform_samples(1), rng=0).reason_code == "accepted"
    unchecked = MetaRewardModel(ScriptedClient(items=[item], count=1), task="essay", num_samples=1,
                                sense_check=False)
    assert unchecked.meta_step(RUBRIC, uniform_samples(1), rng=0).accepted


def test_criteria_that_copy_the_response_are_rejected():
    item = f"### Self-expression (0-5)\n- 5: {RESPONSE}\n- 0: the writing says nothing about clothes."
    result = MetaRewardModel(ScriptedClient(items=[item], count=1), task="essay",
                             num_samples=2).meta_step(RUBRIC, uniform_samples(2), rng=0)
    assert result.reason_code == "sense_check" and [i.code for i in result.sense_check] == ["copied"]


def test_criteria_carried_over_from_the_current_rubric_are_not_copies_when_a_response_quotes_it():
    quoting = [MetaSample(record={"prompt": PROMPT}, response=f"{RESPONSE} {FOCUS}", score=5.0)]
    current = Rubric((FOCUS,), task="essay")
    result = MetaRewardModel(ScriptedClient(items=[FOCUS], count=1), task="essay",
                             num_samples=1).meta_step(current, quoting, rng=0)
    assert result.accepted, result.reason


def test_a_good_rubric_passes_the_sense_check():
    result = MetaRewardModel(ScriptedClient(items=[FOCUS, EVIDENCE]), task="essay",
                             num_samples=4).meta_step(RUBRIC, uniform_samples(), rng=0)
    assert result.accepted and result.reason_code == "accepted" and result.sense_check == []
    assert result.rubric.items == (FOCUS, EVIDENCE)


def test_a_sentence_that_says_how_to_score_is_guidance_enough():
    item = "### Discourse (0-5)\nJudge how the ideas connect. Give an integer score from 0 (worst) to 5 (best)."
    result = MetaRewardModel(ScriptedClient(items=[item], count=1), task="essay",
                             num_samples=1).meta_step(RUBRIC, uniform_samples(1), rng=0)
    assert result.accepted, result.reason


def test_levels_outside_the_stated_scale_are_rejected():
    item = "### Focus (0-5)\n- 7: flawless focus on the instruction.\n- 3: drifts.\n- 0: ignores it."
    result = MetaRewardModel(ScriptedClient(items=[item, EVIDENCE]), task="essay",
                             num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert (result.accepted, result.reason_code) == (False, "sense_check")
    assert [(i.code, i.item) for i in result.sense_check] == [("level_out_of_scale", 1)]
    assert "7" in result.sense_check[0].detail and "(0-5)" in result.sense_check[0].detail


def test_a_criterion_restated_as_several_is_rejected_as_duplicates():
    # What the 1.5B MRM merged at the experiment's first meta step: one criterion, restated with other scales.
    body = ("- 0: The response does not mention the article referenced in the prompt.\n"
            "- {hi}: The response gives a vivid example of how advertisements can be both captivating and "
            "misleading, and explains how they can be used for self-improvement.")
    items = [f"### Evidence ({lo}-{lo + 10})\n" + body.format(hi=lo + 10).replace("- 0:", f"- {lo}:")
             for lo in (0, 10, 20)]
    result = MetaRewardModel(ScriptedClient(items=items, count=3), task="essay",
                             num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert (result.accepted, result.reason_code, result.rubric) == (False, "sense_check", RUBRIC)
    assert [(i.code, i.item) for i in result.sense_check] == [("duplicate", 2), ("duplicate", 3)]
    assert "criterion #1" in result.sense_check[0].detail


def test_criteria_that_share_a_name_but_grade_different_things_pass():
    other = "### Focus (0-5)\n- 5: every paragraph serves the essay's thesis.\n- 0: the thesis is never stated."
    result = MetaRewardModel(ScriptedClient(items=[FOCUS, other]), task="essay",
                             num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert result.accepted, result.reason


def test_one_description_for_different_scores_is_rejected():
    # What the 0.5B MRM wrote: levels alternating two sentences, so most scores cannot be told apart.
    item = ("### Evidence (0-5)\n- 0: Write an essay that is not developed.\n- 1: Write a well-developed story.\n"
            "- 2: Write a well-developed essay.\n- 3: Write a well-developed story.")
    result = MetaRewardModel(ScriptedClient(items=[item], count=1), task="essay",
                             num_samples=1).meta_step(RUBRIC, uniform_samples(1), rng=0)
    assert (result.accepted, result.reason_code) == (False, "sense_check")
    assert [(i.code, i.item) for i in result.sense_check] == [("repeated_level", 1)]
    assert "levels 1 and 3" in result.sense_check[0].detail


def test_a_criterion_cut_off_after_a_level_score_is_rejected():
    # What the 1.5B MRM merged in the repair benchmark: its 160-token budget ran out at "- **Score 4**:".
    levels = ["does not address the task at all", "addresses the task but gives no evidence for the claim",
              "gives some evidence, but it is weak", "gives strong, clear, well-supported evidence"]
    item = "### Evidence (0-10)\n" + "".join(f"- **Score {i}**: The response {text}.\n"
                                              for i, text in enumerate(levels)) + "- **Score 4**:"
    result = MetaRewardModel(ScriptedClient(items=[item], count=1), task="essay",
                             num_samples=1).meta_step(RUBRIC, uniform_samples(1), rng=0)
    assert (result.accepted, result.reason_code, result.rubric) == (False, "sense_check", RUBRIC)
    assert [(i.code, i.item) for i in result.sense_check] == [("cut_off", 1)]
    assert "'Score 4'" in result.sense_check[0].detail
    finished = item + " The response is convincing and answers every counterargument."
    assert MetaRewardModel(ScriptedClient(items=[finished], count=1), task="essay",
                           num_samples=1).meta_step(RUBRIC, uniform_samples(1), rng=0).accepted


def test_lines_that_restate_each_other_are_rejected():
    # What the 0.5B MRM merged in the repair benchmark: one sentence with the subject swapped, four times.
    line = ("- **{0} (0-5)**: The {1} should be well-structured and clear, with each item providing a specific "
            "aspect of the task. The score is 0 points.")
    item = "### Evidence (0-10)\n" + "\n".join(line.format(name, name.lower()) for name in
                                                ("Discourse", "Writing Prompt", "Student Prompt", "Student Response"))
    result = MetaRewardModel(ScriptedClient(items=[item], count=1), task="essay",
                             num_samples=1).meta_step(RUBRIC, uniform_samples(1), rng=0)
    assert (result.accepted, result.reason_code) == (False, "sense_check")
    assert [(i.code, i.item) for i in result.sense_check] == [("repeated_line", 1)]
    # Lines 1 and 2: "discourse" and "writing prompt" differ, so 4-grams (out of 19 + 20 words) differ near them.
    a, b = (ngrams(text) for text in item.splitlines()[1:3])
    expected = len(a & b) / len(a | b)
    assert expected > 0.5 and f"{expected:.0%}" in result.sense_check[0].detail
    assert "lines 1 and 2" in result.sense_check[0].detail


def test_levels_in_parallel_wording_are_not_restatements():
    item = ("### Thesis (0-5)\n- **Score 5**: The essay states a clear thesis and defends it in every paragraph.\n"
            "- **Score 3**: The essay states a thesis but some paragraphs wander from it.\n"
            "- **Score 1**: The essay hints at a position without ever stating it.\n"
            "- **Score 0**: The essay takes no position.")
    result = MetaRewardModel(ScriptedClient(items=[item, FOCUS]), task="essay",
                             num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert result.accepted, result.reason


def test_level_lines_in_the_published_rubrics_parallel_wording_pass():
    # Two levels of a rubric the MRM wrote in the published run (Llama-3-8B, essay, step 400): they
    # differ in "most" / "any" and share 82% of their 4-grams. Level lines are not compared.
    item = ("### Task Adherence (0-8)\n"
            "- **8**: The response fully meets the task requirements, including the word limit and the claim.\n"
            "- **2**: The student's response fails to meet most of the task requirements, with significant "
            "deviations from the word limit or lack of clear organization. The writing is often unclear or lacks "
            "depth.\n"
            "- **0**: The student's response fails to meet any of the task requirements, with significant "
            "deviations from the word limit or lack of clear organization. The writing is often unclear or lacks "
            "depth.")
    a, b = (ngrams(line) for line in item.splitlines()[2:4])
    assert len(a & b) / len(a | b) > 0.5
    result = MetaRewardModel(ScriptedClient(items=[item], count=1), task="essay",
                             num_samples=1).meta_step(RUBRIC, uniform_samples(1), rng=0)
    assert result.accepted, result.reason


def test_repeated_and_empty_merge_criteria_are_listed_as_dropped():
    client = ScriptedClient(items=[FOCUS, EVIDENCE], count=4, merge_items=[FOCUS, FOCUS, "<EOE>", EVIDENCE])
    result = MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert result.accepted and result.rubric.items == (FOCUS, EVIDENCE)
    merge = [(d["criterion"], d["error"]) for d in result.dropped if d["stage"] == "merge"]
    assert merge == [(3, "empty reply"), (2, "an exact repeat of an earlier criterion (kept as #1)")]


def test_a_merge_repeat_after_a_dropped_criterion_is_listed_by_its_own_turn():
    client = ScriptedClient(items=[FOCUS, EVIDENCE], count=4, merge_items=[FOCUS, "<EOE>", FOCUS, EVIDENCE])
    result = MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert result.accepted and result.rubric.items == (FOCUS, EVIDENCE)
    merge = [(d["criterion"], d["error"]) for d in result.dropped if d["stage"] == "merge"]
    assert merge == [(2, "empty reply"), (3, "an exact repeat of an earlier criterion (kept as #1)")]


def test_a_criterion_that_ran_out_of_its_token_budget_keeps_only_its_finished_lines():
    class Client(ScriptedClient):
        """Reports criterion #2 of every conversation as cut off by the budget, and #3 cut in its first line."""

        def chat_batch_ending(self, conversations, **kw):
            out = []
            for reply, conv in zip(self.chat_batch(conversations, **kw), conversations):
                number = int(CRITERION_RE.search(conv[-1]["content"]).group(1)) if "criterion #" in \
                    conv[-1]["content"] else 0
                cut = number in (2, 3)
                out.append((reply.split("<EOE>")[0] if cut else reply, cut))  # a cut reply has no end marker
            return out

    half_evidence = EVIDENCE + "\n- 3: evidence for"
    client = Client(items=[FOCUS, half_evidence, "### Tone (0-5) judge whether the"], count=3)
    result = MetaRewardModel(client, task="essay", num_samples=2, item_tokens=123).meta_step(RUBRIC, samples(), rng=0)
    assert result.accepted and result.rubric.items == (FOCUS, EVIDENCE)
    trimmed = [(c["stage"], c["set"], c["criterion"], c["removed"]) for c in result.cleaned if c["kept"]]
    partial = ["- 3: evidence for [cut off at the 123-token budget]"]
    assert trimmed == [("refinement", 1, 2, partial), ("refinement", 2, 2, partial), ("merge", None, 2, partial)]
    assert [c["criterion"] for c in result.cleaned if not c["kept"]] == [3, 3, 3]
    dropped = [(d["stage"], d["set"], d["criterion"], d["error"]) for d in result.dropped]
    why = "cut off at the 123-token budget before its first line ended"
    assert dropped == [("refinement", 1, 3, why), ("refinement", 2, 3, why), ("merge", None, 3, why)]


def test_an_end_marker_line_without_brackets_is_cleaned_from_criteria():
    text, removed = clean_markup(FOCUS + "\n\nEOE\n")
    assert (text, removed) == (FOCUS.strip(), ("EOE",))
    assert clean_markup("### Tone (0-5)\n- 5: avoids EOE jargon.\n- 0: uses it.")[1] == ()  # inside a line: kept
    assert clean_markup(FOCUS + "\n- **EOE**") == (FOCUS.strip(), ("- **EOE**",))  # as the 1.5B MRM wrote it
    result = MetaRewardModel(ScriptedClient(items=[FOCUS + "\n[EOE]"], count=1), task="essay",
                             num_samples=1).meta_step(RUBRIC, uniform_samples(1), rng=0)
    assert result.accepted and result.rubric.items == (FOCUS.strip(),)


@pytest.mark.parametrize("text, expected", [
    ("### A (0-5)\n- 5: x\n- 3-4: y\n* 0 points: z", [5, 3, 4, 0]),
    ("### A (0-5)\n- **2**: x\n- 1 (weak): y\n- -2: penalty", [2, 1, -2]),
    ("### A (0-5)\nUses 2-3 examples.\n1. Focus: numbered, not a level", []),
    ("### A (0-5)\n- **Score 4**: x\nLevel 2: y\n- score 1-0 points: z\nScore on content: w", [4, 2, 1, 0]),
])
def test_level_values_are_read_from_level_lines_only(text, expected):
    assert level_values(text) == expected


# -- markup, item counts, budgets and fit ----------------------------------------------------------

def test_markup_in_criteria_is_cleaned_and_listed(tmp_path):
    dirty = "### Focus (0-5)\n- 5: on topic</item>< ITEM >\n- 0: off topic"
    result = MetaRewardModel(ScriptedClient(items=[dirty], count=1), task="essay",
                             num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert result.accepted, result.reason
    (item,) = result.rubric.items
    assert "<" not in item and item.startswith("### Focus (0-5)\n- 5: on topic") and item.endswith("- 0: off topic")
    saved = json.loads(result.save(tmp_path, 2, samples()).read_text())
    expected = [{"stage": "refinement", "set": 1, "criterion": 1, "removed": ["</item>", "< ITEM >"], "kept": True},
                {"stage": "refinement", "set": 2, "criterion": 1, "removed": ["</item>", "< ITEM >"], "kept": True},
                {"stage": "merge", "set": None, "criterion": 1, "removed": ["</item>", "< ITEM >"], "kept": True}]
    assert saved["cleaned"] == expected


def test_tags_that_reform_after_removal_are_removed_too():
    text, removed = clean_markup("### Focus (0-5)\n- 5: a <<item>item> b")
    assert text.startswith("### Focus (0-5)\n- 5: a") and text.endswith("b") and "item" not in text
    assert len(removed) == 2 and removed[0] == "<item>"


def _numbered(n):
    return [f"### Criterion {i} (0-5)\n- 5: meets requirement {i} fully.\n- 0: misses requirement {i}."
            for i in range(1, n + 1)]


def test_max_items_zero_does_not_clamp_the_count_at_ten():
    client = ScriptedClient(items=_numbered(12), count=12)
    result = MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert result.accepted and result.rubric.items == tuple(_numbered(12)) and result.capped == []


def test_the_task_item_limit_caps_the_count_and_is_recorded(tmp_path):
    task = dataclasses.replace(TASK, rubric_limits=RubricLimits(max_items=5, require_scale=True))
    client = ScriptedClient(items=_numbered(12), count=12)
    result = MetaRewardModel(client, task=task, num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert result.accepted and result.rubric.items == tuple(_numbered(5))
    saved = json.loads(result.save(tmp_path, 1, samples()).read_text())
    cap = {"asked": 12, "kept": 5, "limit": 5, "by": "rubric_limits.max_items"}
    assert saved["capped"] == [{"stage": "refinement", "set": 1, **cap}, {"stage": "refinement", "set": 2, **cap},
                               {"stage": "merge", "set": None, **cap}]


def test_a_positive_max_items_clamps_as_before():
    client = ScriptedClient(items=_numbered(12), count=12)
    result = MetaRewardModel(client, task="essay", num_samples=1, max_items=3).meta_step(RUBRIC, samples(), rng=0)
    assert result.rubric.items == tuple(_numbered(3))
    assert {c["by"] for c in result.capped} == {"max_items"}


def test_the_merge_prompt_caps_only_each_criterion_unless_a_total_is_set():
    client = ScriptedClient(items=[FOCUS])
    MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    merge = client.turns("int")[-1]
    assert "[Start of Criteria Sets]" in merge and "together" not in merge and "16000" not in merge
    capped = ScriptedClient(items=[FOCUS])
    MetaRewardModel(capped, task="essay", num_samples=2, merged_rubric_words=2500).meta_step(RUBRIC, samples(), 0)
    merge = capped.turns("int")[-1]
    assert "The merged criteria together should stay under 2500 words." in merge
    merge_items = [t for k, convs, _ in capped.requests if k == "text" for conv in convs
                   if any("[Start of Criteria Sets]" in m["content"] for m in conv)
                   for t in [conv[-1]["content"]] if CRITERION_RE.search(t)]
    assert merge_items and all("under 300 words" in t for t in merge_items)


def test_a_merged_rubric_too_big_for_the_judge_keeps_its_longest_fitting_prefix(tmp_path):
    client = ScriptedClient(items=_numbered(4), count=4)
    seen = []

    def fits(rubric):
        seen.append(len(rubric.items))
        return len(rubric.items) <= 2

    result = MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0, fits=fits)
    assert result.accepted and result.reason_code == "truncated" and result.reason_code not in KEPT_REASONS
    assert result.rubric.items == tuple(_numbered(2)) and "2 of 4" in result.reason
    assert seen == [4, 3, 2]
    saved = json.loads(result.save(tmp_path, 5, samples()).read_text())
    assert saved["truncated"] == {"proposed": 4, "kept": 2} and saved["reason_code"] == "truncated"


def test_a_merged_rubric_whose_first_item_does_not_fit_keeps_the_previous_rubric():
    client = ScriptedClient(items=_numbered(3), count=3)
    result = MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0,
                                                                             fits=lambda r: False)
    assert (result.accepted, result.reason_code, result.rubric) == (False, "does_not_fit", RUBRIC)


def test_a_fitting_rubric_is_accepted_whole():
    client = ScriptedClient(items=_numbered(3), count=3)
    result = MetaRewardModel(client, task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0,
                                                                             fits=lambda r: True)
    assert result.reason_code == "accepted" and len(result.rubric.items) == 3 and result.truncated is None


def test_criteria_turns_stop_early_when_the_model_has_no_room_for_another():
    class Full(ScriptedClient):
        def chat_batch(self, conversations, **kw):
            if any("criterion #3" in conv[-1]["content"] for conv in conversations):
                raise ValueError("the conversation needs 9000 positions but the model has 8192")
            return super().chat_batch(conversations, **kw)

    result = MetaRewardModel(Full(items=_numbered(5), count=5), task="essay",
                             num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert result.accepted and result.rubric.items == tuple(_numbered(2))
    assert [(s["stage"], s["criterion"]) for s in result.stopped] == [("refinement", 3), ("merge", 3)]
    assert "8192" in result.stopped[0]["error"]


def test_a_criterion_longer_than_the_item_limit_is_dropped_and_listed(tmp_path):
    limit = get_task("essay").rubric_limits.max_item_chars
    huge = "### Criterion X (0-5)\n" + "\n".join(f"- 1: award a point for point {i}." for i in range(limit // 20))
    assert len(huge) > limit
    client = ScriptedClient(items=[_numbered(1)[0], huge], count=2, merge_items=_numbered(2))
    result = MetaRewardModel(client, task="essay", num_samples=1).meta_step(RUBRIC, samples(), rng=0)
    assert result.refinements == [Rubric(items=(_numbered(1)[0],)).render()]  # the oversized one is left out
    assert [(d["stage"], d["set"], d["criterion"], d["chars"]) for d in result.dropped] == [
        ("refinement", 1, 2, len(huge))]
    assert str(limit) in result.dropped[0]["error"]
    assert result.accepted and result.rubric.items == tuple(_numbered(2))
    saved = json.loads(result.save(tmp_path, 1, samples()).read_text())
    assert saved["dropped"] == result.dropped


def test_a_merge_prompt_the_model_cannot_take_keeps_the_previous_rubric():
    class NoRoomToMerge(ScriptedClient):
        def chat_batch_integer(self, conversations, max_digits=2):
            if any("[Start of Criteria Sets]" in m["content"] for conv in conversations for m in conv):
                raise ValueError("prompt length (tokens) is 447043, larger than the largest bucket 8192")
            return super().chat_batch_integer(conversations, max_digits)

    result = MetaRewardModel(NoRoomToMerge(items=_numbered(2)), task="essay",
                             num_samples=2).meta_step(RUBRIC, samples(), rng=0)
    assert (result.accepted, result.reason_code, result.rubric) == (False, "no_criteria", RUBRIC)
    assert [(s["stage"], s["criterion"]) for s in result.stopped] == [("merge", 0)]
    assert "447043" in result.stopped[0]["error"]


def test_no_samples_is_a_kept_reason():
    result = MetaRewardModel(ScriptedClient(items=[FOCUS]), task="essay").meta_step(RUBRIC, [], rng=0)
    assert (result.accepted, result.reason_code, result.rubric) == (False, "no_samples", RUBRIC)
    assert set(KEPT_REASONS) == {"no_samples", "no_criteria", "invalid", "no_scale", "sense_check", "does_not_fit",
                                 "canary"}


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


def test_a_local_session_says_which_replies_ran_out_of_tokens(tmp_path_factory):
    from mpo_jax.engine.chat_session import open_session
    from mpo_jax.engine.sampling import SamplingParams

    tokenizer = Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    config = tiny_config("qwen2", vocab_size=264, max_position_embeddings=8192)
    model = LanguageModel(config, tokenizer, *place_params(config, random_params(config, seed=5), None),
                          prompt_buckets=(64, 256), generation_buckets=(8, 16), batch_buckets=(4,))
    chats = [[{"role": "user", "content": f"Say something about {topic}."}] for topic in ("a", "bb", "ccc", "dd")]
    # Read each row's first greedy token from a plain one-token sample of the same rendered prompts.
    first = model.sample([model.render(c) for c in chats], SamplingParams(max_new_tokens=1))
    texts = [tokenizer.decode([int(first.tokens[i][0])]) for i in range(4)]
    stop = texts[0]
    assert stop.strip(), "the first row's first token must have text to serve as a stop string"
    session = open_session(model, chats)
    session.say([[]] * 4, max_tokens=1, stop=(stop,))
    # One token: a reply ran out of tokens unless that token ends it (an end token, or the stop
    # string, which row 0's token is).
    ended = [int(first.tokens[i][0]) in set(tokenizer.eos_ids) or stop in texts[i] for i in range(4)]
    assert ended[0] and session.hit_limit == [not e for e in ended]
    # A constrained turn reports too: each row wrote a whole option and then its end token.
    session.say_choice([[{"role": "user", "content": "yes or no?"}]] * 4, ["yes", "no"])
    assert session.hit_limit == [False] * 4


def test_math_meta_step_refines_each_group_from_tiered_cases():
    from mpo_jax.reward.meta import group_meta_step, tiered_cases
    from mpo_jax.tasks.math_reasoning import subject_id

    rng = np.random.default_rng(0)
    picked = tiered_cases([(i, float(s)) for i, s in enumerate([5, 0, 3, 1, 4, 2, 0, 5, 1])], 2, rng)
    scores = [5, 0, 3, 1, 4, 2, 0, 5, 1]
    tiers = [sorted(scores)[:3], sorted(scores)[3:6], sorted(scores)[6:]]
    assert len(picked) == 6 and all(sum(scores[i] in t for i in picked) >= 2 for t in tiers)

    class Client(ScriptedClient):
        def chat_batch(self, conversations, **kw):
            self.requests.append(("text", conversations, kw))
            return ["Check units. Award partial credit for correct setup.<EOE>" for _ in conversations]

    math = get_task("math")
    guideline = math.initial_rubrics["iter0"]
    records = [{"problem": f"p{i}", "solution": "\\boxed{1}", "subject": "algebra" if i < 4 else "geometry"}
               for i in range(6)]
    buffered = [MetaSample(record=r, response="x", score=float(i % 3)) for i, r in enumerate(records)]
    mrm = MetaRewardModel(Client(items=["x"]), task="math")
    updates = group_meta_step(mrm, {0: guideline, 2: guideline, 6: guideline}, buffered, 0, group_of=subject_id)
    assert set(updates) == {0, 2, 6}
    assert len(updates[0].cases) == 4 and len(updates[2].cases) == 2 and updates[6].cases == []
    assert all(u.accepted and u.guideline.iteration == 1 for u in updates.values())
    assert updates[0].guideline.items == ("Check units. Award partial credit for correct setup.",)
    assert {kw["max_tokens"] for _, _, kw in mrm.model.requests} == {2500}  # guideline_tokens


def test_math_meta_step_accepts_a_long_guideline_within_the_task_limits():
    from mpo_jax.reward.meta import group_meta_step

    long_guideline = ("Check every step of the derivation against the reference solution. " * 90).strip()
    assert 6000 <= len(long_guideline) <= 12000

    class Client(ScriptedClient):
        def chat_batch(self, conversations, **kw):
            self.requests.append(("text", conversations, kw))
            return [long_guideline + "<EOE>" for _ in conversations]

    math = get_task("math")
    client = Client(items=["x"])
    mrm = MetaRewardModel(client, task="math", guideline_tokens=3000, analysis_tokens=64)
    updates = group_meta_step(mrm, {0: math.initial_rubrics["iter0"]}, [], 0, group_of=lambda r: 0)
    assert updates[0].accepted, updates[0].reason
    assert updates[0].guideline.items == (long_guideline,)
    assert [kw["max_tokens"] for _, _, kw in client.requests] == [3000, 3000]


def test_the_reason_is_logged_whether_or_not_the_rubric_changes(caplog):
    caplog.set_level("INFO", logger="mpo_jax.reward.meta")
    MetaRewardModel(ScriptedClient(items=[""]), task="essay", num_samples=2).meta_step(RUBRIC, samples(), rng=0, step=4)
    MetaRewardModel(ScriptedClient(items=[FOCUS]), task="essay", num_samples=2).meta_step(RUBRIC, samples(), 0,
                                                                                           step=5)
    messages = [r.getMessage() for r in caplog.records]
    assert any("meta step 4: no refinement" in m and "[no_criteria]" in m for m in messages)
    assert any("meta step 5: accepted" in m and "[accepted]" in m for m in messages)
