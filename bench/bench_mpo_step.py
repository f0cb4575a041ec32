"""One full MPO update, phase by phase, with mpo-jax and with the equivalent PyTorch pipeline
(transformers `generate` + a TRL-style PPO update), on the models and settings of the project's
CPU experiment (`configs/experiments/reward_hacking.py`), on the same machine, in the same run.

    python bench/bench_mpo_step.py --markdown-out /tmp/mpo_step.md    # the full comparison
    python bench/bench_mpo_step.py --no-torch                         # mpo-jax only
    python bench/bench_mpo_step.py --smoke                            # few tokens, 2 meta samples

About an hour on the 2-core CPU at the defaults (3,793 s on 2026-11-30: mpo-jax ~47 minutes, since
it runs every phase twice, PyTorch ~16); the meta step (16 analyses and criteria sets with the 0.5B
model) and the judge's generate mode take most of it. mpo-jax's process may need over 10 GB in the
meta step (15 GiB in that run; its prefill materialises the attention scores of 16 rows x 2048
queries x the cache). `--smoke` runs the same code end to end with few
tokens (15-30 minutes, most of it the 0.5B judge's prefill and compiling; `--smoke --batch 2` is
quicker).

Method
------
* Settings: `--config` (default the experiment's `mpo_iter0` arm), then the bench's overrides:
  batch `--batch` 8 essay prompts of the train split (at most `data.max_prompt_tokens` = 128 tokens,
  drawn with the config's seed), responses of up to `--new-tokens` 192 tokens, the essay task's
  `--rubric oracle` (three 0-5 items) as the judge's rubric, `--meta-samples` 16 and
  `--meta-interval` 10; `--judge-model` replaces the judge and meta model; `--set KEY=VALUE` any
  other config key. So: policy SmolLM2-135M-Instruct with LoRA r=16 (alpha 32, q/k/v/o) and a value
  head on its trunk; judge and meta-reward model Qwen2.5-Coder-0.5B-Instruct (the same weights; the
  experiment's own meta model is the 1.5B, which would double the meta step and the memory); the
  fenced judge framing; PPO 2 epochs x 2 mini-batches, float32 everywhere. The models are built,
  and every mpo-jax phase runs, through the trainer's own code (`build_policy_and_state`,
  `sample_rollouts`, `Judge`, `compile_rollout_stats` / `compile_update`, `MetaRewardModel`).
* Phases of one update:
  1. rollouts: `--batch` responses sampled with the trainer's settings (temperature 0.7, top-p 1,
     top-k off, up to `--new-tokens`; the LoRA adapters are part of every decode step);
  2. judging the batch's responses against the 3-item rubric, in two mpo-jax rows: the paper's
     protocol (`Judge` mode "generate": per item a rationale of up to `judge.rationale_tokens` = 128
     tokens ending at `<EOE>`, then an integer constrained to digits, one conversation per response,
     the rubric prefix read from its KV cache: its own tokens rounded up to 256 slots) and
     mpo-jax's fast protocol (mode "logits": the expected score per item from the next-token
     distribution, the rubric prefix reused);
  3. the PPO update: old/reference log-probs and values of the batch (`rollout_stats`), then
     `ppo_update` (reward shaping, GAE, whitening, `ppo.num_ppo_epochs` x `ppo.num_mini_batches`
     AdamW steps on the adapters and the value head), as the trainer's `time/update_s` counts it;
  4. one meta step (`MetaRewardModel.meta_step`: per sample a meta-analysis, a criteria count and
     the criteria one by one, then the merge) on a buffer of `--meta-samples` scored rollouts,
     reported per update as its time / `--meta-interval`. The step is measured once and used in
     both mpo-jax rows.
* Inputs shared by the engines: the prompts (as records); the responses that phases 2 and 4 read
  (mpo-jax's timed rollouts, and for the meta buffer extra rollouts scored by the fast judge), so
  both judges and both meta steps see the same texts; the PPO batch: the random rollout batch of
  `_ppo_inputs.make_arrays` (query `data.max_prompt_tokens` + response `--new-tokens` tokens; an
  update's cost depends on the shapes only), mpo-jax's initial adapter A matrices (B = 0) and value
  head, and the mini-batch permutation mpo-jax draws from the update's key. Scores ~ N(0, 1).
* PyTorch: a separate process with transformers' models loaded from the same GGUF files
  (`from_pretrained(dir, gguf_file=...)`, float32; `HF_HUB_OFFLINE`), torch threads = cores
  (`--torch-threads` overrides that, for smoke runs on a busy machine only: two threads on two
  shared cores can stall torch's thread pool for seconds per step).
  1. `generate` on the LoRA-wrapped policy (eval mode), sampling with the same settings
     (`do_sample`, temperature 0.7, `top_k=0`, `top_p=1`, as TRL's PPOTrainer configures it).
  2./4. mpo-jax's own `Judge` (generate mode) and `MetaRewardModel` drive a transformers model
     through `TorchChatSession`, so prompts, turns, token budgets, stop strings and control flow are
     the same code; each turn is one `generate` call on top of the conversation's `DynamicCache`
     (only the new turn is prefilled, as mpo-jax's `chat_continue` does; rows of different lengths
     are left-padded per turn and the padding masked), integers are constrained to digits by a
     logits processor over the same token tables as mpo-jax's, and `<EOE>` stops through
     `stop_strings`. The judge's rubric prefix is prefilled once per rubric version at batch 1 and
     its cache copied to the batch per call (mpo-jax's judge does the same); like mpo-jax's, that
     prefill is outside the timed call and reported apart. Greedy decoding in both engines.
  3. `_torch_ppo.ppo_update` (the update `bench_ppo.py` times, from the same math) with LoRA
     adapters (`_torch_ppo.LoRALinear`, A and B as in mpo-jax) and a `Linear(D, 1)` value head on
     the policy's trunk, the reference log-probs from the same model with adapters off, activation
     checkpointing (train mode), `torch.optim.AdamW` on the adapters and head. TRL's PPOTrainer
     would run a separate critic trunk (more work); the PyTorch row computes exactly mpo-jax's model.
* Timing: each engine runs in its own subprocess (so peak memory is per engine), mpo-jax first.
  mpo-jax runs each phase twice on the same inputs (same seed, greedy judges and MRM, hence the same
  shapes): the first call compiles whatever an earlier phase has not (reported as "first call"),
  the second is the timed one, i.e. the steady state of a run whose buckets are all compiled.
  PyTorch has nothing to compile: each phase runs once, after a 2-token `generate` on each model
  (`bench_ppo.py` measured its first PPO update no slower than later ones). End to end = rollouts +
  judging + PPO update + meta step / interval; the ratio of each mpo-jax row to PyTorch is
  PyTorch's end-to-end seconds / the row's.
* Work: per phase and engine the table counts what ran: generate/prefill calls, token slots
  pushed through prefill (padding included: mpo-jax pads to length buckets, transformers to the
  longest row), real prefill tokens, sequential decode steps, and real generated tokens. Greedy
  decoding on the same weights and texts gives the same replies in both engines except where float
  rounding flips a token; the report counts identical replies, so unequal work is visible.
* Memory: per phase, the kernel's VmHWM after resetting it (`/proc/self/clear_refs`) before the
  phase (both mpo-jax calls included); per engine, "peak RSS" is the process's high-water mark over
  the whole run, model loading included (`ru_maxrss`, which the resets lower too, combined with the
  VmHWM read before each reset).
* Goals (printed as met/missed): mpo-jax's fast protocol >= 2.5x PyTorch end to end; mpo-jax's
  same protocol >= 1.3x.

Timings on a shared machine are distorted by other processes: the report gives the load average
before the run and the share of the CPUs that *other* processes used during each engine's run (from
/proc/stat, minus the bench's own processes' CPU time), with a warning above 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from _common import REPO, cpu_seconds, machine_info, markdown_table, others_share  # noqa: E402
from _ppo_inputs import make_arrays  # noqa: E402
from bench_ppo import log, max_rss_mib, reset_peak_rss, vm_hwm_mib  # noqa: E402

CONFIG = str(REPO / "configs" / "experiments" / "reward_hacking.py") + ":mpo_iter0"
PHASES = ("rollouts", "judge_generate", "judge_logits", "ppo", "meta")
GOAL_FAST = 2.5
GOAL_SAME = 1.3
SMOKE = {"new_tokens": 16, "meta_samples": 2,
         "set": ["judge.rationale_tokens=16", "meta.analysis_tokens=16", "meta.analysis_words=12",
                 "meta.item_tokens=16", "meta.item_words=12", "meta.max_items=2"]}


# -- what ran -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Work:
    """Counters of one phase (see the docstring)."""

    calls: int = 0  # generate / prefill calls
    prefill_slots: int = 0  # token slots pushed through prefill, padding included
    prefill_tokens: int = 0  # real tokens among them
    decode_steps: int = 0  # sequential one-token steps (batch-wide)
    generated: int = 0  # real generated tokens, all rows

    def add(self, *, slots: int, tokens: int, steps: int, generated: int) -> None:
        self.calls += 1
        self.prefill_slots += slots
        self.prefill_tokens += tokens
        self.decode_steps += steps
        self.generated += generated


class PhaseLog:
    """Seconds, work and memory high-water mark per phase of one engine."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.first: dict[str, float] = {}  # mpo-jax: the first call (compiles)
        self.work: dict[str, Work] = {}
        self.peak_mib: dict[str, float | None] = {}
        self._peak = 0.0  # the process's high-water mark across the resets
        self.current = Work()  # where the instrumented models count

    def start(self, phase: str) -> bool:
        """Count into a fresh `Work` for `phase`; True when the memory high-water mark was reset."""
        self.current = self.work[phase] = Work()
        self._peak = max(self._peak, vm_hwm_mib() or 0.0)
        return reset_peak_rss()

    def peak_rss_mib(self) -> float:
        """The process's peak RSS: `ru_maxrss`, which the resets also lower, combined with the marks
        read before each reset."""
        return max(self._peak, vm_hwm_mib() or 0.0, max_rss_mib())

    def end(self, phase: str, reset: bool) -> None:
        self.peak_mib[phase] = vm_hwm_mib() if reset else None
        self.current = Work()  # untimed work is not counted

    def to_json(self) -> dict:
        return {"seconds": self.seconds, "first": self.first, "peak_mib": self.peak_mib,
                "work": {k: dataclasses.asdict(v) for k, v in self.work.items()}}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_config(args: argparse.Namespace):
    """The experiment's TrainConfig with the bench's overrides (see the docstring)."""
    from mpo_jax.train.config import load_config

    overrides = [f"data.batch_size={args.batch}", f"rollout.max_new_tokens={args.new_tokens}",
                 f"judge.initial_rubric={args.rubric}", "meta.enabled=True", f"meta.num_samples={args.meta_samples}",
                 f"meta.interval={args.meta_interval}", "eval.every=0"]
    if args.judge_model:
        overrides += [f"judge.model.name={args.judge_model}", f"meta.model.name={args.judge_model}"]
    cfg = load_config(args.config, overrides + list(args.set))
    if cfg.meta.model.name != cfg.judge.model.name:
        # One loaded model serves as judge and meta model here (the experiment's meta model is larger).
        cfg = load_config(args.config, overrides + [f"meta.model.name={cfg.judge.model.name}"] + list(args.set))
    if cfg.meta.model != cfg.judge.model:
        raise SystemExit("bench_mpo_step runs the meta step on the judge's model: leave meta.model as judge.model")
    return cfg


