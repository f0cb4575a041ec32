"""A Flax NNX decoder-only transformer for the Llama family (Llama 2/3, SmolLM2, Qwen2/2.5).

Per-layer weights are stacked on a leading layer axis and the layers run under one
`lax.scan`, so compile time does not grow with depth and `jax.checkpoint` per layer is a
flag. Matrices are stored (in, out). Attention works on padded batches through an explicit
validity mask: padding may sit anywhere (left-padded prompts, padded continuation chunks),
and rotary positions count only the real tokens of each row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mpo_jax.models.blocked_attention import MASK_VALUE as _MASK_VALUE
from mpo_jax.models.blocked_attention import blocked_causal_attention
from mpo_jax.models.config import ModelConfig, canonical_param_shapes, lora_param_shapes
from mpo_jax.models.kv_cache import ContextKV, KVCache

_LAYER_PARAMS = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_norm",
                 "gate_proj", "up_proj", "down_proj")
_BIAS_PARAMS = ("q_bias", "k_bias", "v_bias")


def rope_inverse_frequencies(config: ModelConfig) -> jax.Array:
    """RoPE inverse frequencies, with Llama 3 frequency-dependent scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate [B, T, H, D] by positions [B, T] (HF `rotate_half` convention)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, query_block: int = 0) -> jax.Array:
    """Grouped-query attention. q [B,T,H,D], k/v [B,S,Hkv,D], mask [B|1,T,S] -> [B,T,H,D].

    `query_block` > 0 and < T: the queries go through in blocks of that many rows, one after
    another (`lax.map`), so only one block's [B,H,block,S] scores are live at a time. A long
    prefill into a large cache would otherwise hold the whole [B,H,T,S] matrix at once.
    """
    t = q.shape[1]
    if 0 < query_block < t:
        return _attention_in_query_blocks(q, k, v, mask, query_block)
    return _attention_all_queries(q, k, v, mask)


def _attention_in_query_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                               block: int) -> jax.Array:
    b, t, h, d = q.shape
    count = -(-t // block)
    pad = count * block - t  # padded query rows see no key; their (uniform) outputs are cut off below
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, count, block, h, d)
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(mask.shape[0], count, block, mask.shape[-1])
    out = jax.lax.map(lambda qm: _attention_all_queries(qm[0], k, v, qm[1]),
                      (jnp.moveaxis(q, 1, 0), jnp.moveaxis(mask, 1, 0)))
    return jnp.moveaxis(out, 0, 1).reshape(b, count * block, h, d)[:, :t]


