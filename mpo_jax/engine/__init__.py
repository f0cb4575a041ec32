"""The LM engine: load a model, tokenize, sample, chat; no training and no rubrics.

- `language_model`: `load_model`, `from_random`, `LanguageModel` (logits, generate, sample, chat)
- `tokenizer`: one `Tokenizer` over HF `tokenizers`, GGUF vocabularies and SentencePiece
- `sampling`: the jitted `Sampler` and `SamplingParams`; `constraints`: constrained decoding
- `chat_session`: batched multi-turn programs on a local model or a remote endpoint
- `sharding`: `(data, fsdp, tensor)` meshes and parameter placement
- `shard_loading`: a safetensors checkpoint read slice by slice, each process only what its devices hold
- `host_threads`: XLA:CPU thread pools sized for several CPU devices (set on import, below)
- `presets`: named models resolved to shipped files; `tiny`: the tiny random model for tests
- `remote`: `RemoteChatModel`, an OpenAI-compatible endpoint standing in for a local model
- `compilation`: `count_compilations()`

It is built on `mpo_jax.models` (the Flax architectures and weight converters) and imports
nothing above it; see docs/architecture.md for the layers.
"""

# Before anything creates jax's CPU client: several CPU devices need a larger thread pool
# (host_threads.py says why). Importing any part of mpo_jax runs this first.
from mpo_jax.engine import host_threads as _host_threads

_host_threads.configure_cpu_pools()
_host_threads.warn_if_configured_too_late()