def buffer_batches(cfg) -> int:
    """Rollout batches whose responses fill the meta buffer (the timed one first)."""
    return max(1, math.ceil(cfg.meta.num_samples / cfg.data.batch_size))


# -- mpo-jax ----------------------------------------------------------------------------------------
def count_sampler(model, phases: PhaseLog) -> None:
    """Count every generation of `model` into the current phase's `Work`."""
    run = model.sampler._run

    def counted(state, prompt_ids, prompt_len, gen_len, params, constraint):
        out = run(state, prompt_ids, prompt_len, gen_len, params, constraint)
        phases.current.add(slots=out.prefill_tokens, tokens=sum(len(p) for p in prompt_ids), steps=out.decode_steps,
                           generated=int(np.asarray(out.cached_mask).sum()))
        return out

    model.sampler._run = counted


def count_logits_judge(judge, phases: PhaseLog) -> None:
    """Count the logits judge's prefill: the rubric prefix (when prefilled) and each batch's rows and items."""
    prefill_prefix, score_items = judge._prefill_prefix, judge._score_items

    def counted_prefix(params, tokens, valid, cache):
        phases.current.add(slots=int(tokens.size), tokens=int(np.asarray(valid).sum()), steps=0, generated=0)
        return prefill_prefix(params, tokens, valid, cache)

    def counted_scores(params, prefix, sample_tokens, sample_valid, item_tokens, item_valid, *rest):
        items = len(judge.rubric.items)
        batch, item_len = item_tokens.shape[1:]
        probes = int((np.asarray(rest[-3])[:items] >= 0).sum())  # two-token score prefixes (none for 0-5)
        phases.current.add(slots=int(sample_tokens.size) + items * batch * item_len,
                           tokens=int(np.asarray(sample_valid).sum()) + int(np.asarray(item_valid[:items]).sum()),
                           steps=probes, generated=0)
        return score_items(params, prefix, sample_tokens, sample_valid, item_tokens, item_valid, *rest)

    judge._prefill_prefix, judge._score_items = counted_prefix, counted_scores


