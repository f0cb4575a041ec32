"""Batched generation: one jitted prefill, one jitted decode loop, no host round-trip per token.

Shapes are bucketed (batch, prompt length, generation length, constraint states, stop
sequences) so that new prompts of a seen bucket reuse the compiled functions. The decode
loop is a `lax.while_loop` that exits once every row has stopped. Every sampled token is fed
back through the model before the loop ends, so the returned KV cache holds the whole
conversation and a next turn only prefills its own new tokens (`Sampler.continue_`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mpo_jax.engine import constraints as constraints_lib
from mpo_jax.engine import sharding as sharding_lib
from mpo_jax.errors import InvalidValueError
from mpo_jax.models.config import ModelConfig
from mpo_jax.models.kv_cache import KVCache

# Prompt (and continuation-chunk) lengths step by ~1.5x, so a prefill pads at most a third of its
# slots; cache capacities stay on powers of two (`cache_capacity`), so decode loops compile as rarely.
PROMPT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
GENERATION_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STOP_SEQUENCE_BUCKETS = (1, 4, 16)
STOP_LENGTH_BUCKETS = (1, 4, 8, 16, 32)
STOP_ID_BUCKETS = (4, 16, 64, 256, 1024, 4096)
CACHE_GROWTH = 256  # a continued conversation's KV cache grows by multiples of this many slots
# `Sampler(unroll_layers="auto")` unrolls the decode loop's layers up to this many bytes of layer
# weights: the per-call copy it needs is cheap next to a 135M or 0.5B model, not next to a 1.5B
# float32 model (5.5 GB) on a small machine.
UNROLL_MAX_LAYER_BYTES = 2 * 1024**3
_NEG = -1e30


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise InvalidValueError(f"{what} is {n}, larger than the largest bucket {buckets[-1]}; "
                            f"shorten the input or pass larger buckets to the Sampler")


def cache_capacity(prompt_len: int, gen_len: int) -> int:
    """KV-cache slots for a new generation: the prompt bucket rounded up to a power of two, plus gen_len.

    The decode loop compiles once per cache shape, while a prefill compiles quickly: a 384-token
    prompt prefills 384 slots but shares the 512 + gen_len cache, and its decode loop, with 512.
    """
    return (1 << (prompt_len - 1).bit_length()) + gen_len


def continued_capacity(capacity: int, cursor: int, chunk_len: int, gen_len: int) -> int:
    """KV-cache slots for a continued turn: the cache as it is, or grown in `CACHE_GROWTH` steps so that
    conversations of similar length share compiled shapes (`Sampler.continue_`, and `mpo_jax.plan`)."""
    needed = cursor + chunk_len + gen_len
    return capacity if needed <= capacity else -(-needed // CACHE_GROWTH) * CACHE_GROWTH


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int, *, batch: int | None = None,
             what: str = "row") -> tuple[np.ndarray, np.ndarray]:
    """Token rows right-aligned in `[batch, length]` int32 ids and a bool validity mask.

    Left padding puts every row's last token in the last column, where prefill reads the next-token
    logits. `batch` (default: one per row) adds all-padding filler rows so that batch sizes come from
    a few buckets. A row longer than `length`, or more rows than `batch`, is a caller's bug: a
    `ValueError` naming the row (`what` says what a row is, e.g. "prompt").
    """
    batch = len(rows) if batch is None else batch
    if len(rows) > batch:
        raise ValueError(f"{len(rows)} {what}s do not fit a batch of {batch}")
    tokens = np.full((batch, length), pad_id, np.int32)
    valid = np.zeros((batch, length), bool)
    for i, ids in enumerate(rows):
        if len(ids) > length:
            raise ValueError(f"{what} {i} has {len(ids)} tokens, more than the padded length {length}")
        if len(ids):
            tokens[i, length - len(ids):] = ids
            valid[i, length - len(ids):] = True
    return tokens, valid


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding knobs. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise InvalidValueError("stop strings must be non-empty")


@dataclasses.dataclass
class GenerationState:
    """What a conversation needs to continue: the KV cache and the rows it holds."""

    cache: KVCache
    cursor: int  # host copy of cache.cursor (slots used)
    num_rows: int  # real rows; the rest of the padded batch is filler


@dataclasses.dataclass
class SampleOutput:
    tokens: np.ndarray  # [B, N] int32 generated ids (pad after the end)
    logprobs: np.ndarray  # [B, N] float32 log-prob of each sampled token
    mask: np.ndarray  # [B, N] bool: real generated tokens, the stop token included
    texts: list[str]  # decoded completions, cut before any stop string
    finished: np.ndarray  # [B] bool: stopped by an end token or stop string, not the budget
    state: GenerationState
    cached_mask: np.ndarray | None = None  # [B, N] generated tokens now in the KV cache
    prefill_tokens: int = 0  # padded token slots prefilled (for cost accounting)
    decode_steps: int = 0


def _filter_top_k(logits: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits >= kth, logits, _NEG)


def _filter_top_p(logits: jax.Array, top_p: jax.Array, iterations: int = 32) -> jax.Array:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (nucleus).

    The probability threshold is found by bisection (masked sums) instead of a full sort of
    the vocabulary, which on CPU costs ~40x more per decode step.
    """
    probs = jax.nn.softmax(logits, axis=-1)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        mass = jnp.sum(jnp.where(probs >= mid, probs, 0.0), axis=-1, keepdims=True)
        enough = mass >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo = jnp.zeros(probs.shape[:-1] + (1,), probs.dtype)
    hi = jnp.max(probs, axis=-1, keepdims=True)
    lo, _ = jax.lax.fori_loop(0, iterations, bisect, (lo, hi))
    return jnp.where(probs >= lo, logits, _NEG)


