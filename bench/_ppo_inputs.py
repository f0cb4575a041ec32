"""The PPO benchmarks' shared inputs: a realistic random rollout batch and the model-FLOP count of
one update (see `bench_ppo.py`'s docstring for the method), so that the CPU comparison and the
accelerator figures count the same work the same way."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def make_arrays(rng: np.random.Generator, b: int, p: int, r: int, vocab: int, pad_id: int, eos_id: int,
                special: Sequence[int]) -> dict[str, np.ndarray]:
    """Random token ids with left-padded prompts and variable-length, EOS-terminated responses."""
    def ids(shape):
        x = rng.integers(0, vocab, shape)
        bad = np.isin(x, list(special))
        while bad.any():  # no special tokens inside the text
            x[bad] = rng.integers(0, vocab, int(bad.sum()))
            bad = np.isin(x, list(special))
        return x.astype(np.int32)

    query = ids((b, p))
    q_len = np.full(b, p)
    padded_rows = [i for i in range(b) if i % 8 in (1, 4, 6)]  # 3 of every 8 prompts left-padded
    q_len[padded_rows] = rng.integers(p // 2, p, len(padded_rows))
    query_mask = np.arange(p)[None] >= (p - q_len)[:, None]
    query = np.where(query_mask, query, pad_id).astype(np.int32)

    r_len = rng.integers(max(r // 4, 1), r, b)  # EOS-terminated, shorter than R
    r_len[np.arange(b) % 8 == 3] = r  # one of every 8 truncated without EOS
    response = ids((b, r))
    response[np.arange(b), np.minimum(r_len, r) - 1] = np.where(r_len < r, eos_id,
                                                                response[np.arange(b), r_len - 1])
    response_mask = np.arange(r)[None] < r_len[:, None]
    response = np.where(response_mask, response, pad_id).astype(np.int32)
    return dict(query=query, query_mask=query_mask, response=response, response_mask=response_mask,
                contains_eos=r_len < r, scores=rng.standard_normal(b).astype(np.float32))


def flops(dims: dict, b: int, p: int, r: int, epochs: int) -> dict[str, float]:
    """Model FLOPs of one update (see the docstring) and the remat recompute."""
    layers, d, f = dims["layers"], dims["hidden"], dims["intermediate"]
    d_attn, d_kv = dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]
    n_block = layers * (d * d_attn * 2 + d * d_kv * 2 + 3 * d * f)
    t = p + r
    trunk_fwd = b * t * (2 * n_block + 4 * layers * t * d_attn)
    lm_head_fwd = b * r * 2 * d * dims["vocab"]
    value_fwd = b * r * 2 * d
    model = epochs * 3 * (2 * trunk_fwd + lm_head_fwd + value_fwd)
    return dict(model=model, recompute=epochs * 2 * trunk_fwd, n_block=n_block, trunk_fwd=trunk_fwd,
                lm_head_fwd=lm_head_fwd, attn_fwd=b * t * 4 * layers * t * d_attn)


def add_rollout_noise(arrays: dict[str, np.ndarray], logprobs: np.ndarray, values: np.ndarray,
                      rng: np.random.Generator) -> None:
    """Old and reference log-probs and values near the initial networks' (into `arrays`).

    Exactly on-policy log-probs make the first step's whitened policy loss ~0; Gaussian noise (0.1
    on log-probs and values, 0.2 on the reference) exercises KL, ratio and value clipping.
    """
    shape = logprobs.shape
    arrays["logprobs"] = (logprobs + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    arrays["ref_logprobs"] = (logprobs + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    arrays["values"] = (values + 0.1 * rng.standard_normal(shape)).astype(np.float32)
