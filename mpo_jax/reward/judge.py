"""The reward LM: scores (task prompt, response) pairs against the current rubric.

Two modes share one conversation layout, the rubric living in the system turn:

    [system: persona + rubric]           prefilled once per rubric version (padded token array)
    [user: task material + response]     prefilled once per sample
    [user: rubric item i, score request] per item

- `logits` (default): per item, the expected score under the next-token distribution at the
  point where the score would be written (`mpo_jax.reward.judge_engine`). No decoding.
- `generate`: the published protocol: per item a one-sentence rationale ending at `<EOE>`, then
  an integer constrained to digits; the conversation carries over from item to item.

Swapping the rubric changes array contents only: nothing recompiles. A rubric longer than
`max_rubric_tokens` is refused at `set_rubric`, never truncated.

Each item's score range is the scale stated at the end of its first line (`rubric.item_scale`,
e.g. `### Evidence (0-10)`), read once per rubric in `set_rubric`; a rubric without scales is
refused (`ScaleError`) wherever the judge needs them. A task with its own judge program
(`Task.own_judge`: MATH's answer check or plan-then-execute, 0-5) is scored by that program with
the judge's model, random state and per-group guidelines, and needs no scales.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp
import numpy as np

from mpo_jax.engine import chat_session
from mpo_jax.engine import sharding as sharding_lib
from mpo_jax.engine.language_model import Conversation, LanguageModel
from mpo_jax.engine.sampling import CACHE_GROWTH, GenerationState, bucket, left_pad
from mpo_jax.errors import InvalidValueError
from mpo_jax.models.kv_cache import KVCache
from mpo_jax.reward import judge_engine
from mpo_jax.rubric import DEFAULT_LIMITS, Rubric, RubricError, rubric_scales
from mpo_jax.tasks import Task, get_task
from mpo_jax.tasks.base import JudgeResult, JudgeTools, Record

MODES = ("logits", "generate")
AGGREGATES = ("sum", "mean_normalized")
ITEM_BUCKETS = (1, 2, 4, 8, 16, 32)
CANDIDATE_BUCKETS = (8, 16, 32, 64, 101)  # up to a 0-100 scale
PREFIX_BUCKETS = (1, 2, 4, 10)
# Row and item-turn lengths of the logits mode, in quarter-octave steps: padding costs at most
# ~25% of a prefill (power-of-two buckets waste up to half), for a bounded number of shapes.
LENGTH_BUCKETS = tuple(sorted({16, 32, 48} | {p + q * p // 4 for p in (2 ** e for e in range(6, 14))
                                               for q in range(4)}))


class RubricTooLongError(RubricError):
    """The rubric does not fit this judge: too many items, a prefix over `max_rubric_tokens`, or
    (logits mode) a scale whose scores the scorer cannot read. A `RubricError`, hence a `ValueError`."""


def item_reminder(item: str, max_words: int | None) -> str:
    """The item's first line cut to `max_words` words ("..." when cut); None keeps the whole item."""
    if max_words is None:
        return item
    words = item.strip().splitlines()[0].split() if item.strip() else []
    if len(words) <= max_words and "\n" not in item.strip():
        return " ".join(words)
    cut = " ".join(words[:max_words])
    return f"{cut} ... (full text in the rubric above)" if cut else "(see its full text in the rubric above)"


