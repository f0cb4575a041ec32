"""Load llama.cpp GGUF files (Llama, Qwen2; float or quantised) into the canonical layout.

GGUF lists shapes in ggml order (fastest dimension first); the reader's numpy view is
already (out, in) like HF, so matrices are transposed to (in, out) here. llama.cpp's
converter permutes the Q/K rows of Llama models for its interleaved RoPE; we undo that so
the weights suit the model's HF `rotate_half` RoPE. Tensors are dequantised one at a time
from the memory-mapped file into preallocated stacked arrays.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt

from mpo_jax.errors import FileFormatError
from mpo_jax.models.config import ModelConfig, RopeScaling, canonical_param_shapes
from mpo_jax.models.gguf_metadata import open_gguf, read_gguf_metadata
from mpo_jax.models.hf_checkpoint import hf_tensors, resolve_param_dtype

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
ROPE_FREQS = "rope_freqs.weight"

_LAYER_NAMES = {
    "layers.attn_norm": "attn_norm.weight",
    "layers.q_proj": "attn_q.weight",
    "layers.q_bias": "attn_q.bias",
    "layers.k_proj": "attn_k.weight",
    "layers.k_bias": "attn_k.bias",
    "layers.v_proj": "attn_v.weight",
    "layers.v_bias": "attn_v.bias",
    "layers.o_proj": "attn_output.weight",
    "layers.mlp_norm": "ffn_norm.weight",
    "layers.gate_proj": "ffn_gate.weight",
    "layers.up_proj": "ffn_up.weight",
    "layers.down_proj": "ffn_down.weight",
}
_GLOBAL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


def load_gguf(path: str | os.PathLike, *,
              dtype: npt.DTypeLike = np.float32) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a Llama/Qwen2 GGUF file into `(config, canonical params)`, dequantising to `dtype`."""
    out_dtype = resolve_param_dtype(dtype)
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(read_gguf_metadata(reader), tensors, param_dtype=out_dtype.name)
    params = {key: np.empty(shape, out_dtype) for key, shape in canonical_param_shapes(config).items()}
    used = {ROPE_FREQS}
    for t in hf_tensors(config):
        if t.key is None:  # HF Llama's o_proj bias: any attn_output.bias is reported as unsupported
            continue
        name = _gguf_name(t.key, t.layer)
        tensor = _tensor(tensors, name, t.shape, path)
        value = _dequantize(tensor).reshape(t.shape)
        heads = _permuted_heads(config, t.key)
        if heads:
            value = unpermute_rope_rows(value, heads)
        slot = params[t.key] if t.layer is None else params[t.key][t.layer]
        slot[...] = value.T if t.transposed else value
        used.add(name)
    unused = sorted(set(tensors) - used)
    if unused:
        raise FileFormatError(f"{os.fspath(path)!r} has tensors this loader does not support: {unused[:8]}; "
                              "loading without them would silently change the model")
    return config, params


def _dequantize(tensor: Any) -> np.ndarray:
    """Float32 values of one reader tensor; a plain-ndarray view skips np.memmap's per-slice overhead."""
    import gguf

    return gguf.quants.dequantize(tensor.data.view(np.ndarray), tensor.tensor_type)


def _gguf_name(key: str, layer: int | None) -> str:
    return _GLOBAL_NAMES[key] if layer is None else f"blk.{layer}.{_LAYER_NAMES[key]}"


def _tensor(tensors: dict[str, Any], name: str, shape: tuple[int, ...], path: str | os.PathLike) -> Any:
    """The reader tensor `name`, checked against the (out, in) shape the config implies."""
    if name not in tensors:
        raise FileFormatError(f"tensor {name!r} is missing from {os.fspath(path)!r}; the file is incomplete "
                              "or its metadata does not match its weights")
    found = tuple(int(n) for n in reversed(tensors[name].shape))
    if found != shape:
        raise FileFormatError(f"tensor {name!r} in {os.fspath(path)!r} has shape {found}, expected {shape}: "
                              "the GGUF metadata and the weights disagree")
    return tensors[name]


