"""Every jitted program of one MPO update, as the runtime builds it, with abstract inputs.

Each program comes from the builder the runtime calls: the sampler's `prefill_program` /
`decode_program` (rollouts, the generate-mode judge's turns, the meta model's turns), the judge's
`judge_engine.prefix_prefill_program` / `item_scorer_program`, and `compile_rollout_stats` /
`compile_update` over `make_rollout_stats` / `make_ppo_update` / `make_grpo_update` (the trainer's
calls). Inputs are `jax.ShapeDtypeStruct`s with the shardings the runtime gives its arrays, from the
same helpers (`Sampler.abstract_*`, `abstract_batch`, `judge_engine.abstract_*`).

Shapes follow the config's budgets at their worst case within one run: the longest allowed prompt,
every response at `rollout.max_new_tokens`, a judge rubric filling `max_rubric_tokens` with
`judge_max_items` criteria, each generation running to its budget. Token counts the runtime gets
from the tokenizer (chat markup, instructions, a judged sample's framing) are estimated with the
`*_TOKENS` allowances below, so those shapes are estimates; every budget the config sets is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from mpo_jax.engine.constraints import bucket_states
from mpo_jax.engine.sampling import STOP_ID_BUCKETS, STOP_LENGTH_BUCKETS, bucket, cache_capacity, continued_capacity
from mpo_jax.models.config import ModelConfig
from mpo_jax.plan.models import PlannedModel, meta_role
from mpo_jax.reward import judge_engine
from mpo_jax.reward.judge import CANDIDATE_BUCKETS, ITEM_BUCKETS, LENGTH_BUCKETS, PREFIX_BUCKETS
from mpo_jax.rl import compile_rollout_stats, compile_update, make_grpo_update, make_ppo_update, make_rollout_stats
from mpo_jax.rl.compiled import abstract_batch, abstract_rows
from mpo_jax.rubric import rubric_scales
from mpo_jax.train.config import TrainConfig

TURN_TOKENS = 64  # chat markup and a short instruction around a turn's own text (estimate)
JUDGE_INTRO_TOKENS = 128  # the judge's framing of one sample around its prompt and response (estimate)
SCORE_TURN_TOKENS = 48  # "score this item" turn of the generate-mode judge (estimate)
META_PROMPT_TOKENS = 768  # the meta-analysis instructions beside the rubric and one sample (estimate)
CRITERION_TURN_TOKENS = 128  # the meta model's "write criterion i" turn (estimate)
CHARS_PER_TOKEN = 4  # rubric text to tokens, where no tokenizer is at hand (estimate)


@dataclasses.dataclass(frozen=True)
class Program:
    """One jitted program to compile: its builder's function and abstract arguments.

    `args` is a tuple, or a function of the earlier programs' abstract outputs by name (a decode
    loop takes the logits and KV cache its prefill returned, with the shardings the compiler gave them).
    """

    name: str
    role: str  # the model it runs ("policy", "judge", ...) or "train state"
    phase: str  # rollout, rollout_stats, judge, update, meta
    fn: Any
    args: tuple | Callable[[dict[str, Any]], tuple]
    shapes: dict[str, Any]
    resident: tuple[str, ...]  # the resident pieces among its arguments ("policy", "state", ...)
    flops: float = 0.0  # analytic FLOPs of one call, all chips together
    calls: float = 1.0  # calls per update (a meta step's programs: 1 / interval)
    decode_steps: int = 0  # a decode loop: steps per call at its budget
    step_flops: float = 0.0  # all chips together
    step_hbm_bytes: float = 0.0  # per chip: the weights (gathered over fsdp) and its share of the KV cache
    step_ici_bytes: float = 0.0  # per chip: weight shards received from the other fsdp chips
    fix: str = ""  # what to change when it does not fit
    note: str = ""  # a limit the run would hit at these shapes (e.g. the model's context length)


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: the layers' projections and the LM head."""
    h, d = config.hidden_size, config.head_dim
    per_layer = h * d * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * h * config.intermediate_size
    return config.num_layers * per_layer + config.vocab_size * h


def weight_bytes(config: ModelConfig) -> int:
    from mpo_jax.models.params import all_param_shapes

    itemsize = jax.numpy.dtype(config.param_dtype).itemsize
    return sum(int(_prod(s)) for s in all_param_shapes(config).values()) * itemsize


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def forward_flops(config: ModelConfig, tokens: float, context: float) -> float:
    """2·N per token through the matmuls, plus QK^T and AV over `context` keys per token."""
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * context
    return tokens * (2 * matmul_params(config) + attention)


