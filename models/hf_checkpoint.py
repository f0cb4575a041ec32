"""Load and export Hugging Face Llama / Qwen2 safetensors checkpoints in the canonical layout.

HF stores `nn.Linear` weights as (out, in); the canonical params are (in, out) and stacked
on a leading layer axis (see `canonical_param_shapes`). `load_hf_checkpoint` reads tensors one
at a time into preallocated arrays, so it holds one copy of the model in host memory: a
reference and a tool for small models. `load_model` instead reads only the slices each
device holds (`mpo_jax.models.hf_slices`).

The optional critic head has no HF name; we store it as `value_head.weight` (1, hidden) and
`value_head.bias` (1,) (the `nn.Linear(hidden, 1)` layout). Transformers ignores them, and
their presence in a checkpoint is what sets `ModelConfig.value_head` on load. The compute
`dtype` and `remat` are runtime choices and are not stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from mpo_jax.errors import FileFormatError, InvalidValueError, MissingFileError
from mpo_jax.models.config import ModelConfig, RopeScaling, canonical_param_shapes

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PARAM_DTYPES = ("float32", "bfloat16", "float16")

_LAYER_NAMES = {
    "layers.attn_norm": "input_layernorm.weight",
    "layers.q_proj": "self_attn.q_proj.weight",
    "layers.q_bias": "self_attn.q_proj.bias",
    "layers.k_proj": "self_attn.k_proj.weight",
    "layers.k_bias": "self_attn.k_proj.bias",
    "layers.v_proj": "self_attn.v_proj.weight",
    "layers.v_bias": "self_attn.v_proj.bias",
    "layers.o_proj": "self_attn.o_proj.weight",
    "layers.mlp_norm": "post_attention_layernorm.weight",
    "layers.gate_proj": "mlp.gate_proj.weight",
    "layers.up_proj": "mlp.up_proj.weight",
    "layers.down_proj": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "value_head.kernel": "value_head.weight",
    "value_head.bias": "value_head.bias",
}


class HFTensor(NamedTuple):
    """One HF tensor and the canonical slot it fills (`key` None: a bias that must be zero)."""

    key: str | None
    layer: int | None
    name: str
    shape: tuple[int, ...]  # HF layout
    transposed: bool


def resolve_param_dtype(dtype: npt.DTypeLike) -> np.dtype:
    """The numpy dtype for loaded params; only the dtypes `ModelConfig.param_dtype` allows."""
    import ml_dtypes

    resolved = np.dtype(ml_dtypes.bfloat16 if isinstance(dtype, str) and dtype == "bfloat16" else dtype)
    if resolved.name not in _PARAM_DTYPES:
        raise InvalidValueError(f"unsupported parameter dtype {resolved.name!r}; use one of {_PARAM_DTYPES}")
    return resolved


def hf_tensors(config: ModelConfig) -> list[HFTensor]:
    """Every HF tensor of `config`, in file order, with the canonical slot it maps to."""
    shapes = canonical_param_shapes(config)

    def entry(key: str, layer: int | None, name: str) -> HFTensor:
        shape = shapes[key] if layer is None else shapes[key][1:]
        transposed = len(shape) == 2 and key != "embed"
        return HFTensor(key, layer, name, shape[::-1] if transposed else shape, transposed)

    tensors = [entry("embed", None, _GLOBAL_NAMES["embed"])]
    for i in range(config.num_layers):
        tensors += [entry(key, i, f"model.layers.{i}.{suffix}")
                    for key, suffix in _LAYER_NAMES.items() if key in shapes]
        if config.architecture == "llama" and config.attention_bias:
            # HF Llama's `attention_bias` also adds an o_proj bias, which our model lacks.
            tensors.append(HFTensor(None, i, f"model.layers.{i}.self_attn.o_proj.bias",
                                    (config.hidden_size,), False))
    tensors += [entry(key, None, _GLOBAL_NAMES[key])
                for key in ("final_norm", "lm_head", "value_head.kernel", "value_head.bias") if key in shapes]
    return tensors


def config_from_hf(hf: dict[str, Any], *, value_head: bool = False,
                   param_dtype: str = "float32") -> ModelConfig:
    """Map a HF `config.json` dict (transformers 4 or 5 layout) to a `ModelConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FileFormatError(f"unsupported model_type {model_type!r} in config.json; "
                              f"supported model types are {SUPPORTED_MODEL_TYPES}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise NotImplementedError("only SiLU MLPs without biases are supported "
                                  f"(hidden_act={hf.get('hidden_act')!r}, mlp_bias={hf.get('mlp_bias')!r})")
    if hf.get("use_sliding_window"):
        raise NotImplementedError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
    # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`.
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(rope),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        architecture=model_type,
        param_dtype=param_dtype,
        value_head=value_head,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )


