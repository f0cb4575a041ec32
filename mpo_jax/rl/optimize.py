"""The optimisation loop shared by PPO and GRPO: epochs x shuffled mini-batches x micro-batches.

Everything runs inside nested `lax.scan`s, so one update is one compiled function with no host
synchronisation. A step whose loss or gradients are not finite leaves the parameters and the
optimizer state unchanged and is counted in the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def optimize(params: Any, opt_state: optax.OptState, tx: optax.GradientTransformation, data: dict[str, jax.Array],
             loss_fn: LossFn, rng: jax.Array, *, epochs: int, mini_batches: int, accumulation: int,
             inputs_finite: jax.Array) -> tuple[Any, optax.OptState, dict[str, jax.Array]]:
    """Run `epochs` passes; each shuffles the batch and takes `mini_batches` optimizer steps,
    each the mean gradient of `accumulation` micro-batches. Returns metrics averaged over all
    micro-batches plus the count of skipped (non-finite) steps."""
    batch = jax.tree.leaves(data)[0].shape[0]
    micro = batch // (mini_batches * accumulation)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(carry, indices):
        params, opt_state = carry

        def micro_step(grad_sum, idx):
            micro_batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
            (loss, metrics), grads = grad_fn(params, micro_batch)
            metrics = dict(metrics, loss=loss)
            return jax.tree.map(jnp.add, grad_sum, grads), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, metrics = jax.lax.scan(micro_step, zeros, indices)
        grads = jax.tree.map(lambda g: g / accumulation, grad_sum)
        finite = inputs_finite & all_finite(grads) & jnp.all(jnp.isfinite(metrics["loss"]))
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params = _select(finite, new_params, params)
        opt_state = _select(finite, new_opt_state, opt_state)
        metrics = dict(metrics, grad_norm=jnp.broadcast_to(optax.tree.norm(grads), (accumulation,)),
                       skipped=jnp.broadcast_to(~finite, (accumulation,)).astype(jnp.float32))
        return (params, opt_state), metrics

    def epoch(carry, key):
        order = jax.random.permutation(key, batch)
        indices = order.reshape(mini_batches, accumulation, micro)
        return jax.lax.scan(minibatch_step, carry, indices)

    (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state), jax.random.split(rng, epochs))
    skipped = jnp.sum(metrics.pop("skipped")[..., 0])
    averaged = {name: jnp.mean(value) for name, value in metrics.items()}
    averaged["skipped_steps"] = skipped
    return params, opt_state, averaged
