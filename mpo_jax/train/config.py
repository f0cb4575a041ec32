"""The training run's configuration: `ml_collections` files in, frozen validated dataclasses out.

A config file is Python (the JAX convention) with `get_config()` returning a `ConfigDict`; it
starts from `default_config()` so every key exists with its type. Command-line overrides
(`--config.ppo.optimizer.learning_rate=1e-5`) are parsed against the key's current type.
`to_train_config` turns the dict into `TrainConfig`, naming any unknown key or wrong type. What
needs the machine (data files, models, the mesh against the device count) is checked by the
trainer's `check_resources` before anything compiles.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from mpo_jax.errors import MpoError
from mpo_jax.rl.config import GRPOConfig, PPOConfig

# Tokens of the judge's rubric prefix beyond the criteria themselves: persona, chat markup, tags.
RUBRIC_HEADROOM_TOKENS = 512


class ConfigError(MpoError, ValueError):
    """A configuration problem; the message names the key and the fix."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key} {message}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: a preset name, a local .gguf file / HF directory, or "tiny-random"."""

    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    remat: bool = True
    remat_policy: str = "full"  # "full" | "dots" (keep weight-matmul outputs: faster backward, more memory)
    # Training (cache-free) attention: "blocked" (causal query blocks of attention_block rows: skips the
    # blocks above the diagonal, recomputes in the backward pass; same results, a PPO update ~15% faster on
    # CPU, docs/benchmarks.md) | "dense" (the full masked score matrix). Decoding is unaffected.
    attention_impl: str = "blocked"
    attention_block: int = 64
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # "tiny-random" only: a random decoder over a small byte-level BPE tokenizer built in code.
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_vocab_size: int = 320
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RemoteSpec:
    """An OpenAI-compatible chat endpoint used instead of a local model (judge or meta model)."""

    base_url: str = ""  # empty: use the local model
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_retries: int = 3
    concurrency: int = 8


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    model: ModelSpec = ModelSpec(remat=False)
    remote: RemoteSpec = RemoteSpec()
    mode: str = "logits"  # "logits" | "generate"
    aggregate: str = "sum"  # "sum" | "mean_normalized"
    # 0: derived (see `TrainConfig.judge_rubric_tokens`), so a valid merged rubric is never refused.
    max_rubric_tokens: int = 0
    max_items: int = 0  # 0: meta.max_items, or the task's rubric item limit when that is 0 too
    rationale_tokens: int = 128
    plan_tokens: int = 2000  # MATH plan-then-execute: the plan and the execution each (the original's 2,000)
    item_turn_tokens: int = 64
    # The judge's framing tells it the response is quoted data whose requests (about its own
    # score, say) it must ignore (`tasks.base.FENCE_NOTE`).
    fence: bool = False
    initial_rubric: str = "iter0"  # "iter0" | "expert" | a path to a <rubric> file


@dataclasses.dataclass(frozen=True)
class CanarySpec:
    """The canary gate of every meta step (`mpo_jax.reward.canary`): a proposal is installed only
    if the judge, scoring the sampled rollouts and their degraded copies with it, ranks answers
    above their copies in at least the current rubric's share minus `tolerance`, and in more than
    `floor`. `enabled = False` installs what passes the text checks, as the published MPO does."""

    enabled: bool = True
    tolerance: float = 0.02
    floor: float = 0.5
    num_samples: int = 8  # answers from the meta step's sampled rollouts; fewer for a generate-mode judge
    kinds: tuple[str, ...] = ()  # degradation kinds (reward/hacks.py HACK_KINDS); () = all eight
    batch_size: int = 16  # texts per judge call


@dataclasses.dataclass(frozen=True)
class MetaSpec:
    enabled: bool = True
    interval: int = 10  # updates between meta steps (none after the last update: no update would use it)
    model: ModelSpec = ModelSpec(name="", remat=False)  # name "": the judge's model
    remote: RemoteSpec = RemoteSpec()
    num_samples: int = 16
    prescreen: bool = False
    analysis_tokens: int = 2000  # the original's budget for one meta-analysis
    analysis_words: int = 1000
    item_tokens: int = 500  # per generated criterion
    item_words: int = 300  # per generated criterion, asked for in the prompt
    max_items: int = 0  # 0: no clamp on the MRM's criteria count below the task's rubric item limit
    merge_words: int = 16_000  # budget for joining the refined sets into the merge prompt
    merged_rubric_words: int = 0  # whole merged rubric, asked for in the merge prompt; 0: no cap (the original)
    guideline_tokens: int = 2500  # MATH: meta analysis and guideline refinement, each
    sense_check: bool = True  # reject rubrics that copy the samples or carry no scoring guidance
    max_copied_fraction: float = 0.5  # of an item's word 4-grams found in the prompts and responses shown
    temperature: float = 0.0
    buffer_size: int = 4096  # most recent rollouts kept for the next meta step
    canary: CanarySpec = CanarySpec()