def _rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    """`RopeScaling` from HF rope parameters; only the Llama 3 scheme is implemented."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported; supported: 'default', 'llama3'")
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    return RopeScaling(**{k: v for k, v in rope.items() if k in fields})


def load_hf_checkpoint(path: str | os.PathLike, *,
                       dtype: npt.DTypeLike = np.float32) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a HF Llama/Qwen2 checkpoint directory into `(config, canonical params)`, whole."""
    config, weight_map = read_hf_config(path, dtype=dtype)
    out_dtype = resolve_param_dtype(dtype)
    params = {key: np.empty(shape, out_dtype) for key, shape in canonical_param_shapes(config).items()}
    with SafetensorsFiles(weight_map) as shards:
        for t in hf_tensors(config):
            if t.key is None:
                require_zero(t, shards)
                continue
            value = shards.read(t.name, t.shape)
            slot = params[t.key] if t.layer is None else params[t.key][t.layer]
            slot[...] = value.T if t.transposed else value
    return config, params


def read_hf_config(path: str | os.PathLike, *,
                   dtype: npt.DTypeLike = np.float32) -> tuple[ModelConfig, dict[str, str]]:
    """The `ModelConfig` of a checkpoint directory and the file of each HF tensor; reads no weights."""
    root = _checkpoint_dir(path)
    out_dtype = resolve_param_dtype(dtype)
    weight_map = _weight_map(root)
    config = config_from_hf(_read_json(os.path.join(root, CONFIG_NAME)),
                            value_head=_GLOBAL_NAMES["value_head.kernel"] in weight_map,
                            param_dtype=out_dtype.name)
    return config, weight_map


def _checkpoint_dir(path: str | os.PathLike) -> str:
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise MissingFileError(f"checkpoint directory not found: {root!r}; pass the folder that holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if not os.path.isfile(os.path.join(root, CONFIG_NAME)):
        raise MissingFileError(f"no {CONFIG_NAME} in {root!r}; a HF checkpoint directory needs the model "
                               "config next to the weights (download it with the weights)")
    return root


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path!r} is not valid JSON ({exc}); re-download or re-export it") from exc


