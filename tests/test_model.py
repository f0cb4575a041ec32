"""The Flax decoder against an independent numpy forward pass, and its cache/padding/remat paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_numpy import forward_row
from tiny import numpy_config, random_params, tiny_config

from mpo_jax.errors import InvalidValueError
from mpo_jax.models.kv_cache import ContextKV, KVCache
from mpo_jax.models.params import flat_from_state, state_from_flat
from mpo_jax.models.transformer import attention


def build(config, params):
    graphdef, state = state_from_flat(config, {k: jnp.asarray(v) for k, v in params.items()})
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_match_numpy_reference_with_left_padding(arch):
    config = tiny_config(arch)
    params = random_params(config, seed=1)
    model = build(config, params)
    rng = np.random.default_rng(0)
    lengths = [11, 7]
    tokens = np.zeros((2, 11), np.int32)
    valid = np.zeros((2, 11), bool)
    rows = [rng.integers(0, config.vocab_size, n) for n in lengths]
    for i, row in enumerate(rows):
        tokens[i, 11 - len(row):] = row
        valid[i, 11 - len(row):] = True
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(valid))
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    for i, row in enumerate(rows):
        expected = forward_row(p64, numpy_config(config), row)
        np.testing.assert_allclose(np.asarray(logits[i, 11 - len(row):]), expected, atol=2e-4, rtol=2e-4)


def test_incremental_decoding_with_cache_equals_full_forward():
    config = tiny_config("qwen2")
    model = build(config, random_params(config, seed=2))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (3, 12)), jnp.int32)
    full, _ = model(tokens)
    cache = KVCache.create(config, 3, 16)
    first, cache = model(tokens[:, :5], cache=cache)
    steps = [first]
    for t in range(5, 12):
        out, cache = model(tokens[:, t:t + 1], cache=cache)
        steps.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-5)
    assert int(cache.cursor) == 12 and np.all(np.asarray(cache.next_position) == 12)


def test_padding_inside_a_cached_chunk_is_ignored():
    """A continuation chunk padded in the middle of the cache equals the unpadded sequence."""
    config = tiny_config("llama")
    model = build(config, random_params(config, seed=3))
    seq = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (1, 9)), jnp.int32)
    full, _ = model(seq)
    cache = KVCache.create(config, 1, 32)
    _, cache = model(jnp.pad(seq[:, :4], ((0, 0), (3, 0))), jnp.asarray([[0, 0, 0] + [1] * 4], bool), cache)
    chunk = jnp.pad(seq[:, 4:], ((0, 0), (2, 0)))
    out, _ = model(chunk, jnp.asarray([[0, 0] + [1] * 5], bool), cache)
    np.testing.assert_allclose(np.asarray(out[0, 2:]), np.asarray(full[0, 4:]), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_prefill_in_query_blocks_matches_the_numpy_forward(arch):
    """Query blocks of 4 rows (13-token chunks: the last block padded), left padding, a second chunk
    that reads the first from the cache, then one decode step, all against the numpy forward."""
    config = tiny_config(arch, cache_query_block=4)
    params = random_params(config, seed=6)
    model = build(config, params)
    rng = np.random.default_rng(4)
    rows = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in (13, 9)]
    tokens = np.zeros((2, 13), np.int32)
    valid = np.zeros((2, 13), bool)
    for i, row in enumerate(rows):
        tokens[i, 13 - len(row):], valid[i, 13 - len(row):] = row, True
    more = rng.integers(0, config.vocab_size, (2, 13)).astype(np.int32)
    step = rng.integers(0, config.vocab_size, (2, 1)).astype(np.int32)
    cache = KVCache.create(config, 2, 32)
    first, cache = model(jnp.asarray(tokens), jnp.asarray(valid), cache)
    second, cache = model(jnp.asarray(more), cache=cache)
    last, _ = model(jnp.asarray(step), cache=cache)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    for i, row in enumerate(rows):
        expected = forward_row(p64, numpy_config(config), np.concatenate([row, more[i], step[i]]))
        n = len(row)
        np.testing.assert_allclose(np.asarray(first[i, 13 - n:]), expected[:n], atol=2e-4, rtol=2e-4)
        np.testing.assert_allclose(np.asarray(second[i]), expected[n:n + 13], atol=2e-4, rtol=2e-4)
        np.testing.assert_allclose(np.asarray(last[i]), expected[-1:], atol=2e-4, rtol=2e-4)


def test_query_blocks_hold_one_blocks_scores_not_the_whole_matrix():
    """XLA's own buffer accounting: all queries at once need the [B,H,T,S] float32 scores; blocks of
    64 rows stay under a quarter of that (a 64-row block's scores are 1/16 of it)."""
    b, t, s, h, kv, d = 2, 1024, 1536, 8, 2, 16
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    k = jax.ShapeDtypeStruct((b, s, kv, d), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, t, s), jnp.bool_)
    scores_bytes = b * h * t * s * 4

    def temp_bytes(block):
        fn = jax.jit(lambda q, k, v, m: attention(q, k, v, m, block))
        return fn.lower(q, k, k, mask).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(0) >= scores_bytes
    assert temp_bytes(64) < scores_bytes / 4