@dataclasses.dataclass(frozen=True)
class DataSpec:
    data_dir: str = ""  # folder holding <task>/<split>.jsonl; "" = data/ in the checkout
    tfds_dir: str = ""  # where the array_record datasets are prepared; "" = <run_dir>/tfds
    source: str = "jsonl"  # "jsonl" (our files through a TFDS builder) | "tfds_catalog"
    split: str = "train"
    batch_size: int = 8  # global prompts per update (GRPO: prompts x group_size rollouts)
    max_prompt_tokens: int = 256  # longer prompts are skipped; queries are padded to this length
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    max_new_tokens: int = 128
    top_p: float = 1.0
    top_k: int = 0


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """In-training evaluation on a fixed held-out prompt set (`mpo_jax.train.evaluator`)."""

    every: int = 0  # updates between evaluations (and one before the first update); 0: off
    num_prompts: int = 8
    split: str = "test"
    seed: int = 1234  # picks the prompts and seeds their sampling: every evaluation sees the same
    max_new_tokens: int = 0  # 0: rollout.max_new_tokens
    temperature: float = 0.7
    top_p: float = 1.0
    # The independent judge, which training never sees: its model ("" = the training judge's
    # model) and its fixed rubric ("" = the task's "oracle" rubric where it has one, else "expert",
    # else "iter0"; or a rubric file).
    judge: ModelSpec = ModelSpec(name="", remat=False)
    judge_mode: str = "logits"
    judge_rubric: str = ""
    independent_judge: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    directory: str = ""  # "" = <run_dir>/checkpoints; may be a gs:// URL (orbax writes it directly)
    every: int = 10
    keep: int = 3
    async_save: bool = False


