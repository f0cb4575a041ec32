"""Shape-only models: a `LanguageModel` whose parameters are `jax.ShapeDtypeStruct`s on a mesh.

`mpo_jax.plan` compiles every program of a training update for a TPU topology this host does not
have, from a `ModelConfig` alone (a `config.json`, no weights). The parameters get the shardings
`place_params` would give the loaded weights (the same partition rules, `sharding.param_shardings`)
and the same NNX state layout (`params.state_from_flat`), so the jitted functions the sampler and
the trainer build from this model lower exactly as they do for the loaded one. Nothing is allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mpo_jax.engine import sharding as sharding_lib
from mpo_jax.engine.language_model import LanguageModel
from mpo_jax.models.config import ModelConfig
from mpo_jax.models.params import all_param_shapes, state_from_flat


@dataclasses.dataclass(frozen=True)
class ShapeOnlyTokenizer:
    """What compiling needs of a tokenizer: the pad id (a constant of the decode loop) and end ids.

    A config-only model folder has no tokenizer files; the ids come from its config.json.
    """

    pad_id: int = 0
    eos_ids: tuple[int, ...] = ()

    def token_strings(self) -> list[str]:
        raise NotImplementedError("a shape-only model has no vocabulary; it can be compiled, not run")


def abstract_params(config: ModelConfig, mesh: Mesh | None):
    """(graphdef, state) of `config` with `ShapeDtypeStruct` leaves sharded as `place_params` shards weights."""
    shapes = all_param_shapes(config)
    dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
    shardings = sharding_lib.param_shardings(shapes, mesh) if mesh is not None else {}
    flat = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings.get(name)) for name, shape in shapes.items()}
    return state_from_flat(config, flat)


def abstract_language_model(config: ModelConfig, mesh: Mesh | None, tokenizer: Any | None = None,
                            **sampler_kwargs: Any) -> LanguageModel:
    """A `LanguageModel` over shape-only parameters (compile its programs; do not call them)."""
    mesh = sharding_lib.as_auto_mesh(mesh) if mesh is not None else None
    if tokenizer is None:
        eos = () if config.eos_token_id is None else (config.eos_token_id,)
        tokenizer = ShapeOnlyTokenizer(pad_id=0, eos_ids=eos)
    graphdef, params = abstract_params(config, mesh)
    return LanguageModel(config, tokenizer, graphdef, params, mesh=mesh, **sampler_kwargs)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s or arrays (its shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape: Sequence[int] = leaf.shape
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(tuple(shape))
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


__all__ = ["ShapeOnlyTokenizer", "abstract_language_model", "abstract_params", "per_device_bytes"]