def sample_inverse_cdf(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One categorical draw per row from one uniform number per row.

    Cheaper on CPU than Gumbel-max (`jax.random.categorical` draws one number per vocabulary
    entry); exact up to float32 rounding of the cumulative sum.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, (logits.shape[0], 1)) * cdf[:, -1:]
    token = jnp.sum((cdf <= u).astype(jnp.int32), axis=-1)
    return jnp.minimum(token, logits.shape[-1] - 1).astype(jnp.int32)


def _stop_sequence_hit(recent: jax.Array, stop_seqs: jax.Array) -> jax.Array:
    """recent [B, M] last tokens, stop_seqs [K, M] right-aligned, -1 = no token (wildcard)."""
    active = jnp.any(stop_seqs >= 0, axis=-1)  # [K]
    match = (stop_seqs[None] == recent[:, None]) | (stop_seqs[None] < 0)
    return jnp.any(jnp.all(match, axis=-1) & active[None], axis=-1)


def build_decode_loop(graphdef: nnx.GraphDef, pad_id: int, max_steps: int, top_k: int, use_top_p: bool,
                      unroll_layers: bool = True):
    """The decode loop for one static configuration (generation bucket, filters).

    `unroll_layers` copies the weights out per layer once, before the loop, and runs the layers
    unrolled (`Transformer.decode_weights`): each step then reads the weights in place instead
    of copying every layer's slice out of the stacked arrays. It costs compile time (the step's
    HLO grows with depth) and, while the loop runs, a second copy of the layer weights.
    """

    def decode(params, cache, logits, rng, temperature, top_p, max_new, active, stop_ids,
               stop_seqs, allowed, next_state):
        model = nnx.merge(graphdef, params)
        weights = model.decode_weights() if unroll_layers else None
        batch = logits.shape[0]
        m = stop_seqs.shape[1]

        def cond(carry):
            step, done = carry[0], carry[3]
            return (step < max_new) & ~jnp.all(done)

        def body(carry):
            step, cache, logits, done, state, tokens, logps, mask, recent, finished = carry
            logits = jnp.where(allowed[state], logits, _NEG)
            greedy = temperature <= 0
            scaled = logits / jnp.where(greedy, 1.0, temperature)
            logp_all = jax.nn.log_softmax(scaled, axis=-1)
            filtered = scaled
            if top_k:
                filtered = _filter_top_k(filtered, top_k)
            if use_top_p:
                filtered = _filter_top_p(filtered, top_p)
            token = jax.lax.cond(greedy, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                                 lambda: sample_inverse_cdf(jax.random.fold_in(rng, step), filtered))
            token = jnp.where(done, pad_id, token)
            logp = jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]
            tokens = tokens.at[:, step].set(token)
            logps = logps.at[:, step].set(jnp.where(done, 0.0, logp))
            mask = mask.at[:, step].set(~done)
            recent = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
            hit = jnp.any(token[:, None] == stop_ids[None], axis=-1) | _stop_sequence_hit(recent, stop_seqs)
            finished = finished | (~done & hit)
            state = next_state[state, token]
            # Feed the token (pads of stopped rows are invalid slots) so the cache stays complete.
            hidden, cache = model.hidden_states(token[:, None], (~done)[:, None], cache, weights=weights)
            logits = model.logits_from_hidden(hidden[:, 0], weights=weights)
            return step + 1, cache, logits, done | hit, state, tokens, logps, mask, recent, finished

        init = (jnp.zeros((), jnp.int32), cache, logits, ~active, jnp.zeros((batch,), jnp.int32),
                jnp.full((batch, max_steps), pad_id, jnp.int32), jnp.zeros((batch, max_steps), jnp.float32),
                jnp.zeros((batch, max_steps), bool), jnp.full((batch, m), -2, jnp.int32),
                jnp.zeros((batch,), bool))
        out = jax.lax.while_loop(cond, body, init)
        step, cache, _, _, _, tokens, logps, mask, _, finished = out
        return tokens, logps, mask, finished, cache, step

    return decode