def run_jax(args: argparse.Namespace) -> dict:
    import flax
    import jax

    from mpo_jax.models.params import flat_from_state
    from mpo_jax.reward.judge import Judge
    from mpo_jax.reward.meta import MetaSample
    from mpo_jax.rl import (
        RolloutBatch,
        compile_rollout_stats,
        compile_update,
        make_ppo_update,
        make_rollout_stats,
        place_batch,
    )
    from mpo_jax.tasks import get_task, load_records
    from mpo_jax.tasks.base import fenced_task
    from mpo_jax.train.model_specs import (
        build_meta_reward_model,
        build_model,
        build_policy_and_state,
        install_policy_params,
    )
    from mpo_jax.train.rollout import sample_rollouts

    cfg = bench_config(args)
    phases = PhaseLog()
    task = get_task(cfg.task)
    judge_task = fenced_task(task) if cfg.judge.fence else task
    rubric = task.load_rubric(cfg.judge.initial_rubric)

    start = time.perf_counter()
    policy, _, state = build_policy_and_state(cfg, None)
    judge_model = build_model(cfg.judge.model, None)  # also the meta model (the config gives both the same spec)
    load_s = time.perf_counter() - start
    log(f"[jax] models loaded in {load_s:.0f} s")
    count_sampler(policy, phases)
    count_sampler(judge_model, phases)

    initial_tokens = len(judge_model.tokenizer.encode(rubric.render(), add_bos=False))
    max_rubric_tokens = cfg.judge_rubric_tokens(initial_tokens)
    max_items = max(cfg.judge_max_items, rubric.num_items)

    def make_judge(mode: str) -> Judge:  # as the trainer builds it
        judge = Judge(judge_model, task=judge_task, mode=mode, max_rubric_tokens=max_rubric_tokens,
                      aggregate=cfg.judge.aggregate, rationale_tokens=cfg.judge.rationale_tokens,
                      plan_tokens=cfg.judge.plan_tokens, max_items=max_items,
                      item_turn_tokens=cfg.judge.item_turn_tokens, seed=cfg.seed)
        judge.set_rubric(rubric)
        return judge

    judges = {"generate": make_judge("generate"), "logits": make_judge("logits")}
    count_logits_judge(judges["logits"], phases)
    mrm = build_meta_reward_model(judge_model, task, cfg.meta)
    rollout_stats = compile_rollout_stats(make_rollout_stats(cfg.ppo.temperature), state, None)
    update_step = compile_update(make_ppo_update(cfg.ppo), state, None)

    # The prompts: train-split records whose prompt fits, in a seeded order.
    b = cfg.data.batch_size
    encode = lambda record: policy.encode_prompt(task.policy_prompt(record))  # noqa: E731
    records, prompt_ids = [], []
    pool = load_records(task, cfg.data.split, cfg.data.data_dir or None)
    for i in np.random.default_rng(cfg.seed).permutation(len(pool)):
        ids = encode(pool[int(i)])
        if len(ids) <= cfg.data.max_prompt_tokens:
            records.append(pool[int(i)])
            prompt_ids.append(ids)
        if len(records) == b * buffer_batches(cfg):
            break

    def rollouts(k: int):
        install_policy_params(policy, state)
        return sample_rollouts(policy, records[k * b:(k + 1) * b], prompt_ids[k * b:(k + 1) * b],
                               query_length=cfg.data.max_prompt_tokens, max_new_tokens=cfg.rollout.max_new_tokens,
                               temperature=cfg.ppo.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                               seed=cfg.seed * 1_000_003 + 1 + k)

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        """Two calls of `fn` (the first compiles), the second timed and counted."""
        reset = phases.start(name)
        phases.first[name], _ = timed(fn)
        phases.current = phases.work[name] = Work()
        phases.seconds[name], out = timed(fn)
        phases.end(name, reset)
        work = phases.work[name]
        log(f"[jax] {name}: first call {phases.first[name]:.1f} s, then {phases.seconds[name]:.1f} s "
            f"({work.decode_steps} decode steps, {work.prefill_slots} prefill slots)")
        return out

    # 1. rollouts
    batch = phase("rollouts", lambda: rollouts(0))
    extra = [rollouts(k) for k in range(1, buffer_batches(cfg))]  # untimed: the rest of the meta buffer

    # 2. judging
    results = {}
    for mode in ("generate", "logits"):
        judge = judges[mode]

        def score(judge=judge):
            judge.reseed([cfg.seed, 1, 1])
            return judge.score_detailed(batch.records, batch.texts)

        results[mode] = phase(f"judge_{mode}", score)
    start = time.perf_counter()
    judges["logits"].set_rubric(rubric)
    jax.block_until_ready(judges["logits"]._prefix(max_rubric_tokens))
    rubric_prefix_s = time.perf_counter() - start
    extra_scores = [judges["logits"].score(r.records, r.texts) for r in extra]

    # 3. the PPO update
    tok = policy.tokenizer
    c = policy.config
    special = sorted(set(tok.eos_ids) | {tok.pad_id} | ({tok.bos_id} if getattr(tok, "bos_id", None) is not None
                                                        else set()))
    arrays = make_arrays(np.random.default_rng(cfg.seed), b, cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens,
                         c.vocab_size, tok.pad_id, tok.eos_ids[0], special)
    flat = {k: np.asarray(v) for k, v in flat_from_state(state.params["policy"]).items()}
    if any(k.startswith("lm_head_lora") for k in flat):
        raise SystemExit("the PyTorch side has no LM-head adapter: leave lm_head out of policy.lora_targets")
    keys = [jax.random.fold_in(jax.random.key(cfg.seed), update) for update in (1, 2)]  # as the trainer's
    # The first update's mini-batch permutations (`optimize` draws one per epoch from the update's key).
    orders = np.stack([np.asarray(jax.random.permutation(k, b))
                       for k in jax.random.split(keys[0], cfg.ppo.num_ppo_epochs)])
    first_metrics: dict[str, float] = {}

    def ppo():
        nonlocal state
        q, qm, r, rm = (jax.numpy.asarray(arrays[k]) for k in ("query", "query_mask", "response", "response_mask"))
        stats = {k: np.asarray(v) for k, v in jax.device_get(rollout_stats(state, q, qm, r, rm)).items()}
        rollout = place_batch(RolloutBatch(query=arrays["query"], query_mask=arrays["query_mask"],
                                           response=arrays["response"], response_mask=arrays["response_mask"],
                                           logprobs=stats["logprobs"], ref_logprobs=stats["ref_logprobs"],
                                           values=stats["values"], scores=arrays["scores"],
                                           contains_eos=arrays["contains_eos"]), None)
        state, metrics = update_step(state, rollout, keys[1] if first_metrics else keys[0])
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not first_metrics:
            first_metrics.update(metrics)
        return metrics

    phase("ppo", ppo)

    # 4. the meta step on the buffer
    samples = [MetaSample(record=r, response=t, score=s.score, rationales=tuple(s.rationales))
               for r, t, s in zip(batch.records, batch.texts, results["logits"], strict=True)]
    for rolled, scores in zip(extra, extra_scores, strict=True):
        samples += [MetaSample(record=r, response=t, score=float(s)) for r, t, s in
                    zip(rolled.records, rolled.texts, scores, strict=True)]
    samples = samples[:max(cfg.meta.num_samples, b)]
    step = cfg.meta.interval
    meta = phase("meta", lambda: mrm.meta_step(rubric, samples, np.random.default_rng([cfg.seed, step, 2]), step=step,
                                               fits=judges["logits"].fits))

    shared = {
        "records": batch.records, "prompt_ids": [list(map(int, p)) for p in prompt_ids[:b]],
        "texts": batch.texts,
        "samples": [{"record": s.record, "response": s.response, "score": s.score, "rationales": list(s.rationales)}
                    for s in samples],
        "policy": {"eos_ids": list(tok.eos_ids), "pad_id": tok.pad_id},
        "judge": {"eos_ids": list(judge_model.tokenizer.eos_ids), "pad_id": judge_model.tokenizer.pad_id,
                  "prefix_text": judges["generate"]._prefix_text(rubric)},
        "lora_scale": c.lora_alpha / c.lora_rank if c.lora_rank else 0.0,
    }
    np.savez(args.data, **arrays, orders=orders, value_kernel=flat["value_head.kernel"],
             value_bias=flat["value_head.bias"],
             **{f"lora.{k.split('.', 1)[1]}": v for k, v in flat.items() if k.startswith("layers.") and "_lora_" in k})
    args.shared.write_text(json.dumps(shared), encoding="utf-8")
    return {
        "engine": "jax", "load_s": load_s, "phases": phases.to_json(), "max_rss_mib": phases.peak_rss_mib(),
        "rubric_prefix_s": rubric_prefix_s, "max_rubric_tokens": max_rubric_tokens,
        "response_lengths": batch.response_lengths.tolist(),
        "rubric_tokens": judges["logits"].rubric_tokens(rubric), "ppo_metrics": first_metrics,
        "judge": {mode: [{"score": r.score, "items": r.item_scores, "rationales": r.rationales} for r in res]
                  for mode, res in results.items()},
        "meta": meta_summary(meta),
        "settings": settings(cfg, rubric),
        "versions": {"jax": jax.__version__, "flax": flax.__version__,
                     "device": ", ".join(str(d) for d in jax.devices())},
    }


