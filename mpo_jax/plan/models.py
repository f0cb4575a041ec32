"""The run's models as shapes: each `ModelSpec` to a shape-only `LanguageModel`, and the train state.

A spec names a preset, a GGUF file, a Hugging Face folder or "tiny-random", as for training. Only the
configuration is read (`config.json`, or the GGUF metadata), so a folder holding just `config.json`
is enough. A path that does not exist on this machine (the paper configs point at /models/... on the
TPU VMs) is looked up by its last component in `model_configs` (default `configs/model_configs`),
where the public config.json files of the paper's models are kept. The configuration then gets the
same options the trainer loads it with (`model_specs.load_options`), and the train state is
`create_train_state(..., abstract=True)`: the trainer's own builder, allocating nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from mpo_jax.engine import presets
from mpo_jax.engine.abstract import abstract_language_model
from mpo_jax.engine.language_model import LanguageModel
from mpo_jax.errors import MissingFileError
from mpo_jax.models.config import ModelConfig
from mpo_jax.train.config import ModelSpec, TrainConfig
from mpo_jax.train.model_specs import TINY, load_options, tiny_config

DEFAULT_MODEL_CONFIGS = Path("configs/model_configs")


@dataclasses.dataclass(frozen=True)
class PlannedModel:
    """One model of the run as shapes, and where its configuration came from."""

    role: str  # "policy", "critic", "judge", "meta" (a role sharing another's model is not repeated)
    model: LanguageModel
    source: str


def _base_config(spec: ModelSpec, key: str, model_configs: Path | None) -> tuple[ModelConfig, str, Any]:
    """(configuration as stored, where it came from, tokenizer or None) without reading any weights."""
    if spec.name == TINY:
        from mpo_jax.engine.tiny import tiny_tokenizer

        return None, TINY, tiny_tokenizer(spec.tiny_vocab_size)  # type: ignore[return-value]
    path = Path(spec.name)
    if not path.exists() and model_configs is not None and (model_configs / path.name).exists():
        path = model_configs / path.name
    elif not path.exists():
        try:
            path = presets.resolve(spec.name)
        except (FileNotFoundError, ValueError) as err:
            where = f" or in {model_configs}/{path.name}" if model_configs is not None else ""
            raise MissingFileError(f"config.{key}.name = {spec.name!r}: no model here{where} ({err}); give a folder "
                                   f"with its config.json (weights are not needed), e.g. --model-configs DIR") from None
    if path.is_dir():
        from mpo_jax.models.hf_checkpoint import config_from_hf

        file = path / "config.json"
        if not file.is_file():
            raise MissingFileError(f"config.{key}.name = {spec.name!r}: {path} has no config.json")
        return config_from_hf(json.loads(file.read_text(encoding="utf-8"))), str(file), None
    from mpo_jax.models.gguf_io import config_from_gguf
    from mpo_jax.models.gguf_metadata import open_gguf, read_gguf_metadata

    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    return config_from_gguf(read_gguf_metadata(reader), tensors), str(path), None


def spec_config(spec: ModelSpec, key: str, *, value_head: bool = False, trainable: bool = False,
                model_configs: Path | None = DEFAULT_MODEL_CONFIGS) -> tuple[ModelConfig, str, Any]:
    """The `ModelConfig` the trainer would build for `spec` (options as `load_model` applies them)."""
    base, source, tokenizer = _base_config(spec, key, model_configs)
    if base is None:
        return tiny_config(spec, tokenizer, value_head=value_head, trainable=trainable), source, tokenizer
    options = load_options(spec, value_head=value_head, trainable=trainable)
    dtype = options.pop("dtype")
    value = options.pop("value_head")
    options["lora_targets"] = tuple(options["lora_targets"] or base.lora_targets)
    config = base.replace(dtype=dtype, param_dtype=dtype, **options)
    if value and not config.value_head:
        config = config.replace(value_head=True)
    return config, source, tokenizer


def plan_models(config: TrainConfig, mesh: Mesh, model_configs: Path | None = DEFAULT_MODEL_CONFIGS
                ) -> dict[str, PlannedModel]:
    """Policy, critic (PPO with `critic.name`), judge and meta model as the trainer builds them.

    Roles that the trainer serves with one loaded copy (the judge and the meta model on one spec)
    share one entry: the meta model is then the judge's. A remote judge or meta model has no entry.
    """
    grpo = config.algorithm == "grpo"
    separate_critic = bool(config.critic.name) and not grpo
    policy_value_head = not grpo and not separate_critic
    wanted: list[tuple[str, ModelSpec, bool, bool]] = [("policy", config.policy, policy_value_head, True)]
    if separate_critic:
        wanted.append(("critic", config.critic, True, True))
    if not config.judge.remote.base_url:
        wanted.append(("judge", config.judge.model, False, False))
    if config.meta.enabled and config.meta.model.name and not config.meta.remote.base_url \
            and config.meta.model != config.judge.model:
        wanted.append(("meta", config.meta.model, False, False))
    models = {}
    for role, spec, value_head, trainable in wanted:
        key = {"judge": "judge.model", "meta": "meta.model"}.get(role, role)
        model_config, source, tokenizer = spec_config(spec, key, value_head=value_head, trainable=trainable,
                                                      model_configs=model_configs)
        models[role] = PlannedModel(role, abstract_language_model(model_config, mesh, tokenizer), source)
    return models


def meta_role(config: TrainConfig, models: dict[str, PlannedModel]) -> str | None:
    """Which entry serves the meta step: its own model, the judge's, or none (remote, or no meta step)."""
    if not config.meta.enabled or config.meta.remote.base_url:
        return None
    if "meta" in models:
        return "meta"
    return "judge" if "judge" in models else None


def plan_state(config: TrainConfig, models: dict[str, PlannedModel]):
    """The TrainState as shapes with its shardings (`create_train_state(..., abstract=True)`)."""
    from mpo_jax.rl.train_state import create_train_state

    critic = models["critic"].model if "critic" in models else None
    return create_train_state(models["policy"].model, critic, config.update_config.optimizer,
                              needs_values=config.algorithm != "grpo", abstract=True)
