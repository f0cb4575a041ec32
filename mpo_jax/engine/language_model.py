"""`load_model` and `LanguageModel`: weights + tokenizer + sampler behind one small API.

The policy, critic, judge and meta-reward model are all `LanguageModel`s. Parameters are an
NNX state (a pytree) placed on one device or sharded over a (`data`, `fsdp`, `tensor`) mesh;
every entry point is a jitted function of the parameters, so the same object runs on a
laptop CPU and on a TPU slice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mpo_jax.engine import constraints as constraints_lib
from mpo_jax.engine import presets, shard_loading
from mpo_jax.engine import sharding as sharding_lib
from mpo_jax.engine.sampling import GenerationState, SampleOutput, Sampler, SamplingParams
from mpo_jax.engine.tokenizer import Tokenizer
from mpo_jax.errors import FileFormatError, InvalidValueError
from mpo_jax.models.config import ModelConfig
from mpo_jax.models.hf_slices import HFSliceReader
from mpo_jax.models.params import all_param_shapes, check_param_shapes, init_lora_params, state_from_flat
from mpo_jax.models.transformer import Transformer

Prompt = str | Sequence[dict]
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class Conversation:
    """A batch of chats whose KV cache is kept for the next turn."""

    messages: list[list[dict]]
    context: list[str]  # the exact text in the cache for each row (template + replies)
    state: GenerationState
    replies: list[str]
    prefill_tokens: int = 0  # token slots prefilled for the last turn
    # Per row: the last reply ended by an end token or stop string (False: it ran out of tokens).
    finished: list[bool] = dataclasses.field(default_factory=list)


class LanguageModel:
    """A decoder LM with its tokenizer, ready to compute logits and generate."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, graphdef: nnx.GraphDef,
                 params: nnx.State, *, mesh: Mesh | None = None, **sampler_kwargs: Any):
        self.config = config
        self.tokenizer = tokenizer
        self.graphdef = graphdef
        self.params = params
        self.mesh = mesh
        self.sampler = Sampler(graphdef, params, config, tokenizer, mesh=mesh, **sampler_kwargs)
        self._logits_fn = jax.jit(self._forward_logits)

    @property
    def module(self) -> Transformer:
        """The NNX module (a view sharing this model's parameters)."""
        return nnx.merge(self.graphdef, self.params)

    def _forward_logits(self, params, tokens, valid):
        logits, _ = nnx.merge(self.graphdef, params)(tokens, valid)
        return logits

    def logits(self, token_ids: Any, mask: Any | None = None) -> jax.Array:
        """Float32 logits [B, T, V] for token ids [B, T]; `mask` marks real tokens (any padding)."""
        token_ids = np.asarray(token_ids, np.int32)
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be [batch, length], got shape {token_ids.shape}")
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), "
                             f"got range [{token_ids.min()}, {token_ids.max()}]")
        mask = np.ones(token_ids.shape, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != token_ids.shape:
            raise ValueError(f"mask shape {mask.shape} must equal token_ids shape {token_ids.shape}")
        return self._logits_fn(self.params, self.sampler._put(token_ids), self.sampler._put(mask))

    # -- prompts -------------------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        """A chat (list of messages) gets the chat template; a string is used as it is."""
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode(self.render(prompt), add_bos=False)

    # -- generation ----------------------------------------------------------------------------
    def sample(self, prompts: Sequence[Prompt], params: SamplingParams = SamplingParams(),
               constraint: constraints_lib.TokenConstraint | None = None) -> SampleOutput:
        """Generate with full output: tokens, log-probs, mask and the state to continue from."""
        if isinstance(prompts, (str, dict)):
            raise TypeError("prompts must be a list (of strings or of message lists)")
        return self.sampler.generate([self.encode_prompt(p) for p in prompts], params, constraint)

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] | None = None,
                 seed: int = 0) -> list[str]:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, stop=tuple(stop or ()), seed=seed)
        return self.sample(prompts, params).texts

    def digits_constraint(self, max_digits: int = 2) -> constraints_lib.TokenConstraint:
        """Only an integer may be generated (then an end-of-sequence token)."""
        return constraints_lib.digits(self.sampler.token_strings(), self.tokenizer.eos_ids, max_digits,
                                      self.config.vocab_size)

    def choice_constraint(self, options: Sequence[str]) -> constraints_lib.TokenConstraint:
        """Exactly one of `options` may be generated (then an end-of-sequence token)."""
        seqs = [self.tokenizer.encode(o, add_bos=False) for o in options]
        return constraints_lib.choice(seqs, self.tokenizer.eos_ids, self.config.vocab_size, options)

    # -- multi-turn ----------------------------------------------------------------------------
    def chat(self, conversations: Sequence[Sequence[dict]], params: SamplingParams = SamplingParams(),
             constraint: constraints_lib.TokenConstraint | None = None) -> Conversation:
        """Start a batch of chats; continue them with `chat_continue`."""
        contexts = [self.render(list(c)) for c in conversations]
        out = self.sampler.generate([self.tokenizer.encode(t, add_bos=False) for t in contexts],
                                    params, constraint)
        return self._record(out, [list(c) for c in conversations], contexts)

    def chat_continue(self, conversation: Conversation, new_messages: Sequence[dict | Sequence[dict]],
                      params: SamplingParams = SamplingParams(),
                      constraint: constraints_lib.TokenConstraint | None = None) -> Conversation:
        """Add a message (or messages) to every chat and generate the next reply.

        Only the text the chat template adds after what is already in the KV cache is
        prefilled; the shared context is not recomputed.
        """
        if len(new_messages) != len(conversation.messages):
            raise ValueError(f"got {len(new_messages)} new messages for {len(conversation.messages)} chats")
        histories = [history + ([new] if isinstance(new, dict) else list(new))
                     for history, new in zip(conversation.messages, new_messages, strict=True)]
        fulls = [self.render(history) for history in histories]
        if not all(full.startswith(context) for full, context in zip(fulls, conversation.context, strict=True)):
            # A reply with special tokens in it (dropped from the history's text) does not
            # re-render as cached: prefill these conversations afresh instead.
            return self.chat(histories, params, constraint)
        deltas = [self.tokenizer.encode(full[len(context):], add_bos=False)
                  for full, context in zip(fulls, conversation.context, strict=True)]
        contexts = fulls
        out = self.sampler.continue_(conversation.state, deltas, params, constraint)
        return self._record(out, histories, contexts)

    def _record(self, out: SampleOutput, histories: list[list[dict]], contexts: list[str]) -> Conversation:
        cached = [out.tokens[i][out.cached_mask[i]].tolist() for i in range(len(contexts))]
        contexts = [ctx + self.tokenizer.decode(ids, skip_special_tokens=False) for ctx, ids in zip(contexts, cached)]
        # The history keeps the reply as it sits in the cache (a stop string included), so the
        # next turn's rendering extends the cached text exactly.
        histories = [h + [{"role": "assistant", "content": self.tokenizer.decode(ids)}]
                     for h, ids in zip(histories, cached)]
        return Conversation(messages=histories, context=contexts, state=out.state, replies=out.texts,
                            prefill_tokens=out.prefill_tokens,
                            finished=[bool(f) for f in out.finished])


