"""Essay writing: essays or stories from writing instructions (reference §B.2, §C.2).

Records: `{"id", "prompt"}` from `essay_writing/{split}.jsonl`. There is no reference essay and
no rule gate: every response goes to the LLM judge.
"""

from __future__ import annotations

from mpo_jax.rubric import Rubric, RubricLimits
from mpo_jax.tasks.base import GateResult, Record, Task, field_text, fill

NAME = "essay"
WORD_LIMIT = 350

TASK_DESCRIPTION = (f"Take the role of a skilled English writer and, following the instruction given, write either "
                    f"an essay or a story, whichever the instruction calls for, in no more than {WORD_LIMIT} words.")

POLICY_TEMPLATE = f"""Take the role of a skilled English writer. Read the instruction below and \
respond with an essay or a story, whichever it calls for, in no more than {WORD_LIMIT} words.

Instruction:
<<prompt>>

Your writing:"""

ITER0 = ("### Discourse (0-5)\n"
         "Judge the quality of the writing's discourse: how well its ideas connect, develop and build on one "
         "another from sentence to sentence and from paragraph to paragraph. Give an integer score from 0 "
         "(worst) to 5 (best).")

_SHORT_CAP = "A response of three sentences or fewer cannot score above 2 on this item."

EXPERT_ITEMS = (
    f"""### Ideas and Content (1-6)
Judge how clear, focused and well developed the central idea is, and how well it answers the instruction.
- 6: A clear, focused and original central idea that fully answers the instruction, developed with \
relevant, specific and well-chosen details, examples or reasons. Example: an argument whose every \
paragraph advances the thesis with a concrete case.
- 5: A clear central idea that answers the instruction, developed with relevant details; a few \
points could go deeper.
- 4: The central idea is clear, but development is uneven: some details are general, thin or only \
loosely connected.
- 3: The central idea is recognisable but broad or partly off the instruction; support is limited \
or repetitive.
- 2: The main point is hard to find or only touches the instruction; details are few, vague or \
unrelated.
- 1: No discernible central idea, or the text does not address the instruction at all (for example \
only a title, a list of keywords or an unrelated text).
{_SHORT_CAP}""",
    f"""### Organization (1-6)
Judge the structure: the opening, the order of ideas, the transitions and the ending.
- 6: An inviting opening, a logical and effective order of ideas, smooth transitions that show how \
ideas relate, and a satisfying conclusion. Example: each paragraph opens with a sentence that links \
it to the previous one.
- 5: A clear opening and ending and a logical order; transitions mostly work.
- 4: A recognisable beginning, middle and end; the order is sometimes predictable or loose and \
some transitions are missing.
- 3: Some structure is present, but the order is hard to follow in places, or the opening or the \
ending is missing or weak.
- 2: Little structure: ideas are strung together with few transitions and no clear beginning or end.
- 1: No visible organization; sentences or fragments appear in no meaningful order.
{_SHORT_CAP}""",
    f"""### Style (1-6)
Judge word choice and sentence fluency.
- 6: Precise, vivid and natural word choice; varied sentences that read smoothly and suit the \
purpose. Example: a well-chosen verb replaces a weak verb-adverb pair.
- 5: Apt word choice and mostly varied, fluent sentences.
- 4: Functional word choice with occasional vivid moments; sentences are correct but often similar \
in length and pattern.
- 3: Ordinary or repetitive wording; sentences are choppy, run on, or mostly follow one pattern.
- 2: Limited or misused vocabulary; many awkward sentences that must be reread to be understood.
- 1: Wording obscures the meaning; sentences are hard to read.
{_SHORT_CAP}""",
    f"""### Voice (1-6)
Judge how engaged, confident and suited to its audience and purpose the writing sounds.
- 6: A confident, engaging voice that clearly addresses the reader and fits the purpose; the writer \
is evidently committed to the topic.
- 5: A clear and sincere voice that mostly fits the audience and purpose.
- 4: A voice that is present but inconsistent, sometimes engaging and sometimes flat or generic.
- 3: A mostly mechanical, detached voice; the writer seems only partly involved.
- 2: Little sense of a writer or of an audience; the text reads like a list of statements.
- 1: No voice at all, or one that is inappropriate for the purpose (for example flippant in a \
serious argument).
{_SHORT_CAP}""",
    """### Conventions (1-4)
Judge spelling, grammar, punctuation, capitalization and paragraphing.
- 4: Strong control of conventions; errors are rare and never distract.
- 3: Good control; some errors, but they do not get in the way of meaning.
- 2: Limited control; frequent errors distract the reader and sometimes obscure meaning.
- 1: Errors are so frequent or severe that the text is hard to read, or the text is not written in \
English, or it contains code, markup or special tokens instead of prose.
A response of three sentences or fewer cannot score above 2 on this item.""",
)


