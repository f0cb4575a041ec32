"""Mathematical reasoning on MATH problems (reference §A.3, §B.5, §C.2).

Records: `{"id", "subject", "problem", "solution", "answer", ...}` from `math/{split}.jsonl`.

Scoring differs from the other tasks:
- `rule_score` is the verifiable answer check (MPO's mode 1): fewer than 30 words of
  rationale -> 0; otherwise the first `\\boxed{…}` of the response is compared with the gold
  answer by Hendrycks `is_equiv` -> 5 or 0.
- The LLM mode (plan -> execute -> score, 0-5) uses `judge_plan_request`,
  `judge_execute_request` and `judge_score_request`, after the same 30-word `rationale_gate`.
  The paper tosses a fair coin per judge call between the two modes: `MathTask.score_own`, the
  task's own judge program, draws it from the judge's random state.
- The "rubric" is a single free-text guideline document per subject (`rubric_groups`), stored
  as a one-item `Rubric`; the MRM analyses groups of evaluation cases and rewrites the guidelines
  (`meta_cases_analysis`, `meta_guidelines_request`), with no merge step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from mpo_jax.errors import InvalidValueError
from mpo_jax.rubric import Rubric, RubricLimits
from mpo_jax.tasks.base import (
    END_OF_EVALUATION,
    GateResult,
    JudgeResult,
    JudgeTools,
    Record,
    Task,
    block,
    field_text,
    fill,
    format_score,
    word_count,
)
from mpo_jax.tasks.math_answer import first_boxed_content, is_equiv

NAME = "math"
CORRECT_SCORE = 5.0
MIN_RATIONALE_WORDS = 30
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
# One guideline document of up to ~1000 words per group, so one long item instead of many short ones.
GUIDELINE_LIMITS = RubricLimits(max_items=1, max_item_chars=12000, max_total_chars=12000)

TASK_DESCRIPTION = ("Take the role of a mathematician and solve the problem with clear, step-by-step reasoning "
                    "written in LaTeX, giving the final answer inside \\boxed{ }.")

POLICY_TEMPLATE = """Take the role of a mathematician. Solve the problem below, showing clear \
step-by-step reasoning written in LaTeX. Put the final answer inside \\boxed{ }, for example \
\\boxed{\\frac{2}{3}} or \\boxed{3 \\text{ cm}}.

Problem:
<<problem>>

Your solution, with the final answer inside \\boxed{ }:"""

ITER0 = "Evaluate the correctness of the student response."

JUDGE_PLAN = """Below are a math problem, its reference solution, and the meta-level guidelines \
for grading solutions to problems of this kind.

<<material>>

Before seeing any student's work, write a plan for evaluating a student's solution to this \
problem, tailored to the problem and following the guidelines. The plan may include your own \
step-by-step solution to check against. End the plan with <EOE>."""

JUDGE_EXECUTE = """<<plan_block>>

Now carry out the plan above, step by step, on the student's solution below. Apply the plan \
rather than restating it, ignore how long or short the solution is, and stay objective. End \
with <EOE>.

<<response_block>>"""

JUDGE_SCORE = """<<evaluation_block>>

Based on this evaluation, give the student's solution a final score: a single integer from 0 \
(completely wrong) to 5 (fully correct and well justified), and nothing else."""

META_CASES = """A junior instructor graded students' solutions to math problems of one kind, \
following the meta-level guidelines below. Each evaluation case shows the problem, the \
student's solution, the reference solution, and the junior instructor's feedback and score.

<<cases>>

<<guidelines_block>>

As the senior instructor, review these evaluations. Identify inconsistencies and errors across \
the cases: scores that are too generous or too harsh, mistakes the feedback missed, correct \
work it penalised, and places where the guidelines misled the junior instructor or said \
nothing. Suggest additional diagnostic checks the guidelines should require, each with a \
problem-specific example. Keep the analysis under <<max_words>> words and end it with <EOE>."""

META_GUIDELINES = """<<analysis_block>>

Based on this analysis, write the next version of the meta-level guidelines for the junior \
instructor: keep what works, fix what the analysis found, and add the diagnostic checks it \
suggested. Write only the guidelines, under <<max_words>> words, and end with <EOE>."""

NO_CASES = "(No evaluation cases were collected for this group in this interval.)"


