"""Per-token KL estimators between the sampling policy and the reference (Schulman's k1/k2/k3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpo_jax.errors import InvalidValueError

ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
    """Estimate of KL(pi || ref) per sampled token, with log r = log ref - log pi.

    k1 = -log r (unbiased, high variance), k2 = (log r)^2 / 2, k3 = (r - 1) - log r
    (unbiased and non-negative).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    if estimator == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    raise InvalidValueError(f"unknown KL estimator {estimator!r}; choose one of {ESTIMATORS}")
