"""The canary gate (`mpo_jax.reward.canary`): the pairwise share against independent numpy
computations, the seeded canary set, and a meta step whose well-formed proposal lowers the share."""

import json

import numpy as np
import pytest
from test_meta import FOCUS, RUBRIC, ScriptedClient

from mpo_jax.errors import InvalidValueError
from mpo_jax.reward.canary import (
    CanaryGate,
    CanarySettings,
    build_canary_set,
    decide,
    pairwise_share,
    shares_by_kind,
)
from mpo_jax.reward.hacks import HACK_KINDS
from mpo_jax.reward.meta import MetaRewardModel, MetaSample
from mpo_jax.rubric import Rubric
from mpo_jax.tasks import get_task

ESSAY = get_task("essay")
ESSAYS = [
    "School uniforms help students focus.\n\nThey remove the daily pressure of choosing clothes, and they make "
    "families spend less. In my school, bullying about brands fell after uniforms came in.\n\nStill, students "
    "should be able to choose a coat or a scarf.",
    "Cities should build more bike lanes.\n\nLanes make riding safer and cut traffic. When my town painted a "
    "lane on Main Street, twice as many people rode to work.\n\nDrivers complained at first, but the lane "
    "stayed.",
    "Homework should be limited.\n\nLong evenings of worksheets leave no time for sleep or play. My sister's "
    "school capped homework at one hour and her grades did not drop.\n\nTeachers can assign reading instead.",
]
PROMPTS = ["Should schools require uniforms?", "Should cities build bike lanes?", "Should homework be limited?"]


def rollouts():
    return [{"prompt": p} for p in PROMPTS], list(ESSAYS)


# -- the measure ----------------------------------------------------------------------------------

def test_pairwise_share_counts_ties_half_as_numpy_does():
    rng = np.random.default_rng(0)
    a, d = rng.integers(0, 4, 500).astype(float), rng.integers(0, 4, 500).astype(float)
    expected = np.mean((np.sign(a - d) + 1) / 2)  # 1 win, 0.5 tie, 0 loss
    assert pairwise_share(a, d) == pytest.approx(expected)
    assert pairwise_share([2.0, 1.0, 1.0], [1.0, 1.0, 3.0]) == pytest.approx(0.5)
    assert np.isnan(pairwise_share([], []))
    with pytest.raises(ValueError):
        pairwise_share([1.0], [1.0, 2.0])


def test_shares_by_kind_match_a_grouped_numpy_computation():
    rng = np.random.default_rng(1)
    kinds = rng.choice(["refusal", "truncated", "not_english"], 300)
    a, d = rng.normal(size=300).round(1), rng.normal(size=300).round(1)
    got = shares_by_kind(list(kinds), a, d)
    assert list(got) == [k for k in HACK_KINDS if k in set(kinds)]  # HACK_KINDS order
    for kind in set(kinds):
        mask = kinds == kind
        assert got[kind] == pytest.approx(np.mean((np.sign(a[mask] - d[mask]) + 1) / 2)), kind


@pytest.mark.parametrize("current, proposal, tolerance, floor, installed", [
    (0.70, 0.69, 0.02, 0.5, True),   # within the tolerance
    (0.70, 0.67, 0.02, 0.5, False),  # below it
    (0.40, 0.50, 0.02, 0.5, False),  # better than the current rubric but not above the floor
    (0.40, 0.51, 0.02, 0.5, True),
    (0.70, 0.70, 0.0, 0.0, True),
])
def test_the_decision_needs_the_current_share_minus_tolerance_and_the_floor(current, proposal, tolerance, floor,
                                                                          installed):
    assert decide(current, proposal, tolerance=tolerance, floor=floor)[0] is installed


def test_settings_are_validated_when_built():
    with pytest.raises(InvalidValueError, match="unknown canary kinds"):
        CanarySettings(kinds=("typo",))
    with pytest.raises(InvalidValueError, match="tolerance"):
        CanarySettings(tolerance=-0.1)
    assert CanarySettings().resolved_kinds == tuple(HACK_KINDS)


# -- the canary set -------------------------------------------------------------------------------

def test_the_canary_set_pairs_each_answer_with_each_kind_and_is_seeded():
    records, responses = rollouts()
    gate = CanaryGate(judge=None, task=ESSAY, settings=CanarySettings(num_samples=2), seed=7)
    first = gate.canary_set(records, responses, step=4)
    assert gate.canary_set(records, responses, step=4) == first  # a resumed run builds the same set
    assert len(first.answers) == 2 and set(first.answers) <= set(ESSAYS)
    assert {(p.answer, p.kind) for p in first.pairs} == {(a, k) for a in range(2) for k in HACK_KINDS}
    off = [p for p in first.pairs if p.kind == "off_topic"]
    assert [p.degraded for p in off] == [first.answers[1].strip(), first.answers[0].strip()]
    others = {CanaryGate(None, ESSAY, CanarySettings(num_samples=2), seed=7).canary_set(records, responses, s).rollouts
              for s in range(12)}
    assert len(others) > 1  # another step draws other answers