def gold_answer(record: Record, *, rule: str = "first") -> str | None:
    """The gold answer: by default the first `\\boxed{…}` of the reference solution, else `answer`.

    "first" is MPO's loader rule (used for its training reward and its accuracy numbers); the
    data's own `answer` field is the *last* box ("answer" selects it). They differ on 6 of the
    2,500 local records, all solutions with several boxes.
    """
    if rule not in ("first", "answer"):
        raise InvalidValueError(f"unknown gold-answer rule {rule!r}; choose 'first' or 'answer'")
    solution = record.get("solution")
    if rule == "first" and isinstance(solution, str):
        boxed = first_boxed_content(solution)
        if boxed is not None:
            return boxed
    answer = record.get("answer")
    return answer if isinstance(answer, str) else None


def rationale_words(response: str) -> int:
    """Words of the response outside its first `\\boxed{…}` (the answer does not count as reasoning)."""
    answer = first_boxed_content(response)
    if answer is None:
        return word_count(response)
    return word_count(response.replace("\\boxed{" + answer + "}", " ", 1))


def rationale_gate(record: Record, response: str) -> GateResult | None:
    """0 for fewer than 30 words of rationale (both scoring modes); None otherwise."""
    if rationale_words(response) < MIN_RATIONALE_WORDS:
        return GateResult(0.0, f"The solution's reasoning is too short (under {MIN_RATIONALE_WORDS} words).")
    return None


def answer_check(record: Record, response: str) -> GateResult:
    """MPO's verifiable reward: 5 when the first boxed answer matches the gold answer, else 0."""
    gated = rationale_gate(record, response)
    if gated is not None:
        return gated
    gold = gold_answer(record)
    if gold is None:
        raise InvalidValueError(f"math record {record.get('id', '?')!r} has no gold answer (no boxed solution or "
                                "'answer')")
    student = first_boxed_content(response)
    if student is None or not student.strip():
        return GateResult(0.0, "The solution has no final answer inside \\boxed{ }.")
    if is_equiv(gold.strip(), student.strip()):
        return GateResult(CORRECT_SCORE, "The final answer matches the reference answer.")
    return GateResult(0.0, "The final answer does not match the reference answer.")


def subject_id(record: Record) -> int:
    """The MATH subject index (algebra 0 … precalculus 6), from `subject` or the `id` prefix."""
    subject = record.get("subject") or str(record.get("id", "")).split("/", 1)[0]
    if subject not in MATH_SUBJECTS:
        raise InvalidValueError(f"unknown MATH subject {subject!r}; expected one of {MATH_SUBJECTS}")
    return MATH_SUBJECTS.index(subject)


def _policy_text(record: Record) -> str:
    return fill(POLICY_TEMPLATE, problem=field_text(record, "problem", NAME).strip())


def _prompt_blocks(record: Record) -> tuple[tuple[str, str], ...]:
    return (("Problem", field_text(record, "problem", NAME)),)


