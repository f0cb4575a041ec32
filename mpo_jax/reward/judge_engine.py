"""Jitted pieces of the logits-mode judge: the rubric prefix and expected item scores.

The rubric prefix (system turn + rubric) is prefilled once per rubric version into a batch-1
KV cache from a token array padded to a fixed length, so a new rubric is new data, not a new
program. Scoring a batch reads that cache in place from every row, prefills each row's material
once, then for every rubric item prefills only the item's short turn on top and reads the
next-token distribution where the score would be written.

Scores are whole numbers written as token sequences; with digit-by-digit tokenizers "10" is
two tokens, so a number's probability is the product over its tokens, times the probability
that no further digit follows when it is a prefix of a longer candidate. The expected score
is the probability-weighted mean over the item's candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mpo_jax.errors import InvalidValueError
from mpo_jax.models.config import ModelConfig
from mpo_jax.models.kv_cache import ContextKV, KVCache


@dataclasses.dataclass(frozen=True)
class CandidateTables:
    """Score candidates of every item, padded: [K, C] first/second token, value, validity."""

    first: np.ndarray  # [K, C] int32
    second: np.ndarray  # [K, C] int32, -1 for one-token candidates
    value: np.ndarray  # [K, C] float32
    valid: np.ndarray  # [K, C] bool
    prefixes: np.ndarray  # [K, D] int32 first tokens that start a two-token candidate (-1 pad)
    is_prefix: np.ndarray  # [K, C] bool: the one-token candidate is also a prefix (needs its stop prob)
    prefix_slot: np.ndarray  # [K, C] int32 index into prefixes for the candidate's first token (0 if none)


def candidate_tables(ranges: Sequence[tuple[int, int]], encode_number, num_items: int, num_candidates: int,
                     num_prefixes: int) -> CandidateTables:
    """Tables for score ranges (lo, hi) per item; `encode_number(n)` gives n's token ids."""
    k, c, d = num_items, num_candidates, num_prefixes
    first = np.zeros((k, c), np.int32)
    second = np.full((k, c), -1, np.int32)
    value = np.zeros((k, c), np.float32)
    valid = np.zeros((k, c), bool)
    prefixes = np.full((k, d), -1, np.int32)
    is_prefix = np.zeros((k, c), bool)
    slot = np.zeros((k, c), np.int32)
    for item, (lo, hi) in enumerate(ranges):
        numbers = list(range(lo, hi + 1))
        if len(numbers) > c:
            raise InvalidValueError(f"item {item + 1}: score range {lo}-{hi} has more than {c} values")
        tokens = [encode_number(n) for n in numbers]
        if any(len(t) > 2 for t in tokens):
            raise InvalidValueError(f"item {item + 1}: scores up to {hi} need more than two tokens; "
                                    "use a range below 100 or the generate mode")
        starts = sorted({t[0] for t in tokens if len(t) == 2})
        if len(starts) > d:
            raise InvalidValueError(f"item {item + 1}: too many distinct first tokens of two-token scores")
        prefixes[item, :len(starts)] = starts
        for j, (n, t) in enumerate(zip(numbers, tokens, strict=True)):
            first[item, j], value[item, j], valid[item, j] = t[0], n, True
            if len(t) == 2:
                second[item, j] = t[1]
            if t[0] in starts:
                slot[item, j] = starts.index(t[0])
                is_prefix[item, j] = len(t) == 1
    return CandidateTables(first, second, value, valid, prefixes, is_prefix, slot)


def tile_cache(cache: KVCache, batch: int) -> KVCache:
    """A batch-1 cache repeated over `batch` rows, in new buffers.

    The sampler donates the cache it continues from, so nothing here may alias the judge's cached
    rubric prefix (including the scalar cursor, and the arrays when `batch` is 1): the prefix is
    reused by every later scoring call under the same rubric.
    """
    def tiled(x: jax.Array, axis: int) -> jax.Array:
        return jnp.repeat(x, batch, axis=axis) if batch > 1 else jnp.array(x, copy=True)

    return KVCache(k=tiled(cache.k, 1), v=tiled(cache.v, 1), valid=tiled(cache.valid, 0),
                   cursor=jnp.array(cache.cursor, copy=True), next_position=tiled(cache.next_position, 0))


def prefix_prefill_program(graphdef: nnx.GraphDef):
    """jit(prefix prefill)(params, tokens [1, S], valid [1, S], cache) -> cache; the cache is donated.

    The judge runs it and `mpo_jax.plan` compiles it (`abstract_prefix_args`), from this one place.
    """
    return jax.jit(build_prefix_prefill(graphdef), donate_argnums=(3,))


def item_scorer_program(graphdef: nnx.GraphDef):
    """jit(`build_item_scorer`): the logits-mode scorer the judge runs and the plan compiles."""
    return jax.jit(build_item_scorer(graphdef))