def test_degradations_equal_to_their_answer_and_blank_answers_are_left_out():
    one = build_canary_set(ESSAY, [{"prompt": "p"}, {"prompt": "q"}], ["Short.", "   "], kinds=list(HACK_KINDS),
                           num_samples=8, rng=np.random.default_rng(0))
    assert one.answers == ("Short.",)  # the blank one is not an answer
    assert one.skipped["off_topic"] == 1  # no second answer to borrow
    assert all(p.degraded.strip() != "Short." for p in one.pairs)
    assert one.skipped.get("truncated") == 1 and "truncated" not in {p.kind for p in one.pairs}


# -- the gate in a meta step ----------------------------------------------------------------------

class RubricJudge:
    """Scores by length in words; under a rubric that rewards brevity, by minus the length. So
    answers beat their short degradations under the first and lose to them under the second."""

    def __init__(self):
        self.rubric, self.installed, self.calls = None, [], 0

    def set_rubric(self, rubric):
        self.rubric = rubric
        self.installed.append(rubric)

    def fits(self, rubric):
        return True

    def score(self, records, responses):
        self.calls += 1
        sign = -1.0 if "Brevity" in "\n".join(self.rubric.items) else 1.0
        return np.array([sign * len(r.split()) for r in responses], np.float32)


BREVITY = ("### Brevity (0-5)\n- 5: the response makes its point in few, well-chosen words.\n"
           "- 2: the response repeats itself or pads its sentences.\n- 0: the response rambles off the topic.")


def essay_samples():
    return [MetaSample(record={"prompt": p}, response=e, score=1.0) for p, e in zip(PROMPTS, ESSAYS)]


def expected_shares(gate, samples, selected, step):
    """The shares computed here from word counts, for the set the gate builds."""
    canary = gate.canary_set([samples[i].record for i in selected], [samples[i].response for i in selected], step)
    a = np.array([len(canary.answers[p.answer].split()) for p in canary.pairs], float)
    d = np.array([len(p.degraded.split()) for p in canary.pairs], float)
    return np.mean((np.sign(a - d) + 1) / 2), np.mean((np.sign(d - a) + 1) / 2)


def test_a_well_formed_rubric_that_lowers_the_canary_share_is_kept_out_with_reason_canary(tmp_path):
    judge = RubricJudge()
    judge.set_rubric(RUBRIC)
    gate = CanaryGate(judge, ESSAY, CanarySettings(), seed=3)
    mrm = MetaRewardModel(ScriptedClient(items=[BREVITY], count=1), task="essay", num_samples=3)
    samples = essay_samples()
    result = mrm.meta_step(RUBRIC, samples, rng=0, step=6, fits=judge.fits, gate=gate)
    assert result.sense_check == [] and (result.accepted, result.reason_code) == (False, "canary")
    assert result.rubric is RUBRIC and judge.rubric == RUBRIC  # the judge is left on the current rubric
    current, proposal = expected_shares(gate, samples, result.selected, 6)
    assert current > 0.8 and proposal < 0.2  # the degradations are shorter than their essays
    report = result.canary
    assert report["ran"] and report["decision"] == "keep" and not report["passed"]
    assert report["current_share"] == pytest.approx(current) and report["proposal_share"] == pytest.approx(proposal)
    assert set(report["current_by_kind"]) == set(HACK_KINDS) == set(report["proposal_by_kind"])
    canary = gate.canary_set([samples[i].record for i in result.selected],
                             [samples[i].response for i in result.selected], 6)
    for kind in HACK_KINDS:  # per kind, from word counts
        a = np.array([len(canary.answers[p.answer].split()) for p in canary.pairs if p.kind == kind], float)
        d = np.array([len(p.degraded.split()) for p in canary.pairs if p.kind == kind], float)
        assert report["current_by_kind"][kind] == pytest.approx(np.mean((np.sign(a - d) + 1) / 2)), kind
        assert report["proposal_by_kind"][kind] == pytest.approx(np.mean((np.sign(d - a) + 1) / 2)), kind
    assert report["pairs"] == 3 * len(HACK_KINDS) and report["seconds"] >= 0 and "canary" in result.timing
    saved = json.loads(result.save(tmp_path, 6, samples).read_text())
    assert saved["reason_code"] == "canary" and saved["canary"]["proposal_share"] == pytest.approx(proposal)
    assert "proposal refused by the canary gate" in saved["reason"]


