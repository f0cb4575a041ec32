"""Per-token PPO rewards from a scalar judge score and the KL penalty (TRL's shaping).

Response convention: tokens [B, R] with a boolean `response_mask` that is true on the real
tokens of the truncated response (the end token included), contiguous from position 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mpo_jax.errors import InvalidValueError
from mpo_jax.rl.kl import kl_estimate
from mpo_jax.rl.masked import masked_whiten

# TRL fills log-probs at padded positions with this value so that differences there are 0.
INVALID_LOGPROB = 1.0
SCORE_POSITIONS = ("after_last_token", "last_token")


@struct.dataclass
class ResponseMasks:
    seq_len: jax.Array  # [B] index of the last real token (-1 for an empty response)
    padding: jax.Array  # [B, R] t > seq_len: outside the response (policy loss mask is ~padding)
    padding_p1: jax.Array  # [B, R] t > seq_len + 1: outside the value targets (value mask is ~padding_p1)


def response_masks(response_mask: jax.Array) -> ResponseMasks:
    seq_len = jnp.sum(response_mask.astype(jnp.int32), axis=1) - 1
    t = jnp.arange(response_mask.shape[1])[None]
    return ResponseMasks(seq_len=seq_len, padding=t > seq_len[:, None], padding_p1=t > seq_len[:, None] + 1)


def score_index(seq_len: jax.Array, length: int, position: str = "after_last_token") -> jax.Array:
    """Where the scalar score is added.

    "after_last_token" is TRL's convention (and so the published MPO runs'): one position after
    the last real token when that fits, else the last token. The score then reaches the last
    token's advantage through the GAE recursion via the value of the next position, which
    still has a value target. "last_token" puts it on the last real token itself.
    """
    if position == "after_last_token":
        return jnp.where(seq_len + 1 < length, seq_len + 1, seq_len)
    if position == "last_token":
        return jnp.maximum(seq_len, 0)
    raise InvalidValueError(f"unknown score position {position!r}; choose one of {SCORE_POSITIONS}")


def apply_missing_eos_penalty(scores: jax.Array, contains_eos: jax.Array, penalty: float | None) -> jax.Array:
    """Subtract `penalty` from the score of responses that never produced an end token."""
    if penalty is None:
        return scores
    return jnp.where(contains_eos, scores, scores - penalty)


def shape_rewards(scores: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, response_mask: jax.Array,
                  *, kl_coef: float, kl_estimator: str = "k1", score_position: str = "after_last_token",
                  whiten_rewards: bool = False) -> dict[str, jax.Array]:
    """Per-token rewards: -kl_coef * KL everywhere, plus the score at `score_index`.

    Returns rewards, the KL per token, the non-score reward, and the masks used.
    """
    masks = response_masks(response_mask)
    logprobs = jnp.where(masks.padding, INVALID_LOGPROB, logprobs)
    ref_logprobs = jnp.where(masks.padding, INVALID_LOGPROB, ref_logprobs)
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)
    non_score_reward = -kl_coef * kl
    index = score_index(masks.seq_len, response_mask.shape[1], score_position)
    at_score = jnp.arange(response_mask.shape[1])[None] == index[:, None]
    rewards = non_score_reward + jnp.where(at_score, scores[:, None], 0.0)
    if whiten_rewards:
        rewards = masked_whiten(rewards, ~masks.padding_p1, shift_mean=False)
        rewards = jnp.where(masks.padding_p1, 0.0, rewards)
    return dict(rewards=rewards, kl=kl, non_score_reward=non_score_reward, logprobs=logprobs,
                ref_logprobs=ref_logprobs, masks=masks)