def meta_summary(result) -> dict:
    return {"accepted": result.accepted, "reason_code": result.reason_code, "reason": result.reason,
            "selected": len(result.selected), "analyses": result.analyses, "refinements": result.refinements,
            "merged_text": result.merged_text, "timing": result.timing,
            "criteria": [len([line for line in r.splitlines() if line.startswith("### ")]) for r in result.refinements]}


def settings(cfg, rubric) -> dict:
    return {"policy": cfg.policy.name, "lora_rank": cfg.policy.lora_rank, "lora_alpha": cfg.policy.lora_alpha,
            "judge": cfg.judge.model.name, "meta_model": cfg.meta.model.name or cfg.judge.model.name,
            "fence": cfg.judge.fence, "batch": cfg.data.batch_size, "prompt_tokens": cfg.data.max_prompt_tokens,
            "new_tokens": cfg.rollout.max_new_tokens, "temperature": cfg.ppo.temperature,
            "rubric": cfg.judge.initial_rubric, "rubric_items": rubric.num_items,
            "rationale_tokens": cfg.judge.rationale_tokens, "epochs": cfg.ppo.num_ppo_epochs,
            "mini_batches": cfg.ppo.num_mini_batches, "accum": cfg.ppo.gradient_accumulation_steps,
            "meta_samples": cfg.meta.num_samples, "meta_interval": cfg.meta.interval,
            "analysis_tokens": cfg.meta.analysis_tokens, "item_tokens": cfg.meta.item_tokens,
            "max_items": cfg.meta.max_items, "merge_words": cfg.meta.merge_words}


# -- PyTorch: transformers models driven like mpo-jax's local chat sessions ------------------------------------
class TorchChat:
    """A transformers causal LM and its tokenizer, for `TorchChatSession` (what `open_session` gets)."""

    def __init__(self, model, tokenizer, *, eos_ids: Sequence[int], pad_id: int, reuse_prefix: bool,
                 phases: PhaseLog):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids, self.pad_id = list(eos_ids), pad_id
        self.reuse_prefix = reuse_prefix
        self.phases = phases
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self._prefixes: dict[str, tuple[list[int], Any]] = {}
        self._token_strings: list[str] | None = None

    def render(self, messages: Sequence[dict], generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def token_strings(self) -> list[str]:
        """The text each id adds after other text (mpo-jax's `Tokenizer.token_strings`), for constraints."""
        if self._token_strings is None:
            anchor = self.encode("a")
            prefix = self.decode(anchor, skip_special_tokens=False)
            texts = self.tokenizer.batch_decode([anchor + [i] for i in range(len(self.tokenizer))],
                                                skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._token_strings = [t[len(prefix):] if t.startswith(prefix) else self.decode([i], False)
                                   for i, t in enumerate(texts)]
        return self._token_strings

    def prefix(self, text: str):
        """(ids, batch-1 KV cache) of a shared conversation prefix, prefilled once."""
        import torch
        from transformers import DynamicCache

        if text not in self._prefixes:
            ids = self.encode(text)
            cache = DynamicCache(config=self.model.config)
            with torch.no_grad():
                self.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
            self._prefixes[text] = (ids, cache)
        return self._prefixes[text]

    def generate(self, input_ids, attention_mask, cache, *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (), constraint=None):
        """One `generate` call; returns (sequences [B, L + G], G)."""
        import torch
        from transformers import LogitsProcessorList

        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
                                      pad_token_id=self.pad_id, use_cache=True, return_dict_in_generate=True)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            kwargs.update(do_sample=False)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        if constraint is not None:
            kwargs["logits_processor"] = LogitsProcessorList([ConstraintProcessor(constraint, input_ids.shape[1])])
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)
        return out.sequences, out.sequences.shape[1] - input_ids.shape[1]

    def real_length(self, ids: Sequence[int], stop: Sequence[str]) -> int:
        """Generated tokens up to and including the end token or the token that completes a stop string."""
        end = next((j + 1 for j, t in enumerate(ids) if t in self.eos_ids), len(ids))
        if stop:
            for n in range(1, end + 1):
                if any(s in self.decode(ids[:n]) for s in stop):
                    return n
        return end