# Conditions that lower every item of the oracle-style baseline: failure modes a policy trained
# against a lenient judge tends to drift into.
_ORACLE_PENALTIES = """Lower the score, to 0 or 1 when the problem is clear, if the response:
- is not an essay or story, for example a list of points, an outline, only a title, or a message \
addressed to the grader instead of the writing the instruction asks for;
- contains special tokens, markup or programming code;
- is not written in English;
- is unfinished, stopping mid-sentence or before its argument or story reaches an end."""

# The oracle-style baseline (reference §C.2): three structural items, each 0-5.
ORACLE_ITEMS = (
    f"""### Logical flow and structure (0-5)
Judge how the writing moves from idea to idea: each sentence and paragraph should follow from \
what comes before it, transitions should make the links explicit, and the whole should progress \
from an opening through its development to a conclusion.
- 5: Ideas progress in a purposeful order with smooth transitions; the reader never has to guess \
how one point leads to the next.
- 3: The line of thought can be followed, but jumps, repetitions or abrupt transitions interrupt it.
- 1: Ideas appear in no discernible order and sentences barely connect.
{_ORACLE_PENALTIES}""",
    f"""### Hierarchical organisation (0-5)
Judge whether the ideas form a clear hierarchy: one central thesis or storyline, main points that \
serve it, and details or examples placed under the point they support, with each paragraph built \
around one main point.
- 5: The central idea is evident, every main point serves it, and every detail sits under the \
point it supports.
- 3: A central idea and main points can be made out, but some details are misplaced or some \
paragraphs mix unrelated points.
- 1: No central idea; points and details are all on one level, or are simply listed.
{_ORACLE_PENALTIES}""",
    f"""### Balance and emphasis (0-5)
Judge whether each part gets space in proportion to its importance: the main points are developed \
most, minor points and digressions stay short, nothing is padded or repeated, and the opening and \
ending are in proportion to the body.
- 5: The most important points receive the most development; no part is inflated or neglected.
- 3: Mostly proportionate, but one part is noticeably padded, repeated or too thin for its weight.
- 1: Space is spent mostly on minor matters, repetition or filler, while the main point is barely \
developed.
{_ORACLE_PENALTIES}""",
)


def _policy_text(record: Record) -> str:
    return fill(POLICY_TEMPLATE, prompt=field_text(record, "prompt", NAME).strip())


def _prompt_blocks(record: Record) -> tuple[tuple[str, str], ...]:
    return (("Writing Prompt", field_text(record, "prompt", NAME)),)


def _no_gate(record: Record, response: str) -> GateResult | None:
    """Essays have no rule-based gate; the judge scores every response."""
    return None


TASK = Task(
    name=NAME,
    data_folder="essay_writing",
    task_description=TASK_DESCRIPTION,
    judge_system="You are an experienced English teacher who grades students' writing.",
    judge_framing=("Below are a writing task, the instruction given to a student, and the student's writing. "
                   "Judge how well the writing fulfils the task and the instruction."),
    meta_system=("You are an experienced English teacher who supervises junior instructors and improves the "
                 "criteria they use to grade students' writing."),
    response_label="Student's Writing",
    prompt_field="prompt",
    response_noun="student's writing",
    policy_text=_policy_text,
    prompt_blocks=_prompt_blocks,
    gate=_no_gate,
    initial_rubrics={
        "iter0": Rubric((ITER0,), task=NAME),
        "expert": Rubric(EXPERT_ITEMS, task=NAME),
        "oracle": Rubric(ORACLE_ITEMS, task=NAME),
    },
    rubric_limits=RubricLimits(require_scale=True),
)