def test_query_block_setting_is_validated():
    with pytest.raises(InvalidValueError, match="cache_query_block"):
        tiny_config("llama", cache_query_block=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunks_reading_shared_contexts_match_the_numpy_forward_of_the_whole_sequence(arch):
    """A batch-1 prefix read by every row, then padded per-row chunks read in place, then one step."""
    config = tiny_config(arch)
    params = random_params(config, seed=5)
    model = build(config, params)
    rng = np.random.default_rng(3)
    draw = lambda n: rng.integers(0, config.vocab_size, n).astype(np.int32)  # noqa: E731
    prefix_ids = draw(5)
    cache = KVCache.create(config, 1, 8)  # 3 padding slots before the prefix
    _, cache = model(jnp.asarray(np.pad(prefix_ids, (3, 0))[None]), jnp.asarray([[0] * 3 + [1] * 5], bool), cache)
    samples, items, steps = [draw(4), draw(6)], [draw(3), draw(2)], draw(2)

    def left_pad(rows, width):
        tokens = np.zeros((len(rows), width), np.int32)
        valid = np.zeros((len(rows), width), bool)
        for i, row in enumerate(rows):
            tokens[i, width - len(row):], valid[i, width - len(row):] = row, True
        return jnp.asarray(tokens), jnp.asarray(valid)

    prefix = ContextKV.from_cache(cache)
    hidden_s, sample = model.hidden_states_over(*left_pad(samples, 6), (prefix,))
    hidden_i, item = model.hidden_states_over(*left_pad(items, 4), (prefix, sample))
    hidden_t, _ = model.hidden_states_over(jnp.asarray(steps[:, None]), jnp.ones((2, 1), bool), (prefix, sample, item))
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    for row in range(2):
        whole = np.concatenate([prefix_ids, samples[row], items[row], steps[row:row + 1]])
        expected = forward_row(p64, numpy_config(config), whole)
        n_s, n_i = len(samples[row]), len(items[row])
        got_s = model.logits_from_hidden(hidden_s[row, 6 - n_s:])
        got_i = model.logits_from_hidden(hidden_i[row, 4 - n_i:])
        got_t = model.logits_from_hidden(hidden_t[row])
        np.testing.assert_allclose(np.asarray(got_s), expected[5:5 + n_s], atol=2e-4, rtol=2e-4)
        np.testing.assert_allclose(np.asarray(got_i), expected[5 + n_s:5 + n_s + n_i], atol=2e-4, rtol=2e-4)
        np.testing.assert_allclose(np.asarray(got_t), expected[-1:], atol=2e-4, rtol=2e-4)


def test_value_head_is_a_linear_read_of_the_final_hidden_state():
    config = tiny_config("llama", value_head=True)
    params = random_params(config, seed=4)
    model = build(config, params)
    tokens = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    hidden, _ = model.hidden_states(tokens)
    values = model.values_from_hidden(hidden)
    expected = np.asarray(hidden[0]) @ params["value_head.kernel"][:, 0] + params["value_head.bias"][0]
    np.testing.assert_allclose(np.asarray(values[0]), expected, atol=1e-5)
    assert values.shape == (1, 4)


def test_remat_changes_memory_not_results():
    config = tiny_config("llama")
    params = random_params(config, seed=5)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 8)), jnp.int32)

    def loss_and_grad(cfg):
        graphdef, state = state_from_flat(cfg, {k: jnp.asarray(v) for k, v in params.items()})

        def loss(state):
            logits, _ = nnx.merge(graphdef, state)(tokens)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        value, grads = jax.value_and_grad(loss)(state)
        return value, flat_from_state(grads)

    v1, g1 = loss_and_grad(config)
    for policy in ("full", "dots"):
        v2, g2 = loss_and_grad(config.replace(remat=True, remat_policy=policy))
        np.testing.assert_allclose(v1, v2, rtol=1e-6)
        for name in g1:
            np.testing.assert_allclose(np.asarray(g1[name]), np.asarray(g2[name]), atol=1e-6, err_msg=(policy, name))


def test_bfloat16_params_and_compute_stay_close_to_float32():
    config = tiny_config("qwen2")
    params = random_params(config, seed=6)
    tokens = jnp.asarray([[5, 6, 7, 8, 9]], jnp.int32)
    f32, _ = build(config, params)(tokens)
    bf16_cfg = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf16_model = build(bf16_cfg, {k: v.astype(jnp.bfloat16) for k, v in params.items()})
    bf16, _ = bf16_model(tokens)
    assert bf16.dtype == jnp.float32  # logits are always float32
    assert bf16_model.layers.q_proj[...].dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.1 * float(jnp.max(jnp.abs(f32)))


def test_shape_mismatch_between_config_and_weights_is_named():
    config = tiny_config("llama")
    params = random_params(config)
    params["layers.q_proj"] = params["layers.q_proj"][:, :, :-1]
    with pytest.raises(ValueError, match=r"layers\.q_proj.*config says"):
        state_from_flat(config, params)
