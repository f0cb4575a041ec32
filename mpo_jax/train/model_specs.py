"""Building the run's models (policy, critic, judge, meta model) from their config specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from mpo_jax.engine import presets
from mpo_jax.engine.language_model import LanguageModel, from_random, load_model
from mpo_jax.reward.meta import MetaRewardModel
from mpo_jax.train.config import ConfigError, MetaSpec, ModelSpec, RemoteSpec, TrainConfig

TINY = "tiny-random"


def check_model_available(spec: ModelSpec, key: str) -> None:
    """Fail before anything compiles when a model cannot be found (no download is attempted)."""
    if spec.name == TINY:
        return
    try:
        presets.resolve(spec.name)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config.{key}.name = {spec.name!r}: {err} (or {TINY!r} for a tiny random model)") from None


def load_options(spec: ModelSpec, *, value_head: bool = False, trainable: bool = False) -> dict[str, Any]:
    """The `load_model` keywords for `spec`; LoRA adapters only for trainable models with lora_rank > 0.

    `mpo_jax.plan` derives its shape-only models from these too, so both see the same configuration.
    """
    return dict(dtype=spec.dtype, value_head=value_head, remat=spec.remat, remat_policy=spec.remat_policy,
                attention_impl=spec.attention_impl, attention_block=spec.attention_block,
                lora_rank=spec.lora_rank if trainable else 0, lora_alpha=spec.lora_alpha,
                lora_targets=tuple(spec.lora_targets))


def tiny_config(spec: ModelSpec, tokenizer: Any, *, value_head: bool = False, trainable: bool = False):
    """The `ModelConfig` of a "tiny-random" spec (what `build_model` initialises at random)."""
    from mpo_jax.engine.tiny import tiny_model_config

    options = load_options(spec, value_head=value_head, trainable=trainable)
    dtype = options.pop("dtype")
    return tiny_model_config(tokenizer, hidden_size=spec.tiny_hidden_size, num_layers=spec.tiny_layers,
                             dtype=dtype, param_dtype=dtype, **options)


def build_model(spec: ModelSpec, mesh: Mesh | None, *, value_head: bool = False, trainable: bool = False,
                **sampler_kwargs: Any) -> LanguageModel:
    """A `LanguageModel` for `spec`; LoRA adapters only for trainable models with lora_rank > 0."""
    if spec.name == TINY:
        from mpo_jax.engine.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer(spec.tiny_vocab_size)
        config = tiny_config(spec, tokenizer, value_head=value_head, trainable=trainable)
        return from_random(config, tokenizer, seed=spec.seed, mesh=mesh, **sampler_kwargs)
    return load_model(spec.name, mesh=mesh, **load_options(spec, value_head=value_head, trainable=trainable),
                      **sampler_kwargs)


def build_meta_reward_model(model: Any, task: Any, meta: MetaSpec) -> MetaRewardModel:
    """The meta-reward model on `model` (local or remote) as `meta.*` configures it."""
    return MetaRewardModel(model, task=task, num_samples=meta.num_samples, prescreen=meta.prescreen,
                           analysis_words=meta.analysis_words, item_words=meta.item_words,
                           analysis_tokens=meta.analysis_tokens, item_tokens=meta.item_tokens,
                           max_items=meta.max_items, merge_words=meta.merge_words,
                           merged_rubric_words=meta.merged_rubric_words, guideline_tokens=meta.guideline_tokens,
                           sense_check=meta.sense_check, max_copied_fraction=meta.max_copied_fraction,
                           temperature=meta.temperature)


def build_remote(spec: RemoteSpec):
    from mpo_jax.engine.remote import RemoteChatModel

    return RemoteChatModel(spec.base_url, spec.model, api_key_env=spec.api_key_env or None,
                           timeout_s=spec.timeout_s, max_retries=spec.max_retries, max_concurrency=spec.concurrency)


def build_policy_and_state(config: TrainConfig, mesh: Mesh | None):
    """(policy, separate critic or None, TrainState placed on `mesh`) exactly as the trainer builds them.

    PPO's critic is a value head on the policy trunk unless `critic.name` names a separate model;
    GRPO has none. Export and evaluation rebuild runs through this too, so a checkpoint always
    restores into the same parameter tree.
    """
    from mpo_jax.rl import create_train_state, place_state

    grpo = config.algorithm == "grpo"
    separate_critic = bool(config.critic.name) and not grpo
    policy = build_model(config.policy, mesh, value_head=not grpo and not separate_critic, trainable=True)
    critic = build_model(config.critic, mesh, value_head=True, trainable=True) if separate_critic else None
    state = create_train_state(policy, critic, config.update_config.optimizer, needs_values=not grpo)
    return policy, critic, place_state(state, mesh)


def install_policy_params(policy: LanguageModel, state) -> None:
    """Point the policy (and its sampler) at the state's current weights, trainable and frozen merged."""
    from flax import nnx

    params = nnx.state(state.policy.merge(state.params["policy"]))
    policy.params = params
    policy.sampler.params = params


def checkpoint_directory(config: TrainConfig, run_dir: str | Path) -> str | Path:
    """Where a run's checkpoints live: `checkpoint.directory` (may be gs://) or RUN_DIR/checkpoints."""
    return config.checkpoint.directory or Path(run_dir) / "checkpoints"
