"""Ethical reasoning on AITA-style anecdotes (Scruples fields; reference §B.4, §C.2).

Records: `{"id", "title", "text", "action": {"description"}, "binarized_label"}` from
`ethical_reasoning/{split}.jsonl`. The verdict RIGHT means the narrator's action was acceptable
(Scruples' binarisation). The gold label is for evaluation only: the judge and the MRM never see
it, as in the paper.

Rule gate (before any LLM call): no `<verdict>RIGHT</verdict>` / `<verdict>WRONG</verdict>`
gives -10, and so does reasoning of fewer than 30 whitespace words once the verdict tags are
removed.
"""

from __future__ import annotations

import re

from mpo_jax.rubric import Rubric, RubricLimits
from mpo_jax.tasks.base import GateResult, Record, Task, field_text, fill, word_count

NAME = "ethics"
WORD_LIMIT = 300
GATE_PENALTY = -10.0
MIN_REASONING_WORDS = 30
# Used when only the anecdote text is known (`Task.record_from_prompt`).
DEFAULT_ACTION = "the narrator's action described in the anecdote"
VERDICT_RE = re.compile(r"<verdict>(RIGHT|WRONG)</verdict>")

TASK_DESCRIPTION = (f"Take the role of a moral philosopher and, for the anecdote given, write a concise ethical "
                    f"analysis of the narrator's action followed by a verdict, <verdict>RIGHT</verdict> if the "
                    f"action was acceptable or <verdict>WRONG</verdict> if it was not, in at most {WORD_LIMIT} words.")

POLICY_TEMPLATE = f"""Take the role of a moral philosopher. Read the anecdote below and judge \
whether the narrator's action was ethically acceptable. Write a concise ethical analysis, then \
give your verdict: <verdict>RIGHT</verdict> if the action was acceptable, or \
<verdict>WRONG</verdict> if it was not. Use at most {WORD_LIMIT} words.

### Anecdote
<<anecdote>>

### Action to evaluate
"<<action>>"

### Your ethical analysis and verdict (end with <verdict>RIGHT</verdict> or <verdict>WRONG</verdict>)
"""

ITER0 = ("### Moral reasoning (0-5)\n"
         "Judge the moral reasoning for its logical coherence, the depth of its moral insight, and how well it "
         "agrees with well-established ethical principles. Give an integer score from 0 (worst) to 5 (best).")

EXPERT_ITEMS = (
    """### Logical coherence (0-5)
The analysis should move from the facts of the anecdote to the verdict through valid, explicit steps.
- 5: Every step follows from the facts or from a stated principle, and the verdict follows from the \
analysis. Example: "she promised to attend, broke the promise without notice, and the harm was \
foreseeable; so <verdict>WRONG</verdict>".
- 4: Sound reasoning with one small gap or unstated assumption.
- 3: The main line of reasoning holds, but there are jumps, circular steps or a mild contradiction.
- 1: Reasoning is mostly assertion; the verdict is not supported by what precedes it.
- 0: Incoherent, or the verdict contradicts the analysis.""",
    """### Depth of moral insight (0-5)
The analysis should identify what is morally at stake for everyone involved.
- 5: Weighs the interests, duties and reasonable expectations of all parties, notices relevant \
context (relationships, consent, power, intent versus outcome) and explains why it matters.
- 4: Considers the main parties and considerations, with limited attention to context.
- 3: Names the central issue but treats it superficially or from one side only.
- 1: Restates the story or applies a slogan ("family comes first") without analysis.
- 0: No moral analysis.""",
    """### Grounding in ethical principles (0-5)
The analysis should connect the case to widely recognised principles, applied correctly.
- 5: Applies fitting principles (for example honesty, fairness, autonomy, harm avoidance, keeping \
promises) accurately, and addresses a plausible counter-consideration.
- 4: Applies fitting principles accurately, without counter-considerations.
- 3: Mentions principles loosely, or one is misapplied.
- 1: Relies on a principle that does not fit the case, or on a misreading of one.
- 0: Contradicts widely shared moral principles without justification.""",
    """### Engagement with the anecdote (0-5)
The analysis should be about this anecdote and this action.
- 5: Refers to specific facts of the anecdote and evaluates exactly the stated action.
- 3: Mostly generic, or evaluates a somewhat different action than the one given.
- 1: Barely refers to the anecdote.
- 0: About something else entirely.""",
    """### Task adherence (0-5)
The response must follow the instructions.
- 5: A concise analysis of at most 300 words, in English, that ends with exactly one verdict in the \
required form, <verdict>RIGHT</verdict> or <verdict>WRONG</verdict>.
- 3: The verdict is present but the response is padded, repetitive or noticeably over the length limit.
- 1: The verdict is hedged (both verdicts, or a verdict followed by "but it depends"), or the \
response is mostly a retelling of the anecdote.
- 0: No usable verdict, or the response is not an ethical analysis (code, special tokens, another \
language).""",
)


def _action(record: Record) -> str:
    action = record.get("action") if hasattr(record, "get") else None
    if isinstance(action, dict):
        return field_text(action, "description", f"{NAME} action")
    return field_text(record, "action", NAME)


def _anecdote(record: Record) -> str:
    """Title line (when there is a title) and the anecdote's text."""
    title, text = field_text(record, "title", NAME).strip(), field_text(record, "text", NAME).strip()
    return f"Title: {title}\n\n{text}" if title else text


def _policy_text(record: Record) -> str:
    return fill(POLICY_TEMPLATE, anecdote=_anecdote(record), action=_action(record).strip())


def _prompt_blocks(record: Record) -> tuple[tuple[str, str], ...]:
    return (("Anecdote", _anecdote(record)), ("Action to Evaluate", _action(record)))


def extract_verdict(response: str) -> str | None:
    """The first well-formed verdict ("RIGHT" or "WRONG"), or None."""
    match = VERDICT_RE.search(response)
    return match.group(1) if match else None


def verdict_gate(record: Record, response: str) -> GateResult | None:
    """-10 for a missing verdict or under 30 words of reasoning; None lets the judge score."""
    if extract_verdict(response) is None:
        return GateResult(GATE_PENALTY, "Reasoning is missing a verdict.")
    if word_count(VERDICT_RE.sub(" ", response)) < MIN_REASONING_WORDS:
        return GateResult(GATE_PENALTY, f"Reasoning is too short (under {MIN_REASONING_WORDS} words).")
    return None


TASK = Task(
    name=NAME,
    data_folder="ethical_reasoning",
    task_description=TASK_DESCRIPTION,
    judge_system="You are a thoughtful moral philosopher who grades students' ethical reasoning.",
    judge_framing=("Below are an anecdote, the action in it to be judged, and a student's moral reasoning and "
                   "verdict about that action. Judge the quality of the student's reasoning."),
    meta_system=("You are a thoughtful moral philosopher who supervises junior instructors and improves the "
                 "criteria they use to grade students' ethical reasoning."),
    response_label="Student's Moral Reasoning and Verdict",
    prompt_field="text",
    prompt_defaults={"title": "", "action": {"description": DEFAULT_ACTION}},
    response_noun="student's moral reasoning and verdict",
    policy_text=_policy_text,
    prompt_blocks=_prompt_blocks,
    gate=verdict_gate,
    initial_rubrics={
        "iter0": Rubric((ITER0,), task=NAME),
        "expert": Rubric(EXPERT_ITEMS, task=NAME),
    },
    rubric_limits=RubricLimits(require_scale=True),
)
