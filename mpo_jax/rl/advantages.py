"""Advantage estimation: GAE with a reverse `lax.scan` (PPO) and group normalisation (GRPO)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
                lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and returns for [B, T] per-token rewards and values.

    Positions outside `mask` carry neither reward nor value, and the value after the last
    position is 0: delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1},
    returns = A + V (TRL's recursion, run backwards over every position).
    """
    rewards = jnp.where(mask, rewards, 0.0)
    values = jnp.where(mask, values, 0.0)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def backwards(carry, delta):
        carry = delta + gamma * lam * carry
        return carry, carry

    _, advantages = jax.lax.scan(backwards, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = advantages.T
    return advantages, advantages + values


def group_advantages(scores: jax.Array, group_size: int, eps: float = 1e-4,
                     scale: bool = True) -> jax.Array:
    """GRPO: (r - mean of its group) / (std of its group + eps), groups of consecutive samples.

    The batch holds `group_size` samples per prompt, consecutively. std is the unbiased
    (Bessel-corrected) standard deviation, as `torch.std` computes it in TRL.
    """
    if scores.shape[0] % group_size:
        raise ValueError(f"batch of {scores.shape[0]} scores is not a whole number of groups of {group_size}")
    grouped = scores.reshape(-1, group_size)
    centered = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale:
        std = jnp.std(grouped, axis=1, keepdims=True, ddof=1 if group_size > 1 else 0)
        centered = centered / (std + eps)
    return centered.reshape(scores.shape)
