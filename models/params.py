"""Conversion between the loaders' flat `{"layers.q_proj": array}` dicts and NNX state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mpo_jax.errors import FileFormatError
from mpo_jax.models.config import ModelConfig, canonical_param_shapes, lora_param_shapes
from mpo_jax.models.transformer import Transformer


def all_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint weights plus LoRA adapters, when the config has them."""
    return {**canonical_param_shapes(config), **lora_param_shapes(config)}


def init_lora_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Fresh adapters: A ~ N(0, 1/fan_in), B = 0, so the adapted model starts equal to the base."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(dtype) if name.endswith("_lora_a")
            else np.zeros(shape, dtype) for name, shape in lora_param_shapes(config).items()}


def check_param_shapes(config: ModelConfig, flat: Mapping[str, Any], source: str = "weights") -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
    expected = all_param_shapes(config)
    problems = [f"missing {name} {shape}" for name, shape in expected.items() if name not in flat]
    problems += [f"unexpected {name}" for name in flat if name not in expected]
    problems += [f"{name}: config says {expected[name]}, {source} have {tuple(np.shape(flat[name]))}"
                 for name in flat if name in expected and tuple(np.shape(flat[name])) != expected[name]]
    if problems:
        raise FileFormatError(f"the model config and the {source} disagree: " + "; ".join(problems)
                              + ". Check that the config.json/metadata belongs to these weights.")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        node = nested
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state, without allocating any weights."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def state_from_flat(config: ModelConfig, flat: Mapping[str, Any]) -> tuple[nnx.GraphDef, nnx.State]:
    check_param_shapes(config, flat)
    graphdef, state = abstract_model(config)
    nnx.replace_by_pure_dict(state, unflatten(flat))
    return graphdef, state


def flat_from_state(state: nnx.State) -> dict[str, Any]:
    return flatten(nnx.to_pure_dict(state))
