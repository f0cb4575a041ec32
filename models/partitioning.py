"""Logical axes of every parameter, for mapping onto a (`data`, `fsdp`, `tensor`) mesh.

Names follow `canonical_param_shapes`. Logical axes are mapped to mesh axes in
`mpo_jax.engine.sharding`; keeping the model side logical lets other meshes reuse the rules.
"""

from __future__ import annotations

LOGICAL_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "layers.attn_norm": ("layers", None),
    "layers.q_proj": ("layers", "embed", "heads"),
    "layers.k_proj": ("layers", "embed", "kv_heads"),
    "layers.v_proj": ("layers", "embed", "kv_heads"),
    "layers.o_proj": ("layers", "heads", "embed"),
    "layers.q_bias": ("layers", "heads"),
    "layers.k_bias": ("layers", "kv_heads"),
    "layers.v_bias": ("layers", "kv_heads"),
    "layers.mlp_norm": ("layers", None),
    "layers.gate_proj": ("layers", "embed", "mlp"),
    "layers.up_proj": ("layers", "embed", "mlp"),
    "layers.down_proj": ("layers", "mlp", "embed"),
    "final_norm": (None,),
    "lm_head": ("embed", "vocab"),
    "value_head.kernel": ("embed", None),
    "value_head.bias": (None,),
}

# KV cache [layers, batch, slots, kv_heads, head_dim]
CACHE_AXES: tuple[str | None, ...] = ("layers", "batch", None, "kv_heads", None)


def logical_axes(name: str) -> tuple[str | None, ...]:
    """Axes of a parameter; a LoRA factor shares the split of its base matrix's outer dimension.

    A [..., in, r] keeps the base's input axis, B [..., r, out] its output axis; a leading
    layer axis stays. `lm_head_lora_*` follow `lm_head` (embed, vocab) also for a tied model,
    whose output projection is the transposed embedding.
    """
    if name.endswith("_lora_a"):
        return (*logical_axes(name[: -len("_lora_a")])[:-1], None)
    if name.endswith("_lora_b"):
        base = logical_axes(name[: -len("_lora_b")])
        return (*base[:-2], None, base[-1])
    try:
        return LOGICAL_AXES[name]
    except KeyError:
        raise KeyError(f"no partition rule for parameter {name!r}; add it to LOGICAL_AXES") from None