def build_prefill(graphdef: nnx.GraphDef):
    def prefill(params, tokens, valid, cache):
        model = nnx.merge(graphdef, params)
        hidden, cache = model.hidden_states(tokens, valid, cache)
        return model.logits_from_hidden(hidden[:, -1]), cache

    return prefill


def layer_weight_bytes(params: nnx.State) -> int:
    """Bytes of the stacked decoder-layer weights (what an unrolled decode loop copies per call)."""
    layers = params["layers"] if "layers" in params else {}
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layers))


class Sampler:
    """Generation for one model (graph definition + parameters) and one tokenizer."""

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, config: ModelConfig, tokenizer: Any, *,
                 mesh: Mesh | None = None, prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
                 generation_buckets: Sequence[int] = GENERATION_BUCKETS,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS, unroll_layers: bool | str = "auto"):
        self.graphdef, self.params, self.config, self.tokenizer = graphdef, params, config, tokenizer
        if unroll_layers == "auto":
            unroll_layers = layer_weight_bytes(params) <= UNROLL_MAX_LAYER_BYTES
        elif not isinstance(unroll_layers, bool):
            raise InvalidValueError(f"unroll_layers must be True, False or 'auto', got {unroll_layers!r}")
        self.unroll_layers = unroll_layers
        self.mesh = mesh
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.generation_buckets = tuple(sorted(generation_buckets))
        self.batch_buckets = tuple(sorted(batch_buckets))
        self._compiled: dict[tuple, Any] = {}
        self._token_strings: list[str] | None = None

    # -- compiled functions ------------------------------------------------------------------
    # The runtime calls these with real arrays; `mpo_jax.plan` lowers the same jitted functions on
    # the `abstract_*` inputs below, so what the plan compiles for a TPU is what generation runs.
    def cache_shardings(self, cache_shape: tuple[int, ...]) -> KVCache:
        """Shardings of a KV cache of `cache_shape` [L, B, S, Hkv, D] on this sampler's mesh."""
        mesh = self.mesh
        cache_s = sharding_lib.cache_sharding(mesh, cache_shape)
        b, s = cache_shape[1], cache_shape[2]
        return KVCache(k=cache_s, v=cache_s, valid=sharding_lib.batch_sharding(mesh, (b, s)),
                       cursor=sharding_lib.replicated(mesh),
                       next_position=sharding_lib.batch_sharding(mesh, (b,)))

    def _param_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.params)

    def prefill_program(self):
        """jit(prefill)(params, tokens [B, P], valid [B, P], cache) -> (last logits [B, V], cache); cache donated."""
        key = ("prefill",)
        if key not in self._compiled:
            fn = build_prefill(self.graphdef)
            self._compiled[key] = jax.jit(fn, donate_argnums=(3,))
        return self._compiled[key]

    def decode_program(self, max_steps: int, top_k: int, use_top_p: bool):
        """jit(decode loop) for one generation bucket and filter set; the cache is donated."""
        key = ("decode", max_steps, top_k, use_top_p)
        if key not in self._compiled:
            fn = build_decode_loop(self.graphdef, self.tokenizer.pad_id, max_steps, top_k, use_top_p,
                                   self.unroll_layers)
            self._compiled[key] = jax.jit(fn, donate_argnums=(1,))
        return self._compiled[key]

    def _abstract(self, shape: tuple[int, ...], dtype, batch_axis: bool = True) -> jax.ShapeDtypeStruct:
        """A shape-only input placed as `_put` places a host array of that shape."""
        if self.mesh is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        sharding = (sharding_lib.batch_sharding(self.mesh, shape) if batch_axis
                    else sharding_lib.replicated(self.mesh))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def abstract_cache(self, batch: int, capacity: int) -> KVCache:
        """The shapes and shardings of `_new_cache(batch, capacity)`, allocating nothing."""
        cache = jax.eval_shape(lambda: KVCache.create(self.config, batch, capacity))
        if self.mesh is None:
            return cache
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache,
                            self.cache_shardings(cache.k.shape))

    def abstract_prefill_args(self, batch: int, length: int, cache: KVCache) -> tuple:
        """(params, tokens, valid, cache) as `_run` passes them to `prefill_program()`."""
        return (self.params, self._abstract((batch, length), jnp.int32), self._abstract((batch, length), jnp.bool_),
                cache)

    def abstract_decode_args(self, cache: KVCache, logits: jax.ShapeDtypeStruct, *, states: int = 1,
                             stop_ids: int = STOP_ID_BUCKETS[0], stop_shape: tuple[int, int] = (1, 1)) -> tuple:
        """The arguments `_run` passes to `decode_program(...)`: `states` constraint states (bucketed),
        `stop_ids` end-token slots and a `stop_shape` table of stop sequences."""
        batch, vocab = logits.shape
        replicated = functools.partial(self._abstract, batch_axis=False)
        key = jax.eval_shape(lambda: jax.random.key(0))
        return (self.params, cache, logits, replicated(key.shape, key.dtype), replicated((), jnp.float32),
                replicated((), jnp.float32), replicated((), jnp.int32), self._abstract((batch,), jnp.bool_),
                replicated((stop_ids,), jnp.int32), replicated(stop_shape, jnp.int32),
                replicated((states, vocab), jnp.bool_), replicated((states, vocab), jnp.int32))

    def _put(self, array: np.ndarray, batch_axis: bool = True):
        if self.mesh is None:
            return jnp.asarray(array)
        sharding = (sharding_lib.batch_sharding(self.mesh, array.shape) if batch_axis
                    else sharding_lib.replicated(self.mesh))
        return sharding_lib.place(array, sharding)

    def _new_cache(self, batch: int, capacity: int) -> KVCache:
        cache = KVCache.create(self.config, batch, capacity)
        if self.mesh is not None:
            cache = jax.device_put(cache, self.cache_shardings(cache.k.shape))
        return cache

    # -- public API ----------------------------------------------------------------------------
    def padded_batch(self, rows: int) -> int:
        step = sharding_lib.batch_parallelism(self.mesh)
        size = bucket(rows, self.batch_buckets, "batch size")
        return -(-size // step) * step

    def token_strings(self) -> list[str]:
        if self._token_strings is None:
            self._token_strings = self.tokenizer.token_strings()
        return self._token_strings

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(),
                 constraint: constraints_lib.TokenConstraint | None = None) -> SampleOutput:
        """Sample a completion for each prompt (token ids, no padding)."""
        if not prompt_ids:
            raise InvalidValueError("generate needs at least one prompt")
        rows = len(prompt_ids)
        batch = self.padded_batch(rows)
        longest = max(len(p) for p in prompt_ids)
        if longest == 0:
            raise InvalidValueError("every prompt is empty; give at least one token per prompt")
        prompt_len = bucket(longest, self.prompt_buckets, "prompt length (tokens)")
        gen_len = bucket(params.max_new_tokens, self.generation_buckets, "max_new_tokens")
        cache = self._new_cache(batch, cache_capacity(prompt_len, gen_len))
        state = GenerationState(cache=cache, cursor=0, num_rows=rows)
        return self._run(state, prompt_ids, prompt_len, gen_len, params, constraint)

    def continue_(self, state: GenerationState, new_ids: Sequence[Sequence[int]],
                  params: SamplingParams = SamplingParams(),
                  constraint: constraints_lib.TokenConstraint | None = None) -> SampleOutput:
        """Append a turn (new token ids per row) to a previous generation and sample again.

        Only the new tokens are prefilled: the shared context is read from the KV cache.
        """
        if len(new_ids) != state.num_rows:
            raise ValueError(f"continue_ got {len(new_ids)} rows but the conversation has {state.num_rows}")
        longest = max((len(p) for p in new_ids), default=0)
        chunk_len = bucket(max(longest, 1), self.prompt_buckets, "continuation length (tokens)")
        gen_len = bucket(params.max_new_tokens, self.generation_buckets, "max_new_tokens")
        needed = state.cursor + chunk_len + gen_len
        cache = state.cache
        if needed > cache.capacity:
            capacity = continued_capacity(cache.capacity, state.cursor, chunk_len, gen_len)
            if capacity > self.config.max_position_embeddings:
                raise InvalidValueError(f"the conversation needs {needed} positions but the model has "
                                        f"{self.config.max_position_embeddings}; start a new conversation")
            cache = cache.grow(capacity)
            if self.mesh is not None:
                cache = jax.device_put(cache, self.cache_shardings(cache.k.shape))
        state = dataclasses.replace(state, cache=cache)
        return self._run(state, new_ids, chunk_len, gen_len, params, constraint)

    def _run(self, state: GenerationState, prompt_ids, prompt_len: int, gen_len: int,
             params: SamplingParams, constraint) -> SampleOutput:
        batch = state.cache.batch_size
        rows = state.num_rows
        tokens, valid = left_pad(prompt_ids, prompt_len, self.tokenizer.pad_id, batch=batch, what="prompt")
        active = np.zeros((batch,), bool)
        active[:rows] = True

        logits, cache = self.prefill_program()(self.params, self._put(tokens), self._put(valid), state.cache)

        stop_ids, stop_seqs = self._stop_tables(params)
        constraint = constraint or constraints_lib.unconstrained(self.config.vocab_size)
        allowed, next_state = constraint.padded(constraints_lib.bucket_states(constraint.num_states))
        decode = self.decode_program(gen_len, params.top_k, params.top_p < 1.0)
        out = decode(self.params, cache, logits, jax.random.key(params.seed),
                     jnp.float32(params.temperature), jnp.float32(params.top_p),
                     jnp.int32(params.max_new_tokens), self._put(active), jnp.asarray(stop_ids),
                     jnp.asarray(stop_seqs), jnp.asarray(allowed), jnp.asarray(next_state))
        out_tokens, logps, mask, finished = (sharding_lib.to_host(x) for x in out[:4])
        cache, steps = out[4:]
        steps = int(steps)
        new_state = GenerationState(cache=cache, cursor=state.cursor + prompt_len + steps, num_rows=rows)
        cached_mask = mask[:rows]
        texts, mask, stopped = self._cut_at_stop_strings(out_tokens[:rows], cached_mask, params.stop)
        return SampleOutput(tokens=out_tokens[:rows], logprobs=logps[:rows], mask=mask,
                            texts=texts, finished=finished[:rows] | stopped, state=new_state,
                            cached_mask=cached_mask,
                            prefill_tokens=batch * prompt_len, decode_steps=steps)

    def _stop_tables(self, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
        """End-token ids (incl. tokens whose text contains a stop string) and stop sequences."""
        ids = set(self.tokenizer.eos_ids) | set(params.stop_token_ids)
        sequences = []
        if params.stop:
            strings = self.token_strings()
            ids |= {i for i, s in enumerate(strings) if any(stop in s for stop in params.stop)}
            sequences = [self.tokenizer.encode(stop, add_bos=False) for stop in params.stop]
        ids_arr = np.full((bucket(len(ids), STOP_ID_BUCKETS, "stop token count"),), -1, np.int32)
        ids_arr[:len(ids)] = sorted(ids)
        k = bucket(max(len(sequences), 1), STOP_SEQUENCE_BUCKETS, "number of stop strings")
        m = bucket(max((len(s) for s in sequences), default=1), STOP_LENGTH_BUCKETS,
                   "stop string length (tokens)")
        seqs = np.full((k, m), -1, np.int32)
        for i, seq in enumerate(sequences):
            seqs[i, m - len(seq):] = seq
        return ids_arr, seqs

    def _cut_at_stop_strings(self, tokens: np.ndarray, mask: np.ndarray, stops: Sequence[str]
                             ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Decode rows; cut text before the first stop string and mask the tokens after it."""
        texts: list[str] = []
        stopped = np.zeros((tokens.shape[0],), bool)
        mask = mask.copy()
        for row in range(tokens.shape[0]):
            ids = tokens[row][mask[row]].tolist()
            text = self.tokenizer.decode(ids)
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
            if cut is not None:
                text = text[:cut]
                n = next(n for n in range(1, len(ids) + 1)
                         if any(s in self.tokenizer.decode(ids[:n]) for s in stops))
                mask[row, n:] = False
                stopped[row] = True
            texts.append(text)
        return texts, mask, stopped
