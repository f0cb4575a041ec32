"""In-training evaluation: the policy on a fixed held-out prompt set, every `eval.every` updates.

The training score alone cannot show reward hacking: a policy that games its judge raises it. So
each evaluation generates on the same test prompts with the same seed and measures what training
never optimises:

- response length and code-computed hack detectors (`mpo_jax.reward.hacks`): too short or
  title-only, repeated n-grams, refusals, off-prompt, not English, copying the input, text
  addressed to the grader, code or special tokens;
- the training judge's score with the rubric in force (what the policy is optimising);
- an independent judge: another model and/or another fixed rubric, which training never sees;
- for summarization, ROUGE against the reference summaries.

Every sample is appended to `eval_samples.jsonl` so that the examples behind the numbers can be read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpo_jax.engine.language_model import LanguageModel
from mpo_jax.engine.sampling import SamplingParams
from mpo_jax.errors import InvalidValueError
from mpo_jax.fileio import truncate_jsonl_after
from mpo_jax.reward import hacks

EVAL_SAMPLES_FILE = "eval_samples.jsonl"
# Tasks with reference answers: ROUGE for summaries, verdict or answer accuracy for ethics and MATH.
REFERENCE_METRIC_TASKS = ("summarization", "ethics", "math")


def held_out_records(records: Sequence[Mapping[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` records drawn without replacement by `seed`, in a fixed order (all when fewer)."""
    order = np.random.default_rng(seed).permutation(len(records))[:count]
    return [dict(records[int(i)]) for i in order]


def source_text(record: Mapping[str, Any]) -> str | None:
    """The input document a response may copy from (a bill for summarization), if the task has one."""
    for key in ("clean_text", "text", "anecdote"):
        value = record.get(key)
        if isinstance(value, str) and value:
            return value
    return None


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict[str, Any]]


class TrainingEvaluator:
    """Generates on the held-out prompts and scores the responses (see the module docstring)."""

    def __init__(self, policy: LanguageModel, task: Any, records: Sequence[Mapping[str, Any]], *,
                 judge: Any, independent_judge: Any | None, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, seed: int = 0):
        if not records:
            raise InvalidValueError("in-training evaluation needs at least one held-out record (eval.num_prompts >= 1)")
        self.policy, self.task = policy, task
        self.records = [dict(r) for r in records]
        self.prompt_ids = [policy.encode_prompt(task.policy_prompt(r)) for r in self.records]
        self.judge, self.independent_judge = judge, independent_judge
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def generate(self) -> tuple[list[str], np.ndarray]:
        out = self.policy.sampler.generate(self.prompt_ids, self.params)
        lengths = np.asarray(out.mask, bool).sum(axis=1)
        return list(out.texts), lengths

    def evaluate(self, update: int) -> EvalResult:
        texts, lengths = self.generate()
        prompts = [self.task.prompt_text(r) for r in self.records]
        detections = [hacks.detect_all(p, t, source=source_text(r))
                      for p, t, r in zip(prompts, texts, self.records, strict=True)]
        metrics: dict[str, float] = {"eval/length_mean": float(np.mean(lengths)),
                                     "eval/words_mean": float(np.mean([len(t.split()) for t in texts]))}
        for name, rate in hacks.rates(detections).items():
            metrics[f"eval/hack/{name}"] = float(rate)
        metrics["eval/hack/any"] = float(np.mean([any(d.values()) for d in detections]))
        judge_scores = np.asarray(self.judge.score(self.records, texts), np.float64)
        metrics["eval/judge_score"] = float(judge_scores.mean())
        independent = None
        if self.independent_judge is not None:
            independent = np.asarray(self.independent_judge.score(self.records, texts), np.float64)
            metrics["eval/independent_score"] = float(independent.mean())
        if self.task.name in REFERENCE_METRIC_TASKS:
            from mpo_jax.tasks.metrics import score_generations

            reference = score_generations(self.task.name, [{"record": r, "response": t}
                                                           for r, t in zip(self.records, texts, strict=True)])
            metrics.update({f"eval/{k}": float(v) for k, v in reference.items() if k not in ("count", "total")})
        rows = [{"update": update, "index": i, "prompt": prompts[i], "response": texts[i],
                 "response_tokens": int(lengths[i]), "judge_score": float(judge_scores[i]),
                 "independent_score": None if independent is None else float(independent[i]),
                 "hacks": sorted(name for name, hit in detections[i].items() if hit)}
                for i in range(len(texts))]
        return EvalResult(metrics=metrics, rows=rows)


def append_rows(run_dir: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with (Path(run_dir) / EVAL_SAMPLES_FILE).open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def truncate_rows(run_dir: str | Path, last_update: int) -> None:
    """Drop rows written after the checkpoint a resumed run starts from."""
    truncate_jsonl_after(Path(run_dir) / EVAL_SAMPLES_FILE, last_update)