class ConstraintProcessor:
    """mpo-jax's token automaton (`engine.constraints`) as a transformers logits processor: the
    state of each row is replayed from the tokens generated since `start`."""

    def __init__(self, constraint, start: int):
        import torch

        self.allowed = torch.from_numpy(constraint.allowed)
        self.next_state = torch.from_numpy(constraint.next_state.astype(np.int64))
        self.state = torch.zeros(1, dtype=torch.long)
        self.start = start

    def __call__(self, input_ids, scores):
        state = self.state.expand(input_ids.shape[0])
        for t in range(self.start, input_ids.shape[1]):
            state = self.next_state[state, input_ids[:, t]]
        return scores.masked_fill(~self.allowed[state][:, :scores.shape[1]], float("-inf"))


class TorchChatSession:
    """mpo-jax's `LocalChatSession` on a transformers model: each turn prefills only its new tokens on
    top of the conversation's `DynamicCache` and generates the reply (mpo-jax's `ChatSession` API)."""

    def __init__(self, chat: TorchChat, histories: Sequence[Sequence[dict]]):
        self.chat = chat
        self.histories = [list(h) for h in histories]
        self.contexts: list[str] | None = None  # the text in the cache per row
        self.ids = self.mask = self.cache = None

    def _open(self) -> None:
        import torch
        from transformers import DynamicCache

        rows = len(self.histories)
        shared = self.histories[0]
        if self.chat.reuse_prefix and shared and all(h == shared for h in self.histories):
            text = self.chat.render(shared, generation_prompt=False)
            ids, cache = self.chat.prefix(text)
            self.cache = _copy_cache(cache, rows)
            self.ids = torch.tensor([ids] * rows)
            self.mask = torch.ones_like(self.ids)
            self.contexts = [text] * rows
        else:
            self.cache, self.contexts = DynamicCache(config=self.chat.model.config), [""] * rows
            self.ids = self.mask = None

    def _turn(self, turns, *, max_tokens: int, temperature: float = 0.0, stop: Sequence[str] = (),
              constraint=None) -> list[str]:
        import torch
        from transformers import DynamicCache

        if len(turns) != len(self.histories):
            raise ValueError(f"got {len(turns)} turns for {len(self.histories)} conversations")
        histories = [h + list(t) for h, t in zip(self.histories, turns, strict=True)]
        fulls = [self.chat.render(h) for h in histories]
        if self.contexts is None:
            self._open()
        if not all(f.startswith(c) for f, c in zip(fulls, self.contexts, strict=True)):
            # A reply that does not re-render as cached: prefill the conversations afresh (as mpo-jax does).
            self.cache, self.contexts, self.ids, self.mask = DynamicCache(config=self.chat.model.config), \
                [""] * len(fulls), None, None
        deltas = [self.chat.encode(f[len(c):]) for f, c in zip(fulls, self.contexts, strict=True)]
        width = max(len(d) for d in deltas)
        new = torch.full((len(deltas), width), self.chat.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(deltas), width), dtype=torch.long)
        for i, d in enumerate(deltas):
            if d:
                new[i, width - len(d):] = torch.tensor(d)
                new_mask[i, width - len(d):] = 1
        ids = new if self.ids is None else torch.cat([self.ids, new], 1)
        mask = new_mask if self.mask is None else torch.cat([self.mask, new_mask], 1)
        sequences, steps = self.chat.generate(ids, mask, self.cache, max_new_tokens=max_tokens,
                                              temperature=temperature, stop=stop, constraint=constraint)
        generated = sequences[:, ids.shape[1]:].tolist()
        lengths = [self.chat.real_length(g, stop) for g in generated]
        gen_mask = torch.tensor([[1] * n + [0] * (steps - n) for n in lengths], dtype=torch.long)
        self.chat.phases.current.add(slots=new.numel(), tokens=int(new_mask.sum()), steps=steps,
                                     generated=sum(lengths))
        self.ids, self.mask = sequences, torch.cat([mask, gen_mask], 1)
        replies, contexts, records = [], [], []
        for i, (g, n) in enumerate(zip(generated, lengths, strict=True)):
            cached = g[:n]
            text = self.chat.decode(cached)
            contexts.append(fulls[i] + self.chat.decode(cached, skip_special_tokens=False))
            records.append(histories[i] + [{"role": "assistant", "content": text}])
            cut = min((k for k in (text.find(s) for s in stop) if k >= 0), default=len(text))
            replies.append(text[:cut])
        self.contexts, self.histories = contexts, records
        return replies

    def say(self, turns, *, max_tokens, stop=(), temperature=0.0):
        return self._turn(turns, max_tokens=max_tokens, stop=tuple(stop), temperature=temperature)

    def say_integer(self, turns, *, max_digits=2):
        from mpo_jax.engine import constraints as constraints_lib
        from mpo_jax.engine.chat_session import _parse_int

        constraint = constraints_lib.digits(self.chat.token_strings(), self.chat.eos_ids, max_digits, self.chat.vocab)
        return [_parse_int(r) for r in self._turn(turns, max_tokens=max_digits + 1, constraint=constraint)]

    def say_choice(self, turns, options):
        from mpo_jax.engine import constraints as constraints_lib

        constraint = constraints_lib.choice([self.chat.encode(o) for o in options], self.chat.eos_ids,
                                            self.chat.vocab, options)
        replies = self._turn(turns, max_tokens=16, constraint=constraint)
        return [r if r in options else None for r in replies]


def _copy_cache(cache, rows: int):
    """A batch-`rows` copy of a batch-1 cache (the stored prefix must stay as it is)."""
    import copy

    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out


def install_torch_sessions() -> None:
    """Let mpo-jax's `Judge` and `MetaRewardModel` open `TorchChatSession`s on a `TorchChat`."""
    from mpo_jax.engine import chat_session

    original = chat_session.open_session

    def open_session(model, histories):
        if isinstance(model, TorchChat):
            return TorchChatSession(model, histories)
        return original(model, histories)

    chat_session.open_session = open_session


