"""GRPO behind the same interfaces as PPO: group-normalised advantages, no critic, KL in the loss.

The batch holds `group_size` consecutive responses per prompt. `rollout_stats` (from
`mpo_jax.rl.ppo`) gives the sampling policy's and the reference's log-probs; values are unused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpo_jax.rl.advantages import group_advantages
from mpo_jax.rl.batch import RolloutBatch
from mpo_jax.rl.config import GRPOConfig
from mpo_jax.rl.forward import response_logprobs
from mpo_jax.rl.losses import grpo_loss
from mpo_jax.rl.optimize import all_finite, optimize
from mpo_jax.rl.train_state import TrainState, learning_rate, with_learning_rate


def make_grpo_update(config: GRPOConfig):
    def loss_fn(state: TrainState, params, micro: dict[str, jax.Array]):
        policy = state.policy.merge(params["policy"])
        rows = RolloutBatch(query=micro["query"], query_mask=micro["query_mask"], response=micro["response"],
                            response_mask=micro["response_mask"], logprobs=None, ref_logprobs=None, values=None,
                            scores=None, contains_eos=None)
        new_logprobs = response_logprobs(policy, rows, config.temperature)
        loss, m = grpo_loss(new_logprobs, micro["logprobs"], micro["ref_logprobs"], micro["advantages"],
                            micro["response_mask"], cliprange=config.cliprange, cliprange_high=config.cliprange_high,
                            beta=config.beta, kl_estimator=config.kl_estimator, loss_type=config.loss_type)
        return loss, {"policy/clipfrac_avg": m["clipfrac"], "objective/kl": m["kl"], "val/ratio": m["ratio"],
                      "loss/policy_avg": loss}

    def grpo_update(state: TrainState, batch: RolloutBatch, rng: jax.Array) -> tuple[TrainState, dict]:
        advantages = group_advantages(batch.scores, config.group_size, scale=config.scale_rewards)
        data = dict(query=batch.query, query_mask=batch.query_mask, response=batch.response,
                    response_mask=batch.response_mask, logprobs=batch.logprobs, ref_logprobs=batch.ref_logprobs,
                    advantages=advantages)
        inputs_finite = all_finite((batch.scores, batch.logprobs, batch.ref_logprobs))
        lr = learning_rate(config.optimizer, state.step)
        params, opt_state, metrics = optimize(
            state.params, with_learning_rate(state.opt_state, lr), state.tx, data,
            lambda p, micro: loss_fn(state, p, micro), rng, epochs=config.num_iterations,
            mini_batches=config.num_mini_batches, accumulation=config.gradient_accumulation_steps,
            inputs_finite=inputs_finite)
        grouped = batch.scores.reshape(-1, config.group_size)
        metrics.update({"objective/scores": jnp.mean(batch.scores),
                        "objective/scores_group_std": jnp.mean(jnp.std(grouped, axis=1)),
                        "val/num_eos_tokens": jnp.sum(batch.contains_eos.astype(jnp.float32)), "lr": lr,
                        "nonfinite/inputs": (~inputs_finite).astype(jnp.float32)})
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return grpo_update
