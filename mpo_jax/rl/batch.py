"""The rollout batch an update consumes: fixed-shape arrays, validated on the host."""

from __future__ import annotations

import jax
import numpy as np
from flax import struct


@struct.dataclass
class RolloutBatch:
    """B rollouts: a left-padded query [B, P] and a response [B, R] truncated after its end token.

    `response_mask` is true on the response's real tokens (end token included), contiguous from
    position 0. `logprobs`, `ref_logprobs` and `values` are per response token, computed before
    the update (`rollout_stats`); `scores` are the judge's scalars.
    """

    query: jax.Array  # [B, P] int32
    query_mask: jax.Array  # [B, P] bool
    response: jax.Array  # [B, R] int32
    response_mask: jax.Array  # [B, R] bool
    logprobs: jax.Array  # [B, R] float32, the policy that sampled (recomputed on the trainer graph)
    ref_logprobs: jax.Array  # [B, R] float32
    values: jax.Array  # [B, R] float32 (zeros for GRPO)
    scores: jax.Array  # [B] float32
    contains_eos: jax.Array  # [B] bool

    @property
    def batch_size(self) -> int:
        return self.query.shape[0]


def validate_batch(batch: RolloutBatch) -> None:
    """Clear errors for mismatched shapes or dtypes, before anything is compiled."""
    b, p = np.shape(batch.query)
    r = np.shape(batch.response)[1] if np.ndim(batch.response) == 2 else None
    expected = {"query": (b, p), "query_mask": (b, p), "response": (b, r), "response_mask": (b, r),
                "logprobs": (b, r), "ref_logprobs": (b, r), "values": (b, r), "scores": (b,),
                "contains_eos": (b,)}
    problems = [f"{name} has shape {tuple(np.shape(getattr(batch, name)))}, expected {shape}"
                for name, shape in expected.items() if tuple(np.shape(getattr(batch, name))) != shape]
    if problems:
        raise ValueError("rollout batch shapes disagree (B = batch, P = query length, R = response length): "
                         + "; ".join(problems))
    for name in ("query", "response"):
        if not np.issubdtype(np.asarray(getattr(batch, name)).dtype, np.integer):
            raise ValueError(f"rollout batch field {name} must hold integer token ids")
