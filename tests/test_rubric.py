"""The Rubric value: parsing untrusted MRM text, validation, rendering, diff and history."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpo_jax.reward.meta import MetaResult
from mpo_jax.reward.rubric_history import HISTORY_FILE, JUDGE_REFUSED, RubricHistory, rubric_file_name
from mpo_jax.rubric import (
    SCALE_FORM,
    Rubric,
    RubricError,
    RubricLimits,
    ScaleError,
    diff,
    item_scale,
    render_items,
    rubric_scales,
    validate,
)

ESSAY_ITEM = "### Clarity\n- 5: crystal clear, e.g. one idea per paragraph.\n- 0: unreadable."
STRUCTURE_ITEM = "### Structure\n- 5: intro, body, conclusion.\n- 0: none."


# -- parse / render ---------------------------------------------------------------------------------


def test_parse_reads_items_in_order_and_strips():
    text = ("Here is the refined rubric:\n<rubric>\n<item>\n  b second  \n</item>\n<item>a first</item>\n"
            "</rubric>\nDone.")
    assert Rubric.parse(text).items == ("b second", "a first")


def test_render_format():
    rubric = Rubric(("one", "two\nlines"))
    assert rubric.render() == "<rubric>\n<item>\none\n</item>\n\n<item>\ntwo\nlines\n</item>\n</rubric>"


def test_round_trip_keeps_items():
    rubric = Rubric((ESSAY_ITEM, STRUCTURE_ITEM, "{{ jinja }} {% raw %} {prompt} <<name>> $x$"))
    assert Rubric.parse(rubric.render()).items == rubric.items


def test_dedup_keeps_first_occurrence_order():
    text = "<rubric><item>c</item><item>a</item><item> c </item><item>b</item><item>a</item></rubric>"
    assert Rubric.parse(text).items == ("c", "a", "b")


def test_missing_rubric_wrapper_is_tolerated_and_chatter_dropped():
    text = "Sure! <item>first</item> some chatter between items <item>second</item> thanks"
    assert Rubric.parse(text).items == ("first", "second")


def test_tags_are_case_and_space_insensitive():
    assert Rubric.parse("< RUBRIC ><Item>x</ item>< /rubric>").items == ("x",)


def test_only_the_rubric_block_is_read():
    text = "Example: <item>not this</item>\n<rubric><item>this</item></rubric>"
    assert Rubric.parse(text).items == ("this",)


def test_template_syntax_is_kept_literally():
    rubric = Rubric.parse("<item>{{ 7 * 7 }} {% for x in y %}{x}{% endfor %} {0.__class__}</item>")
    assert rubric.items == ("{{ 7 * 7 }} {% for x in y %}{x}{% endfor %} {0.__class__}",)


def test_parse_passes_metadata():
    rubric = Rubric.parse("<item>x</item>", iteration=3, parent=2, created_step=40, task="essay")
    assert (rubric.iteration, rubric.parent, rubric.created_step, rubric.task) == (3, 2, 40, "essay")


# -- rejections ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("", "no <item>"),
    ("just prose, no tags", "no <item>"),
    ("<rubric></rubric>", "no <item>"),
    ("<item>a</item><item>   </item>", "item #2 of the rubric text is empty"),
    ("<item>a <item>b</item></item>", "nested"),
    ("<item>a</item></item>", "has no matching <item>"),
    ("<item>a</item><item>b", "item #2 (opened before offset"),
    ("<rubric><item>a</item>", "exactly one <rubric>"),
    ("<item>a</item></rubric>", "exactly one <rubric>"),
    ("<rubric><item>a</item></rubric><rubric><item>b</item></rubric>", "exactly one <rubric>"),
    ("</rubric><item>a</item><rubric>", "exactly one <rubric>"),
    ("<item>lone \ud800 surrogate</item>", "not valid Unicode"),
    ("<rubric><item>a <rubric> b</item></rubric>", "exactly one <rubric>"),
])
def test_parse_rejections(text, message):
    with pytest.raises(RubricError, match=re.escape(message)):
        Rubric.parse(text)


def test_too_many_items():
    text = "".join(f"<item>{i}</item>" for i in range(4))
    with pytest.raises(RubricError, match="rubric has 4 items; the limit is 3"):
        Rubric.parse(text, limits=RubricLimits(max_items=3))


def test_duplicates_do_not_count_towards_the_item_limit():
    assert len(Rubric.parse("<item>a</item>" * 50, limits=RubricLimits(max_items=1))) == 1


def test_item_too_long():
    with pytest.raises(RubricError, match="item #2 has 11 chars; the limit is 10"):
        Rubric.parse("<item>ok</item><item>01234567890</item>", limits=RubricLimits(max_item_chars=10))


def test_total_too_long():
    with pytest.raises(RubricError, match="total 12 chars; the limit is 10"):
        Rubric.parse("<item>abcdef</item><item>ghijkl</item>", limits=RubricLimits(max_total_chars=10))


def test_non_str_input():
    with pytest.raises(RubricError, match="must be a str"):
        Rubric.parse(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("items, message", [
    ((), "at least one item"),
    (("",), "item #1 is empty"),
    (("  padded ",), "leading or trailing whitespace"),
    (("a", "a"), "item #2 duplicates"),
    (("has </item><item> inside",), "contains the tag '</item>'"),
    (("has <ITEM> inside",), "contains the tag '<ITEM>'"),
    (("has </rubric> inside",), "contains the tag '</rubric>'"),
    (("lone \ud800 surrogate",), "not valid Unicode"),
    ((1,), "must be a str"),
    ("abc", "sequence of str"),
])
def test_construction_rejections(items, message):
    with pytest.raises(RubricError, match=message):
        Rubric(items)


def test_construction_accepts_lists_and_tag_lookalikes():
    rubric = Rubric(["a <itemize> b", "<items> and &lt;item&gt; and <item id=1>"])
    assert rubric.items == ("a <itemize> b", "<items> and &lt;item&gt; and <item id=1>")
    assert Rubric.parse(rubric.render()).items == rubric.items


def test_validate_and_validated():
    rubric = Rubric(("a" * 5, "b" * 5))
    validate(rubric)
    assert rubric.validated(RubricLimits(max_items=2)) is rubric
    with pytest.raises(RubricError, match="limit is 1"):
        rubric.validated(RubricLimits(max_items=1))


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_items"):
        RubricLimits(max_items=0)


# -- fuzzing: untrusted MRM output ---------------------------------------------------------------

_FRAGMENTS = st.sampled_from([
    "<item>", "</item>", "<rubric>", "</rubric>", "<ITEM>", "< /item >", "</ Rubric>", "<item", "item>", "</",
    "</item><item>", "{{ x }}", "{% if %}", "{prompt}", "<<name>>", "\n", "  ", "word", "\\boxed{1}", "<EOE>",
    "[End of Rubric Item #1]", "\x00", "é", "<", ">", "<item id=1>",
])
_TAG_SOUP = st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=40).map("".join)


def _check_parse(text: str) -> None:
    try:
        rubric = Rubric.parse(text)
    except RubricError:
        return
    validate(rubric)
    assert all(item and item == item.strip() for item in rubric.items)
    assert len(set(rubric.items)) == len(rubric.items)
    assert Rubric.parse(rubric.render()).items == rubric.items


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_fuzz_arbitrary_text(text):
    _check_parse(text)


@settings(max_examples=500, deadline=None)
@given(_TAG_SOUP)
def test_fuzz_tag_soup(text):
    _check_parse(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), _FRAGMENTS), min_size=1, max_size=6))
def test_fuzz_injection_inside_items(parts):
    """Items whose text tries to close/open tags either parse as more items or are rejected."""
    _check_parse("<rubric>" + "".join(f"<item>{part}</item>" for part in parts) + "</rubric>")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(["<item>", "x", " ", "<", "< ", "</item>", "<rubric>"]), st.integers(10_000, 200_000))
def test_fuzz_huge_inputs(fragment, repeat):
    _check_parse(fragment * repeat)


def test_huge_whitespace_after_angle_bracket_is_linear():
    _check_parse("<" + " " * 2_000_000)
    _check_parse("<item>" + "x" * 5_000 + "</item>")  # over max_item_chars: rejected, not crashed


_ITEM_TEXT = st.text(min_size=1, max_size=60).map(str.strip).filter(bool)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ITEM_TEXT, min_size=1, max_size=8, unique=True))
def test_render_parse_round_trip_property(items):
    try:
        rubric = Rubric(tuple(items))
    except RubricError:
        return  # items with tags or lone surrogates are not constructible
    assert Rubric.parse(rubric.render()).items == rubric.items


# -- score scales ----------------------------------------------------------------------------------


@pytest.mark.parametrize("item, expected", [
    ("### Evidence (0-10)", (0, 10)),
    ("### Evidence (0 - 10)", (0, 10)),
    ("### Evidence (0\u201310)", (0, 10)),  # en dash
    ("### Evidence (0 \u2014 10)", (0, 10)),  # em dash
    ("### Evidence (0 to 10)", (0, 10)),
    ("### Evidence (0 TO 10)", (0, 10)),
    ("### Evidence (0-10 points)", (0, 10)),
    ("### Evidence ( 1 to 6 Points )", (1, 6)),
    ("### Evidence (0-1 point)", (0, 1)),
    ("**Evidence (0-10)**", (0, 10)),
    ("### Evidence (0-10):", (0, 10)),
    ("Evidence (99-100)", (99, 100)),
    ("Evidence (0-100)\n- 100: flawless", (0, 100)),
    ("### Ideas (1-6)   \nbody", (1, 6)),
    ("### Faithfulness (0-30)\nUses 2-3 examples; levels:\n- 30: exact\n- 20: minor slips\n- 0: wrong", (0, 30)),
    ("### Ideas (1-6)\nA related scale (0-10) or (2-3) in the body is ignored.", (1, 6)),
    ("clarity of the answer, judged strictly (2-4)", (2, 4)),
])
def test_item_scale_reads_the_header(item, expected):
    assert item_scale(item) == expected


@pytest.mark.parametrize("item, message", [
    ("### Evidence", "does not end with a score scale in parentheses"),
    ("### Evidence\nScore it from 0 to 10.", "does not end with a score scale in parentheses"),
    ("### Evidence\nScore (0-10).", "'(0-10)' appears elsewhere in the item"),
    ("### Evidence (10 points)", "ends with '(10 points)', which is not a scale"),
    ("### Evidence\n- 30: strong\n- 20: fair\n- 0: weak", "does not end with a score scale"),
    ("uses 2-3 examples", "does not end with a score scale"),
    ("### Evidence 0-10", "does not end with a score scale"),
    ("### Evidence (5-5)", "(5-5) must have 0 <= lowest < highest <= 100"),
    ("### Evidence (6-1)", "(6-1) must have 0 <= lowest < highest <= 100"),
    ("### Evidence (0-101)", "(0-101) must have"),
    ("### Evidence (0-1000 points)", "(0-1000) must have"),
    ("### Evidence (0.5-5)", "not a scale of the form (lo-hi)"),
    ("### Evidence (-1-5)", "not a scale of the form (lo-hi)"),
    ("### Evidence (0-10) (weight 2)", "ends with '(weight 2)'"),
    ("### Evidence (0-10", "does not end with a score scale"),
    ("### Evidence (\u0660-\u0665)", "not a scale"),  # Arabic-Indic digits are not read as numbers
    ("### Evidence (0-10 marks)", "not a scale"),
])
def test_item_scale_errors_say_what_is_wrong_and_how_to_fix_it(item, message):
    with pytest.raises(ScaleError, match=re.escape(message)) as err:
        item_scale(item)
    text = str(err.value)
    assert text.startswith("rubric item '")  # no item number: item_scale does not know it
    fix = "'### Evidence (0-10)'" if item.startswith("### Evidence") else "'uses 2-3 examples (0-10)'"
    assert f"state the scale at the end of the first line, e.g. {fix}" in text
    assert err.value.index is None and err.value.item == item


def test_a_body_range_never_changes_the_header_scale():
    header = "### Examples (0-4)"
    for body in ("", "\nUses 2-3 examples.", "\n- 10: many (5-10)\n- 0: none", "\nfrom 1 to 9"):
        assert item_scale(header + body) == (0, 4)


def test_rubric_scales_names_the_item():
    rubric = Rubric(("### Clarity (0-5)\n- 5: clear", "### Depth\nGive 2-3 points.", "### Tone (1-3)"))
    with pytest.raises(ScaleError, match=re.escape("rubric item #2 '### Depth\\nGive 2-3 points.'")) as err:
        rubric_scales(rubric)
    assert err.value.index == 2
    assert "e.g. '### Depth (0-10)'" in str(err.value)
    good = Rubric(("### Clarity (0-5)\n- 5: clear", "### Depth (0 to 10 points)\nGive 2-3 points.", "Tone (1-3)"))
    assert rubric_scales(good) == ((0, 5), (0, 10), (1, 3))


def test_scale_form_examples_follow_the_form():
    assert 0 < SCALE_FORM.count(". ") + 1 <= 2 and len(SCALE_FORM) < 400
    examples = re.findall(r"`([^`]+)`", SCALE_FORM)
    assert examples and [item_scale(example) for example in examples] == [(0, 10)] * len(examples)


@pytest.mark.parametrize("header", [
    "### Evidence (0-10" + " " * 200_000 + "x)",
    "(" * 100_000 + " 1 " * 10_000,
    "a" + " " * 200_000 + "1-1x",
    "a" + " " * 100_000 + "1 -" + " " * 100_000 + "1x",
    "a" + "1" * 200_000 + "x",
    "a" + "(0-1" * 50_000,
    "E " + "1 - " * 50_000,
    "E " + "()" * 100_000,
])
def test_pathological_headers_are_rejected_in_linear_time(header):
    with pytest.raises(ScaleError):
        item_scale(header)  # a quadratic search would not finish here


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_item_scale_returns_a_valid_scale_or_raises_scale_error(text):
    try:
        lo, hi = item_scale(text)
    except ScaleError:
        return
    assert 0 <= lo < hi <= 100


def test_validate_requires_scales_only_when_asked():
    rubric = Rubric(("### Clarity (0-5)", "### Depth\nscored 0-5"))
    validate(rubric)  # scales are not required by default
    with pytest.raises(ScaleError, match="rubric item #2 '### Depth"):
        validate(rubric, RubricLimits(require_scale=True))
    validate(Rubric(("### Clarity (0-5)", "### Depth (0-5)")), RubricLimits(require_scale=True))


def test_parse_with_required_scales_names_the_item():
    text = "<rubric><item>### Clarity (0-5)</item><item>### Depth (10 points)\n- 10: deep</item></rubric>"
    with pytest.raises(ScaleError, match="rubric item #2 .*'\\(10 points\\)'"):
        Rubric.parse(text, limits=RubricLimits(require_scale=True))
    assert Rubric.parse(text).num_items == 2


def test_history_with_required_scales_rejects_a_proposal_without_them():
    limits = RubricLimits(require_scale=True)
    history = RubricHistory(Rubric(("### Start (0-5)",)), limits=limits)
    assert history.propose("<rubric><item>### Better\nscore 0-5</item></rubric>", reason="meta step 1") is None
    with pytest.raises(ScaleError, match="rubric item #1"):
        history.append(Rubric(("no scale here",)), reason="meta step 2")
    assert history.propose("<rubric><item>### Better (0-5)</item></rubric>", reason="meta step 3") is not None
    assert [e.accepted for e in history.events] == [True, False, False, True]
    assert "state the scale at the end of the first line" in history.events[1].error


def test_limits_require_scale_must_be_a_bool():
    with pytest.raises(ValueError, match="require_scale must be a bool"):
        RubricLimits(require_scale="yes")  # type: ignore[arg-type]


def test_history_json_keeps_require_scale_and_old_json_without_it_loads(tmp_path):
    history = RubricHistory(Rubric(("### Start (0-5)",)), limits=RubricLimits(max_items=3, require_scale=True))
    history.save(tmp_path)
    log = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert log["limits"]["require_scale"] is True
    assert RubricHistory.load(tmp_path).limits == RubricLimits(max_items=3, require_scale=True)
    assert RubricHistory.from_json(history.to_json()).limits.require_scale is True

    old = RubricHistory(Rubric(("start without a scale",)))  # as written before scales existed
    old.save(tmp_path / "old")
    log = json.loads((tmp_path / "old" / HISTORY_FILE).read_text())
    del log["limits"]["require_scale"]
    (tmp_path / "old" / HISTORY_FILE).write_text(json.dumps(log))
    loaded = RubricHistory.load(tmp_path / "old")
    assert loaded.limits.require_scale is False and loaded.current.items == ("start without a scale",)
    payload = old.to_json()
    del payload["limits"]["require_scale"]
    assert RubricHistory.from_json(payload).current.items == ("start without a scale",)


# -- diff ------------------------------------------------------------------------------------------


def test_diff_has_header_and_changes():
    old = Rubric((ESSAY_ITEM,), iteration=0)
    new = Rubric((ESSAY_ITEM.replace("crystal clear", "clear"), STRUCTURE_ITEM), iteration=1, parent=0,
                 created_step=10)
    text = diff(old, new)
    assert text.startswith("--- rubric_iter_0 (iteration 0; 1 items)\n"
                           "+++ rubric_iter_1 (iteration 1, parent 0, step 10; 2 items)\n")
    assert "\n-- 5: crystal clear" in text
    assert "\n+- 5: clear" in text
    assert "\n+### Structure" in text


def test_diff_of_identical_rubrics():
    rubric = Rubric(("a",))
    assert diff(rubric, rubric).endswith("(no changes)")


# -- history ---------------------------------------------------------------------------------------


def test_history_append_stamps_iterations():
    history = RubricHistory(Rubric(("start",), task="essay"))
    second = history.append(Rubric(("refined", "more")), reason="meta step", created_step=10)
    assert (second.iteration, second.parent, second.created_step, second.task) == (1, 0, 10, "essay")
    assert history.current is second
    assert len(history) == 2


def test_history_empty_current():
    with pytest.raises(LookupError, match="empty"):
        _ = RubricHistory().current


def test_rejected_attempt_keeps_current_and_is_logged():
    history = RubricHistory(Rubric(("start",)), limits=RubricLimits(max_items=2))
    assert history.propose("no tags at all", reason="meta step 10", created_step=10) is None
    with pytest.raises(RubricError, match="limit is 2"):
        history.append(Rubric(("a", "b", "c")), reason="meta step 20", created_step=20)
    accepted = history.propose("<rubric><item>better</item></rubric>", reason="meta step 30", created_step=30)
    assert accepted is not None and accepted.iteration == 1
    assert [r.items for r in history.versions] == [("start",), ("better",)]
    events = history.events
    assert [e.accepted for e in events] == [True, False, False, True]
    assert events[1].parent == 0 and events[1].iteration is None and "no <item>" in events[1].error
    assert events[2].created_step == 20 and "limit is 2" in events[2].error


def test_history_save_load_round_trip(tmp_path):
    history = RubricHistory(Rubric(("start {{x}}",), task="ethics"), reason="iter0")
    history.append(Rubric(("refined", "second")), reason="meta step 10", created_step=10)
    history.propose("<rubric><item>a</item><item>", reason="meta step 20", created_step=20)
    history.propose("<rubric><item>final</item></rubric>", reason="meta step 30", created_step=30)
    history.save(tmp_path)

    assert (tmp_path / rubric_file_name(2)).read_text() == history.current.render() + "\n"
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind
    log = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert log["current"] == 2
    assert [e["accepted"] for e in log["events"]] == [True, True, False, True]
    assert log["events"][1]["item_chars"] == [7, 6] and log["events"][1]["total_chars"] == 13
    assert log["events"][2]["error"] and log["events"][2]["parent"] == 1
    assert (tmp_path / log["events"][2]["file"]).read_text() == "<rubric><item>a</item><item>"

    loaded = RubricHistory.load(tmp_path)
    assert loaded.versions == history.versions
    assert loaded.events == history.events
    assert loaded.current.task == "ethics"
    assert loaded.events[2].raw == "<rubric><item>a</item><item>"
    loaded.save(tmp_path / "copy")  # a loaded history saves again, rejected texts included
    assert RubricHistory.load(tmp_path / "copy").events == history.events


def test_history_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=HISTORY_FILE):
        RubricHistory.load(tmp_path)
    RubricHistory(Rubric(("a",))).save(tmp_path)
    (tmp_path / rubric_file_name(0)).write_text("<item>broken")
    with pytest.raises(RubricError, match="rubric_iter_0.txt"):
        RubricHistory.load(tmp_path)
    (tmp_path / HISTORY_FILE).write_text("{not json")
    with pytest.raises(RubricError, match="not a valid rubric history"):
        RubricHistory.load(tmp_path)


def test_render_items_is_the_rubric_markup():
    items = ("### Clarity (0-5)\n- 5: clear", "### Depth (0-5)")
    expected = "<rubric>\n<item>\n### Clarity (0-5)\n- 5: clear\n</item>\n\n<item>\n### Depth (0-5)\n</item>\n</rubric>"
    assert render_items(items) == expected == Rubric(items).render()
    assert Rubric.parse(render_items(["a", "a", "b"])).items == ("a", "b")  # unchecked items, deduplicated on parse


# -- applying a meta step's result -----------------------------------------------------------------

START = Rubric(("### Start (0-5)",), task="essay")
NEW = Rubric(("### Focus (0-5)", "### Depth (0-5)"), iteration=1, parent=0, task="essay")


def _result(accepted: bool, code: str = "") -> MetaResult:
    return MetaResult(rubric=NEW if accepted else START, accepted=accepted,
                      reason="accepted: 2 criteria" if accepted else "no refinement produced a valid criterion",
                      previous=START, selected=[], prescreen=[], analyses=[], refinements=[],
                      merged_text=NEW.render() if accepted else "<rubric><item>half", timing={}, reason_code=code)


def test_apply_installs_an_accepted_rubric_and_records_it():
    history = RubricHistory(START)
    installed: list[Rubric] = []
    assert history.apply(_result(True), created_step=4, install=installed.append) is None
    assert history.current.items == NEW.items and (history.current.iteration, history.current.created_step) == (1, 4)
    assert [r.items for r in installed] == [NEW.items, NEW.items] and installed[-1] is history.current
    assert history.events[-1].accepted and history.events[-1].reason == "accepted: 2 criteria"


def test_apply_records_a_kept_rubric_with_its_reason_code():
    history = RubricHistory(START)
    assert history.apply(_result(False, "no_criteria"), created_step=6) == "no_criteria"
    assert history.current == history.versions[0] and len(history) == 1
    event = history.events[-1]
    assert (event.accepted, event.raw, event.created_step) == (False, "<rubric><item>half", 6)
    assert event.reason == "meta step kept the rubric (no_criteria)"
    assert event.error == "no refinement produced a valid criterion"


def test_apply_logs_a_rubric_the_judge_refuses_and_keeps_the_current_one():
    def refuse(rubric: Rubric) -> None:
        raise RubricError("rubric prefix is 900 tokens")

    history = RubricHistory(START)
    assert history.apply(_result(True), created_step=2, install=refuse) == JUDGE_REFUSED
    assert len(history) == 1 and history.current.items == START.items
    event = history.events[-1]
    assert (event.accepted, event.reason, event.error) == (False, "the judge cannot take the new rubric",
                                                           "rubric prefix is 900 tokens")
    assert event.raw == NEW.render()


def test_apply_follows_the_agreed_proposal_over_the_local_result():
    """A process whose own step kept the rubric still records process 0's accepted proposal."""
    history = RubricHistory(START)
    assert history.apply(_result(False, "invalid"), created_step=3, proposal=NEW.render()) is None
    assert history.current.items == NEW.items and history.events[-1].accepted