def _permuted_heads(config: ModelConfig, key: str | None) -> int:
    """Head count llama.cpp permuted this tensor's rows with (0: not permuted)."""
    if config.architecture != "llama":
        return 0
    if key in ("layers.q_proj", "layers.q_bias"):
        return config.num_heads
    if key in ("layers.k_proj", "layers.k_bias"):
        return config.num_kv_heads
    return 0


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's `permute` (interleaved RoPE rows -> HF rotate_half rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, Any], *,
                     param_dtype: str = "float32") -> ModelConfig:
    """Map GGUF metadata (and which tensors exist) to a `ModelConfig`."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FileFormatError(f"unsupported GGUF architecture {arch!r}; supported architectures are "
                              f"{SUPPORTED_ARCHITECTURES}")

    def required(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise FileFormatError(f"GGUF metadata key {arch}.{key!r} is missing; the file is incomplete")
        return meta[f"{arch}.{key}"]

    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise FileFormatError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    num_heads = required("attention.head_count")
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=required("embedding_length"),
        intermediate_size=required("feed_forward_length"),
        num_layers=required("block_count"),
        num_heads=num_heads,
        num_kv_heads=meta.get(f"{arch}.attention.head_count_kv", num_heads),
        head_dim=meta.get(f"{arch}.attention.key_length"),
        rms_norm_eps=_f32(required("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=meta.get(f"{arch}.context_length", 8192),
        tie_word_embeddings=_GLOBAL_NAMES["lm_head"] not in tensors,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        architecture=arch,
        param_dtype=param_dtype,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    return config.replace(rope_scaling=_rope_scaling(meta, tensors, config))


def _f32(value: float) -> float:
    """Shortest decimal of a float32 metadata value, so 1e-5 reads back as 1e-5, not 9.99e-6."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: dict[str, Any], tensors: dict[str, Any], config: ModelConfig) -> RopeScaling | None:
    """Llama 3 scaling, which llama.cpp stores as per-frequency divisors in `rope_freqs.weight`."""
    scaling_type = meta.get(f"{config.architecture}.rope.scaling.type", "none")
    if scaling_type != "none":
        raise NotImplementedError(f"GGUF rope scaling type {scaling_type!r} is not supported "
                                  "(only Llama 3 scaling via rope_freqs.weight)")
    if ROPE_FREQS not in tensors:
        return None
    return llama3_scaling_from_factors(_dequantize(tensors[ROPE_FREQS]).ravel(),
                                       config.rope_theta, config.head_dim)


def llama3_rope_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of the Llama 3 scheme (what llama.cpp writes as rope_freqs)."""
    s = scaling
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    factors = 1 / ((1 - smooth) / s.factor + smooth)
    factors = np.where(wavelen < s.original_max_position_embeddings / s.high_freq_factor, 1.0, factors)
    return np.where(wavelen > s.original_max_position_embeddings / s.low_freq_factor, s.factor, factors)


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> RopeScaling | None:
    """Recover `RopeScaling` from rope_freqs, assuming Llama 3's low/high factors (1, 4).

    Only ratios of the three parameters affect the frequencies, so fixing low=1, high=4 loses
    nothing when the result reproduces the stored factors, which is verified.
    """
    factor = _f32(factors.max())
    if np.allclose(factors, 1.0):
        return None
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    middle = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if middle.any():
        smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
        original = round(float(np.median(wavelen[middle] * (1 + 3 * smooth))))
        scaling = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=original)
        if np.allclose(llama3_rope_factors(scaling, theta, head_dim), factors, rtol=1e-3):
            return scaling
    raise NotImplementedError(f"{ROPE_FREQS} does not follow the Llama 3 rope scaling scheme; "
                              "this rope scaling is not supported")
