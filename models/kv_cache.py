"""The decoding KV cache: fixed-capacity slots shared by all rows, with a validity mask.

All rows write the same slot range per call (`cursor`), so writes are one
`dynamic_update_slice` and shapes never depend on the data. Padding is simply an invalid
slot, which lets a padded continuation chunk be appended to a padded prompt. Rotary
positions are tracked per row (`next_position`) from the count of real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mpo_jax.models.config import ModelConfig


@struct.dataclass
class LayerKV:
    """The per-layer view carried through the layer scan."""

    k: jax.Array  # [L, B, S, Hkv, D]
    v: jax.Array
    cursor: jax.Array  # int32 scalar: first slot written by this call

    def write_layer(self, layer: jax.Array, k_new: jax.Array, v_new: jax.Array) -> LayerKV:
        index = (layer, 0, self.cursor, 0, 0)
        k = jax.lax.dynamic_update_slice(self.k, k_new[None].astype(self.k.dtype), index)
        v = jax.lax.dynamic_update_slice(self.v, v_new[None].astype(self.v.dtype), index)
        return self.replace(k=k, v=v)

    def layer(self, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.k[layer], self.v[layer]


@struct.dataclass
class ContextKV:
    """Keys and values a chunk attends to without writing to them.

    Reading a shared context instead of appending to it keeps one copy of the context for
    any number of continuations (the judge's rubric prefix, each row's sample under every
    rubric item). A batch of 1 is broadcast over the rows of the chunk.
    """

    k: jax.Array  # [L, Bc, S, Hkv, D]
    v: jax.Array
    valid: jax.Array  # [Bc, S] bool

    @classmethod
    def from_cache(cls, cache: KVCache) -> ContextKV:
        return cls(k=cache.k, v=cache.v, valid=cache.valid)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def token_count(self) -> jax.Array:
        """Real tokens per row [Bc]: the rotary position where a following chunk starts."""
        return jnp.sum(self.valid.astype(jnp.int32), axis=1)

    def concat(self, other: ContextKV) -> ContextKV:
        """This context followed by `other` (for short chunks: it copies both)."""
        return ContextKV(k=jnp.concatenate([self.k, other.k], axis=2), v=jnp.concatenate([self.v, other.v], axis=2),
                         valid=jnp.concatenate([self.valid, other.valid], axis=1))


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, Hkv, D]
    v: jax.Array  # [L, B, S, Hkv, D]
    valid: jax.Array  # [B, S] bool: the slot holds a real token
    cursor: jax.Array  # int32 scalar: next slot to write
    next_position: jax.Array  # [B] int32: rotary position of each row's next real token

    @classmethod
    def create(cls, config: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, capacity), bool), cursor=jnp.zeros((), jnp.int32),
                   next_position=jnp.zeros((batch,), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reserve(self, chunk_valid: jax.Array) -> KVCache:
        """Mark the slots this chunk will occupy, so its tokens can attend to each other."""
        valid = jax.lax.dynamic_update_slice(self.valid, chunk_valid.astype(bool), (0, self.cursor))
        return self.replace(valid=valid)

    def layers_view(self) -> LayerKV:
        return LayerKV(k=self.k, v=self.v, cursor=self.cursor)

    def advance(self, kv: LayerKV, chunk_valid: jax.Array) -> KVCache:
        return self.replace(
            k=kv.k, v=kv.v, cursor=self.cursor + chunk_valid.shape[1],
            next_position=self.next_position + jnp.sum(chunk_valid.astype(jnp.int32), axis=1))

    def grow(self, capacity: int) -> KVCache:
        """A copy with more slots (needed when a continued conversation outgrows the cache)."""
        extra = capacity - self.capacity
        if extra < 0:
            raise ValueError(f"cannot shrink a KV cache from {self.capacity} to {capacity} slots")
        pad5 = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
        return self.replace(k=jnp.pad(self.k, pad5), v=jnp.pad(self.v, pad5),
                            valid=jnp.pad(self.valid, ((0, 0), (0, extra))))
