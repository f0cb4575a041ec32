"""The four MPO tasks: prompts for policy, judge and meta-reward model, initial rubrics, rule gates.

`get_task(name)` returns a `Task`; names are "essay", "summarization", "ethics" and "math"
(MPO's own names, such as "essay_writing", are accepted as aliases). `load_records` reads a
task's JSONL split from the project's data folder.
"""

from __future__ import annotations

from types import MappingProxyType

from mpo_jax.errors import InvalidValueError
from mpo_jax.tasks import essay, ethics, math_reasoning, summarization
from mpo_jax.tasks.base import GateResult, Messages, Record, Task, join_criteria_sets
from mpo_jax.tasks.data import default_data_dir, load_records
from mpo_jax.tasks.math_reasoning import MathTask

__all__ = [
    "ALIASES", "TASKS", "GateResult", "MathTask", "Messages", "Record", "Task", "default_data_dir", "get_task",
    "join_criteria_sets", "load_records", "task_names",
]

TASKS: MappingProxyType[str, Task] = MappingProxyType({
    task.name: task for task in (essay.TASK, summarization.TASK, ethics.TASK, math_reasoning.TASK)
})
ALIASES = MappingProxyType({
    "essay_writing": "essay", "ethical_reasoning": "ethics", "math_reasoning": "math",
})


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str) -> Task:
    """The task called `name` (or one of its MPO aliases); ValueError lists the valid names."""
    key = ALIASES.get(name, name) if isinstance(name, str) else name
    try:
        return TASKS[key]
    except (KeyError, TypeError):
        raise InvalidValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