class Judge:
    """Scores responses with a local `LanguageModel` against a `Rubric`."""

    def __init__(self, model: LanguageModel, *, task: str | Task, mode: str = "logits",
                 max_rubric_tokens: int = 1024, aggregate: str = "sum",
                 reuse_prefix: bool = True, rationale_tokens: int = 128, plan_tokens: int = 2000,
                 temperature: float = 0.0,
                 max_items: int = 16, llm_probability: float = 0.5, seed: int = 0,
                 item_reminder_words: int | None = 12, item_turn_tokens: int = 64,
                 length_buckets: Sequence[int] = LENGTH_BUCKETS):
        if mode not in MODES:
            raise InvalidValueError(f"judge mode must be one of {MODES}, got {mode!r}")
        if aggregate not in AGGREGATES:
            raise InvalidValueError(f"judge aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        self.local = isinstance(model, LanguageModel)
        if not self.local and mode != "generate":
            raise InvalidValueError("a remote judge has no logits: use mode='generate' with a RemoteChatModel")
        self.model, self.mode, self.aggregate = model, mode, aggregate
        self.task = get_task(task) if isinstance(task, str) else task
        self.max_rubric_tokens = max_rubric_tokens
        self.reuse_prefix, self.rationale_tokens, self.temperature = reuse_prefix, rationale_tokens, temperature
        # A task's own program may write long generations (MATH: a plan with a worked solution,
        # then a step-by-step check), not one-sentence rationales.
        self.plan_tokens = plan_tokens
        # Item scales are needed by tasks that require them and wherever the judge reads a range
        # (logits candidates, normalisation); a task with its own judge program reads none. A
        # stand-in task object without these attributes is an item-wise task with default limits.
        limits = getattr(self.task, "rubric_limits", DEFAULT_LIMITS)
        self.own_judge = bool(getattr(self.task, "own_judge", False))
        self.requires_scale = not self.own_judge and (
            limits.require_scale or mode == "logits" or aggregate == "mean_normalized")
        self.max_items = bucket(max_items, ITEM_BUCKETS, "max_items")
        if item_reminder_words is not None and item_reminder_words < 0:
            raise InvalidValueError("item_reminder_words must be >= 0 (words of the item repeated in its turn) or None "
                                    "(the whole item)")
        # The item's text is in the rubric prefix already; its logits-mode turn names it by number
        # plus its first words, so per-row item turns stay short (they are prefilled for every row).
        self.item_reminder_words = item_reminder_words
        # Item turns are padded to at least `item_turn_tokens`, so a new rubric whose turns still
        # fit reuses the compiled scorer.
        self.item_turn_tokens = item_turn_tokens
        self.length_buckets = tuple(sorted(length_buckets))
        self.rubric: Rubric | None = None
        self._scales: tuple[tuple[int, int], ...] | None = None  # per item of `rubric`, when required
        self._tables: judge_engine.CandidateTables | None = None  # logits mode: score candidates per item
        # For a task's own program (MATH): the chance that a response the rules could score goes
        # to the LLM instead, the coin's random state and the per-group guidelines.
        self.llm_probability = llm_probability
        self._rng = np.random.default_rng(seed)
        self._guidelines: dict[int, Rubric] = {}
        self.prefix_prefills = 0  # how many times a rubric prefix was prefilled (cost accounting)
        self._prefix_tokens: np.ndarray | None = None
        self._prefix_valid: np.ndarray | None = None
        self._prefix_cache: KVCache | None = None
        if self.local:
            self._prefill_prefix = judge_engine.prefix_prefill_program(model.graphdef)
            self._score_items = judge_engine.item_scorer_program(model.graphdef)
            strings = model.sampler.token_strings()
            digit = np.array([bool(s) and s.isascii() and s.isdigit() for s in strings], bool)
            self._digit_mask = np.zeros((model.config.vocab_size,), bool)
            self._digit_mask[:len(digit)] = digit

    # -- rubric ---------------------------------------------------------------------------------
    def _prefix_messages(self, rubric: Rubric) -> list[dict]:
        return [{"role": "system", "content": f"{self.task.judge_system}\n\nScoring rubric:\n{rubric.render()}"}]

    def _prefix_text(self, rubric: Rubric) -> str:
        return self.model.tokenizer.apply_chat_template(self._prefix_messages(rubric), add_generation_prompt=False)

    def _prefix_ids(self, rubric: Rubric) -> list[int]:
        return self.model.tokenizer.encode(self._prefix_text(rubric), add_bos=False)

    def rubric_tokens(self, rubric: Rubric) -> int | None:
        """Tokens of the rubric prefix this judge would prefill; None for a remote judge (its
        tokenizer is the server's, so no local count would be the true one)."""
        return len(self._prefix_ids(rubric)) if self.local else None

    def _admit(self, rubric: Rubric) -> tuple[tuple[tuple[int, int], ...] | None, list[int] | None,
                                              judge_engine.CandidateTables | None]:
        """(scales, prefix ids, candidate tables) for `rubric`, or the error saying why it does not fit."""
        if len(rubric.items) > self.max_items:
            raise RubricTooLongError(f"rubric has {len(rubric.items)} items; this judge takes at most "
                                     f"{self.max_items} (max_items)")
        scales = rubric_scales(rubric) if self.requires_scale else None
        if not self.local:
            return scales, None, None
        ids = self._prefix_ids(rubric)
        if len(ids) > self.max_rubric_tokens:
            raise RubricTooLongError(f"rubric prefix is {len(ids)} tokens but max_rubric_tokens is "
                                     f"{self.max_rubric_tokens}; shorten the rubric or raise max_rubric_tokens")
        tables = self._candidate_tables(scales) if self.mode == "logits" and scales is not None else None
        return scales, ids, tables

    def fits(self, rubric: Rubric) -> bool:
        """Whether `set_rubric(rubric)` would accept it (item count, prefix tokens, item scales)."""
        try:
            self._admit(rubric)
        except RubricError:
            return False
        return True

    def set_rubric(self, rubric: Rubric) -> None:
        """Install a rubric: its prefix tokens become the new input array (no recompilation).

        Raises `RubricTooLongError` or `ScaleError` (both `RubricError`s) for a rubric that does
        not fit; the previous rubric then stays installed.
        """
        scales, ids, tables = self._admit(rubric)
        if self.local:
            self._prefix_tokens, self._prefix_valid = left_pad([ids], self.max_rubric_tokens,
                                                               self.model.tokenizer.pad_id)
        self.rubric, self._scales, self._tables, self._prefix_cache = rubric, scales, tables, None

    # -- a task's own program: random state and per-group guidelines ------------------------------
    def reseed(self, seed: Any) -> None:
        """Restart the judge's random state (MATH's coin) from `seed`, anything `np.random.default_rng`
        takes; a run reseeds per update, so a resumed run draws what the uninterrupted one did."""
        self._rng = np.random.default_rng(seed)

    @property
    def guidelines(self) -> Mapping[int, Rubric]:
        """Per-group guidelines (`Task.rubric_group`; MATH: per subject), read-only; a record of a
        group without one is scored under the installed rubric."""
        return MappingProxyType(self._guidelines)

    def set_guidelines(self, guidelines: Mapping[int, Rubric]) -> None:
        """Replace the per-group guidelines (group index -> `Rubric`)."""
        for group, rubric in guidelines.items():
            if not isinstance(rubric, Rubric):
                raise TypeError(f"guideline of group {group!r} must be a Rubric, got {type(rubric).__name__}")
        self._guidelines = {int(group): rubric for group, rubric in guidelines.items()}

    def rubric_for(self, record: Record) -> Rubric | None:
        """The guideline of `record`'s group if it has one, else the installed rubric."""
        group_of = getattr(self.task, "rubric_group", None)
        group = group_of(record) if group_of is not None else None
        return self.rubric if group is None else self._guidelines.get(group, self.rubric)

    def _tools(self) -> JudgeTools:
        return JudgeTools(open_session=lambda histories: chat_session.open_session(self.model, histories),
                          rubric_for=self.rubric_for, rng=self._rng, llm_probability=self.llm_probability,
                          generation_tokens=self.plan_tokens, temperature=self.temperature)

    def _prefix(self, capacity: int, batch: int = 1) -> KVCache:
        """The rubric prefix in a KV cache of `capacity` slots, all filled (prefilled once per rubric).

        The prefix is left-padded to `max_rubric_tokens`; a smaller capacity keeps its last
        `capacity` columns, which must hold every real token.
        """
        if self.rubric is None:
            raise ValueError("no rubric installed: call judge.set_rubric(rubric) first")
        if self.reuse_prefix and self._prefix_cache is not None and self._prefix_cache.capacity == capacity:
            return self._prefix_cache
        real = int(self._prefix_valid.sum())
        if capacity < real:
            raise ValueError(f"a {capacity}-slot prefix cannot hold the rubric's {real} tokens")
        tokens = np.repeat(self._prefix_tokens[:, -capacity:], batch, axis=0)
        valid = np.repeat(self._prefix_valid[:, -capacity:], batch, axis=0)
        cache = KVCache.create(self.model.config, batch, capacity)
        cache = self._prefill_prefix(self.model.params, jnp.asarray(tokens), jnp.asarray(valid), cache)
        self.prefix_prefills += 1
        if self.reuse_prefix:
            self._prefix_cache = cache
        return cache

    # -- scoring --------------------------------------------------------------------------------
    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
        """Scalar rewards for (task prompt, response) pairs; see `score_detailed`."""
        return np.array([r.score for r in self.score_detailed(prompts, responses)], np.float32)

    def score_detailed(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[JudgeResult]:
        """Per-sample results. A prompt is a task record (dict) or the task prompt as a string."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        records = [p if isinstance(p, dict) else self.task.record_from_prompt(p) for p in prompts]
        if self.own_judge:
            return self.task.score_own(records, list(responses), self._tools())
        results: list[JudgeResult | None] = [None] * len(records)
        llm_rows = []
        for i, (record, response) in enumerate(zip(records, responses, strict=True)):
            rule = self.task.rule_score(record, response)
            if rule is not None:
                results[i] = JudgeResult(score=float(rule), item_scores=[], rationales=[], parse_failures=0,
                                         rule="task rule")
            else:
                llm_rows.append(i)
        if llm_rows:
            rows = [(records[i], responses[i]) for i in llm_rows]
            scored = self._score_logits(rows) if self.mode == "logits" else self._score_generate(rows)
            for i, result in zip(llm_rows, scored, strict=True):
                results[i] = result
        return results

    def _aggregate(self, item_scores: Sequence[float]) -> float:
        if self.aggregate == "sum":
            return float(np.sum(item_scores))
        normalized = [(s - lo) / (hi - lo) for s, (lo, hi) in zip(item_scores, self._scales, strict=True)]
        return float(np.clip(np.mean(normalized), 0.0, 1.0))

    def _sample_messages(self, record: dict, response: str) -> list[dict]:
        return [{"role": "user", "content": self.task.judge_intro(record, response)}]

    def _item_turn(self, index: int, item: str) -> list[dict]:
        return [{"role": "user", "content": self.task.item_rationale_request(index + 1, item)}]

    def _logits_item_turn(self, index: int, item: str) -> list[dict]:
        lo, hi = self._scales[index]
        content = (f"Rubric item #{index + 1}:\n{item_reminder(item, self.item_reminder_words)}\n\n"
                   f"{self.task.item_score_request()} "
                   f"Answer with one integer from {lo} to {hi}.")
        return [{"role": "user", "content": content}]

    def _deltas(self, rows) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Token ids of each row's material and of each item turn, as appended to the prefix."""
        tok = self.model.tokenizer
        prefix_msgs = self._prefix_messages(self.rubric)
        prefix_text = self._prefix_text(self.rubric)
        samples, items = [], []
        for record, response in rows:
            msgs = prefix_msgs + self._sample_messages(record, response)
            sample_text = tok.apply_chat_template(msgs, add_generation_prompt=False)
            _check_prefix(prefix_text, sample_text)
            samples.append(tok.encode(sample_text[len(prefix_text):], add_bos=False))
            row_items = []
            for k, item in enumerate(self.rubric.items):
                full = tok.apply_chat_template(msgs + self._logits_item_turn(k, item), add_generation_prompt=True)
                _check_prefix(sample_text, full)
                row_items.append(tok.encode(full[len(sample_text):], add_bos=False))
            items.append(row_items)
        return samples, items

    def _score_logits(self, rows) -> list[JudgeResult]:
        sampler = self.model.sampler
        samples, items = self._deltas(rows)
        batch = sampler.padded_batch(len(rows))
        sample_len = bucket(max(len(s) for s in samples), self.length_buckets, "judged sample (tokens)")
        item_len = bucket(max(self.item_turn_tokens, *(len(t) for r in items for t in r)), self.length_buckets,
                          "rubric item turn (tokens)")
        k = self.max_items
        sample_tokens, sample_valid = left_pad(samples, sample_len, self.model.tokenizer.pad_id, batch=batch)
        item_tokens = np.full((k, batch, item_len), self.model.tokenizer.pad_id, np.int32)
        item_valid = np.zeros((k, batch, item_len), bool)
        item_valid[:, :, -1] = True  # padding items/rows still need one valid query position
        for j in range(len(self.rubric.items)):
            t, v = left_pad([r[j] for r in items], item_len, self.model.tokenizer.pad_id, batch=batch)
            item_tokens[j], item_valid[j] = t, v | item_valid[j]
        tables = self._tables
        capacity = self.max_rubric_tokens
        # Without reuse every row prefills the rubric prefix itself, as a plain judge would.
        prefix = self._prefix(capacity) if self.reuse_prefix else self._prefix(capacity, batch)
        expected = self._score_items(self.model.params, prefix, jnp.asarray(sample_tokens), jnp.asarray(sample_valid),
                                     jnp.asarray(item_tokens), jnp.asarray(item_valid), jnp.asarray(self._digit_mask),
                                     *(jnp.asarray(getattr(tables, f.name)) for f in dataclasses.fields(tables)))
        expected = sharding_lib.to_host(expected)[:len(self.rubric.items), :len(rows)]
        return [JudgeResult(score=self._aggregate(expected[:, r].tolist()), item_scores=expected[:, r].tolist(),
                            rationales=[], parse_failures=0, rule=None) for r in range(len(rows))]

    def _encode_number(self, n: int) -> list[int]:
        return self.model.tokenizer.encode(str(n), add_bos=False)

    def _candidate_tables(self, scales: Sequence[tuple[int, int]]) -> judge_engine.CandidateTables:
        """Score candidates of every item; a scale the scorer cannot read is `RubricTooLongError`."""
        try:
            widest = max(hi - lo + 1 for lo, hi in scales)
            starts = max(len({t[0] for t in map(self._encode_number, range(lo, hi + 1)) if len(t) > 1})
                         for lo, hi in scales)
            return judge_engine.candidate_tables(scales, self._encode_number, self.max_items,
                                                 bucket(widest, CANDIDATE_BUCKETS, "score range size"),
                                                 bucket(max(starts, 1), PREFIX_BUCKETS, "two-token score prefixes"))
        except ValueError as err:
            raise RubricTooLongError(f"the logits judge cannot score this rubric's scales: {err}") from err

    def _score_generate(self, rows) -> list[JudgeResult]:
        session = self._generate_session(rows)
        item_scores = [[] for _ in rows]
        rationales = [[] for _ in rows]
        failures = [0] * len(rows)
        score_turn = [{"role": "user", "content": self.task.item_score_request()}]
        for k, item in enumerate(self.rubric.items):
            turns = [(self._sample_messages(r, resp) if k == 0 else []) + self._item_turn(k, item) for r, resp in rows]
            for i, reply in enumerate(session.say(turns, max_tokens=self.rationale_tokens, stop=("<EOE>",),
                                                  temperature=self.temperature)):
                rationales[i].append(reply.strip())
            digits = max(2, len(str(self._scales[k][1]))) if self._scales else 2  # 3 for a (0-100) item
            for i, value in enumerate(session.say_integer([score_turn] * len(rows), max_digits=digits)):
                failures[i] += value is None
                item_scores[i].append(float(value or 0))  # an unreadable score counts 0, as published
        return [JudgeResult(score=self._aggregate(item_scores[i]), item_scores=item_scores[i],
                            rationales=rationales[i], parse_failures=failures[i], rule=None)
                for i in range(len(rows))]

    def _generate_session(self, rows) -> chat_session.ChatSession:
        """Conversations that start after the rubric prefix (read from its KV cache when local)."""
        histories = [self._prefix_messages(self.rubric) for _ in rows]
        if not self.local:
            return chat_session.open_session(self.model, histories)
        batch = self.model.sampler.padded_batch(len(rows))
        # Only the rubric's own tokens (rounded up to the cache's growth step) start each conversation:
        # every later token attends over the whole cache, so the padding up to max_rubric_tokens,
        # which logits mode keeps for a fixed compiled shape, would only cost time here.
        width = min(self.max_rubric_tokens, -(-int(self._prefix_valid.sum()) // CACHE_GROWTH) * CACHE_GROWTH)
        cache = judge_engine.tile_cache(self._prefix(width), batch)
        prefix = Conversation(messages=histories, context=[self._prefix_text(self.rubric)] * len(rows),
                              state=GenerationState(cache=cache, cursor=width, num_rows=len(rows)),
                              replies=[])
        return chat_session.LocalChatSession(self.model, histories, conversation=prefix)


def _check_prefix(prefix: str, full: str) -> None:
    if not full.startswith(prefix):
        raise InvalidValueError("the chat template does not extend the judge prefix turn by turn; "
                                "this judge needs a template where earlier turns render identically")

