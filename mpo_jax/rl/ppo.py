"""PPO as in TRL's PPOTrainer, as pure functions: `rollout_stats` and `ppo_update`.

    stats = rollout_stats(state, query, query_mask, response, response_mask)   # old/ref log-probs, values
    batch = RolloutBatch(..., **stats, scores=..., contains_eos=...)
    state, metrics = ppo_update(state, batch, rng)

Both are built by `make_*` from a static config and jitted by `compile_*` with explicit
shardings (`mpo_jax.rl.compiled`). Reward shaping, GAE and advantage whitening happen inside the
update on the whole local batch, as TRL does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpo_jax.rl.advantages import compute_gae
from mpo_jax.rl.batch import RolloutBatch
from mpo_jax.rl.config import PPOConfig
from mpo_jax.rl.forward import response_hidden, response_logprobs, response_values
from mpo_jax.rl.losses import clipped_policy_loss, clipped_value_loss, entropy_from_logits, token_logprobs
from mpo_jax.rl.masked import masked_mean, masked_whiten
from mpo_jax.rl.optimize import all_finite, optimize
from mpo_jax.rl.rewards import INVALID_LOGPROB, apply_missing_eos_penalty, response_masks, shape_rewards
from mpo_jax.rl.train_state import TrainState, learning_rate, with_learning_rate


def make_rollout_stats(temperature: float):
    """Old policy log-probs, reference log-probs and critic values of sampled responses."""

    def rollout_stats(state: TrainState, query, query_mask, response, response_mask) -> dict[str, jax.Array]:
        rows = RolloutBatch(query=query, query_mask=query_mask, response=response, response_mask=response_mask,
                            logprobs=None, ref_logprobs=None, values=None, scores=None, contains_eos=None)
        policy = state.policy.merge(state.params["policy"])
        hidden = response_hidden(policy, query, query_mask, response, response_mask)
        logprobs = token_logprobs(policy.logits_from_hidden(hidden), response, temperature)
        if state.uses_lora:
            ref_logprobs = response_logprobs(policy, rows, temperature, adapters=False)
        else:
            ref_logprobs = response_logprobs(state.policy.merge(state.ref_params), rows, temperature)
        if state.critic is not None:
            values = response_values(state.critic.merge(state.params["critic"]), rows)
        elif policy.config.value_head:
            values = policy.values_from_hidden(hidden)
        else:  # GRPO: no critic
            values = jnp.zeros(response.shape, jnp.float32)
        return dict(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values)

    return rollout_stats


def make_ppo_update(config: PPOConfig):
    """The update function for a static config: (state, batch, rng) -> (state, metrics)."""

    def policy_outputs(state: TrainState, params, micro: dict[str, jax.Array]):
        policy = state.policy.merge(params["policy"])
        hidden = response_hidden(policy, micro["query"], micro["query_mask"], micro["response"],
                                 micro["response_mask"])
        logits = policy.logits_from_hidden(hidden)
        logprobs = token_logprobs(logits, micro["response"], config.temperature)
        entropy = entropy_from_logits(logits, config.temperature)
        if state.critic is None:
            values = policy.values_from_hidden(hidden)
        else:
            critic = state.critic.merge(params["critic"])
            values = critic.values_from_hidden(response_hidden(
                critic, micro["query"], micro["query_mask"], micro["response"], micro["response_mask"]))
        return logprobs, values, entropy

    def loss_fn(state: TrainState, params, micro: dict[str, jax.Array]):
        new_logprobs, vpred, entropy = policy_outputs(state, params, micro)
        new_logprobs = jnp.where(micro["padding"], INVALID_LOGPROB, new_logprobs)
        vpred = jnp.where(micro["padding_p1"], 0.0, vpred)
        pg_loss, pg = clipped_policy_loss(new_logprobs, micro["logprobs"], micro["advantages"], ~micro["padding"],
                                          config.cliprange)
        vf_loss, vf = clipped_value_loss(vpred, micro["values"], micro["returns"], ~micro["padding_p1"],
                                         config.cliprange_value)
        entropy_mean = masked_mean(entropy, ~micro["padding"])
        loss = pg_loss + config.vf_coef * vf_loss
        if config.entropy_coef:  # otherwise entropy is a metric only and stays out of the backward pass
            loss = loss - config.entropy_coef * entropy_mean
        ratio = jnp.exp(new_logprobs - micro["logprobs"])
        return loss, {"policy/approxkl_avg": pg["approxkl"], "policy/clipfrac_avg": pg["clipfrac"],
                      "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss, "val/clipfrac_avg": vf["clipfrac"],
                      "policy/entropy_avg": entropy_mean, "val/ratio": pg["ratio"],
                      "val/ratio_var": jnp.var(ratio)}

    def ppo_update(state: TrainState, batch: RolloutBatch, rng: jax.Array) -> tuple[TrainState, dict]:
        masks = response_masks(batch.response_mask)
        scores = apply_missing_eos_penalty(batch.scores, batch.contains_eos, config.missing_eos_penalty)
        values = jnp.where(masks.padding_p1, 0.0, batch.values)
        shaped = shape_rewards(scores, batch.logprobs, batch.ref_logprobs, batch.response_mask,
                               kl_coef=config.kl_coef, kl_estimator=config.kl_estimator,
                               score_position=config.score_position, whiten_rewards=config.whiten_rewards)
        advantages, returns = compute_gae(shaped["rewards"], values, ~masks.padding_p1, config.gamma, config.lam)
        advantages = jnp.where(masks.padding, 0.0, masked_whiten(advantages, ~masks.padding))
        data = dict(query=batch.query, query_mask=batch.query_mask, response=batch.response,
                    response_mask=batch.response_mask, logprobs=shaped["logprobs"], values=values,
                    advantages=advantages, returns=returns, padding=masks.padding, padding_p1=masks.padding_p1)
        inputs_finite = all_finite((scores, batch.logprobs, batch.ref_logprobs, batch.values))

        lr = learning_rate(config.optimizer, state.step)
        params, opt_state, metrics = optimize(
            state.params, with_learning_rate(state.opt_state, lr), state.tx, data,
            lambda p, micro: loss_fn(state, p, micro), rng, epochs=config.num_ppo_epochs,
            mini_batches=config.num_mini_batches, accumulation=config.gradient_accumulation_steps,
            inputs_finite=inputs_finite)

        kl_sum = jnp.sum(jnp.where(masks.padding, 0.0, shaped["kl"]), axis=1)
        non_score = jnp.sum(jnp.where(masks.padding, 0.0, shaped["non_score_reward"]), axis=1)
        sampled_entropy = jnp.sum(jnp.where(masks.padding, 0.0, -batch.logprobs), axis=1)
        metrics.update({
            "objective/kl": jnp.mean(kl_sum),
            "objective/entropy": jnp.mean(sampled_entropy),
            "objective/non_score_reward": jnp.mean(non_score),
            "objective/rlhf_reward": jnp.mean(non_score) + jnp.mean(scores),
            "objective/scores": jnp.mean(scores),
            "val/num_eos_tokens": jnp.sum(batch.contains_eos.astype(jnp.float32)),
            "lr": lr,
            "nonfinite/inputs": (~inputs_finite).astype(jnp.float32),
        })
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return state, metrics

    return ppo_update
