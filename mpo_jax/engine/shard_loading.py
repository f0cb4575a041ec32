"""HF safetensors checkpoints read straight into device shards, never whole into host memory.

On a mesh, each process reads only the regions its own devices hold, one shard at a time
(`sharding.place_shards` over `HFSliceReader.read`), so a host of a TPU pod holds one shard
plus one slice of a tensor instead of the whole model. Without a mesh, parameters go to the
default device one at a time (the host holds one stacked parameter). GGUF files, quantised
and single-file, are still read whole by `gguf_io.load_gguf` and placed by `place_params`.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import numpy.typing as npt
from jax.sharding import Mesh

from mpo_jax.engine import sharding as sharding_lib
from mpo_jax.models.config import ModelConfig
from mpo_jax.models.hf_slices import HFSliceReader
from mpo_jax.models.params import all_param_shapes


def read_params(reader: HFSliceReader, mesh: Mesh | None,
                config: ModelConfig | None = None) -> dict[str, jax.Array]:
    """Every checkpoint parameter as a jax.Array, sharded by the partition rules over `mesh`.

    `config` (default: the checkpoint's) is the model they are for; its partition rules are
    computed from all its parameter shapes, LoRA adapters included, as `place_params` does.
    """
    if mesh is None:
        # one parameter at a time, to the default device, uncommitted (as `jnp.asarray` places it)
        return {key: sharding_lib.copy_to_devices(reader.read(key), [None])[0] for key in reader.shapes}
    shardings = sharding_lib.param_shardings(all_param_shapes(config or reader.config), mesh)
    return {key: sharding_lib.place_shards(shape, shardings[key], partial(reader.read, key))
            for key, shape in reader.shapes.items()}


def load_hf_params(path: str | os.PathLike, *, dtype: npt.DTypeLike = "float32",
                   mesh: Mesh | None = None) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """`(config, params)` of a HF checkpoint directory, read shard by shard over `mesh`."""
    mesh = sharding_lib.as_auto_mesh(mesh) if mesh is not None else None
    with HFSliceReader(path, dtype=dtype) as reader:
        return reader.config, read_params(reader, mesh)
