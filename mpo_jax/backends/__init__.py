"""LLM backends other than the in-process JAX `LanguageModel`.

`RemoteChatModel` talks to an OpenAI-compatible server (vLLM, SGLang, a hosted API) and can
stand in for the judge or the meta-reward model.
"""

from mpo_jax.backends.remote import CONSTRAINT_STYLES, RemoteBackendError, RemoteChatModel, parse_choice, parse_integer

__all__ = ["CONSTRAINT_STYLES", "RemoteBackendError", "RemoteChatModel", "parse_choice", "parse_integer"]