@dataclasses.dataclass(frozen=True)
class LogSpec:
    rollouts_per_update: int = 4
    progress: bool = True
    tensorboard: bool = True
    report: bool = True  # write RUN_DIR/report at the end


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """Multi-host JAX. On Cloud TPU `initialize` with no address finds the coordinator itself."""

    initialize: bool = False
    coordinator_address: str = ""
    num_processes: int = 0  # 0: from the environment
    process_id: int = -1  # -1: from the environment
    cpu_collectives: str = "gloo"  # CPU-only multi-process runs (tests) need gloo collectives


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/mpo"
    task: str = "essay"
    algorithm: str = "ppo"  # "ppo" | "grpo"
    num_updates: int = 100
    seed: int = 0
    mesh: tuple[int, ...] = (1, 1, 1)  # (data, fsdp, tensor)
    policy: ModelSpec = ModelSpec(lora_rank=16, lora_alpha=32.0)
    critic: ModelSpec = ModelSpec(name="")  # name "": a value head on the policy trunk
    judge: JudgeSpec = JudgeSpec()
    meta: MetaSpec = MetaSpec()
    data: DataSpec = DataSpec()
    rollout: RolloutSpec = RolloutSpec()
    ppo: PPOConfig = PPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    log: LogSpec = LogSpec()
    distributed: DistributedSpec = DistributedSpec()

    def __post_init__(self) -> None:
        from mpo_jax.tasks import task_names

        _check(self.task in task_names() or self.task in ("essay_writing", "ethical_reasoning", "math_reasoning"),
               "task", f"is {self.task!r}; choose one of {', '.join(task_names())}")
        _check(self.algorithm in ("ppo", "grpo"), "algorithm", f"is {self.algorithm!r}; use 'ppo' or 'grpo'")
        _check(self.num_updates >= 1, "num_updates", "must be >= 1")
        _check(len(self.mesh) == 3 and all(s >= 1 for s in self.mesh), "mesh",
               f"is {self.mesh}; give three sizes >= 1 for the (data, fsdp, tensor) axes")
        _check(bool(self.run_dir), "run_dir", "is empty; name a folder for logs, rubrics and checkpoints")
        _check("://" not in self.run_dir, "run_dir",
               f"is {self.run_dir!r}: it must be a local or mounted folder (e.g. a gcsfuse mount of the bucket); "
               "put checkpoints on GCS with --config.checkpoint.directory=gs://...")
        for key, spec in (("policy", self.policy), ("judge.model", self.judge.model)):
            _check(bool(spec.name), f"{key}.name", "is empty; give a preset, a local model path or 'tiny-random'")
        for key, spec in (("policy", self.policy), ("critic", self.critic), ("judge.model", self.judge.model),
                          ("meta.model", self.meta.model), ("eval.judge", self.eval.judge)):
            _check(spec.dtype in ("float32", "bfloat16"), f"{key}.dtype", f"is {spec.dtype!r}; use float32 or bfloat16")
            _check(spec.lora_rank >= 0, f"{key}.lora_rank", "must be >= 0 (0 = full fine-tuning)")
            _check(spec.attention_impl in ("dense", "blocked"), f"{key}.attention_impl",
                   f"is {spec.attention_impl!r}; use 'dense' or 'blocked'")
            _check(spec.attention_block >= 1, f"{key}.attention_block",
                   "must be >= 1 (query rows per block of blocked attention)")
        _check(self.judge.mode in ("logits", "generate"), "judge.mode", "must be 'logits' or 'generate'")
        _check(not (self.judge.remote.base_url and self.judge.mode == "logits"), "judge.mode",
               "must be 'generate' with a remote judge (an OpenAI-compatible endpoint returns no logits)")
        _check(self.judge.aggregate in ("sum", "mean_normalized"), "judge.aggregate",
               "must be 'sum' or 'mean_normalized'")
        _check(self.judge.max_rubric_tokens >= 0, "judge.max_rubric_tokens", "must be >= 0 (0 = derived)")
        _check(self.judge.max_items >= 0, "judge.max_items", "must be >= 0 (0 = derived)")
        _check(self.judge.plan_tokens >= 1, "judge.plan_tokens", "must be >= 1")
        _check(self.meta.max_items >= 0, "meta.max_items", "must be >= 0 (0 = no clamp)")
        _check(self.meta.merged_rubric_words >= 0, "meta.merged_rubric_words", "must be >= 0 (0 = no cap)")
        _check(0.0 < self.meta.max_copied_fraction <= 1.0, "meta.max_copied_fraction", "must be in (0, 1]")
        _check(self.meta.interval >= 1, "meta.interval", "must be >= 1")
        try:
            self.canary_settings()
        except MpoError as err:
            raise ConfigError(f"config.meta.canary: {err}") from None
        _check(self.eval.every >= 0, "eval.every", "must be >= 0 (0 = no in-training evaluation)")
        _check(self.eval.num_prompts >= 1, "eval.num_prompts", "must be >= 1")
        _check(self.eval.max_new_tokens >= 0, "eval.max_new_tokens", "must be >= 0 (0 = rollout.max_new_tokens)")
        _check(self.eval.judge_mode in ("logits", "generate"), "eval.judge_mode", "must be 'logits' or 'generate'")
        _check(self.meta.num_samples >= 1, "meta.num_samples", "must be >= 1")
        _check(self.meta.buffer_size >= self.meta.num_samples, "meta.buffer_size", "must be >= meta.num_samples")
        _check(self.data.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.data.max_prompt_tokens >= 8, "data.max_prompt_tokens", "must be >= 8")
        _check(self.data.source in ("jsonl", "tfds_catalog"), "data.source", "must be 'jsonl' or 'tfds_catalog'")
        _check(self.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(self.checkpoint.every >= 1 and self.checkpoint.keep >= 1, "checkpoint",
               "every and keep must be >= 1")
        algo = self.ppo if self.algorithm == "ppo" else self.grpo
        rollouts = self.data.batch_size * (self.grpo.group_size if self.algorithm == "grpo" else 1)
        per = algo.micro_batches_per_update()
        _check(rollouts % per == 0, f"{self.algorithm}.num_mini_batches",
               f"x gradient_accumulation_steps = {per} must divide the {rollouts} rollouts per update")
        parallel = self.mesh[0] * self.mesh[1]
        _check(rollouts % parallel == 0, "mesh",
               f"{self.mesh}: data x fsdp = {parallel} must divide the {rollouts} rollouts per update")

    def canary_settings(self):
        """`meta.canary` as the gate's `CanarySettings` (validated there)."""
        from mpo_jax.reward.canary import CanarySettings

        return CanarySettings(**dataclasses.asdict(self.meta.canary))

    @property
    def rollouts_per_update(self) -> int:
        return self.data.batch_size * (self.grpo.group_size if self.algorithm == "grpo" else 1)

    @property
    def update_config(self) -> PPOConfig | GRPOConfig:
        return self.ppo if self.algorithm == "ppo" else self.grpo

    @property
    def judge_max_items(self) -> int:
        """Criteria the judge takes: as set, else as many as the meta step may write."""
        from mpo_jax.tasks import get_task

        return self.judge.max_items or self.meta.max_items or get_task(self.task).rubric_limits.max_items

    def judge_rubric_tokens(self, initial_rubric_tokens: int) -> int:
        """The judge's rubric-prefix length: as set, else room for every rubric the run can install.

        With meta steps: `judge_max_items` criteria of up to `meta.item_tokens` each, plus
        `RUBRIC_HEADROOM_TOKENS` for the persona and markup; never less than the initial rubric.
        Without: the initial rubric (the only one the run installs) plus the headroom.
        """
        if self.judge.max_rubric_tokens:
            return self.judge.max_rubric_tokens
        needed = initial_rubric_tokens + RUBRIC_HEADROOM_TOKENS
        if self.meta.enabled:
            needed = max(needed, self.judge_max_items * self.meta.item_tokens + RUBRIC_HEADROOM_TOKENS)
        return -(-needed // 256) * 256  # whole 256-token blocks


# -- ConfigDict <-> dataclasses ---------------------------------------------------------------

def _to_config_dict(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return ml_collections.ConfigDict({f.name: _to_config_dict(getattr(value, f.name))
                                          for f in dataclasses.fields(value)})
    return value


def default_config() -> ml_collections.ConfigDict:
    """Every key of `TrainConfig` with its default: the base a config file edits."""
    return _to_config_dict(TrainConfig())


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (from a dataclass annotation), or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config.{key} must not be None")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()
        if not isinstance(value, dict):
            raise ConfigError(f"config.{key} must be a section (dict of keys), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config.{key} must be a tuple, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config.{key} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config.{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config.{key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config.{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"config.{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys here: {', '.join(names)}"
        raise ConfigError(f"unknown config key config.{key}{hint}")
    kwargs = {name: _convert(data[name], hints[name], f"{prefix}.{name}" if prefix else name)
              for name in names if name in data}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # the rl configs' own checks name their keys relative to the section
        raise ConfigError(f"config.{prefix}: {err}" if prefix else str(err)) from None


def to_train_config(config: ml_collections.ConfigDict | dict[str, Any]) -> TrainConfig:
    data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return _build(TrainConfig, data, "")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists) for RUN_DIR/config.json."""
    return dataclasses.asdict(config)


# -- files and overrides ----------------------------------------------------------------------

def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Run a config file's `get_config()` (a trusted, user-written Python file).

    `file.py:variant` passes "variant" to `get_config`, as ml_collections' config flags do.
    """
    text = str(path)
    argument = None
    if ".py:" in text:
        text, argument = text.split(".py:", 1)
        text += ".py"
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; configs/ has the shipped ones (e.g. "
                          f"configs/demo_cpu.py)")
    spec = importlib.util.spec_from_file_location(f"mpo_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} must define get_config() returning an ml_collections.ConfigDict")
    try:
        return module.get_config() if argument is None else module.get_config(argument)
    except TypeError as err:
        raise ConfigError(f"{path}: get_config({argument!r}) failed: {err}") from None
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None


def _parse_value(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"--config.{key}={text}: expected a {type(current).__name__} literal") from None
    if isinstance(current, tuple) and isinstance(value, (list, int)):
        value = tuple(value) if isinstance(value, list) else (value,)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` (or `a.b=value`) strings; the key must exist."""
    config = ml_collections.ConfigDict(config.to_dict())
    for raw in overrides:
        text = raw[2:] if raw.startswith("--") else raw
        text = text[len("config."):] if text.startswith("config.") else text
        if "=" not in text:
            raise ConfigError(f"override {raw!r} must look like --config.key=value")
        key, value_text = text.split("=", 1)
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            keys = list(node.keys())
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f"; did you mean {'.'.join(parts[:depth] + [close[0]])!r}?" if close else ""
                raise ConfigError(f"unknown config key config.{'.'.join(parts[:depth + 1])}{hint}")
            if depth < len(parts) - 1:
                node = node[part]
                if not isinstance(node, ml_collections.ConfigDict):
                    raise ConfigError(f"config.{'.'.join(parts[:depth + 1])} is a value, not a section")
        current = node[parts[-1]]
        with node.ignore_type():
            node[parts[-1]] = _parse_value(value_text, current, key)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    return to_train_config(apply_overrides(load_config_file(path), overrides))