def _weight_map(root: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, from the shard index or the single weights file."""
    index_path = os.path.join(root, INDEX_NAME)
    if os.path.isfile(index_path):
        weight_map = {name: os.path.join(root, file)
                      for name, file in _read_json(index_path)["weight_map"].items()}
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(file):
                raise MissingFileError(f"shard {file!r} listed in {index_path!r} is missing; "
                                       "re-download the checkpoint")
        return weight_map
    single = os.path.join(root, WEIGHTS_NAME)
    if not os.path.isfile(single):
        raise MissingFileError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {root!r}; only safetensors "
                               "weights are supported (convert pytorch_model.bin first)")
    with _open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open_safetensors(file: str) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as exc:
        raise FileFormatError(f"{file!r} is not a valid safetensors file ({exc}); it is probably truncated "
                              "or corrupt: re-download or re-export it") from exc


class SafetensorsFiles(contextlib.ExitStack):
    """Safetensors files opened on first use; errors name the tensor and the file."""

    def __init__(self, weight_map: dict[str, str]) -> None:
        super().__init__()
        self._weight_map = weight_map
        self._handles: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def open_slice(self, name: str, shape: tuple[int, ...]) -> Any:
        """Tensor `name` as a lazy safetensors slice, after checking its shape; index it to read."""
        from safetensors import SafetensorError

        file = self._file(name)
        try:
            lazy = self._handle(file).get_slice(name)
            found = tuple(lazy.get_shape())
        except SafetensorError as exc:
            raise self._corrupt(name, file, exc) from exc
        if found != shape:
            raise FileFormatError(f"tensor {name!r} in {file!r} has shape {found}, expected {shape}: "
                                  f"{CONFIG_NAME} and the weights disagree (wrong config or mixed weights)")
        return lazy

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The whole tensor `name` (checked to have `shape`) in its file dtype."""
        from safetensors import SafetensorError

        self.open_slice(name, shape)
        file = self._file(name)
        try:
            return self._handle(file).get_tensor(name)
        except SafetensorError as exc:
            raise self._corrupt(name, file, exc) from exc

    def read_region(self, name: str, shape: tuple[int, ...], region: tuple[slice, ...]) -> np.ndarray:
        """Only `region` of tensor `name` (checked to have `shape`), in its file dtype."""
        from safetensors import SafetensorError

        lazy = self.open_slice(name, shape)
        try:
            return lazy[region]
        except SafetensorError as exc:
            raise self._corrupt(name, self._file(name), exc) from exc

    def _file(self, name: str) -> str:
        file = self._weight_map.get(name)
        if file is None:
            files = sorted({os.path.basename(f) for f in self._weight_map.values()})
            raise FileFormatError(f"tensor {name!r} is missing from the checkpoint (looked in {files}); "
                                  "the weights are incomplete or belong to a different architecture")
        return file

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = self.enter_context(_open_safetensors(file))
        return self._handles[file]

    @staticmethod
    def _corrupt(name: str, file: str, exc: Exception) -> FileFormatError:
        return FileFormatError(f"cannot read tensor {name!r} from {file!r} ({exc}); the file is corrupt "
                               "or does not match its index: re-download or re-export it")


def require_zero(t: HFTensor, shards: SafetensorsFiles) -> None:
    """Accept an o_proj bias only when it is zero, since the model has no slot for it."""
    if t.name in shards and np.any(shards.read(t.name, t.shape)):
        raise NotImplementedError(f"non-zero {t.name!r}: attention output biases are not supported")


def export_hf_checkpoint(config: ModelConfig, params: dict[str, Any], out_dir: str | os.PathLike, *,
                         dtype: str = "float32", max_shard_bytes: int | None = None) -> None:
    """Write `config.json` + safetensors that transformers' Llama/Qwen2 classes load.

    With `max_shard_bytes`, tensors are split into `model-0000k-of-0000n.safetensors` shards
    plus `model.safetensors.index.json` (a single shard is written as `model.safetensors`).
    Stale weight files in `out_dir` are removed so the loader cannot mix old and new shards.
    """
    from safetensors.numpy import save_file

    out_dtype = resolve_param_dtype(dtype)
    _check_params(config, params)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "model*.safetensors*")):
        os.remove(stale)
    _transformers_config(config, out_dtype.name).save_pretrained(out_dir)
    shards = _plan_shards(hf_tensors(config), out_dtype.itemsize, max_shard_bytes)
    files = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for file, shard in zip(files, shards, strict=True):
        arrays = {t.name: _hf_array(t, params, out_dtype) for t in shard}
        save_file(arrays, os.path.join(out_dir, file), metadata={"format": "pt"})
    if len(shards) > 1:
        pairs = [(t, file) for file, shard in zip(files, shards, strict=True) for t in shard]
        index = {"metadata": {"total_size": sum(_nbytes(t, out_dtype.itemsize) for t, _ in pairs)},
                 "weight_map": {t.name: file for t, file in pairs}}
        with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def _check_params(config: ModelConfig, params: dict[str, Any]) -> None:
    expected = canonical_param_shapes(config)
    problems = [f"missing {k!r}" for k in expected if k not in params]
    problems += [f"unexpected {k!r}" for k in params if k not in expected]
    problems += [f"{k!r} has shape {tuple(np.shape(params[k]))}, expected {s}"
                 for k, s in expected.items() if k in params and tuple(np.shape(params[k])) != s]
    if problems:
        raise ValueError("params do not match canonical_param_shapes(config): " + "; ".join(problems))


def _transformers_config(config: ModelConfig, dtype: str) -> Any:
    """The transformers config object, so `AutoConfig` reads exactly what transformers writes."""
    from transformers import LlamaConfig, Qwen2Config

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, dtype=dtype,
    )
    if config.architecture == "llama":
        return LlamaConfig(attention_bias=config.attention_bias, **common)
    if not config.attention_bias:
        raise InvalidValueError("Qwen2 always has q/k/v projection biases; set attention_bias=True to export qwen2")
    return Qwen2Config(**common)


def _nbytes(t: HFTensor, itemsize: int) -> int:
    return int(np.prod(t.shape)) * itemsize


def _plan_shards(tensors: list[HFTensor], itemsize: int, max_shard_bytes: int | None) -> list[list[HFTensor]]:
    """Greedy, order-preserving split; a tensor larger than the limit gets a shard of its own."""
    if max_shard_bytes is None:
        return [tensors]
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = _nbytes(t, itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _hf_array(t: HFTensor, params: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    if t.key is None:
        return np.zeros(t.shape, dtype)
    value = np.asarray(params[t.key] if t.layer is None else params[t.key][t.layer])
    return np.ascontiguousarray(value.T if t.transposed else value, dtype=dtype)
