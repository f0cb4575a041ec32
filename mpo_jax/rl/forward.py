"""Per-response-token log-probs and values from the policy, reference and critic networks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpo_jax.rl.losses import token_logprobs


def response_hidden(model, query, query_mask, response, response_mask, *, adapters: bool = True):
    """Hidden states at the positions that predict each response token: [B, R, D].

    The sequence is the left-padded query followed by the response; position P-1+t predicts
    response token t. Padding (query left pad, response tail) is masked out of attention.
    """
    tokens = jnp.concatenate([query, response], axis=1)
    valid = jnp.concatenate([query_mask, response_mask], axis=1)
    hidden, _ = model.hidden_states(tokens, valid, adapters=adapters)
    p, r = query.shape[1], response.shape[1]
    return hidden[:, p - 1:p + r - 1]


def response_logprobs(model, batch_like, temperature: float, *, adapters: bool = True):
    hidden = response_hidden(model, batch_like.query, batch_like.query_mask, batch_like.response,
                             batch_like.response_mask, adapters=adapters)
    logits = model.logits_from_hidden(hidden, adapters=adapters)
    return token_logprobs(logits, batch_like.response, temperature)


def response_values(model, batch_like) -> jax.Array:
    hidden = response_hidden(model, batch_like.query, batch_like.query_mask, batch_like.response,
                             batch_like.response_mask)
    return model.values_from_hidden(hidden)