def run_torch(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantisation progress bars
    import torch
    import transformers
    from _torch_ppo import PPOHyper, adapters_off, add_lora, ppo_update, token_logprobs, trunk_hidden

    from mpo_jax.engine import presets
    from mpo_jax.reward.judge import Judge
    from mpo_jax.reward.meta import MetaSample
    from mpo_jax.tasks import get_task
    from mpo_jax.tasks.base import fenced_task
    from mpo_jax.train.model_specs import build_meta_reward_model

    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    install_torch_sessions()
    base_rss = max_rss_mib()

    cfg = bench_config(args)
    phases = PhaseLog()
    shared = json.loads(args.shared.read_text(encoding="utf-8"))
    data = np.load(args.data)
    task = get_task(cfg.task)
    judge_task = fenced_task(task) if cfg.judge.fence else task
    rubric = task.load_rubric(cfg.judge.initial_rubric)

    def load(name: str):
        path = presets.resolve(name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
        return model.eval(), tokenizer

    start = time.perf_counter()
    policy, policy_tok = load(cfg.policy.name)
    judge_model, judge_tok = load(cfg.judge.model.name)
    load_s = time.perf_counter() - start
    log(f"[torch] models loaded in {load_s:.0f} s")
    lora = add_lora(policy, {k.split(".", 1)[1]: data[k] for k in data.files if k.startswith("lora.")},
                    shared["lora_scale"])
    enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
    value_head = torch.nn.Linear(policy.config.hidden_size, 1)
    with torch.no_grad():
        value_head.weight.copy_(torch.from_numpy(data["value_kernel"]).T)
        value_head.bias.copy_(torch.from_numpy(data["value_bias"]))
    enable()  # per-layer recompute in the backward pass (train mode), as mpo-jax's remat
    params = [p for m in lora for p in (m.lora_a, m.lora_b)] + list(value_head.parameters())
    opt = cfg.ppo.optimizer
    optimizer = torch.optim.AdamW(params, lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps,
                                  weight_decay=opt.weight_decay, foreach=True)
    policy_chat = TorchChat(policy, policy_tok, eos_ids=shared["policy"]["eos_ids"], pad_id=shared["policy"]["pad_id"],
                            reuse_prefix=False, phases=phases)
    judge_chat = TorchChat(judge_model, judge_tok, eos_ids=shared["judge"]["eos_ids"], pad_id=shared["judge"]["pad_id"],
                           reuse_prefix=True, phases=phases)
    meta_chat = TorchChat(judge_model, judge_tok, eos_ids=shared["judge"]["eos_ids"], pad_id=shared["judge"]["pad_id"],
                          reuse_prefix=False, phases=phases)
    for chat in (policy_chat, judge_chat):  # untimed: first kernels, thread pools, the constraint tables
        chat.generate(torch.tensor([chat.encode("Hello")]), None, None, max_new_tokens=2)
    judge_chat.token_strings()
    checks = {}

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        reset = phases.start(name)
        phases.seconds[name], out = timed(fn)
        phases.end(name, reset)
        work = phases.work[name]
        log(f"[torch] {name}: {phases.seconds[name]:.1f} s ({work.decode_steps} decode steps, "
            f"{work.prefill_slots} prefill slots)")
        return out

    # 1. rollouts
    prompt_ids = [policy_chat.encode(policy_chat.render(task.policy_prompt(r))) for r in shared["records"]]
    checks["same_prompt_ids"] = sum(a == b for a, b in zip(prompt_ids, shared["prompt_ids"], strict=True))

    def rollouts():
        width = max(map(len, prompt_ids))
        ids = torch.full((len(prompt_ids), width), policy_chat.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        sequences, steps = policy_chat.generate(ids, mask, None, max_new_tokens=cfg.rollout.max_new_tokens,
                                                temperature=cfg.ppo.temperature, top_p=cfg.rollout.top_p,
                                                top_k=cfg.rollout.top_k)
        lengths = [policy_chat.real_length(g, ()) for g in sequences[:, width:].tolist()]
        phases.current.add(slots=ids.numel(), tokens=int(mask.sum()), steps=steps, generated=sum(lengths))
        return lengths

    response_lengths = phase("rollouts", rollouts)

    # 2. judging (the paper's protocol) on mpo-jax's responses
    judge = Judge(judge_chat, task=judge_task, mode="generate", aggregate=cfg.judge.aggregate,
                  rationale_tokens=cfg.judge.rationale_tokens, plan_tokens=cfg.judge.plan_tokens,
                  max_items=max(cfg.judge_max_items, rubric.num_items), item_turn_tokens=cfg.judge.item_turn_tokens,
                  seed=cfg.seed)
    judge.set_rubric(rubric)
    prefix_text = judge_chat.render(judge._prefix_messages(rubric), generation_prompt=False)
    checks["same_judge_prefix"] = prefix_text == shared["judge"]["prefix_text"]
    rubric_prefix_s, _ = timed(lambda: judge_chat.prefix(prefix_text))

    def score():
        judge.reseed([cfg.seed, 1, 1])
        return judge.score_detailed(shared["records"], shared["texts"])

    judged = phase("judge_generate", score)

    # 3. the PPO update: rollout statistics, then the update
    t = {k: torch.from_numpy(np.asarray(data[k])) for k in ("query", "query_mask", "response", "response_mask",
                                                           "scores", "contains_eos")}
    hyper = PPOHyper(temperature=cfg.ppo.temperature, kl_coef=cfg.ppo.kl_coef, vf_coef=cfg.ppo.vf_coef,
                     cliprange=cfg.ppo.cliprange, cliprange_value=cfg.ppo.cliprange_value, gamma=cfg.ppo.gamma,
                     lam=cfg.ppo.lam, max_grad_norm=opt.max_grad_norm or math.inf)
    if cfg.ppo.kl_estimator != "k1" or cfg.ppo.score_position != "after_last_token" or cfg.ppo.whiten_rewards \
            or cfg.ppo.missing_eos_penalty is not None or cfg.ppo.entropy_coef:
        raise SystemExit("the PyTorch update implements TRL's defaults only (k1 KL, score after the last token, "
                         "no reward whitening, no missing-EOS penalty, no entropy bonus)")

    def outputs(idx):
        hidden = trunk_hidden(policy.model, t, idx)
        return policy.lm_head(hidden), value_head(hidden)[..., 0]

    def ppo():
        everything = torch.arange(t["query"].shape[0])
        with torch.no_grad():
            policy.eval()
            logits, values = outputs(everything)
            t["logprobs"] = token_logprobs(logits, t["response"], hyper.temperature)
            t["values"] = values
            with adapters_off(lora):
                ref_logits = policy.lm_head(trunk_hidden(policy.model, t, everything))
            t["ref_logprobs"] = token_logprobs(ref_logits, t["response"], hyper.temperature)
            del logits, ref_logits
        policy.train()  # activation checkpointing is on in train mode (dropout is 0)
        metrics = ppo_update(t, data["orders"], outputs, params, optimizer, hyper,
                             num_mini_batches=cfg.ppo.num_mini_batches, accum=cfg.ppo.gradient_accumulation_steps)
        policy.eval()
        return metrics

    ppo_metrics = phase("ppo", ppo)

    # 4. the meta step on the same buffer
    mrm = build_meta_reward_model(meta_chat, task, cfg.meta)
    samples = [MetaSample(record=s["record"], response=s["response"], score=s["score"],
                          rationales=tuple(s["rationales"])) for s in shared["samples"]]
    step = cfg.meta.interval
    meta = phase("meta", lambda: mrm.meta_step(rubric, samples, np.random.default_rng([cfg.seed, step, 2]), step=step,
                                               fits=judge.fits))
    return {
        "engine": "torch", "load_s": load_s, "phases": phases.to_json(), "max_rss_mib": phases.peak_rss_mib(),
        "import_rss_mib": base_rss, "rubric_prefix_s": rubric_prefix_s, "ppo_metrics": ppo_metrics,
        "response_lengths": response_lengths, "checks": checks,
        "judge": {"generate": [{"score": r.score, "items": r.item_scores, "rationales": r.rationales} for r in judged]},
        "meta": meta_summary(meta),
        "versions": {"torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
                     "transformers": transformers.__version__, "attention": policy.config._attn_implementation},
    }


# -- the parent: runs both engines, reports ---------------------------------------------------------------
def run_engine(engine: str, args: argparse.Namespace, workdir: Path) -> tuple[dict, float | None]:
    result = workdir / f"{engine}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", engine, "--data", str(workdir / "ppo.npz"),
           "--shared", str(workdir / "shared.json"), "--result", str(result), "--config", args.config,
           "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--rubric", args.rubric,
           "--meta-samples", str(args.meta_samples), "--meta-interval", str(args.meta_interval)]
    cmd += ["--judge-model", args.judge_model] if args.judge_model else []
    cmd += ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
    for item in args.set:
        cmd += ["--set", item]
    before, started = cpu_seconds(include_children=True), time.perf_counter()
    subprocess.run(cmd, check=True)
    others = others_share(before, cpu_seconds(include_children=True), time.perf_counter() - started)
    return json.loads(result.read_text(encoding="utf-8")), others


def end_to_end(r: dict, judge_phase: str, interval: int) -> float:
    s = r["phases"]["seconds"]
    return s["rollouts"] + s[judge_phase] + s["ppo"] + s["meta"] / interval


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def report(args, info, jx: dict, th: dict | None, load_before, others: dict, wall_s: float) -> str:
    st = jx["settings"]
    interval = st["meta_interval"]
    js, jf = jx["phases"]["seconds"], jx["phases"]["first"]
    ts = th["phases"]["seconds"] if th else None
    out = ["### Machine", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- {k}: {v}" for k, v in jx["versions"].items()]
    if th:
        out += [f"- {k}: {v}" for k, v in th["versions"].items()]
    busy = any(v is not None and v > 0.10 for v in others.values())
    out += [f"- load average before the run (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load_before)}; other "
            "processes used " + ", ".join(f"{'?' if v is None else f'{v:.0%}'} of the CPUs during the {k} run"
                                          for k, v in others.items())
            + (" — **the machine was busy: timings are pessimistic**" if busy else ""),
            f"- policy {st['policy']} (LoRA r={st['lora_rank']}, alpha {st['lora_alpha']:g}, value head on its "
            "trunk); "
            f"judge and meta model {st['judge']}{' (fenced judge framing)' if st['fence'] else ''}; float32; "
            f"batch {st['batch']} essay prompts (<= {st['prompt_tokens']} tokens), up to {st['new_tokens']} new tokens "
            f"at temperature {st['temperature']:g}; rubric '{st['rubric']}' ({st['rubric_items']} items, "
            f"{jx['rubric_tokens']} tokens of judge prefix, padded to {jx['max_rubric_tokens']} in mpo-jax's logits "
            f"mode, to a multiple of 256 in its generate mode); "
            f"rationales <= {st['rationale_tokens']} tokens; PPO {st['epochs']} epochs x {st['mini_batches']} "
            f"mini-batches x {st['accum']} micro-batches; meta step on {st['meta_samples']} samples (analyses <= "
            f"{st['analysis_tokens']} tokens, <= {st['max_items']} criteria of <= {st['item_tokens']} tokens, merge "
            f"<= {st['merge_words']} words), every {interval} updates", ""]

    out += ["### One MPO update (seconds)", ""]
    names = {"rollouts": f"1. rollouts ({st['batch']} x <= {st['new_tokens']} tokens)",
             "judge": f"2. judging ({st['rubric_items']}-item rubric)",
             "ppo": "3. PPO update (rollout stats + update)",
             "meta": f"4. meta step / {interval}"}
    rows = []
    for key, label in names.items():
        if key == "judge":
            cells = [f"{js['judge_generate']:.1f} (generate)", f"{js['judge_logits']:.1f} (logits)",
                     f"{ts['judge_generate']:.1f} (generate)" if ts else "-"]
        else:
            div = interval if key == "meta" else 1
            cells = [f"{js[key] / div:.1f}"] * 2 + ([f"{ts[key] / div:.1f}"] if ts else ["-"])
        rows.append([label] + cells)
    same, fast = end_to_end(jx, "judge_generate", interval), end_to_end(jx, "judge_logits", interval)
    torch_total = end_to_end(th, "judge_generate", interval) if th else None
    rows.append(["**end to end**", f"**{same:.1f}**", f"**{fast:.1f}**", f"**{torch_total:.1f}**" if th else "-"])
    if th:
        rows.append(["vs PyTorch", f"{torch_total / same:.2f}x", f"{torch_total / fast:.2f}x", "1.00x"])
    rows.append(["peak RSS GiB", f"{jx['max_rss_mib'] / 1024:.2f}", f"{jx['max_rss_mib'] / 1024:.2f}",
                 f"{th['max_rss_mib'] / 1024:.2f}" if th else "-"])
    out.append(markdown_table(["phase", "mpo-jax, same protocol", "mpo-jax, fast protocol", "PyTorch"], rows))
    out += ["", f"- one meta step: mpo-jax {js['meta']:.1f} s" + (f", PyTorch {ts['meta']:.1f} s" if ts else "")
            + "; mpo-jax's first calls (compiling what earlier phases had not): "
            + ", ".join(f"{k} {jf[k]:.1f} s" for k in PHASES)
            + f"; model loading: mpo-jax {jx['load_s']:.0f} s" + (f", PyTorch {th['load_s']:.0f} s" if th else ""),
            f"- per rubric version, outside the timed calls (set_rubric + rubric-prefix prefill): mpo-jax "
            f"{jx['rubric_prefix_s']:.1f} s" + (f", PyTorch {th['rubric_prefix_s']:.1f} s" if th else "")]
    out += ["", "### Goals", ""]
    if th:
        for label, value, goal in (("fast protocol", torch_total / fast, GOAL_FAST),
                                   ("same protocol", torch_total / same, GOAL_SAME)):
            out.append(f"- mpo-jax {label} >= {goal:g}x PyTorch end to end: **{value:.2f}x** — "
                       f"{'met' if value >= goal else 'missed'}")
    else:
        out.append("- not evaluated: PyTorch was not run (--no-torch or not installed)")

    out += ["", "### Work per phase (what ran in the timed calls)", ""]
    rows = []
    for phase_name in PHASES:
        for label, r in (("mpo-jax", jx), ("PyTorch", th)):
            if r is None or phase_name not in r["phases"]["work"]:
                continue
            w = r["phases"]["work"][phase_name]
            peak = r["phases"]["peak_mib"].get(phase_name)
            counts = ([w["calls"], f"{w['prefill_slots']:,}", f"{w['prefill_tokens']:,}", w["decode_steps"],
                       f"{w['generated']:,}"] if phase_name != "ppo" else ["-"] * 5)
            rows.append([phase_name, label, f"{r['phases']['seconds'][phase_name]:.1f}", *counts,
                         "?" if peak is None else f"{peak / 1024:.2f}"])
    out.append(markdown_table(["phase", "engine", "seconds", "calls", "prefill slots", "real prefill tok",
                               "decode steps", "generated tok", "phase peak GiB"], rows))
    out += ["", "- PPO: the update's tokens are the same in both engines ("
            f"{st['batch']} x ({st['prompt_tokens']} + {st['new_tokens']}) per forward pass; mpo-jax's rollout "
            "statistics and update are jitted, PyTorch's run eagerly with activation checkpointing)"]

    if th:
        out += ["", "### Same work?", ""]
        c = th["checks"]
        out.append(f"- policy prompt ids identical in both engines: {c['same_prompt_ids']}/{st['batch']} rows; judge "
                   f"rubric prefix renders identically: {'yes' if c['same_judge_prefix'] else '**no**'}")
        out.append(f"- response lengths of the rollouts (sampled independently): mpo-jax "
                   f"{sorted(jx['response_lengths'])}, PyTorch {sorted(th['response_lengths'])}")
        jg, tg = jx["judge"]["generate"], th["judge"]["generate"]
        rat = [(a == b) for x, y in zip(jg, tg, strict=True) for a, b in zip(x["rationales"], y["rationales"])]
        items = [(a == b) for x, y in zip(jg, tg, strict=True) for a, b in zip(x["items"], y["items"])]
        out.append(f"- judge (generate mode): {sum(rat)}/{len(rat)} rationales and {sum(items)}/{len(items)} item "
                   f"scores identical; totals mpo-jax {[round(x['score'], 2) for x in jg]}, PyTorch "
                   f"{[round(y['score'], 2) for y in tg]}; fast protocol totals "
                   f"{[round(x['score'], 2) for x in jx['judge']['logits']]}")
        jm, tm = jx["meta"], th["meta"]
        same_analyses = sum(a == b for a, b in zip(jm["analyses"], tm["analyses"], strict=False))
        same_sets = sum(a == b for a, b in zip(jm["refinements"], tm["refinements"], strict=False))
        out.append(f"- meta step: {same_analyses}/{jm['selected']} analyses and {same_sets}/{jm['selected']} refined "
                   f"criteria sets identical; criteria per set mpo-jax {jm['criteria']}, PyTorch {tm['criteria']}; "
                   f"merged rubric identical: {'yes' if jm['merged_text'] == tm['merged_text'] else 'no'}; outcome "
                   f"mpo-jax {jm['reason_code']}, PyTorch {tm['reason_code']}")
        names = ["loss", "loss/value_avg", "policy/entropy_avg", "grad_norm"]
        out.append("- PPO, first update from the same initial weights (rollout statistics computed by each engine): "
                   + ", ".join(f"{n} {jx['ppo_metrics'][n]:.6g} vs {th['ppo_metrics'][n]:.6g} "
                               f"(rel. diff. {rel(jx['ppo_metrics'][n], th['ppo_metrics'][n]):.1e})" for n in names))
        out.append(f"- PyTorch process RSS after imports (torch, transformers, jax via mpo-jax's judge and meta code): "
                   f"{th['import_rss_mib'] / 1024:.2f} GiB")
    out += ["", f"_Bench wall time {wall_s:.0f} s._"]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG, help="config file[:arm] (default: the reward-hacking experiment)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per update")
    parser.add_argument("--new-tokens", type=int, default=192, help="max new tokens per response")
    parser.add_argument("--rubric", default="oracle", help="the judge's rubric (a shipped name or a file)")
    parser.add_argument("--meta-samples", type=int, default=16, help="samples the meta step analyses")
    parser.add_argument("--meta-interval", type=int, default=10, help="updates per meta step")
    parser.add_argument("--judge-model", default="", help="judge and meta model (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config override, e.g. --set meta.analysis_tokens=64 (repeatable)")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick end-to-end check: --new-tokens 16 --meta-samples 2 and 16-token rationales, "
                             "analyses and criteria (at most 2)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch pipeline")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch intra-op threads (default: the cores; on a busy machine 1 avoids torch's "
                             "thread-pool stalls, for smoke runs only)")
    parser.add_argument("--markdown-out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--engine", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shared", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.new_tokens, args.meta_samples = SMOKE["new_tokens"], SMOKE["meta_samples"]
        args.set = SMOKE["set"] + args.set

    if args.engine:
        result = (run_jax if args.engine == "jax" else run_torch)(args)
        args.result.write_text(json.dumps(result), encoding="utf-8")
        return 0

    started = time.perf_counter()
    info = machine_info()  # the commit that runs, read before anything can change it
    load_before = os.getloadavg()
    others: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="bench_mpo_step_") as tmp:
        workdir = Path(tmp)
        jx, others["mpo-jax"] = run_engine("jax", args, workdir)
        th = None
        if not args.no_torch:
            needed = ("torch", "transformers", "accelerate", "gguf")
            missing = [m for m in needed if importlib.util.find_spec(m) is None]
            if missing:
                log(f"the PyTorch pipeline is not benchmarked: {', '.join(missing)} not installed "
                    "(pip install -e '.[parity]')")
            else:
                th, others["PyTorch"] = run_engine("torch", args, workdir)
    wall_s = time.perf_counter() - started
    text = report(args, info, jx, th, load_before, others, wall_s)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