def _attention_all_queries(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(d))
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def attention_over(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                   contexts: Sequence[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """Attention of a chunk to read-only contexts and to itself, as one softmax over all of them.

    q [B,T,H,D]; the chunk's own k/v [B,T,Hkv,D] with mask [B,T,T]; each context is
    (k [Bc,S,Hkv,D], v, valid [Bc,S]) with Bc 1 (shared by all rows) or B. Each part is
    attended separately and the parts are merged by their log-sum-exp statistics, so no
    keys, values or score matrices are concatenated.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    q = q.reshape(b, t, kv_heads, groups, d) * (1.0 / math.sqrt(d))

    def part(keys, values, visible):  # visible [B|1, T|1, S] -> (max, sum, unnormalised out) per query
        # A shared (batch-1) context is broadcast per layer: [B, S, Hkv, D] of one layer is
        # small, and batched matmuls run faster on it than on the query rows folded together.
        keys, values = (jnp.broadcast_to(x, (b, *x.shape[1:])) for x in (keys, values))
        s = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32)
        s = jnp.where(visible[:, None, None, :, :], s, _MASK_VALUE)
        peak = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - peak)
        total = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("bkgts,bskd->bkgtd", p.astype(values.dtype), values)
        return peak, total, out.astype(jnp.float32)

    parts = [part(kc, vc, valid[:, None, :]) for kc, vc, valid in contexts]
    parts.append(part(k, v, mask))
    peak = functools.reduce(jnp.maximum, [m for m, _, _ in parts])
    weights = [jnp.exp(m - peak) for m, _, _ in parts]
    total = sum(w * part_sum for w, (_, part_sum, _) in zip(weights, parts, strict=True))
    out = sum(w * o for w, (_, _, o) in zip(weights, parts, strict=True)) / total  # [B, Hkv, G, T, D]
    return jnp.moveaxis(out, 3, 1).astype(v.dtype).reshape(b, t, h, d)


def tied_logits(hidden: jax.Array, embed: jax.Array, chunks: int = 8) -> jax.Array:
    """hidden [..., D] @ embed[V, D].T in vocabulary chunks under a scan.

    The chunks are contiguous row blocks of the embedding, so no transposed copy is made;
    on CPU this runs about twice as fast as one large dot against the transposed table.
    """
    vocab, d = embed.shape
    if vocab % chunks:
        return jnp.einsum("...d,vd->...v", hidden, embed, preferred_element_type=jnp.float32)
    flat = hidden.reshape(-1, d)
    blocks = embed.reshape(chunks, vocab // chunks, d)
    _, out = jax.lax.scan(
        lambda carry, block: (carry, jnp.einsum("nd,vd->nv", flat, block, preferred_element_type=jnp.float32)),
        None, blocks)
    return jnp.moveaxis(out, 0, 1).reshape(*hidden.shape[:-1], vocab)


def tied_logits_over_blocks(hidden: jax.Array, blocks: Sequence[jax.Array]) -> jax.Array:
    """`tied_logits` with the embedding's row blocks already split (see `DecodeWeights`)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = [jnp.einsum("nd,vd->nv", flat, block, preferred_element_type=jnp.float32) for block in blocks]
    return jnp.concatenate(out, axis=-1).reshape(*hidden.shape[:-1], -1)


@struct.dataclass
class DecodeWeights:
    """The weights a decode step reads, copied out per layer (and per vocabulary block) once per call.

    XLA:CPU's dot kernels do not read a slice of the stacked layer weights in place: each
    layer of a scan first copies its weights out, and the chunked LM head copies its blocks.
    Prefill and training amortise that copy over many tokens, but a decode step reads every
    weight once, so the copy about doubles its memory traffic. The decode loop makes these
    copies once, before its `while_loop` (the loop only reads them), and runs the layers
    unrolled; the price is a second copy of the layer weights while the loop runs.
    """

    layers: tuple[dict[str, jax.Array], ...]  # per layer: name -> weight (matrices in compute dtype)
    vocab_blocks: tuple[jax.Array, ...] | None  # tied LM head: row blocks of the embedding


class LoRAParam(nnx.Param):
    """A low-rank adapter weight: the only trainable parameters in LoRA fine-tuning."""


def fresh_adapter(name: str, shape: tuple[int, ...], param_dtype: jnp.dtype, rngs: nnx.Rngs) -> LoRAParam:
    """A is random and B is zero, so a fresh adapter leaves the model unchanged."""
    if name.endswith("_lora_a"):
        return LoRAParam(jax.random.normal(rngs.params(), shape, param_dtype) * shape[-2] ** -0.5)
    return LoRAParam(jnp.zeros(shape, param_dtype))


class DecoderLayers(nnx.Module):
    """All decoder blocks, weights stacked on a leading layer axis."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        shapes = canonical_param_shapes(config)
        param_dtype = jnp.dtype(config.param_dtype)
        for name, shape in lora_param_shapes(config).items():
            if name.startswith("layers."):
                setattr(self, name.split(".", 1)[1], fresh_adapter(name, shape, param_dtype, rngs))
        for name in _LAYER_PARAMS + (_BIAS_PARAMS if config.attention_bias else ()):
            shape = shapes[f"layers.{name}"]
            if name.endswith("norm"):
                value = jnp.ones(shape, param_dtype)
            elif name.endswith("bias"):
                value = jnp.zeros(shape, param_dtype)
            else:
                value = jax.random.normal(rngs.params(), shape, param_dtype) * (shape[-2] ** -0.5)
            setattr(self, name, nnx.Param(value))


class ValueHead(nnx.Module):
    """Scalar value per token for a critic that shares the backbone architecture."""

    def __init__(self, hidden_size: int, param_dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (hidden_size, 1), param_dtype)
                                * (hidden_size ** -0.5))
        self.bias = nnx.Param(jnp.zeros((1,), param_dtype))


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` returns float32 logits and the updated KV cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = jnp.dtype(config.param_dtype)
        d, v = config.hidden_size, config.vocab_size
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (v, d), param_dtype) * 0.02)
        self.layers = DecoderLayers(config, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((d,), param_dtype))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(jax.random.normal(rngs.params(), (d, v), param_dtype) * d ** -0.5)
        # The output projection's adapter sits beside it (tied or not), outside the layer scan.
        for name, shape in lora_param_shapes(config).items():
            if name.startswith("lm_head_"):
                setattr(self, name, fresh_adapter(name, shape, param_dtype, rngs))
        if config.value_head:
            self.value_head = ValueHead(d, param_dtype, rngs=rngs)

    # -- the three outputs built on one trunk -------------------------------------------------
    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None,
                 cache: KVCache | None = None, *, adapters: bool = True) -> tuple[jax.Array, KVCache | None]:
        hidden, cache = self.hidden_states(tokens, valid, cache, adapters=adapters)
        return self.logits_from_hidden(hidden, adapters=adapters), cache

    def logits_from_hidden(self, hidden: jax.Array, *, adapters: bool = True,
                           weights: DecodeWeights | None = None) -> jax.Array:
        """Float32 logits of final hidden states; `adapters=False` skips an `lm_head` adapter.

        A reference-policy forward must pass the same `adapters` here as to `hidden_states`.
        `weights` (from `decode_weights`) reads a tied head's pre-split vocabulary blocks.
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        hidden = hidden.astype(dtype)
        if not c.tie_word_embeddings:
            logits = jnp.dot(hidden, self.lm_head[...].astype(dtype), preferred_element_type=jnp.float32)
        elif weights is not None and weights.vocab_blocks is not None:
            logits = tied_logits_over_blocks(hidden, weights.vocab_blocks)
        else:
            # Tied: the transposed input embedding; an adapter adds to this product only.
            logits = tied_logits(hidden, self.embed[...].astype(dtype))
        if adapters and c.lora_rank and "lm_head" in c.lora_targets:
            low_rank = jnp.dot(hidden, self.lm_head_lora_a[...].astype(dtype))
            logits = logits + (c.lora_alpha / c.lora_rank) * jnp.dot(
                low_rank, self.lm_head_lora_b[...].astype(dtype), preferred_element_type=jnp.float32)
        return logits

    def values_from_hidden(self, hidden: jax.Array) -> jax.Array:
        if not self.config.value_head:
            raise ValueError("this model has no value head; build it with ModelConfig(value_head=True)")
        kernel = self.value_head.kernel[...].astype(jnp.float32)
        return (hidden.astype(jnp.float32) @ kernel)[..., 0] + self.value_head.bias[...][0]

    def hidden_states(self, tokens: jax.Array, valid: jax.Array | None = None,
                      cache: KVCache | None = None, *, adapters: bool = True,
                      weights: DecodeWeights | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, D] for token ids [B, T].

        `valid` [B, T] marks real tokens (default: all). With a cache, the tokens are written
        at slots [cache.cursor, cache.cursor + T) and attend to every valid earlier slot.
        `adapters=False` runs the base model of a LoRA model (the PPO reference policy); pass the
        same flag to `logits_from_hidden`, which holds an `lm_head` adapter. Without a cache,
        `config.attention_impl == "blocked"` computes attention in causal query blocks
        (`blocked_attention`): same results, less work and memory in training. `weights` (from
        `decode_weights`, made with the same `adapters`) runs the layers unrolled on them.
        """
        valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
        start = jnp.zeros(tokens.shape[:1], jnp.int32) if cache is None else cache.next_position
        blocked = cache is None and self.config.attention_impl == "blocked"
        if blocked:
            mask = None  # causal + key padding, applied block by block from `valid`
        elif cache is None:
            t = tokens.shape[1]
            mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
        else:
            cache = cache.reserve(valid)
            slots = jnp.arange(cache.capacity)
            query_slots = cache.cursor + jnp.arange(tokens.shape[1])
            mask = (slots[None, :] <= query_slots[:, None])[None] & cache.valid[:, None, :]

        def attend(q, k, v, layer_index, cache_kv, _context):
            if blocked:
                return blocked_causal_attention(q, k, v, valid, self.config.attention_block), cache_kv, None
            if cache_kv is None:
                keys, values = k, v
            else:
                cache_kv = cache_kv.write_layer(layer_index, k, v)
                keys, values = cache_kv.layer(layer_index)
            block = self.config.cache_query_block if cache_kv is not None else 0
            return attention(q, keys, values, mask, block), cache_kv, None

        kv = None if cache is None else cache.layers_view()
        hidden, kv, _ = self._decode_layers(tokens, valid, start, attend, kv, None, adapters, weights)
        if cache is not None:
            cache = cache.advance(kv, valid)
        return hidden, cache

    def hidden_states_over(self, tokens: jax.Array, valid: jax.Array, contexts: Sequence[ContextKV], *,
                           adapters: bool = True) -> tuple[jax.Array, ContextKV]:
        """Hidden states of a chunk that reads `contexts` (in order) without writing to them.

        Returns the hidden states [B, T, D] and the chunk's own keys/values as a context, so
        a later chunk can read it too. Rotary positions continue after the contexts' real tokens.
        """
        valid = valid.astype(bool)
        start = sum((ctx.token_count() for ctx in contexts), jnp.zeros(tokens.shape[:1], jnp.int32))
        t = tokens.shape[1]
        own_mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
        layer_contexts = tuple((ctx.k, ctx.v) for ctx in contexts)
        context_valid = tuple(ctx.valid for ctx in contexts)

        def attend(q, k, v, _layer_index, state, context):
            parts = [(kc, vc, m) for (kc, vc), m in zip(context, context_valid, strict=True)]
            return attention_over(q, k, v, own_mask, parts), state, (k, v)

        hidden, _, (keys, values) = self._decode_layers(tokens, valid, start, attend, None, layer_contexts,
                                                       adapters)
        return hidden, ContextKV(k=keys, v=values, valid=valid)

    def _layer_lora_targets(self, adapters: bool) -> tuple[str, ...]:
        c = self.config
        return tuple(t for t in c.lora_targets if t != "lm_head") if (adapters and c.lora_rank) else ()

    def _layer_params(self, adapters: bool) -> dict[str, jax.Array]:
        """The stacked [L, ...] weights the blocks read (adapters included when on)."""
        names = _LAYER_PARAMS + (_BIAS_PARAMS if self.config.attention_bias else ())
        names += tuple(f"{t}_lora_{ab}" for t in self._layer_lora_targets(adapters) for ab in "ab")
        return {name: getattr(self.layers, name)[...] for name in names}

    def decode_weights(self, *, adapters: bool = True, vocab_chunks: int = 8) -> DecodeWeights:
        """Per-layer (and per-vocabulary-block) copies of the weights for a decode loop.

        Make them once, outside the loop; see `DecodeWeights` for why and what it costs.
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)

        def view(name: str, array: jax.Array) -> jax.Array:
            return array if name.endswith(("norm", "bias")) else array.astype(dtype)

        stacked = self._layer_params(adapters)
        layers = tuple({name: view(name, a[i]) for name, a in stacked.items()} for i in range(c.num_layers))
        blocks = None
        if c.tie_word_embeddings and c.vocab_size % vocab_chunks == 0:
            embed = self.embed[...].astype(dtype)
            size = c.vocab_size // vocab_chunks
            blocks = tuple(embed[i * size:(i + 1) * size] for i in range(vocab_chunks))
        return DecodeWeights(layers=layers, vocab_blocks=blocks)

    def _decode_layers(self, tokens, valid, start, attend, state, layer_xs, adapters, weights=None):
        """The decoder blocks under one scan; `attend` decides where keys/values come from and go.

        `attend(q, k, v, layer_index, state, layer_x) -> (out, state, emitted)`: `state` is
        carried through the layers, `layer_x` is this layer's slice of `layer_xs`, and the
        stacked `emitted` values are returned. With `weights` (`decode_weights`) the layers run
        unrolled on those copies instead, with Python-int layer indices.
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        positions = jnp.maximum(start[:, None] + jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        inv_freq = rope_inverse_frequencies(c)
        lora_targets = self._layer_lora_targets(adapters)
        lora_scale = c.lora_alpha / max(c.lora_rank, 1)

        def linear(h, p, name):
            y = jnp.dot(h, p[name].astype(dtype))
            if name in lora_targets:
                low_rank = jnp.dot(jnp.dot(h, p[f"{name}_lora_a"].astype(dtype)), p[f"{name}_lora_b"].astype(dtype))
                y = y + lora_scale * low_rank
            return y

        def block(x, layer_index, p, state, layer_x):
            h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
            q = linear(h, p, "q_proj")
            k = linear(h, p, "k_proj")
            v = linear(h, p, "v_proj")
            if c.attention_bias:
                q, k, v = (q + p["q_bias"].astype(dtype), k + p["k_bias"].astype(dtype),
                           v + p["v_bias"].astype(dtype))
            b, t = x.shape[:2]
            q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), positions, inv_freq)
            k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), positions, inv_freq)
            v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
            out, state, emitted = attend(q, k, v, layer_index, state, layer_x)
            x = x + linear(out.reshape(b, t, c.num_heads * c.head_dim), p, "o_proj")
            h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
            x = x + linear(jax.nn.silu(linear(h, p, "gate_proj")) * linear(h, p, "up_proj"), p, "down_proj")
            return x, state, emitted

        if c.remat:
            policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if c.remat_policy == "dots"
                      else None)
            block = jax.checkpoint(block, prevent_cse=False, policy=policy)

        if weights is not None:
            emitted_per_layer = []
            for i, p in enumerate(weights.layers):
                layer_x = None if layer_xs is None else jax.tree.map(lambda a, i=i: a[i], layer_xs)
                x, state, emitted = block(x, i, p, state, layer_x)
                emitted_per_layer.append(emitted)
            emitted = jax.tree.map(lambda *a: jnp.stack(a), *emitted_per_layer)
            return rms_norm(x, self.final_norm[...], c.rms_norm_eps), state, emitted

        def scan_body(carry, xs):
            x, state = carry
            layer_index, p, layer_x = xs
            x, state, emitted = block(x, layer_index, p, state, layer_x)
            return (x, state), emitted

        layer_params = self._layer_params(adapters)
        (x, state), emitted = jax.lax.scan(scan_body, (x, state), (jnp.arange(c.num_layers), layer_params, layer_xs))
        return rms_norm(x, self.final_norm[...], c.rms_norm_eps), state, emitted
