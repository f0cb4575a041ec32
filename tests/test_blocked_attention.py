"""Blocked causal attention (`attention_impl="blocked"`) against the dense `attention`: values, gradients,
fully masked queries, a whole tiny Transformer with remat, the config option and its route to the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import random_params, tiny_config

from mpo_jax.errors import InvalidValueError
from mpo_jax.models.blocked_attention import blocked_causal_attention, query_blocks
from mpo_jax.models.kv_cache import KVCache
from mpo_jax.models.params import flat_from_state, state_from_flat
from mpo_jax.models.transformer import attention

T = 13


def padded_valid(t: int = T) -> np.ndarray:
    """Rows: full; left-padded prompt; right-padded response; both; a single token; no token at all."""
    valid = np.ones((6, t), bool)
    valid[1, :5] = False
    valid[2, t - 4:] = False
    valid[3, :3] = False
    valid[3, t - 2:] = False
    valid[4, :] = False
    valid[4, t // 2] = True
    valid[5, :] = False
    return valid


def qkv(valid, heads=6, kv_heads=2, dim=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    b, t = valid.shape
    q = rng.standard_normal((b, t, heads, dim))
    k = rng.standard_normal((b, t, kv_heads, dim))
    v = rng.standard_normal((b, t, kv_heads, dim))
    weight = rng.standard_normal((b, t, heads, dim))
    return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(weight, jnp.float32))


def dense(q, k, v, valid):
    t = q.shape[1]
    return attention(q, k, v, jnp.tril(jnp.ones((t, t), bool))[None] & jnp.asarray(valid)[:, None, :])


def value_and_grads(fn, q, k, v, *weights):
    """fn(q, k, v) and, for each weight, the gradients of sum(fn * weight) w.r.t. q, k, v: one jitted call."""
    def loss(q, k, v, weight):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * weight), out

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    results = jax.jit(lambda q, k, v, weights: [grad(q, k, v, w) for w in weights])(q, k, v, weights)
    out = results[0][1]
    grads = [g for g, _ in results]
    return (out, *grads)


def assert_close(actual, expected, tol, what):
    actual, expected = (np.asarray(x, np.float32) for x in (actual, expected))
    assert np.all(np.isfinite(actual)), what
    np.testing.assert_allclose(actual, expected, atol=tol * max(1.0, float(np.max(np.abs(expected)))), rtol=tol,
                               err_msg=what)


def test_query_blocks_cover_ragged_lengths():
    assert query_blocks(13, 5) == ((0, 5), (5, 10), (10, 13))
    assert query_blocks(8, 8) == ((0, 8),)
    assert query_blocks(3, 64) == ((0, 3),)
    with pytest.raises(ValueError, match="positive"):
        query_blocks(8, 0)


@pytest.mark.parametrize("block", [3, 5, 16])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_values_and_gradients_equal_dense(block, heads, kv_heads):
    """Causal + left + right padding, T=13 not a multiple of the block, GQA groups of 3 and 1."""
    valid = padded_valid()
    q, k, v, weight = qkv(valid, heads, kv_heads)
    out_d, grads_d = value_and_grads(lambda q, k, v: dense(q, k, v, valid), q, k, v, weight)
    blocked = lambda q, k, v: blocked_causal_attention(q, k, v, jnp.asarray(valid), block)  # noqa: E731
    out_b, grads_b = value_and_grads(blocked, q, k, v, weight)
    assert out_b.shape == out_d.shape and out_b.dtype == out_d.dtype
    assert_close(out_b, out_d, 1e-5, "out")
    for name, gb, gd in zip("qkv", grads_b, grads_d, strict=True):
        assert gb.dtype == gd.dtype
        assert_close(gb, gd, 1e-5, f"d{name}")


@pytest.mark.parametrize("block", [4, 16])
def test_bfloat16_inputs_stay_close_to_dense(block):
    valid = padded_valid()
    q, k, v, weight = qkv(valid, dtype=jnp.bfloat16, seed=1)
    out_d, grads_d = value_and_grads(lambda q, k, v: dense(q, k, v, valid), q, k, v, weight)
    blocked = lambda q, k, v: blocked_causal_attention(q, k, v, jnp.asarray(valid), block)  # noqa: E731
    out_b, grads_b = value_and_grads(blocked, q, k, v, weight)
    assert out_b.dtype == jnp.bfloat16
    assert_close(out_b, out_d, 3e-2, "out")
    for name, gb, gd in zip("qkv", grads_b, grads_d, strict=True):
        assert gb.dtype == jnp.bfloat16
        assert_close(gb, gd, 5e-2, f"d{name}")


def test_fully_masked_queries_are_finite_with_zero_gradients_like_dense():
    """Left-padding queries see no key: finite (the dense path's uniform mean of v), and a loss that masks
    them, as the PPO losses do, gives them and the padding keys exactly zero gradient."""
    valid = padded_valid()
    q, k, v, weight = qkv(valid, seed=2)
    seen = np.cumsum(valid, axis=1) > 0
    assert not seen.all()  # the fixture has fully masked queries
    masked_weight = weight * jnp.asarray(valid)[:, :, None, None]  # a loss on real tokens only
    only_masked = weight * jnp.asarray(~seen)[:, :, None, None]  # a loss on the fully masked queries only
    out, masked_grads, only_grads = value_and_grads(
        lambda q, k, v: blocked_causal_attention(q, k, v, jnp.asarray(valid), 4), q, k, v, masked_weight, only_masked)
    out_d, masked_grads_d, only_grads_d = value_and_grads(lambda q, k, v: dense(q, k, v, valid), q, k, v,
                                                          masked_weight, only_masked)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out)[~seen], np.asarray(out_d)[~seen], atol=1e-6)

    for grad, grad_d in zip(masked_grads, masked_grads_d, strict=True):
        assert np.all(np.isfinite(np.asarray(grad)))
        assert np.all(np.asarray(grad)[~valid] == 0.0)  # padding queries and padding keys
        assert_close(grad, grad_d, 1e-5, "masked-loss gradients")

    # Nothing from the fully masked queries reaches q or k (as in the dense path's `where`); v gets the mean's.
    dq, dk, dv = only_grads
    assert np.all(np.asarray(dq) == 0.0) and np.all(np.asarray(dk) == 0.0)
    assert_close(dv, only_grads_d[2], 1e-5, "dv from fully masked queries")


def _model_loss_and_grads(config, params, tokens, valid):
    graphdef, state = state_from_flat(config, {k: jnp.asarray(v) for k, v in params.items()})

    @jax.jit
    def run(state):
        def loss(state):
            hidden, _ = nnx.merge(graphdef, state).hidden_states(tokens, valid)
            per_token = jnp.sum(jnp.sin(hidden), axis=-1)
            return jnp.sum(per_token * valid) / jnp.sum(valid), hidden

        (value, hidden), grads = jax.value_and_grad(loss, has_aux=True)(state)
        return value, hidden, grads

    value, hidden, grads = run(state)
    return value, hidden, flat_from_state(grads)


@pytest.mark.parametrize("arch,remat_policy", [("llama", "full"), ("qwen2", "dots")])
def test_transformer_blocked_equals_dense_with_remat(arch, remat_policy):
    config = tiny_config(arch, remat=True, remat_policy=remat_policy)
    params = random_params(config, seed=4)
    valid = jnp.asarray(padded_valid(11)[:4])
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, valid.shape), jnp.int32)
    v_dense, h_dense, g_dense = _model_loss_and_grads(config, params, tokens, valid)
    blocked = config.replace(attention_impl="blocked", attention_block=4)
    v_blocked, h_blocked, g_blocked = _model_loss_and_grads(blocked, params, tokens, valid)
    np.testing.assert_allclose(float(v_blocked), float(v_dense), rtol=1e-5)
    assert_close(h_blocked, h_dense, 2e-5, "hidden states")  # every position, padding included
    assert g_blocked.keys() == g_dense.keys()
    for name in g_dense:
        assert_close(g_blocked[name], g_dense[name], 5e-5, name)


def test_blocked_config_keeps_cached_decoding_dense():
    """With a cache the dense path runs whatever the config says; without padding, prefill and a decode step
    match the blocked cache-free forward."""
    config = tiny_config("qwen2", attention_impl="blocked", attention_block=4)
    graphdef, state = state_from_flat(config, {k: jnp.asarray(v) for k, v in random_params(config, 2).items()})
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 10)), jnp.int32)

    @jax.jit
    def run(state):
        model = nnx.merge(graphdef, state)
        full, _ = model(tokens)
        prefill, cache = model(tokens[:, :9], cache=KVCache.create(config, 2, 12))
        step, _ = model(tokens[:, 9:], cache=cache)
        return full, jnp.concatenate([prefill, step], axis=1)

    full, cached = run(state)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5)


@pytest.mark.parametrize("changes,match", [
    (dict(attention_impl="flash"), r"attention_impl must be one of \('dense', 'blocked'\), got 'flash'"),
    (dict(attention_block=0), r"attention_block must be a positive int.*got 0"),
    (dict(attention_block=64.0), r"attention_block must be a positive int.*got 64\.0"),
])
def test_bad_attention_config_is_named(changes, match):
    with pytest.raises(InvalidValueError, match=match):
        tiny_config("llama", **changes)


def test_model_spec_carries_the_option_to_the_model(cache_env):
    from mpo_jax.train.config import ConfigError, ModelSpec, TrainConfig
    from mpo_jax.train.model_specs import build_model

    spec = ModelSpec(name="tiny-random", attention_impl="blocked", attention_block=32, tiny_layers=1)
    config = build_model(spec, None).config
    assert (config.attention_impl, config.attention_block) == ("blocked", 32)
    with pytest.raises(ConfigError, match=r"config\.policy\.attention_impl is 'flash'"):
        TrainConfig(policy=ModelSpec(name="tiny-random", attention_impl="flash"))
    with pytest.raises(ConfigError, match=r"config\.critic\.attention_block must be >= 1"):
        TrainConfig(critic=ModelSpec(name="", attention_block=0))