def _load_weights(path: Path, dtype: np.dtype
                  ) -> tuple[ModelConfig, dict[str, np.ndarray] | HFSliceReader, Tokenizer]:
    """GGUF: the whole file as host arrays. HF directory: an open reader, so that each process
    later reads only the slices its devices hold (`shard_loading`); the caller closes it."""
    if path.is_dir():
        reader = HFSliceReader(path, dtype=dtype)
        try:
            return reader.config, reader, Tokenizer.from_dir(path)
        except BaseException:
            reader.close()
            raise
    if path.suffix == ".gguf":
        from mpo_jax.models.gguf_io import load_gguf

        config, flat = load_gguf(path, dtype=dtype)
        return config, flat, Tokenizer.from_gguf(path)
    raise FileFormatError(f"cannot load {str(path)!r}: expected a .gguf file or a Hugging Face checkpoint "
                          f"directory (config.json + *.safetensors)")


def place_params(config: ModelConfig, flat: dict[str, np.ndarray], mesh: Mesh | None
                 ) -> tuple[nnx.GraphDef, nnx.State]:
    """Host arrays -> NNX state on one device, or sharded over `mesh` shard by shard."""
    check_param_shapes(config, flat)
    if mesh is None:
        placed = {name: jnp.asarray(value) for name, value in flat.items()}
    else:
        shardings = sharding_lib.param_shardings(all_param_shapes(config), mesh)
        placed = {name: sharding_lib.place(value, shardings[name]) for name, value in flat.items()}
    return state_from_flat(config, placed)