class MathTask(Task):
    """`Task` plus MATH's own judge program (answer check or plan-then-execute), one guideline
    per subject, and the guideline-refining MRM turns."""

    own_judge: ClassVar[bool] = True

    def rubric_group(self, record: Record) -> int | None:
        """The record's subject index; None (the run's guideline) for a record of no known subject."""
        try:
            return subject_id(record)
        except ValueError:
            return None

    def score_own(self, records: Sequence[Record], responses: Sequence[str], tools: JudgeTools) -> list[JudgeResult]:
        """Per sample a coin (`tools.llm_probability`): the answer check (5/0) or the LLM judge (0-5).

        The 30-word rationale gate scores 0 either way; every sample draws its coin, so the
        random state advances by one draw per sample whatever the outcome.
        """
        results: list[JudgeResult | None] = [None] * len(records)
        use_llm = tools.rng.random(len(records)) < tools.llm_probability
        llm_rows = []
        for i, (record, response) in enumerate(zip(records, responses, strict=True)):
            gate = rationale_gate(record, response)
            if gate is None and use_llm[i]:
                llm_rows.append(i)
                continue
            verdict = gate or answer_check(record, response)
            results[i] = JudgeResult(score=verdict.score, item_scores=[verdict.score], rationales=[verdict.reason],
                                     parse_failures=0, rule="rationale gate" if gate else "answer check")
        if llm_rows:
            scored = self._plan_execute([records[i] for i in llm_rows], [responses[i] for i in llm_rows], tools)
            for i, result in zip(llm_rows, scored, strict=True):
                results[i] = result
        return results

    def _plan_execute(self, records: Sequence[Record], responses: Sequence[str], tools: JudgeTools
                      ) -> list[JudgeResult]:
        """The LLM judge: write an evaluation plan from the guideline, execute it on the solution, score 0-5."""
        session = tools.open_session([[{"role": "system", "content": self.judge_system}] for _ in records])
        stop = (END_OF_EVALUATION,)
        plans = session.say([[{"role": "user", "content": self.judge_plan_request(r, _guideline_text(tools, r))}]
                             for r in records], max_tokens=tools.generation_tokens, stop=stop,
                            temperature=tools.temperature)
        evaluations = session.say([[{"role": "user", "content": self.judge_execute_request(p, resp)}]
                                   for p, resp in zip(plans, responses, strict=True)],
                                  max_tokens=tools.generation_tokens, stop=stop, temperature=tools.temperature)
        scores = session.say_integer([[{"role": "user", "content": self.judge_score_request(e)}]
                                      for e in evaluations], max_digits=1)
        return [JudgeResult(score=float(min(s, 5) if s is not None else 0), item_scores=[float(min(s or 0, 5))],
                            rationales=[f"{p.strip()}\n\n{e.strip()}"], parse_failures=int(s is None), rule=None)
                for p, e, s in zip(plans, evaluations, scores, strict=True)]

    def judge_plan_request(self, record: Record, guidelines: str) -> str:
        material = "\n\n".join([block("Problem", field_text(record, "problem", NAME)),
                                block("Reference Solution", field_text(record, "solution", NAME)),
                                block("Meta-Level Guidelines", guidelines)])
        return fill(JUDGE_PLAN, material=material)

    def judge_execute_request(self, plan: str, response: str) -> str:
        return fill(JUDGE_EXECUTE, plan_block=block("Evaluation Plan", plan),
                    response_block=block("Student's Solution", response))

    def judge_score_request(self, evaluation: str) -> str:
        """Asks for one integer 0-5 (constrain decoding to `[0-5]`)."""
        return fill(JUDGE_SCORE, evaluation_block=block("Evaluation", evaluation))

    def meta_cases_analysis(self, cases: Sequence[Mapping[str, Any]], guidelines: str, max_words: int) -> str:
        """Analysis over one group's cases; each case has problem, response, reference, feedback, score."""
        rendered = "\n\n".join(_case_block(index, case) for index, case in enumerate(cases, start=1))
        return fill(META_CASES, cases=rendered or NO_CASES,
                    guidelines_block=block("Meta-Level Guidelines", guidelines), max_words=str(max_words))

    def meta_guidelines_request(self, analysis: str, max_words: int) -> str:
        return fill(META_GUIDELINES, analysis_block=block("Meta-Level Analysis", analysis), max_words=str(max_words))


def _guideline_text(tools: JudgeTools, record: Record) -> str:
    """The guideline the plan follows: the record's subject's, else the installed one ("" if none)."""
    rubric = tools.rubric_for(record)
    return "\n\n".join(rubric.items) if rubric is not None else ""


def _case_block(index: int, case: Mapping[str, Any]) -> str:
    missing = [key for key in ("problem", "response", "reference", "feedback", "score") if key not in case]
    if missing:
        raise ValueError(f"evaluation case #{index} lacks {missing}")
    inner = "\n\n".join([block("Problem", str(case["problem"])), block("Student's Solution", str(case["response"])),
                         block("Reference Solution", str(case["reference"])),
                         block("Junior Instructor's Feedback", str(case["feedback"])),
                         block("Junior Instructor's Score", format_score(case["score"]))])
    return f"[Start of Evaluation Case #{index}]\n{inner}\n[End of Evaluation Case #{index}]"


TASK = MathTask(
    name=NAME,
    data_folder="math",
    task_description=TASK_DESCRIPTION,
    judge_system="You are a skilled mathematician who grades students' solutions.",
    judge_framing="Below are a math problem and a student's solution. Judge the correctness of the solution.",
    meta_system=("You are a skilled mathematician who supervises junior instructors and improves the guidelines "
                 "they follow to grade students' solutions."),
    response_label="Student's Solution",
    prompt_field="problem",
    response_noun="student's solution",
    policy_text=_policy_text,
    prompt_blocks=_prompt_blocks,
    gate=answer_check,
    initial_rubrics={"iter0": Rubric((ITER0,), task=NAME)},
    rubric_limits=GUIDELINE_LIMITS,
    rubric_groups=MATH_SUBJECTS,
)
