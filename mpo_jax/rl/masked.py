"""Masked statistics over padded [batch, time] arrays (TRL's `masked_mean/var/whiten`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean over positions where mask is true (0 when there are none, never NaN)."""
    count = jnp.sum(mask, axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance over the masked positions; Bessel-corrected like TRL when `unbiased`."""
    mean = masked_mean(x, mask)
    variance = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        count = jnp.sum(mask)
        variance = variance * count / jnp.maximum(count - 1, 1)
    return variance


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) over the masked positions; `shift_mean=False` keeps the mean."""
    mean, variance = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean
