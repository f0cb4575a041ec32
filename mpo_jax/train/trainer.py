"""The MPO loop: rollouts, judge scores, PPO/GRPO updates, and meta steps that rewrite the rubric.

    for update in 1..N:
        prompts  <- data iterator (per process, gathered into the global batch)
        rollouts <- policy sampler (current params)
        stats    <- old/ref log-probs and values          (jit)
        scores   <- judge(rubric tokens as an array input) (jit, rubric prefix cached)
        state    <- ppo_update(state, batch, rng)          (jit, explicit shardings, donated)
        buffer   += rollouts
        every meta.interval updates but the last: rubric <- meta step (MRM, compiled separately);
            judge.set_rubric (after update N no update would use the new rubric)
        checkpoint every checkpoint.every updates and on SIGTERM
    (every start and resume appends its code version and devices to provenance.jsonl)

Randomness is derived from (seed, update), so a resumed run repeats exactly what the
uninterrupted run would have done. Only process 0 writes files; all processes run the same
jitted calls and install the same rubric (process 0's, broadcast).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mpo_jax.data import PromptIterator, prepare_task_source
from mpo_jax.engine import sharding as sharding_lib
from mpo_jax.engine.language_model import LanguageModel
from mpo_jax.fileio import atomic_write_text
from mpo_jax.reward.canary import CanaryGate
from mpo_jax.reward.judge import Judge
from mpo_jax.reward.meta import KEPT_REASONS, MetaSample, group_meta_step, save_meta_evaluation
from mpo_jax.reward.rubric_history import RubricHistory
from mpo_jax.rl import (
    RolloutBatch,
    check_finite,
    compile_rollout_stats,
    compile_update,
    make_grpo_update,
    make_ppo_update,
    make_rollout_stats,
    place_batch,
)
from mpo_jax.rubric import Rubric, RubricError
from mpo_jax.tasks import get_task, load_records
from mpo_jax.tasks.base import fenced_task
from mpo_jax.train import distributed
from mpo_jax.train.checkpoint import PreemptionGuard
from mpo_jax.train.config import RUBRIC_HEADROOM_TOKENS, ConfigError, ModelSpec, TrainConfig
from mpo_jax.train.evaluator import TrainingEvaluator, held_out_records
from mpo_jax.train.evaluator import append_rows as append_eval_rows
from mpo_jax.train.metrics import MetricsWriter
from mpo_jax.train.model_specs import (
    build_meta_reward_model,
    build_model,
    build_policy_and_state,
    build_remote,
    check_model_available,
    install_policy_params,
)
from mpo_jax.train.rollout import Rollouts, sample_rollouts
from mpo_jax.train.run_dir import ROLLOUTS_FILE, discard_after, open_checkpointer, record_start, write_config

_LOG = logging.getLogger(__name__)


def _device_summary() -> dict[str, Any]:
    devices = jax.devices()
    return {"platform": jax.default_backend(), "kind": devices[0].device_kind, "count": len(devices),
            "processes": jax.process_count()}


def check_resources(config: TrainConfig) -> None:
    """What can fail without compiling: devices for the mesh, model files, data files."""
    devices = jax.device_count()
    size = math.prod(config.mesh)
    if devices % size or (size < devices and jax.process_count() > 1):
        raise ConfigError(f"config.mesh = {config.mesh} uses {size} devices but {devices} are available; choose "
                          f"(data, fsdp, tensor) sizes whose product is {devices}"
                          + (" (or divides it, on one host)" if jax.process_count() == 1 else ""))
    check_model_available(config.policy, "policy")
    if config.critic.name:
        check_model_available(config.critic, "critic")
    if not config.judge.remote.base_url:
        check_model_available(config.judge.model, "judge.model")
    if config.meta.enabled and config.meta.model.name and not config.meta.remote.base_url:
        check_model_available(config.meta.model, "meta.model")
    task = get_task(config.task)
    data_dir = Path(config.data.data_dir) if config.data.data_dir else None
    if config.data.source == "jsonl":
        from mpo_jax.tasks.data import default_data_dir

        path = (data_dir or default_data_dir()) / task.data_folder / f"{config.data.split}.jsonl"
        if not path.is_file():
            raise ConfigError(f"config.data.data_dir: no {task.name} data at {path}; set --config.data.data_dir=DIR "
                              f"to the folder that holds {task.data_folder}/{config.data.split}.jsonl")
    rubrics = [("judge.initial_rubric", config.judge.initial_rubric)]
    if config.eval.every:
        rubrics.append(("eval.judge_rubric", eval_rubric_name(config)))
        if config.eval.judge.name:
            check_model_available(config.eval.judge, "eval.judge")
        if config.data.source == "jsonl":
            from mpo_jax.tasks.data import default_data_dir

            path = (data_dir or default_data_dir()) / task.data_folder / f"{config.eval.split}.jsonl"
            if not path.is_file():
                raise ConfigError(f"config.eval.split: no {task.name} data at {path}; set --config.eval.split or "
                                  f"--config.data.data_dir, or turn evaluation off with --config.eval.every=0")
    for key, name in rubrics:
        if name not in task.initial_rubrics and not Path(name).is_file():
            raise ConfigError(f"config.{key} = {name!r} is neither one of this task's rubrics "
                              f"({', '.join(task.initial_rubrics)}) nor a rubric file")
        try:
            load_rubric(task.name, name)
        except RubricError as err:
            raise ConfigError(f"config.{key} = {name!r}: {err}") from None


def make_run_mesh(config: TrainConfig, devices: list | None = None, *, always: bool = False):
    """The run's (data, fsdp, tensor) mesh over the first devices; None for one device unless `always`.

    `mpo_jax.plan` passes a TPU topology's abstract devices (and `always`, since it compiles for them)."""
    size = math.prod(config.mesh)
    if size == 1 and not always:
        return None
    devices = jax.devices() if devices is None else devices
    return sharding_lib.make_mesh(config.mesh, devices=list(devices)[:size])


