"""PPO and GRPO losses as pure functions of per-token arrays, with TRL's metric definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpo_jax.errors import InvalidValueError
from mpo_jax.rl.kl import kl_estimate
from mpo_jax.rl.masked import masked_mean


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature) at the given tokens; logits [B, T, V], tokens [B, T]."""
    logits = logits.astype(jnp.float32) / (temperature + 1e-7)
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature) per position."""
    logits = logits.astype(jnp.float32) / (temperature + 1e-7)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def clipped_policy_loss(new_logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                        mask: jax.Array, cliprange: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))) and its diagnostics."""
    log_ratio = new_logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = dict(clipfrac=masked_mean((clipped > unclipped).astype(jnp.float32), mask),
                   approxkl=0.5 * jnp.mean(jnp.square(log_ratio)),  # TRL: unmasked mean
                   ratio=jnp.mean(ratio))
    return loss, metrics


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
                       cliprange_value: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """0.5 * masked_mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2))."""
    clipped_values = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = jnp.square(values - returns)
    clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, dict(clipfrac=masked_mean((clipped > unclipped).astype(jnp.float32), mask))


def grpo_loss(new_logprobs: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array,
              advantages: jax.Array, mask: jax.Array, *, cliprange: float, cliprange_high: float | None = None,
              beta: float = 0.0, kl_estimator: str = "k3",
              loss_type: str = "grpo") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level clipped surrogate with sequence advantages [B] and a KL penalty in the loss.

    loss_type: "grpo" averages each sequence's tokens then the batch; "bnpo" averages all
    tokens; "dr_grpo" divides the token sum by batch * max length (TRL's three options).
    """
    ratio = jnp.exp(new_logprobs - old_logprobs)
    high = cliprange if cliprange_high is None else cliprange_high
    adv = advantages[:, None]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - cliprange, 1.0 + high) * adv)
    kl = kl_estimate(new_logprobs, ref_logprobs, kl_estimator)
    if beta:
        per_token = per_token + beta * kl
    maskf = mask.astype(jnp.float32)
    if loss_type == "grpo":
        loss = jnp.mean(jnp.sum(per_token * maskf, axis=1) / jnp.maximum(jnp.sum(maskf, axis=1), 1.0))
    elif loss_type == "bnpo":
        loss = masked_mean(per_token, mask)
    elif loss_type == "dr_grpo":
        loss = jnp.sum(per_token * maskf) / (mask.shape[0] * mask.shape[1])
    else:
        raise InvalidValueError(f"unknown GRPO loss_type {loss_type!r}; choose grpo, bnpo or dr_grpo")
    clipped = (ratio < 1.0 - cliprange) & (adv < 0) | (ratio > 1.0 + high) & (adv > 0)
    return loss, dict(clipfrac=masked_mean(clipped.astype(jnp.float32), mask), kl=masked_mean(kl, mask),
                      ratio=masked_mean(ratio, mask))