def _host_input(shape: tuple[int, ...], dtype, mesh: Mesh | None) -> jax.ShapeDtypeStruct:
    """A host array the judge hands to a program with `jnp.asarray` (uncommitted: replicated on a mesh)."""
    sharding = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_prefix_args(params, config: ModelConfig, mesh: Mesh | None, capacity: int, batch: int = 1) -> tuple:
    """(params, tokens, valid, cache) as `Judge._prefix` passes them to `prefix_prefill_program`, as shapes."""
    cache = jax.eval_shape(lambda: KVCache.create(config, batch, capacity))
    cache = jax.tree.map(lambda x: _host_input(x.shape, x.dtype, mesh), cache)
    return (params, _host_input((batch, capacity), jnp.int32, mesh), _host_input((batch, capacity), jnp.bool_, mesh),
            cache)


def abstract_scorer_args(params, prefix_cache, mesh: Mesh | None, *, vocab: int, batch: int, sample_len: int,
                         item_len: int, items: int, candidates: int, prefixes: int) -> tuple:
    """The arguments `Judge._score_logits` passes to `item_scorer_program`, as shapes."""
    def host(shape, dtype):
        return _host_input(shape, dtype, mesh)

    k, c, d = items, candidates, prefixes
    return (params, prefix_cache, host((batch, sample_len), jnp.int32), host((batch, sample_len), jnp.bool_),
            host((k, batch, item_len), jnp.int32), host((k, batch, item_len), jnp.bool_), host((vocab,), jnp.bool_),
            host((k, c), jnp.int32), host((k, c), jnp.int32), host((k, c), jnp.float32), host((k, c), jnp.bool_),
            host((k, d), jnp.int32), host((k, c), jnp.bool_), host((k, c), jnp.int32))


def build_prefix_prefill(graphdef: nnx.GraphDef):
    def prefill_prefix(params, tokens, valid, cache):
        model = nnx.merge(graphdef, params)
        _, cache = model.hidden_states(tokens, valid, cache)
        return cache

    return prefill_prefix


def build_item_scorer(graphdef: nnx.GraphDef):
    """(params, prefix cache, rows, items, candidate tables) -> expected scores [K, B].

    The rubric prefix and each row's sample are read in place (`hidden_states_over`): no item
    writes into, or copies, the long shared context; only the item turn's own keys/values
    are kept for the second digit of two-token scores.
    """

    def score(params, prefix_cache, sample_tokens, sample_valid, item_tokens, item_valid, digit_mask,
              first, second, value, valid, prefixes, is_prefix, prefix_slot):
        model = nnx.merge(graphdef, params)
        batch = sample_tokens.shape[0]
        prefix = ContextKV.from_cache(prefix_cache)
        _, sample = model.hidden_states_over(sample_tokens, sample_valid, (prefix,))

        def one_item(args):
            tokens, tok_valid, first, second, value, valid, prefixes, is_prefix, slot = args
            hidden, item = model.hidden_states_over(tokens, tok_valid, (prefix, sample))
            logp1 = jax.nn.log_softmax(model.logits_from_hidden(hidden[:, -1]), axis=-1)  # [B, V]

            def after_prefix(prefix_token):
                def forward():
                    step = jnp.broadcast_to(prefix_token, (batch, 1)).astype(jnp.int32)
                    h, _ = model.hidden_states_over(step, jnp.ones((batch, 1), bool), (prefix, sample, item))
                    return jax.nn.log_softmax(model.logits_from_hidden(h[:, 0]), axis=-1)  # [B, V]

                # padding slots (-1) skip the forward pass at run time
                return jax.lax.cond(prefix_token >= 0, forward, lambda: jnp.zeros_like(logp1))

            logp2 = jax.lax.map(after_prefix, prefixes)  # [D, B, V]
            lp_first = logp1[:, first]  # [B, C]
            lp_second = logp2[slot, :, jnp.maximum(second, 0)].T  # [B, C]
            more_digits = jnp.sum(jnp.where(digit_mask, jnp.exp(logp2), 0.0), axis=-1)  # [D, B]
            stop = jnp.log1p(-jnp.clip(more_digits, 0.0, 1.0 - 1e-6))[slot].T  # log P(no further digit | prefix)
            logp = lp_first + jnp.where(second >= 0, lp_second, jnp.where(is_prefix, stop, 0.0))
            logp = jnp.where(valid, logp, -jnp.inf)
            weights = jax.nn.softmax(logp, axis=-1)
            return jnp.sum(weights * value, axis=-1)  # [B]

        items = (item_tokens, item_valid, first, second, value, valid, prefixes, is_prefix, prefix_slot)
        # Real items come first; padding items (no valid candidate) are never visited, so the
        # loop's trip count is the rubric's item count, not the padded maximum.
        num_items = jnp.sum(jnp.any(valid, axis=1).astype(jnp.int32))

        def body(k, scores):
            args = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, keepdims=False), items)
            return jax.lax.dynamic_update_index_in_dim(scores, one_item(args), k, axis=0)

        return jax.lax.fori_loop(0, num_items, body, jnp.zeros((valid.shape[0], batch), jnp.float32))

    return score