def load_rubric(task_name: str, name: str) -> Rubric:
    """One of the task's shipped rubrics by name, or a rubric file (checked against the task's limits)."""
    return get_task(task_name).load_rubric(name)


def initial_rubric(config: TrainConfig) -> Rubric:
    return load_rubric(config.task, config.judge.initial_rubric)


def eval_rubric_name(config: TrainConfig) -> str:
    """The independent judge's fixed rubric: as configured, else the task's oracle, expert or iter0."""
    if config.eval.judge_rubric:
        return config.eval.judge_rubric
    shipped = get_task(config.task).initial_rubrics
    return next(name for name in ("oracle", "expert", "iter0") if name in shipped)


class Trainer:
    """One MPO (or fixed-rubric PPO/GRPO) run, resumable from its run directory."""

    def __init__(self, config: TrainConfig):
        check_resources(config)
        self.config = config
        self.task = get_task(config.task)
        self.run_dir = Path(config.run_dir)
        self.is_main = distributed.is_main()
        self.mesh = make_run_mesh(config)
        self.grpo = config.algorithm == "grpo"
        self.update_config = config.update_config
        self.rollouts_per_update = config.rollouts_per_update

        self.policy, _, self.state = build_policy_and_state(config, self.mesh)
        self._frozen_models: list[tuple[ModelSpec, LanguageModel]] = []
        self.judge_model = (build_remote(config.judge.remote) if config.judge.remote.base_url
                            else self._frozen_model(config.judge.model))
        if not config.meta.enabled:  # fixed rubric: the meta model is never asked, so never loaded
            meta_model = self.judge_model
        elif config.meta.remote.base_url:
            meta_model = build_remote(config.meta.remote)
        elif config.meta.model.name:
            meta_model = self._frozen_model(config.meta.model)
        else:
            meta_model = self.judge_model

        self._judge_tokenizer = getattr(self.judge_model, "tokenizer", None) or self.policy.tokenizer
        # Task limits throughout: MATH guidelines may be far longer than a rubric item.
        self.history = RubricHistory(initial_rubric(config), reason="initial rubric", limits=self.task.rubric_limits)
        initial_tokens = len(self._judge_tokenizer.encode(self.history.current.render(), add_bos=False))
        self.judge_task = fenced_task(self.task) if config.judge.fence else self.task
        self.judge = Judge(self.judge_model, task=self.judge_task, mode=config.judge.mode,
                           max_rubric_tokens=config.judge_rubric_tokens(initial_tokens),
                           aggregate=config.judge.aggregate, rationale_tokens=config.judge.rationale_tokens,
                           plan_tokens=config.judge.plan_tokens,
                           max_items=max(config.judge_max_items, self.history.current.num_items),
                           item_turn_tokens=config.judge.item_turn_tokens, seed=config.seed)
        self.mrm = build_meta_reward_model(meta_model, self.task, config.meta)
        self.judge.set_rubric(self.history.current)
        # The canary gate of every meta step (per-group guidelines, MATH's, have no rubric to gate).
        self.canary = (CanaryGate(self.judge, self.task, config.canary_settings(), seed=config.seed)
                       if config.meta.enabled and config.meta.canary.enabled and not self.task.rubric_groups else None)
        # Meta steps that kept the rubric, by reason (cumulative, checkpointed): a run whose rubric
        # never changes shows why in its metrics.
        self.kept_reasons: dict[str, int] = dict.fromkeys(KEPT_REASONS, 0)
        self.buffer: list[MetaSample] = []

        tfds_dir = config.data.tfds_dir or str(self.run_dir / "tfds")
        self.source = prepare_task_source(self.task.name, config.data.split, data_dir=config.data.data_dir or None,
                                          tfds_dir=tfds_dir, source=config.data.source)
        processes = jax.process_count()
        if config.data.batch_size % processes:
            raise ConfigError(f"config.data.batch_size = {config.data.batch_size} must be a multiple of the "
                              f"{processes} processes")
        self.iterator = PromptIterator(self.source, self.encode_record, batch_size=config.data.batch_size // processes,
                                       max_prompt_tokens=config.data.max_prompt_tokens, seed=config.seed,
                                       shuffle=config.data.shuffle, process_index=jax.process_index(),
                                       process_count=processes)

        self.rollout_stats = compile_rollout_stats(make_rollout_stats(self.update_config.temperature), self.state,
                                                   self.mesh)
        update_fn = make_grpo_update(self.update_config) if self.grpo else make_ppo_update(self.update_config)
        self.update_step = compile_update(update_fn, self.state, self.mesh)
        self.evaluator = self._build_evaluator() if config.eval.every else None
        self.checkpointer = open_checkpointer(config, self.run_dir)
        self.update = 0  # updates completed

    def _frozen_model(self, spec: ModelSpec) -> LanguageModel:
        """One loaded copy per distinct spec among the judge, meta model and evaluation judge.

        They only read their weights, so sharing is safe, and a 1.5B model in float32 (6 GB)
        loaded twice would not fit a small machine beside the rest of the run.
        """
        for loaded_spec, model in self._frozen_models:
            if loaded_spec == spec:
                return model
        model = build_model(spec, self.mesh)
        self._frozen_models.append((spec, model))
        return model

    def _build_evaluator(self) -> TrainingEvaluator:
        """The held-out prompts, the training judge and an independent judge (see EvalSpec)."""
        cfg, spec = self.config, self.config.eval
        records = [r for r in load_records(self.task, spec.split, cfg.data.data_dir or None)
                   if len(self.encode_record(r)) <= cfg.data.max_prompt_tokens]
        independent = None
        if spec.independent_judge:
            model = self._frozen_model(spec.judge) if spec.judge.name else self.judge_model
            rubric = load_rubric(self.task.name, eval_rubric_name(cfg))
            tokens = len((getattr(model, "tokenizer", None) or self._judge_tokenizer).encode(rubric.render(),
                                                                                              add_bos=False))
            independent = Judge(model, task=self.judge_task, mode=spec.judge_mode,
                                max_rubric_tokens=-(-(tokens + RUBRIC_HEADROOM_TOKENS) // 256) * 256,
                                aggregate=cfg.judge.aggregate, rationale_tokens=cfg.judge.rationale_tokens,
                                plan_tokens=cfg.judge.plan_tokens, max_items=max(len(rubric.items), 1),
                                item_turn_tokens=cfg.judge.item_turn_tokens, seed=cfg.seed + 1)
            independent.set_rubric(rubric)
        return TrainingEvaluator(self.policy, self.task, held_out_records(records, spec.num_prompts, spec.seed),
                                 judge=self.judge, independent_judge=independent,
                                 max_new_tokens=spec.max_new_tokens or cfg.rollout.max_new_tokens,
                                 temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed)

    def _evaluate(self, update: int) -> dict[str, float]:
        start = time.perf_counter()
        self._sync_policy_params()
        result = self.evaluator.evaluate(update)
        if self.is_main:
            append_eval_rows(self.run_dir, result.rows)
        return {**result.metrics, "time/eval_s": time.perf_counter() - start}

    # -- pieces ----------------------------------------------------------------------------------
    def encode_record(self, record: dict) -> list[int]:
        return self.policy.encode_prompt(self.task.policy_prompt(record))

    def _sync_policy_params(self) -> None:
        """Point the sampler at the current weights (the update donates the previous buffers)."""
        install_policy_params(self.policy, self.state)

    def _global_prompts(self) -> tuple[list[dict], list[list[int]]]:
        local = self.iterator.next()
        indices = distributed.gather_rows(np.asarray(local.indices, np.int64))
        records = [self.source[int(i)] for i in indices]
        prompt_ids = [self.encode_record(r) for r in records]
        if self.grpo:
            g = self.config.grpo.group_size
            records = [r for r in records for _ in range(g)]
            prompt_ids = [p for p in prompt_ids for _ in range(g)]
        return records, prompt_ids

    def _judge(self, rollouts: Rollouts, update: int) -> tuple[np.ndarray, list]:
        self.judge.reseed([self.config.seed, update, 1])
        results = self.judge.score_detailed(rollouts.records, rollouts.texts)
        return np.array([r.score for r in results], np.float32), results

    def _batch(self, rollouts: Rollouts, scores: np.ndarray) -> RolloutBatch:
        put = (lambda x: sharding_lib.place(x, sharding_lib.batch_sharding(self.mesh, x.shape))) if self.mesh \
            else jax.numpy.asarray
        stats = self.rollout_stats(self.state, put(rollouts.query), put(rollouts.query_mask), put(rollouts.response),
                                   put(rollouts.response_mask))
        stats = {k: sharding_lib.to_host(v) for k, v in stats.items()}
        return place_batch(RolloutBatch(query=rollouts.query, query_mask=rollouts.query_mask,
                                        response=rollouts.response, response_mask=rollouts.response_mask,
                                        logprobs=stats["logprobs"], ref_logprobs=stats["ref_logprobs"],
                                        values=stats["values"], scores=scores, contains_eos=rollouts.contains_eos),
                           self.mesh)

    @property
    def guidelines(self) -> Mapping[int, Rubric]:
        """The per-group guidelines in force (`Task.rubric_groups`; MATH: one per subject), held by the judge."""
        return self.judge.guidelines

    @guidelines.setter
    def guidelines(self, guidelines: Mapping[int, Rubric]) -> None:
        self.judge.set_guidelines(guidelines)

    def _group_meta_step(self, update: int) -> dict[str, float]:
        """Per rubric group seen since the last meta step (MATH: per subject), refine its guideline (§A.3)."""
        start = time.perf_counter()
        task, names = self.task, self.task.rubric_groups
        guidelines = dict(self.judge.guidelines)
        seen = sorted({task.rubric_group(s.record) for s in self.buffer} - {None})
        current = {g: guidelines.get(g, self.history.current) for g in seen}
        updates = group_meta_step(self.mrm, current, self.buffer, np.random.default_rng([self.config.seed, update, 2]),
                                  group_of=task.rubric_group, step=update) if current else {}
        proposed = {str(g): u.guideline.render() for g, u in updates.items() if u.accepted}
        proposed = json.loads(distributed.broadcast_text(json.dumps(proposed, sort_keys=True)))
        for group, text in proposed.items():
            guidelines[int(group)] = Rubric.parse(text, limits=task.rubric_limits, task=task.name)
        self.judge.set_guidelines(guidelines)
        if self.is_main:
            save_meta_evaluation(self.run_dir, update, {"update": update, "groups": {names[g]: {
                "accepted": u.accepted, "reason": u.reason, "guideline": guidelines.get(g, u.guideline).render(),
                "analysis": u.analysis, "refinement": u.refinement, "cases": u.cases} for g, u in updates.items()}})
            for g, rubric in guidelines.items():
                atomic_write_text(self.run_dir / f"guideline_{names[g]}.txt", rubric.render() + "\n")
        self.buffer = []
        kept = sum(not u.accepted for u in updates.values())
        self.kept_reasons["guideline_rejected"] = self.kept_reasons.get("guideline_rejected", 0) + kept
        return {"meta/step": 1.0, "meta/accepted": float(len(proposed)), **self._kept_metrics(),
                "time/meta_s": time.perf_counter() - start}

    def _kept_metrics(self) -> dict[str, float]:
        return {f"meta/kept/{reason}": float(count) for reason, count in sorted(self.kept_reasons.items())}

    def _meta_step(self, update: int) -> dict[str, float]:
        if self.task.rubric_groups:
            return self._group_meta_step(update)
        start = time.perf_counter()
        result = self.mrm.meta_step(self.history.current, self.buffer,
                                    np.random.default_rng([self.config.seed, update, 2]), step=update,
                                    fits=self.judge.fits, gate=self.canary)
        # Every process records process 0's proposal, so all install the same rubric.
        proposal = distributed.broadcast_text(result.rubric.render() if result.accepted else "")
        kept = self.history.apply(result, created_step=update, proposal=proposal, install=self.judge.set_rubric)
        accepted = kept is None
        if not accepted:
            self.kept_reasons[kept] = self.kept_reasons.get(kept, 0) + 1
        _LOG.info("update %d: meta step %s", update, f"installed rubric iteration {self.history.current.iteration}"
                  if accepted else f"kept the rubric ({result.reason})")
        if self.is_main:
            result.save(self.run_dir, update, self.buffer)
            self.history.save(self.run_dir)
        self.buffer = []
        return {"meta/step": 1.0, "meta/accepted": float(accepted), **self._kept_metrics(),
                **canary_metrics(result.canary), "time/meta_s": time.perf_counter() - start}

    def _host_state(self) -> dict[str, Any]:
        return {"update": self.update, "data": self.iterator.get_state(), "rubric_history": self.history.to_json(),
                "kept_reasons": dict(self.kept_reasons),
                "math_guidelines": {str(g): r.render() for g, r in self.guidelines.items()},
                "meta_buffer": [{"record": s.record, "response": s.response, "score": s.score,
                                 "rationales": list(s.rationales)} for s in self.buffer]}

    def _restore(self) -> None:
        """Continue from the newest checkpoint that restores; corrupt newer ones are set aside with a warning."""
        restored = self.checkpointer.restore_latest(self.state, set_aside=True)
        if restored is None:
            return
        self.state, host = restored.state, restored.host_state
        self.update = int(host["update"])
        self.iterator.set_state(host["data"])
        self.history = RubricHistory.from_json(host["rubric_history"])
        self.judge.set_rubric(self.history.current)
        self.kept_reasons.update({str(k): int(v) for k, v in host.get("kept_reasons", {}).items()})
        self.guidelines = {int(g): Rubric.parse(text, limits=self.task.rubric_limits, task=self.task.name)
                           for g, text in host.get("math_guidelines", {}).items()}
        self.buffer = [MetaSample(record=s["record"], response=s["response"], score=float(s["score"]),
                                  rationales=tuple(s["rationales"])) for s in host["meta_buffer"]]
        # WARNING so that the default log level shows it: a resumed run's output starts mid-way.
        _LOG.warning("resuming from update %d, rubric iteration %d", self.update, self.history.current.iteration)

    def _write_rollouts(self, update: int, rollouts: Rollouts, scores: np.ndarray) -> None:
        count = min(self.config.log.rollouts_per_update, len(rollouts.texts))
        with (self.run_dir / ROLLOUTS_FILE).open("a", encoding="utf-8") as handle:
            for i in range(count):
                handle.write(json.dumps({"update": update, "prompt": self.task.prompt_text(rollouts.records[i]),
                                         "response": rollouts.texts[i], "score": float(scores[i]),
                                         "rubric_iteration": self.history.current.iteration},
                                        ensure_ascii=False) + "\n")

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self, update: int) -> dict[str, float]:
        """Update number `update` (1-based): rollouts, scores, one PPO/GRPO update."""
        cfg = self.config
        t0 = time.perf_counter()
        records, prompt_ids = self._global_prompts()
        self._sync_policy_params()
        rollouts = sample_rollouts(self.policy, records, prompt_ids, query_length=cfg.data.max_prompt_tokens,
                                   max_new_tokens=cfg.rollout.max_new_tokens,
                                   temperature=self.update_config.temperature, top_p=cfg.rollout.top_p,
                                   top_k=cfg.rollout.top_k, seed=cfg.seed * 1_000_003 + update)
        t1 = time.perf_counter()
        scores, results = self._judge(rollouts, update)
        t2 = time.perf_counter()
        batch = self._batch(rollouts, scores)
        rng = jax.random.fold_in(jax.random.key(cfg.seed), update)
        self.state, metrics = self.update_step(self.state, batch, rng)
        metrics = check_finite(metrics, update, self.update_config.on_nonfinite)
        t3 = time.perf_counter()
        self.buffer.extend(MetaSample(record=r, response=t, score=float(s), rationales=tuple(res.rationales))
                           for r, t, s, res in zip(rollouts.records, rollouts.texts, scores, results, strict=True))
        self.buffer = self.buffer[-cfg.meta.buffer_size:]
        lengths = rollouts.response_lengths
        tokens = int(rollouts.query_mask.sum() + lengths.sum())
        rubric = self.history.current
        metrics.update({
            "score/mean": float(np.mean(scores)), "score/std": float(np.std(scores)),
            "response/length_mean": float(np.mean(lengths)), "response/eos_rate": float(np.mean(rollouts.contains_eos)),
            "judge/parse_failures": float(sum(r.parse_failures for r in results)),
            "judge/rule_scored": float(sum(r.rule is not None for r in results)),
            "rubric/iteration": float(rubric.iteration), "rubric/items": float(len(rubric.items)),
            "rubric/tokens": float(len(self._judge_tokenizer.encode(rubric.render(), add_bos=False))),
            "time/rollout_s": t1 - t0, "time/judge_s": t2 - t1, "time/update_s": t3 - t2,
            "throughput/tokens_per_s": tokens / max(t3 - t0, 1e-9),
        })
        if self.is_main:
            self._write_rollouts(update, rollouts, scores)
        return metrics

    def run(self) -> dict[str, float]:
        """Train to `num_updates` (resuming from the latest checkpoint); returns the last metrics."""
        cfg = self.config
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.run_dir, cfg)
        self._restore()
        if self.is_main:
            # Files written after the checkpoint this run starts from (or by a run that never
            # reached its first checkpoint) describe updates that will be redone.
            discard_after(self.run_dir, self.update, self.history.current.iteration)
            self.history.save(self.run_dir)
            record_start(self.run_dir, self.update, cfg.num_updates, devices=_device_summary())
        # A run that starts from scratch redoes the evaluation before its first update (update 0).
        writer = MetricsWriter(self.run_dir, enabled=self.is_main, resume_from_update=self.update + 1 if self.update
                               else 0,
                               total_updates=cfg.num_updates, tensorboard=cfg.log.tensorboard,
                               progress=cfg.log.progress)
        last: dict[str, float] = {}
        with writer, PreemptionGuard() as guard:
            if self.evaluator is not None and self.update == 0:
                writer.write(0, self._evaluate(0))
            while self.update < cfg.num_updates:
                update = self.update + 1
                metrics = self.train_step(update)
                if cfg.meta.enabled and update % cfg.meta.interval == 0 and update < cfg.num_updates:
                    metrics.update(self._meta_step(update))
                    writer.write_rubric(self.history.current, update)
                if self.evaluator is not None and (update % cfg.eval.every == 0 or update == cfg.num_updates):
                    metrics.update(self._evaluate(update))
                self.update = update
                writer.write(update, metrics)
                last = metrics
                stop = guard.should_stop(update)
                self.checkpointer.save(update, self.state, self._host_state(),
                                       force=stop or update == cfg.num_updates)
                if stop:
                    _LOG.warning("SIGTERM: saved update %d and stopping", update)
                    break
        self.checkpointer.close()
        if self.is_main and cfg.log.report and self.update == cfg.num_updates:
            from mpo_jax.train.report import write_report

            write_report(self.run_dir)
        return last


def canary_metrics(report: Mapping[str, Any] | None) -> dict[str, float]:
    """`meta/canary/*` from a meta step's canary report: whether it ran and passed, both shares
    overall and per degradation kind, and its seconds (`time/meta_canary_s`)."""
    if not report or not report.get("enabled"):
        return {}
    out = {"meta/canary/ran": float(bool(report.get("ran")))}
    if not report.get("ran"):
        return out
    out.update({"meta/canary/passed": float(bool(report["passed"])),
                "meta/canary/current_share": float(report["current_share"]),
                "meta/canary/proposal_share": float(report["proposal_share"]),
                "meta/canary/pairs": float(report["pairs"]), "time/meta_canary_s": float(report["seconds"])})
    for side in ("current", "proposal"):
        out.update({f"meta/canary/{side}/{kind}": float(share) for kind, share in report[f"{side}_by_kind"].items()})
    return out


def train(config: TrainConfig) -> dict[str, float]:
    return Trainer(config).run()


__all__ = ["Trainer", "check_resources", "train"]