def cache_bytes(config: ModelConfig, batch: int, capacity: int) -> float:
    itemsize = jax.numpy.dtype(config.dtype).itemsize
    return 2 * config.num_layers * batch * capacity * config.num_kv_heads * config.head_dim * itemsize


@dataclasses.dataclass
class _Builder:
    config: TrainConfig
    models: dict[str, PlannedModel]
    mesh: Mesh
    programs: list[Program] = dataclasses.field(default_factory=list)

    # -- sampler programs (rollouts, generate-mode judge turns, meta model turns) ---------------
    def generation(self, prefix: str, role: str, phase: str, *, rows: int, chunk: int, capacity: int, gen: int,
                   steps: int, cursor: int = 0, top_k: int = 0, top_p: bool = False, states: int = 1,
                   stop: tuple[int, int] | None = None, calls: float = 1.0, fix: str = "",
                   decode_only: bool = False) -> None:
        """A prefill of `chunk` tokens at `cursor` into a `capacity`-slot cache, then a `gen`-step decode loop."""
        model = self.models[role].model
        sampler, cfg = model.sampler, model.config
        batch = sampler.padded_batch(rows)
        chunk = bucket(chunk, sampler.prompt_buckets, f"{prefix} prompt (tokens)")
        gen = bucket(gen, sampler.generation_buckets, f"{prefix} generation (tokens)")
        shapes = {"batch": batch, "chunk": chunk, "cache": capacity, "generation": gen, "cursor": cursor}
        note = ""
        if capacity > cfg.max_position_embeddings:
            note = (f"the cache needs {capacity} positions but the model has {cfg.max_position_embeddings}: at these "
                    "budgets the run stops here (fewer criteria, shorter rationale / item / analysis budgets)")
        prefill_name, decode_name = f"{prefix}/prefill", f"{prefix}/decode"
        if not decode_only:
            cache = sampler.abstract_cache(batch, capacity)
            self.programs.append(Program(
                name=prefill_name, role=role, phase=phase, fn=sampler.prefill_program(),
                args=sampler.abstract_prefill_args(batch, chunk, cache), shapes=shapes, resident=(role,),
                flops=forward_flops(cfg, batch * chunk, capacity), calls=calls, fix=fix, note=note))

        stop_ids, stop_shape = STOP_ID_BUCKETS[0], (1, 1)
        if stop is not None:
            stop_ids = bucket(stop[0], STOP_ID_BUCKETS, "stop ids")
            stop_shape = (1, bucket(stop[1], STOP_LENGTH_BUCKETS, "stop length"))

        def decode_args(outputs: dict[str, Any], name=prefill_name) -> tuple:
            if name in outputs:
                logits, cache = outputs[name]
            else:  # the prefill did not compile: the shardings its outputs would most likely have
                logits = sampler._abstract((batch, cfg.vocab_size), jax.numpy.float32)
                cache = sampler.abstract_cache(batch, capacity)
            return sampler.abstract_decode_args(cache, logits, states=bucket_states(states), stop_ids=stop_ids,
                                                stop_shape=stop_shape)

        self.programs.append(Program(
            name=decode_name, role=role, phase=phase, fn=sampler.decode_program(gen, top_k, top_p),
            args=decode_args, shapes=shapes, resident=(role,), calls=calls, fix=fix, note=note, decode_steps=steps,
            step_flops=forward_flops(cfg, batch, capacity), **self.step_bytes(cfg, batch, capacity)))

    def step_bytes(self, cfg: ModelConfig, batch: int, capacity: int) -> dict[str, float]:
        """What one decode step must move per chip: every weight of its tensor shard (fsdp shards are
        gathered), its part of the KV cache, and the gathered shards over ICI."""
        data, fsdp, tensor = (self.mesh.shape.get(a, 1) for a in ("data", "fsdp", "tensor"))
        weights = weight_bytes(cfg) / tensor
        rows = data * fsdp if batch % (data * fsdp) == 0 else 1
        heads = tensor if cfg.num_kv_heads % tensor == 0 else 1
        return {"step_hbm_bytes": weights + cache_bytes(cfg, batch, capacity) / (rows * heads),
                "step_ici_bytes": weights * (fsdp - 1) / fsdp}

    # -- the policy and the update --------------------------------------------------------------
    def rollout_and_update(self, state) -> None:
        cfg = self.config
        rows = cfg.rollouts_per_update
        prompt, response = cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens
        sampler = self.models["policy"].model.sampler
        p = bucket(prompt, sampler.prompt_buckets, "prompt length (tokens)")
        g = bucket(response, sampler.generation_buckets, "max_new_tokens")
        fix = ("raise data x fsdp so each chip holds fewer rows, or shorten data.max_prompt_tokens / "
               "rollout.max_new_tokens")
        self.generation("rollout", "policy", "rollout", rows=rows, chunk=p, capacity=cache_capacity(p, g), gen=g,
                        steps=response, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p < 1.0, fix=fix)
        policy = self.models["policy"].model.config
        critic = self.models["critic"].model.config if "critic" in self.models else None
        tokens = rows * (prompt + response)
        rows_args = (abstract_rows((rows, prompt), jax.numpy.int32, self.mesh),
                     abstract_rows((rows, prompt), jax.numpy.bool_, self.mesh),
                     abstract_rows((rows, response), jax.numpy.int32, self.mesh),
                     abstract_rows((rows, response), jax.numpy.bool_, self.mesh))
        context = (prompt + response) / 2  # causal attention: half the sequence on average
        stats_flops = 2 * forward_flops(policy, tokens, context) + (forward_flops(critic, tokens, context)
                                                                    if critic else 0.0)
        resident = ("policy", "state") + (("critic",) if critic else ())
        update = cfg.update_config
        self.programs.append(Program(
            name="rollout_stats", role="policy", phase="rollout_stats",
            fn=compile_rollout_stats(make_rollout_stats(update.temperature), state, self.mesh),
            args=(state, *rows_args), shapes={"batch": rows, "query": prompt, "response": response},
            resident=resident, flops=stats_flops,
            fix="raise data x fsdp, or lower data.max_prompt_tokens / rollout.max_new_tokens"))
        grpo = cfg.algorithm == "grpo"
        update_fn = make_grpo_update(update) if grpo else make_ppo_update(update)
        epochs = update.num_iterations if grpo else update.num_ppo_epochs

        def train_flops(model: ModelConfig) -> float:
            # forward 2N, backward through the activations 2N, weight gradients 2N (full fine-tuning only)
            factor = 2.0 if model.lora_rank > 0 else 3.0
            return factor * forward_flops(model, tokens, context)

        flops = epochs * (train_flops(policy) + (train_flops(critic) if critic else 0.0))
        key = jax.eval_shape(lambda: jax.random.key(0))
        name = "grpo_update" if grpo else "ppo_update"
        self.programs.append(Program(
            name=name, role="train state", phase="update", fn=compile_update(update_fn, state, self.mesh),
            args=(state, abstract_batch(rows, prompt, response, self.mesh), key),
            shapes={"batch": rows, "query": prompt, "response": response, "micro_batch":
                    rows // update.micro_batches_per_update(), "epochs": epochs},
            resident=resident, flops=flops,
            fix=f"raise {cfg.algorithm}.gradient_accumulation_steps (smaller micro-batches), keep remat on, or raise "
                "fsdp"))

    # -- the judge -------------------------------------------------------------------------------
    def judge(self, mode: str, rubric_tokens: int, max_items: int, scales: tuple[tuple[int, int], ...]) -> None:
        cfg = self.config
        if "judge" not in self.models:
            return
        model = self.models["judge"].model
        rows = cfg.rollouts_per_update
        prompt, response = cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens
        fix = ("shard the judge more (a larger tensor axis), use a smaller judge (--config.judge.model.name=...) or "
               "a remote one (--config.judge.remote.base_url=..., judge.mode=generate)")
        item_tokens = cfg.meta.item_tokens if cfg.meta.enabled else max(64, rubric_tokens // max(max_items, 1))
        tag = f"judge_{mode}"
        if mode == "logits":
            prefix = f"{tag}/prefix_prefill"
            self.programs.append(Program(
                name=prefix, role="judge", phase="judge", fn=judge_engine.prefix_prefill_program(model.graphdef),
                args=judge_engine.abstract_prefix_args(model.params, model.config, self.mesh, rubric_tokens),
                shapes={"batch": 1, "rubric": rubric_tokens}, resident=("judge",),
                flops=forward_flops(model.config, rubric_tokens, rubric_tokens / 2), calls=0.0, fix=fix))
            batch = model.sampler.padded_batch(rows)
            sample = bucket(prompt + response + JUDGE_INTRO_TOKENS, LENGTH_BUCKETS, "judged sample (tokens)")
            item = bucket(max(cfg.judge.item_turn_tokens, TURN_TOKENS), LENGTH_BUCKETS, "rubric item turn (tokens)")
            k = bucket(max_items, ITEM_BUCKETS, "max_items")
            widest = max(hi - lo + 1 for lo, hi in scales) if scales else 11
            candidates = bucket(widest, CANDIDATE_BUCKETS, "score range size")
            prefixes = PREFIX_BUCKETS[0]

            def scorer_args(outputs: dict[str, Any]) -> tuple:
                cache = outputs.get(prefix)
                if cache is None:
                    cache = judge_engine.abstract_prefix_args(model.params, model.config, self.mesh, rubric_tokens)[3]
                return judge_engine.abstract_scorer_args(
                    model.params, cache, self.mesh, vocab=model.config.vocab_size, batch=batch, sample_len=sample,
                    item_len=item, items=k, candidates=candidates, prefixes=prefixes)

            context = rubric_tokens + sample
            flops = (forward_flops(model.config, batch * sample, rubric_tokens + sample / 2)
                     + max_items * forward_flops(model.config, batch * (item + prefixes), context + item))
            self.programs.append(Program(
                name=f"{tag}/score_items", role="judge", phase="judge", fn=judge_engine.item_scorer_program(
                    model.graphdef), args=scorer_args, shapes={"batch": batch, "sample": sample, "item_turn": item,
                                                               "items": k, "candidates": candidates},
                resident=("judge",), flops=flops, fix=fix))
            return
        # generate: the rubric prefix once, then per item a rationale turn and an integer turn
        self.programs.append(Program(
            name=f"{tag}/prefix_prefill", role="judge", phase="judge",
            fn=judge_engine.prefix_prefill_program(model.graphdef),
            args=judge_engine.abstract_prefix_args(model.params, model.config, self.mesh, rubric_tokens),
            shapes={"batch": 1, "rubric": rubric_tokens}, resident=("judge",),
            flops=forward_flops(model.config, rubric_tokens, rubric_tokens / 2), calls=0.0, fix=fix))
        sampler = model.sampler
        rationale = cfg.judge.rationale_tokens
        gen = bucket(rationale, sampler.generation_buckets, "judge rationale tokens")
        first = bucket(prompt + response + JUDGE_INTRO_TOKENS + item_tokens + TURN_TOKENS, sampler.prompt_buckets,
                       "judged sample (tokens)")
        capacity = continued_capacity(rubric_tokens, rubric_tokens, first, gen)
        self.generation(f"{tag}/first_item", "judge", "judge", rows=rows, chunk=first, capacity=capacity, gen=gen,
                        steps=rationale, cursor=rubric_tokens, stop=(16, 4), fix=fix, calls=1.0)
        cursor = rubric_tokens + first + rationale
        item_chunk = bucket(item_tokens + TURN_TOKENS, sampler.prompt_buckets, "rubric item turn (tokens)")
        score_chunk = bucket(SCORE_TURN_TOKENS, sampler.prompt_buckets, "score turn (tokens)")
        digits = max(2, *(len(str(hi)) for _, hi in scales)) if scales else 2
        for k in range(max_items):
            capacity = continued_capacity(capacity, cursor, score_chunk, bucket(digits + 1, sampler.generation_buckets,
                                                                                 "score digits"))
            score_cursor = cursor
            cursor += score_chunk + digits + 1
            if k == max_items - 1:
                break
            capacity = continued_capacity(capacity, cursor, item_chunk, gen)
            item_cursor = cursor
            cursor += item_chunk + rationale
        last_items = max_items - 1
        if max_items > 1:
            self.generation(f"{tag}/last_item", "judge", "judge", rows=rows, chunk=item_chunk, capacity=capacity,
                            gen=gen, steps=rationale, cursor=item_cursor, stop=(16, 4), fix=fix, calls=last_items)
        self.generation(f"{tag}/score", "judge", "judge", rows=rows, chunk=score_chunk, capacity=capacity,
                        gen=digits + 1, steps=digits + 1, cursor=score_cursor, states=digits + 2, fix=fix,
                        calls=max_items)

    # -- the meta model ---------------------------------------------------------------------------
    def meta(self, rubric_tokens: int, max_items: int) -> None:
        cfg = self.config
        role = meta_role(cfg, self.models)
        if role is None:
            return
        sampler = self.models[role].model.sampler
        meta = cfg.meta
        calls = 1.0 / meta.interval
        fix = ("shard the meta model more, lower meta.num_samples / meta.analysis_tokens / meta.item_tokens, or use a "
               "remote meta model (--config.meta.remote.base_url=...)")
        largest = sampler.prompt_buckets[-1]
        first = min(largest, rubric_tokens + cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
                    + META_PROMPT_TOKENS)
        first = bucket(first, sampler.prompt_buckets, "meta-analysis prompt (tokens)")
        analysis = bucket(meta.analysis_tokens, sampler.generation_buckets, "meta.analysis_tokens")
        capacity = cache_capacity(first, analysis)
        rows = meta.num_samples
        self.generation("meta/analysis", role, "meta", rows=rows, chunk=first, capacity=capacity, gen=analysis,
                        steps=meta.analysis_tokens, stop=(16, 8), calls=calls, fix=fix)
        item = bucket(meta.item_tokens, sampler.generation_buckets, "meta.item_tokens")
        turn = bucket(CRITERION_TURN_TOKENS, sampler.prompt_buckets, "criterion turn (tokens)")

        def conversation(capacity: int, cursor: int) -> tuple[int, int]:
            """The cache after the count turn and `max_items` criteria, and the last criterion's cursor."""
            capacity = continued_capacity(capacity, cursor, turn, 8)
            cursor += turn + 3
            last = cursor
            for _ in range(max_items):
                capacity = continued_capacity(capacity, cursor, turn, item)
                last = cursor
                cursor += turn + meta.item_tokens
            return capacity, last

        capacity, last = conversation(capacity, first + meta.analysis_tokens)
        self.generation("meta/last_criterion", role, "meta", rows=rows, chunk=turn, capacity=capacity, gen=item,
                        steps=meta.item_tokens * max_items, cursor=last, stop=(16, 8), calls=calls, fix=fix)
        # the merge prompt joins every refined set (num_samples x criteria), cut at merge_words
        merge = min(largest, rows * max_items * (meta.item_tokens + TURN_TOKENS) + rubric_tokens + META_PROMPT_TOKENS,
                    meta.merge_words * 4 // 3)
        merge = bucket(merge, sampler.prompt_buckets, "merge prompt (tokens)")
        merge_capacity = cache_capacity(merge, item)
        self.generation("meta/merge", role, "meta", rows=1, chunk=merge, capacity=merge_capacity, gen=item,
                        steps=0, stop=(16, 8), calls=calls, fix=fix)
        merge_capacity, merge_last = conversation(merge_capacity, merge)
        self.generation("meta/merge_last_criterion", role, "meta", rows=1, chunk=turn, capacity=merge_capacity,
                        gen=item, steps=meta.item_tokens * max_items, cursor=merge_last, stop=(16, 8), calls=calls,
                        fix=fix, decode_only=True)


def judge_budget(config: TrainConfig) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """(rubric-prefix tokens, criteria, initial scales) of the judge the trainer builds (tokens estimated)."""
    from mpo_jax.tasks import get_task

    task = get_task(config.task)
    rubric = task.load_rubric(config.judge.initial_rubric)
    initial_tokens = -(-len(rubric.render()) // CHARS_PER_TOKEN) + TURN_TOKENS
    try:
        scales = rubric_scales(rubric)
    except ValueError:
        scales = ()
    return (config.judge_rubric_tokens(initial_tokens), max(config.judge_max_items, rubric.num_items), scales)


def build_programs(config: TrainConfig, models: dict[str, PlannedModel], state, mesh: Mesh, *,
                   judge_modes: tuple[str, ...]) -> list[Program]:
    """The programs of one update (and of a meta step, amortised over `meta.interval` updates)."""
    builder = _Builder(config, models, mesh)
    builder.rollout_and_update(state)
    rubric_tokens, max_items, scales = judge_budget(config)
    for mode in judge_modes:
        builder.judge(mode, rubric_tokens, max_items, scales)
    builder.meta(rubric_tokens, max_items)
    order = {"rollout": 0, "rollout_stats": 1, "judge": 2, "update": 3, "meta": 4}
    return sorted(builder.programs, key=lambda p: order[p.phase])
