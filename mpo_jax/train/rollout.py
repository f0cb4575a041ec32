"""Sampling the policy's responses and laying them out as fixed-shape PPO arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from mpo_jax.engine.language_model import LanguageModel
from mpo_jax.engine.sampling import SamplingParams, left_pad


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """B rollouts: queries left-padded to a fixed P, responses cut after the end token, padded to R."""

    records: list[dict[str, Any]]
    query: np.ndarray  # [B, P] int32
    query_mask: np.ndarray  # [B, P] bool
    response: np.ndarray  # [B, R] int32
    response_mask: np.ndarray  # [B, R] bool, the end token included
    contains_eos: np.ndarray  # [B] bool
    texts: list[str]  # decoded responses (special tokens dropped)

    @property
    def response_lengths(self) -> np.ndarray:
        return self.response_mask.sum(axis=1)


def sample_rollouts(policy: LanguageModel, records: Sequence[dict], prompt_ids: Sequence[Sequence[int]], *,
                    query_length: int, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                    top_k: int = 0, seed: int = 0) -> Rollouts:
    """One response per prompt from the policy's current parameters."""
    out = policy.sampler.generate(list(prompt_ids), SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed))
    pad = policy.tokenizer.pad_id
    response = np.full((len(prompt_ids), max_new_tokens), pad, np.int32)
    mask = np.zeros((len(prompt_ids), max_new_tokens), bool)
    width = min(max_new_tokens, out.tokens.shape[1])
    mask[:, :width] = out.mask[:, :width]
    response[:, :width] = np.where(mask[:, :width], out.tokens[:, :width], pad)
    query, query_mask = left_pad(prompt_ids, query_length, pad, what="prompt")
    return Rollouts(records=list(records), query=query, query_mask=query_mask, response=response,
                    response_mask=mask, contains_eos=np.asarray(out.finished, bool), texts=list(out.texts))


__all__ = ["Rollouts", "left_pad", "sample_rollouts"]  # left_pad: the engine's, used here for queries