def place_checkpoint(config: ModelConfig, reader: HFSliceReader, fresh: dict[str, np.ndarray],
                     mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State]:
    """Checkpoint tensors read shard by shard from `reader`, plus `fresh` host arrays (new LoRA
    adapters, a new value head) placed whole: together, the NNX state of `config`."""
    placed = shard_loading.read_params(reader, mesh, config)
    if mesh is None:
        placed.update({name: jnp.asarray(value) for name, value in fresh.items()})
    else:
        shardings = sharding_lib.param_shardings(all_param_shapes(config), mesh)
        placed.update({name: sharding_lib.place(value, shardings[name]) for name, value in fresh.items()})
    return state_from_flat(config, placed)


def load_model(name_or_path: str | os.PathLike, *, dtype: str = "float32", mesh: Mesh | None = None,
               value_head: bool = False, remat: bool = False, remat_policy: str = "full",
               attention_impl: str = "dense", attention_block: int = 64, lora_rank: int = 0,
               lora_alpha: float = 16.0,
               lora_targets: Sequence[str] | None = None, **sampler_kwargs: Any) -> LanguageModel:
    """Load a preset name, a .gguf file or a HF checkpoint directory as a `LanguageModel`.

    `dtype` ("float32" or "bfloat16") sets both the parameter and the compute dtype. With
    `mesh` (axes from `data`, `fsdp`, `tensor`, e.g. `jax.make_mesh((1, 2, 4), ("data",
    "fsdp", "tensor"))`), parameters are sharded by the partition rules. `value_head` adds a
    freshly initialised scalar head (a critic built from the same backbone). `lora_rank` > 0
    adds fresh low-rank adapters (B = 0, so the model's outputs are unchanged at first).
    `attention_impl` "blocked" computes training (cache-free) attention in causal query blocks of
    `attention_block` rows (`ModelConfig.attention_impl`); decoding is unaffected.
    """
    if dtype not in _DTYPES:
        raise InvalidValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path = presets.resolve(name_or_path)
    config, weights, tokenizer = _load_weights(path, _DTYPES[dtype])
    with weights if isinstance(weights, HFSliceReader) else contextlib.nullcontext():
        config = config.replace(dtype=dtype, param_dtype=dtype, remat=remat, remat_policy=remat_policy,
                                attention_impl=attention_impl, attention_block=attention_block,
                                lora_rank=lora_rank, lora_alpha=lora_alpha,
                                lora_targets=tuple(lora_targets or config.lora_targets))
        fresh = init_lora_params(config, dtype=_DTYPES[dtype])
        if value_head and not config.value_head:
            config = config.replace(value_head=True)
            rng = np.random.default_rng(0)
            fresh["value_head.kernel"] = (rng.standard_normal((config.hidden_size, 1)) /
                                          np.sqrt(config.hidden_size)).astype(_DTYPES[dtype])
            fresh["value_head.bias"] = np.zeros((1,), _DTYPES[dtype])
        mesh = sharding_lib.as_auto_mesh(mesh) if mesh is not None else None
        if isinstance(weights, HFSliceReader):
            graphdef, params = place_checkpoint(config, weights, fresh, mesh)
        else:
            graphdef, params = place_params(config, {**weights, **fresh}, mesh)
    return LanguageModel(config, tokenizer, graphdef, params, mesh=mesh, **sampler_kwargs)


def from_random(config: ModelConfig, tokenizer: Tokenizer, *, seed: int = 0, mesh: Mesh | None = None,
                **sampler_kwargs: Any) -> LanguageModel:
    """A randomly initialised model (tests, tiny configs)."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    from mpo_jax.models.params import flat_from_state

    flat = {k: np.asarray(v) for k, v in flat_from_state(nnx.state(model)).items()}
    mesh = sharding_lib.as_auto_mesh(mesh) if mesh is not None else None
    graphdef, params = place_params(config, flat, mesh)
    return LanguageModel(config, tokenizer, graphdef, params, mesh=mesh, **sampler_kwargs)


__all__ = ["Conversation", "LanguageModel", "check_param_shapes", "from_random", "load_model", "place_params"]
