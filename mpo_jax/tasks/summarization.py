"""Summarization of US Congressional bills (BillSum; reference §B.3, §C.2).

Records: `{"id", "title", "clean_text", "clean_summary", ...}` from `summarization/{split}.jsonl`.
The bill is `clean_text` (falling back to the raw `text`). The reference summary is for
evaluation only: as in the paper, neither the judge nor the MRM sees it during training.
"""

from __future__ import annotations

from mpo_jax.rubric import Rubric, RubricLimits
from mpo_jax.tasks.base import GateResult, Record, Task, block, field_text, fill

NAME = "summarization"
WORD_LIMIT = 400

TASK_DESCRIPTION = (f"Take the role of an experienced government official and write a concise summary of a US "
                    f"bill that stays faithful to the bill's text, in fewer than {WORD_LIMIT} words.")

POLICY_TEMPLATE = f"""Take the role of an experienced government official. Write a concise summary \
of the bill below that stays faithful to what the bill says. Use fewer than {WORD_LIMIT} words.

<<bill_block>>

Your summary:"""

ITER0 = ("### Faithfulness and conciseness (0-5)\n"
         "Judge how faithful the summary is to the bill (no invented or distorted provisions) and how concise "
         "it is. Give an integer score from 0 (worst) to 5 (best).")

EXPERT_ITEMS = (
    """### Faithfulness to the bill (0-10)
Every statement in the summary must be supported by the bill's text.
- 10: Every statement is accurate; amounts, dates, agencies, thresholds and conditions match the \
bill exactly. Example: "raises the credit to 30 percent for property placed in service before 2021" \
when the bill says exactly that.
- 7: Accurate overall, with one minor imprecision (a rounded figure, a slightly loose paraphrase) \
that does not change the meaning.
- 4: One material error, such as a wrong amount, date or responsible agency, or a condition presented \
as unconditional.
- 1: Several material errors, or a provision that the bill does not contain.
- 0: The summary mostly describes things the bill does not say, or contradicts it.""",
    """### Coverage of the main provisions (0-10)
The summary should state the bill's purpose and each of its main operative provisions.
- 10: States the purpose and every main provision (what changes, for whom, by whom, from when), \
including effective dates and sunset clauses when the bill has them.
- 7: States the purpose and most main provisions; one secondary provision is missing.
- 4: States the purpose but leaves out one or more main provisions.
- 1: Mentions only the title or one provision.
- 0: Does not say what the bill does.""",
    """### Conciseness (0-5)
The summary should be short, with no filler, repetition or verbatim copying of long passages.
- 5: Every sentence carries new information; well under 400 words; paraphrases instead of copying.
- 4: Mostly tight, with a little repetition or an unneeded detail.
- 3: Noticeably padded, or copies several sentences of the bill verbatim.
- 1: Largely repetitive or copied, or close to the length of the bill section it covers.
- 0: Longer than 400 words, or mostly filler.""",
    """### Clarity and precision (0-5)
A reader without legal training should understand what the bill does.
- 5: Plain, precise sentences; legal cross-references are explained ("the residential energy \
credit" rather than "section 25D(a)(6)"); correct grammar.
- 4: Clear, with an occasional unexplained reference or awkward sentence.
- 3: Understandable only with effort; vague wording such as "makes changes to the law".
- 1: Confusing, badly ordered or ungrammatical.
- 0: Unreadable.""",
    """### Task adherence (0-5)
The response must be a summary of this bill and nothing else.
- 5: A prose summary of this bill, written in English, with no commentary, opinions, questions, \
meta-remarks ("Here is a summary") or formatting artefacts.
- 3: A summary with some extraneous content, such as an opinion about the bill or a closing remark.
- 1: Mostly something other than a summary (an outline of headings, a copy of the title, an essay \
about the topic).
- 0: Empty, unrelated to the bill, not in English, or containing code or special tokens.""",
)


def _bill_text(record: Record) -> str:
    key = "clean_text" if "clean_text" in record else "text"
    return field_text(record, key, NAME)


def _policy_text(record: Record) -> str:
    return fill(POLICY_TEMPLATE, bill_block=block("Bill", _bill_text(record)))


def _prompt_blocks(record: Record) -> tuple[tuple[str, str], ...]:
    return (("Bill", _bill_text(record)),)


def _no_gate(record: Record, response: str) -> GateResult | None:
    """Summaries have no rule-based gate; the judge scores every response."""
    return None


TASK = Task(
    name=NAME,
    data_folder="summarization",
    task_description=TASK_DESCRIPTION,
    judge_system="You are an experienced government official who reviews summaries of legislation.",
    judge_framing=("Below are a US bill and a summary of it written by a student. Judge the quality of the summary "
                   "as a summary of this bill."),
    meta_system=("You are an experienced government official who supervises junior reviewers and improves the "
                 "criteria they use to grade summaries of legislation."),
    response_label="Student's Summary",
    prompt_field="clean_text",
    response_noun="student's summary",
    policy_text=_policy_text,
    prompt_blocks=_prompt_blocks,
    gate=_no_gate,
    initial_rubrics={
        "iter0": Rubric((ITER0,), task=NAME),
        "expert": Rubric(EXPERT_ITEMS, task=NAME),
    },
    rubric_limits=RubricLimits(require_scale=True),
)
