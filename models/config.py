"""Model hyper-parameters for the Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/2.5).

One frozen dataclass is the contract between the loaders (GGUF, safetensors) and the
Flax model: every converter produces a `ModelConfig` plus a flat dict of numpy arrays
whose names and shapes are given by `canonical_param_shapes`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mpo_jax.errors import InvalidValueError

_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("full", "dots")
ATTENTION_IMPLS = ("dense", "blocked")
# Adapter targets: the per-layer projections, and the output projection `lm_head` (for a tied
# model the transposed embedding; its adapter changes the logits only, never the input embedding).
LAYER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = (*LAYER_LORA_TARGETS, "lm_head")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only transformer.

    `param_dtype` is the storage dtype of the weights, `dtype` the compute dtype of
    activations; logits and log-probs are always returned in float32.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q/k/v projections
    architecture: str = "llama"  # "llama" | "qwen2"
    dtype: str = "float32"
    param_dtype: str = "float32"
    value_head: bool = False  # scalar per-token value head (critic)
    remat: bool = False  # jax.checkpoint each layer (training memory)
    # What a rematerialised layer keeps for the backward pass: "full" keeps only the layer's input
    # (recomputes everything), "dots" also keeps the weight-matmul outputs (recomputes only
    # attention and elementwise work: more memory, about a quarter less compute in training).
    remat_policy: str = "full"
    # Attention without a KV cache (training forwards): "dense" materialises the masked T x T scores;
    # "blocked" works in causal query blocks of `attention_block` rows, never computing the blocks above
    # the diagonal, with a backward that recomputes them (`blocked_attention`): same results, less
    # work and memory. Decoding with a cache is always dense.
    attention_impl: str = "dense"
    attention_block: int = 64
    # Attention over a KV cache (prefill and decoding) takes the queries in blocks of this many rows,
    # so a long prefill holds one block's scores against the cache at a time, not all T rows'
    # (`transformer.attention`); 0 takes them all at once. Decode steps (one query) are unaffected.
    cache_query_block: int = 256
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    lora_rank: int = 0  # > 0 adds low-rank adapters to `lora_targets`
    lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = LAYER_LORA_TARGETS

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise InvalidValueError(f"ModelConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise InvalidValueError(f"ModelConfig.remat_policy must be one of {REMAT_POLICIES}, "
                                    f"got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise InvalidValueError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                                    f"got {self.attention_impl!r}")
        block = self.attention_block
        if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
            raise InvalidValueError(f"ModelConfig.attention_block must be a positive int (query rows per block "
                                    f"of blocked attention), got {self.attention_block!r}")
        block = self.cache_query_block
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise InvalidValueError(f"ModelConfig.cache_query_block must be an int >= 0 (query rows per block of "
                                    f"attention over a KV cache; 0: all at once), got {self.cache_query_block!r}")
        if self.architecture not in ("llama", "qwen2"):
            raise InvalidValueError(f"ModelConfig.architecture must be 'llama' or 'qwen2', got {self.architecture!r}")
        if self.lora_rank < 0:
            raise InvalidValueError(f"ModelConfig.lora_rank must be >= 0, got {self.lora_rank}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown:
            raise InvalidValueError(f"ModelConfig.lora_targets has unknown modules {unknown}; "
                                    f"choose from {LORA_TARGETS}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidValueError(f"unknown ModelConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def canonical_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the flat parameter dict every loader produces.

    Per-layer tensors are stacked on a leading `num_layers` axis so the decoder can
    `lax.scan` over layers. Matrices are stored (in, out): `y = x @ kernel`.
    """
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    L, D, F = c.num_layers, c.hidden_size, c.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed": (c.vocab_size, D),
        "layers.attn_norm": (L, D),
        "layers.q_proj": (L, D, q),
        "layers.k_proj": (L, D, kv),
        "layers.v_proj": (L, D, kv),
        "layers.o_proj": (L, q, D),
        "layers.mlp_norm": (L, D),
        "layers.gate_proj": (L, D, F),
        "layers.up_proj": (L, D, F),
        "layers.down_proj": (L, F, D),
        "final_norm": (D,),
    }
    if c.attention_bias:
        shapes["layers.q_bias"] = (L, q)
        shapes["layers.k_bias"] = (L, kv)
        shapes["layers.v_bias"] = (L, kv)
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (D, c.vocab_size)
    if c.value_head:
        shapes["value_head.kernel"] = (D, 1)
        shapes["value_head.bias"] = (1,)
    return shapes


def lora_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Adapter shapes: `layers.{target}_lora_a` [L, in, r] and `layers.{target}_lora_b` [L, r, out];
    for `lm_head`, `lm_head_lora_a` [D, r] and `lm_head_lora_b` [r, V], tied or not."""
    if not config.lora_rank:
        return {}
    base = canonical_param_shapes(config)
    shapes = {}
    for target in config.lora_targets:
        if target == "lm_head":
            shapes["lm_head_lora_a"] = (config.hidden_size, config.lora_rank)
            shapes["lm_head_lora_b"] = (config.lora_rank, config.vocab_size)
            continue
        layers, fan_in, fan_out = base[f"layers.{target}"]
        shapes[f"layers.{target}_lora_a"] = (layers, fan_in, config.lora_rank)
        shapes[f"layers.{target}_lora_b"] = (layers, config.lora_rank, fan_out)
    return shapes