def test_a_proposal_that_keeps_the_share_is_installed_and_quality_findings_only_warn():
    judge = RubricJudge()
    judge.set_rubric(RUBRIC)
    gate = CanaryGate(judge, ESSAY, CanarySettings(), seed=3)
    # Two criteria that repeat each other: refused by the text checks without a gate, a warning with one.
    twin = FOCUS.replace("### Focus (0-5)", "### Focus again (0-5)")
    mrm = MetaRewardModel(ScriptedClient(items=[FOCUS, twin], count=2), task="essay", num_samples=3)
    without = mrm.meta_step(RUBRIC, essay_samples(), rng=0, step=6)
    assert without.reason_code == "sense_check" and [i.code for i in without.sense_check] == ["duplicate"]
    result = mrm.meta_step(RUBRIC, essay_samples(), rng=0, step=6, fits=judge.fits, gate=gate)
    assert result.accepted and result.reason_code == "accepted" and result.sense_check == []
    assert [i.code for i in result.sense_warnings] == ["duplicate"]
    assert result.canary["decision"] == "install"
    assert result.canary["proposal_share"] == pytest.approx(result.canary["current_share"])
    assert judge.rubric == RUBRIC  # installing is the caller's job


def test_the_gate_does_not_run_when_the_text_checks_refuse():
    judge = RubricJudge()
    judge.set_rubric(RUBRIC)
    demo = "### Evidence (0-10)\n- Evidence (0-10 points)\n- Evidence (1-10 points)\n- Evidence (11-10 points)"
    mrm = MetaRewardModel(ScriptedClient(items=[demo], count=1), task="essay", num_samples=3)
    result = mrm.meta_step(RUBRIC, essay_samples(), rng=0, step=2, gate=CanaryGate(judge, ESSAY))
    assert result.reason_code == "sense_check" and judge.calls == 0
    assert result.canary == {"enabled": True, "ran": False, "decision": "not_run",
                             "reason": "the proposal was refused before the gate (sense_check)"}
    assert {i.code for i in result.sense_check} >= {"no_guidance", "hollow_line", "level_out_of_scale"}


def test_a_proposal_the_judge_cannot_take_is_kept_out_and_the_current_rubric_stays():
    class Picky(RubricJudge):
        def set_rubric(self, rubric):
            if "Brevity" in rubric.render():
                from mpo_jax.rubric import RubricError

                raise RubricError("too long for this judge")
            super().set_rubric(rubric)

    judge = Picky()
    judge.set_rubric(RUBRIC)
    report = CanaryGate(judge, ESSAY).evaluate(RUBRIC, Rubric((BREVITY,)), *rollouts(), step=1)
    assert not report.passed and "cannot take the proposal" in report.reason and judge.rubric == RUBRIC


# -- the run report -------------------------------------------------------------------------------

def test_the_report_shows_each_meta_steps_decision_near_the_top_and_the_score_fraction(tmp_path):
    from mpo_jax.reward.rubric_history import RubricHistory
    from mpo_jax.train.metrics import MetricsWriter
    from mpo_jax.train.report import write_report
    from mpo_jax.train.report_data import SCORE_FRACTION, add_score_fractions, load_run

    wide = Rubric((BREVITY.replace("(0-5)", "(0-10)"),), task="essay")
    history = RubricHistory(RUBRIC, limits=ESSAY.rubric_limits)
    history.append(wide, reason="accepted", created_step=2)
    history.save(tmp_path)
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False, progress=False) as writer:
        for update, (score, iteration) in enumerate([(2.5, 0), (3.0, 0), (5.0, 1)], start=1):
            writer.write(update, {"score/mean": score, "score/std": 0.1, "rubric/iteration": float(iteration)})
    judge = RubricJudge()
    judge.set_rubric(RUBRIC)
    mrm = MetaRewardModel(ScriptedClient(items=[BREVITY], count=1), task="essay", num_samples=3)
    result = mrm.meta_step(RUBRIC, essay_samples(), rng=0, step=2, gate=CanaryGate(judge, ESSAY, seed=3))
    result.save(tmp_path, 2, essay_samples())
    report = (write_report(tmp_path) / "report.md").read_text()
    decisions, plots = report.index("## Meta step decisions"), report.index("## Plots")
    assert decisions < plots
    section = report[decisions:plots]
    assert f"keep: current {result.canary['current_share']:.2f}, proposal {result.canary['proposal_share']:.2f}" \
        in section and "| 2 | kept | canary |" in section
    for kind, share in result.canary["proposal_by_kind"].items():
        assert f"| 2 | {kind} | {result.canary['current_by_kind'][kind]:.2f} | {share:.2f} |" in section
    fractions = {r["update"]: r[SCORE_FRACTION] for r in add_score_fractions(load_run(tmp_path), []).metrics}
    assert fractions == {1: pytest.approx(0.5), 2: pytest.approx(0.6), 3: pytest.approx(0.5)}  # 5 of 0-10 is half
