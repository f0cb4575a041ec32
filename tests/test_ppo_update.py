"""Behaviour of the jitted PPO/GRPO updates on tiny random policies (1 device and a 2x2x2 mesh)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import Tokenizer
from mpo_jax.engine.compilation import count_compilations
from mpo_jax.engine.language_model import LanguageModel, place_params
from mpo_jax.engine.sharding import as_auto_mesh
from mpo_jax.models.params import flatten, init_lora_params
from mpo_jax.rl.advantages import compute_gae
from mpo_jax.rl.batch import RolloutBatch
from mpo_jax.rl.compiled import (
    NonFiniteUpdateError,
    check_finite,
    compile_rollout_stats,
    compile_update,
    place_batch,
    place_state,
)
from mpo_jax.rl.config import GRPOConfig, OptimizerConfig, PPOConfig
from mpo_jax.rl.forward import response_hidden
from mpo_jax.rl.grpo import make_grpo_update
from mpo_jax.rl.masked import masked_whiten
from mpo_jax.rl.ppo import make_ppo_update, make_rollout_stats
from mpo_jax.rl.rewards import response_masks
from mpo_jax.rl.train_state import create_train_state

VOCAB = 264
EOS = 2  # the tiny tokenizer's <|im_end|>; random tokens are drawn from 3 up, so never by chance


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def models(tokenizer, *, lora: bool, separate_critic: bool, mesh=None):
    policy_cfg = tiny_config("llama", vocab_size=VOCAB, lora_rank=4 if lora else 0, lora_alpha=8.0,
                             value_head=not separate_critic)
    flat = random_params(policy_cfg, seed=1)
    flat.update(init_lora_params(policy_cfg, seed=2))
    policy = LanguageModel(policy_cfg, tokenizer, *place_params(policy_cfg, flat, mesh), mesh=mesh)
    critic = None
    if separate_critic:
        critic_cfg = tiny_config("llama", vocab_size=VOCAB, value_head=True)
        critic = LanguageModel(critic_cfg, tokenizer,
                               *place_params(critic_cfg, random_params(critic_cfg, seed=3), mesh), mesh=mesh)
    return policy, critic


def rollout_arrays(seed=0, b=8, p=6, r=5):
    rng = np.random.default_rng(seed)
    query = rng.integers(3, VOCAB, (b, p)).astype(np.int32)
    query_mask = np.ones((b, p), bool)
    query_mask[::3, :2] = False  # left padding
    response = rng.integers(3, VOCAB, (b, r)).astype(np.int32)
    lengths = rng.integers(1, r + 1, b)
    response_mask = np.arange(r)[None] < lengths[:, None]
    # A response that stopped before the length limit ended with EOS; one that reached it did not.
    response[np.arange(b), lengths - 1] = np.where(lengths < r, EOS, response[np.arange(b), lengths - 1])
    response = np.where(response_mask, response, 0).astype(np.int32)
    return query, query_mask, response, response_mask


def contains_eos(arrays) -> np.ndarray:
    """Per row: does the response hold an EOS token among its real tokens (as the sampler reports it)."""
    _, _, response, response_mask = arrays
    return np.any((response == EOS) & response_mask, axis=1)


def make_batch(stats_fn, state, arrays, scores, mesh=None):
    query, query_mask, response, response_mask = arrays
    stats = jax.device_get(stats_fn(state, *(place_batch_rows(a, mesh) for a in arrays)))
    batch = RolloutBatch(query=query, query_mask=query_mask, response=response, response_mask=response_mask,
                         scores=np.asarray(scores, np.float32), contains_eos=contains_eos(arrays),
                         **{k: np.asarray(v) for k, v in stats.items()})
    return place_batch(batch, mesh), stats


def place_batch_rows(array, mesh):
    if mesh is None:
        return jnp.asarray(array)
    from mpo_jax.engine.sharding import place
    from mpo_jax.rl.compiled import batch_spec

    return place(np.asarray(array), batch_spec(mesh))


def ppo_config(**overrides):
    base = dict(num_ppo_epochs=1, kl_coef=0.0, temperature=1.0,
                optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant", max_grad_norm=None))
    base.update(overrides)
    return PPOConfig(**base)


def setup(tokenizer, config, *, lora=True, separate_critic=True, mesh=None):
    policy, critic = models(tokenizer, lora=lora, separate_critic=separate_critic, mesh=mesh)
    state = place_state(create_train_state(policy, critic, config.optimizer), mesh)
    stats_fn = compile_rollout_stats(make_rollout_stats(config.temperature), state, mesh)
    update = compile_update(make_ppo_update(config), state, mesh)
    return state, stats_fn, update


def test_update_follows_the_sign_of_the_advantages_with_the_missing_eos_penalty(tokenizer):
    penalty = 3.0
    config = ppo_config(missing_eos_penalty=penalty)
    state, stats_fn, update = setup(tokenizer, config)
    arrays = rollout_arrays()
    eos = contains_eos(arrays)
    assert eos.any() and not eos.all(), eos  # both branches of the penalty are exercised
    # Rows without EOS get a positive judge score that the penalty turns negative.
    scores = np.where(eos, np.array([2.0, -2.0] * 4), 1.0)
    penalised = np.where(eos, scores, scores - penalty)
    assert np.all(penalised[~eos] < 0)
    batch, before = make_batch(stats_fn, state, arrays, scores)
    # advantages from the (separately tested) pure functions: which tokens should go up or down
    masks = response_masks(jnp.asarray(arrays[3]))
    rewards = np.zeros(arrays[2].shape, np.float32)
    rewards[np.arange(8), np.minimum(masks.seq_len + 1, 4)] = penalised
    values = np.where(masks.padding_p1, 0.0, before["values"])
    adv, _ = compute_gae(jnp.asarray(rewards), jnp.asarray(values), ~masks.padding_p1, 1.0, 0.95)
    adv = np.asarray(jnp.where(masks.padding, 0.0, masked_whiten(adv, ~masks.padding)))
    for i in range(6):
        state, metrics = update(state, batch, jax.random.key(i))
        # kl_coef is 0, so the RLHF reward is the mean penalised score
        np.testing.assert_allclose(float(metrics["objective/scores"]), penalised.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["objective/rlhf_reward"]), penalised.mean(), rtol=1e-6)
        assert float(metrics["val/num_eos_tokens"]) == eos.sum()
    after = jax.device_get(stats_fn(state, *map(jnp.asarray, arrays)))
    delta = after["logprobs"] - before["logprobs"]
    real = arrays[3]
    assert delta[(adv > 0.3) & real].mean() > 0.05
    assert delta[(adv < -0.3) & real].mean() < -0.05
    # The unpenalised score would have raised these responses; the penalty lowers them.
    assert np.sum(np.where(real[~eos], delta[~eos], 0.0)) < 0


def exact_kl_to_reference(state, arrays):
    """Mean over response positions of KL(pi || ref) from the full next-token distributions."""
    policy = state.policy.merge(state.params["policy"])
    hidden = [response_hidden(policy, *map(jnp.asarray, arrays), adapters=a) for a in (True, False)]
    logp, logq = (np.asarray(jax.nn.log_softmax(policy.logits_from_hidden(h, adapters=a)), np.float64)
                  for h, a in zip(hidden, (True, False)))
    kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)
    return kl[arrays[3]].mean()


def test_kl_to_the_reference_grows_from_zero_and_lora_trains_only_adapters(tokenizer):
    config = ppo_config()
    state, stats_fn, update = setup(tokenizer, config)
    frozen_before = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(state.policy.frozen)).items()}
    arrays = rollout_arrays(1)
    batch, stats = make_batch(stats_fn, state, arrays, np.linspace(-1, 1, 8))
    np.testing.assert_array_equal(stats["logprobs"], stats["ref_logprobs"])  # adapters start at B = 0
    assert exact_kl_to_reference(state, arrays) == 0.0
    state, metrics = update(state, batch, jax.random.key(0))
    assert float(metrics["objective/kl"]) == 0.0
    for i in range(3):
        state, _ = update(state, batch, jax.random.key(i + 1))
    assert exact_kl_to_reference(state, arrays) > 1e-4
    # frozen base weights untouched; only adapters (and no base weight) carry optimizer state
    frozen_after = flatten(nnx.to_pure_dict(state.policy.frozen))
    for name, value in frozen_before.items():
        np.testing.assert_array_equal(np.asarray(frozen_after[name]), value, err_msg=name)
    trainable = flatten(nnx.to_pure_dict(state.params["policy"]))
    assert trainable and all("lora" in name for name in trainable)
    assert any(np.abs(np.asarray(v)).sum() > 0 for k, v in trainable.items() if k.endswith("_lora_b"))
    n_params = len(jax.tree.leaves(state.params))
    mu_leaves = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert len(mu_leaves) == 2 * n_params  # Adam's mu and nu, for trainable leaves only


def test_full_finetuning_with_a_shared_value_head_keeps_a_frozen_reference(tokenizer):
    config = ppo_config()
    state, stats_fn, update = setup(tokenizer, config, lora=False, separate_critic=False)
    ref_before = jax.tree.map(np.asarray, state.ref_params)
    arrays = rollout_arrays(2)
    batch, _ = make_batch(stats_fn, state, arrays, np.linspace(-1, 1, 8))
    state, _ = update(state, batch, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.ref_params), ref_before)
    after = jax.device_get(stats_fn(state, *map(jnp.asarray, arrays)))
    assert not np.allclose(after["logprobs"], after["ref_logprobs"])
    assert "value_head" in nnx.to_pure_dict(state.params["policy"])


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sharded_update_equals_single_device_and_does_not_recompile(tokenizer):
    config = ppo_config(num_mini_batches=2, gradient_accumulation_steps=2, num_ppo_epochs=2,
                        optimizer=OptimizerConfig(learning_rate=1e-3, schedule="linear", total_updates=4))
    arrays = rollout_arrays(3)
    scores = np.linspace(-1, 1, 8)
    results = []
    for mesh in (None, as_auto_mesh(jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor")))):
        state, stats_fn, update = setup(tokenizer, config, mesh=mesh)
        batch, _ = make_batch(stats_fn, state, arrays, scores, mesh)
        state, metrics = update(state, batch, jax.random.key(7))
        results.append((_flat(state.params), jax.device_get(metrics)))
        if mesh is not None:
            assert state.params["policy"]["layers"]["q_proj_lora_a"][...].sharding.spec[1] == "fsdp"
            new_batch, _ = make_batch(stats_fn, state, rollout_arrays(4), -scores, mesh)
            with count_compilations() as compiled:
                state, _ = update(state, new_batch, jax.random.key(8))
                jax.block_until_ready(state.params)
            assert [name for name in compiled if "ppo_update" in name] == []
    (params_1, metrics_1), (params_8, metrics_8) = results
    for name in params_1:
        np.testing.assert_allclose(params_8[name], params_1[name], atol=1e-5, err_msg=name)
    for name in metrics_1:
        np.testing.assert_allclose(metrics_8[name], metrics_1[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_a_bfloat16_state_keeps_its_types_across_updates(tokenizer):
    """The learning rate is set every update; it must not change the optimizer state's dtypes
    (bf16 parameters would make optax's hyper-parameters bf16), or each jit recompiles and an
    ahead-of-time compiled update refuses the state it returned."""
    config = ppo_config(optimizer=OptimizerConfig(learning_rate=1e-3, schedule="linear", total_updates=4))
    policy_cfg = tiny_config("llama", vocab_size=VOCAB, dtype="bfloat16", param_dtype="bfloat16")
    critic_cfg = tiny_config("llama", vocab_size=VOCAB, value_head=True, dtype="bfloat16", param_dtype="bfloat16")
    policy, critic = (LanguageModel(cfg, tokenizer, *place_params(cfg, random_params(cfg, seed, jnp.bfloat16), None))
                      for cfg, seed in ((policy_cfg, 1), (critic_cfg, 3)))
    state = create_train_state(policy, critic, config.optimizer)
    assert state.params["policy"]["layers"]["q_proj"][...].dtype == jnp.bfloat16
    stats_fn = compile_rollout_stats(make_rollout_stats(config.temperature), state, None)
    batch, _ = make_batch(stats_fn, state, rollout_arrays(5), np.linspace(-1, 1, 8))
    before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    update = compile_update(make_ppo_update(config), state, None)
    compiled = update.lower(state, batch, jax.random.key(0)).compile()
    state, _ = compiled(state, batch, jax.random.key(0))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == before
    state, metrics = compiled(state, batch, jax.random.key(1))  # the state it returned is accepted
    assert np.isfinite(float(metrics["loss"]))
    lr = state.opt_state[1].hyperparams["learning_rate"]
    assert lr.dtype == jnp.float32 and float(lr) == pytest.approx(1e-3 * (1 - 1 / 4))
    assert float(state.opt_state[1].hyperparams["b2"]) == pytest.approx(0.999)  # bf16 would round it to 1.0


def test_nonfinite_scores_skip_the_update_or_stop_the_run(tokenizer):
    config = ppo_config()
    state, stats_fn, update = setup(tokenizer, config)
    before = jax.tree.map(np.asarray, state.params)
    scores = np.linspace(-1, 1, 8)
    scores[3] = np.nan
    batch, _ = make_batch(stats_fn, state, rollout_arrays(5), scores)
    state, metrics = update(state, batch, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    host = check_finite(metrics, 0, "skip")
    assert host["skipped_steps"] == 1 and host["nonfinite/inputs"] == 1
    with pytest.raises(NonFiniteUpdateError, match=r"update 12: non-finite values in inputs"):
        check_finite(metrics, 12, "raise")


def test_mismatched_batch_shapes_are_named():
    query, query_mask, response, response_mask = rollout_arrays()
    bad = RolloutBatch(query=query, query_mask=query_mask, response=response, response_mask=response_mask,
                       logprobs=np.zeros((8, 4)), ref_logprobs=np.zeros((8, 5)), values=np.zeros((8, 5)),
                       scores=np.zeros(7), contains_eos=np.ones(8, bool))
    with pytest.raises(ValueError, match=r"logprobs has shape \(8, 4\), expected \(8, 5\).*scores"):
        place_batch(bad, None)


def test_grpo_raises_the_best_response_of_each_group(tokenizer):
    config = GRPOConfig(group_size=4, temperature=1.0, beta=0.04,
                        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant", max_grad_norm=None))
    policy, _ = models(tokenizer, lora=True, separate_critic=True)
    state = create_train_state(policy, None, config.optimizer, needs_values=False)
    stats_fn = compile_rollout_stats(make_rollout_stats(config.temperature), state, None)
    update = compile_update(make_grpo_update(config), state, None)
    arrays = rollout_arrays(6)
    scores = np.array([3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0])  # one winner per group of 4
    batch, before = make_batch(stats_fn, state, arrays, scores)
    for i in range(5):
        state, metrics = update(state, batch, jax.random.key(i))
    after = jax.device_get(stats_fn(state, *map(jnp.asarray, arrays)))
    seq_delta = np.sum(np.where(arrays[3], after["logprobs"] - before["logprobs"], 0.0), axis=1)
    assert seq_delta[0] > 0 and seq_delta[7] > 0
    assert seq_delta[[1, 2, 3]].mean() < seq_delta[0] and seq_delta[[4, 5, 6]].mean() < seq_delta[7]
