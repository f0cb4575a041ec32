"""LoRA on the output projection (`lm_head`), as the original MPO policy has it, for tied and untied models.

Expected logits come from the independent numpy forward pass with the head replaced by
W + (alpha / rank) * A @ B, where W is `lm_head` or, for a tied model, the transposed embedding
(the input embedding stays W's source, unadapted). Gradients and merged weights are checked
against numpy formulas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_numpy import forward_row
from tiny import numpy_config, random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import Tokenizer
from mpo_jax.engine import sharding as sharding_lib
from mpo_jax.engine.language_model import LanguageModel, place_params
from mpo_jax.models.config import LORA_TARGETS, ModelConfig, lora_param_shapes
from mpo_jax.models.hf_checkpoint import export_hf_checkpoint, load_hf_checkpoint
from mpo_jax.models.partitioning import logical_axes
from mpo_jax.models.transformer import LoRAParam
from mpo_jax.rl.config import OptimizerConfig
from mpo_jax.rl.ppo import make_rollout_stats
from mpo_jax.rl.train_state import create_train_state
from mpo_jax.train.export import exported_model_config, merge_lora

RANK, ALPHA = 3, 6.0
SCALE = ALPHA / RANK
ARCHS = {"untied": "llama", "tied": "qwen2"}  # tiny qwen2 ties its embeddings, tiny llama does not


def adapted_config(tie: str, targets: tuple[str, ...] = ("q_proj", "lm_head")) -> ModelConfig:
    config = tiny_config(ARCHS[tie], lora_rank=RANK, lora_alpha=ALPHA, lora_targets=targets)
    assert config.tie_word_embeddings == (tie == "tied")
    return config


def random_adapters(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Adapters with B != 0, so each one changes the model (fresh ones have B = 0)."""
    rng = np.random.default_rng(seed)
    return {name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in lora_param_shapes(config).items()}


def build(config: ModelConfig, flat: dict[str, np.ndarray]) -> nnx.Module:
    graphdef, state = place_params(config, flat, None)
    return nnx.merge(graphdef, state)


def numpy_head(flat: dict[str, np.ndarray]) -> np.ndarray:
    """The base output projection [D, V] in float64: `lm_head`, or the transposed embedding when tied."""
    return (flat["lm_head"] if "lm_head" in flat else flat["embed"].T).astype(np.float64)


def numpy_merged(flat: dict[str, np.ndarray], *, adapters: bool) -> dict[str, np.ndarray]:
    """Float64 weights for `forward_row`: each adapter folded in with numpy (or left out)."""
    p = {k: v.astype(np.float64) for k, v in flat.items() if "_lora_" not in k}
    p["lm_head"] = numpy_head(flat)
    if adapters:
        for key in ("layers.q_proj", "lm_head"):
            a, b = flat[f"{key}_lora_a"].astype(np.float64), flat[f"{key}_lora_b"].astype(np.float64)
            p[key] = p[key] + SCALE * np.matmul(a, b)
    return p


def rows(config: ModelConfig) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in (9, 5)]


def left_padded(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    valid = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s):], valid[i, width - len(s):] = s, True
    return tokens, valid


def test_lm_head_is_a_target_and_its_adapter_shapes():
    assert "lm_head" in LORA_TARGETS
    assert "lm_head" not in ModelConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_layers=1,
                                        num_heads=1, num_kv_heads=1).lora_targets  # default: the projections
    for tie in ARCHS:
        config = adapted_config(tie)
        shapes = lora_param_shapes(config)
        assert shapes["lm_head_lora_a"] == (config.hidden_size, RANK)
        assert shapes["lm_head_lora_b"] == (RANK, config.vocab_size)
    with pytest.raises(ValueError, match="unknown modules"):
        tiny_config(lora_rank=2, lora_targets=("embed",))


@pytest.mark.parametrize("tie", list(ARCHS))
def test_logits_with_an_lm_head_adapter_match_numpy(tie):
    config = adapted_config(tie)
    flat = {**random_params(config, seed=1), **random_adapters(config, seed=2)}
    model = build(config, flat)
    seqs = rows(config)
    tokens, valid = left_padded(seqs)
    cfg = numpy_config(config)
    for adapters in (True, False):
        logits, _ = model(jnp.asarray(tokens), jnp.asarray(valid), adapters=adapters)
        p = numpy_merged(flat, adapters=adapters)
        for i, seq in enumerate(seqs):
            expected = forward_row(p, cfg, seq)
            np.testing.assert_allclose(np.asarray(logits[i, tokens.shape[1] - len(seq):]), expected,
                                       atol=2e-4, rtol=2e-4, err_msg=f"adapters={adapters}")
    # The adapter is far above the tolerance: a model ignoring it would fail the check above.
    on, _ = model(jnp.asarray(tokens), jnp.asarray(valid))
    off, _ = model(jnp.asarray(tokens), jnp.asarray(valid), adapters=False)
    assert float(jnp.max(jnp.abs(on - off))) > 0.1


def test_tied_lm_head_adapter_leaves_the_input_embedding_alone():
    """With only an lm_head adapter, hidden states are the base model's; only the logits move."""
    config = adapted_config("tied", targets=("lm_head",))
    flat = {**random_params(config, seed=3), **random_adapters(config, seed=4)}
    model = build(config, flat)
    tokens, valid = left_padded(rows(config))
    with_adapter, _ = model.hidden_states(jnp.asarray(tokens), jnp.asarray(valid))
    without, _ = model.hidden_states(jnp.asarray(tokens), jnp.asarray(valid), adapters=False)
    np.testing.assert_array_equal(np.asarray(with_adapter), np.asarray(without))
    h = np.asarray(with_adapter, np.float64)
    a, b = flat["lm_head_lora_a"].astype(np.float64), flat["lm_head_lora_b"].astype(np.float64)
    expected = h @ flat["embed"].T.astype(np.float64) + SCALE * (h @ a) @ b
    np.testing.assert_allclose(np.asarray(model.logits_from_hidden(with_adapter)), expected, atol=2e-4, rtol=2e-4)
    assert "lm_head" not in nnx.to_pure_dict(nnx.state(model))  # still tied: no separate head was made


@pytest.mark.parametrize("tie", list(ARCHS))
def test_the_gradient_reaches_the_lm_head_adapter(tie):
    config = adapted_config(tie, targets=("lm_head",))
    flat = {**random_params(config, seed=5), **random_adapters(config, seed=6)}
    graphdef, state = place_params(config, flat, None)
    adapter_state = nnx.state(nnx.merge(graphdef, state), LoRAParam)
    assert set(nnx.to_pure_dict(adapter_state)) == {"lm_head_lora_a", "lm_head_lora_b"}  # the trainable split
    seq = rows(config)[0]
    weights = np.random.default_rng(8).standard_normal((len(seq), config.vocab_size))

    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(jnp.asarray(seq[None]))
        return jnp.sum(logits[0] * weights)

    grads = {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(jax.grad(loss)(state)).items()
             if k.startswith("lm_head_lora")}
    # d/dB sum(G * (H @ (W + s A B))) = s (H A)^T G and d/dA = s H^T G B^T, with H the final hidden
    # states: the numpy forward with an identity head returns them.
    p = numpy_merged(flat, adapters=False)
    p["lm_head"] = np.eye(config.hidden_size)
    h = forward_row(p, numpy_config(config), seq)
    a, b = flat["lm_head_lora_a"].astype(np.float64), flat["lm_head_lora_b"].astype(np.float64)
    np.testing.assert_allclose(grads["lm_head_lora_b"], SCALE * (h @ a).T @ weights, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(grads["lm_head_lora_a"], SCALE * h.T @ weights @ b.T, rtol=2e-3, atol=2e-3)
    assert np.abs(grads["lm_head_lora_b"]).max() > 1.0


def numpy_response_logprobs(p: dict[str, np.ndarray], config: ModelConfig, query: np.ndarray, query_mask: np.ndarray,
                            response: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
    """log softmax of the numpy forward at the positions that predict each real response token."""
    out = np.zeros(response.shape)
    for i in range(len(query)):
        q, r = query[i][query_mask[i]], response[i][response_mask[i]]
        logits = forward_row(p, numpy_config(config), np.concatenate([q, r]))
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        out[i, :len(r)] = logp[len(q) - 1 + np.arange(len(r)), r]
    return out


@pytest.fixture(scope="module")
def rollout_state(tmp_path_factory):
    """A tied LoRA policy with an lm_head adapter in a train state, its weights and a small rollout."""
    tokenizer = Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    config = adapted_config("tied")
    flat = {**random_params(config, seed=15), **random_adapters(config, seed=16)}
    policy = LanguageModel(config, tokenizer, *place_params(config, flat, None))
    state = create_train_state(policy, None, OptimizerConfig(), needs_values=False)
    rng = np.random.default_rng(17)
    query = rng.integers(3, config.vocab_size, (3, 5)).astype(np.int32)
    query_mask = np.ones(query.shape, bool)
    query_mask[1, :2] = False
    response_mask = np.arange(4)[None] < np.array([4, 2, 3])[:, None]
    response = np.where(response_mask, rng.integers(3, config.vocab_size, (3, 4)), 0).astype(np.int32)
    stats = make_rollout_stats(1.0)(state, *map(jnp.asarray, (query, query_mask, response, response_mask)))
    return config, flat, (query, query_mask, response, response_mask), jax.device_get(stats)


def test_rollout_logprobs_of_the_policy_include_the_lm_head_adapter(rollout_state):
    config, flat, arrays, stats = rollout_state
    expected = numpy_response_logprobs(numpy_merged(flat, adapters=True), config, *arrays)
    mask = arrays[3]
    np.testing.assert_allclose(stats["logprobs"][mask], expected[mask], atol=2e-4, rtol=2e-4)


def test_reference_logprobs_leave_the_lm_head_adapter_out(rollout_state):
    config, flat, arrays, stats = rollout_state
    expected = numpy_response_logprobs(numpy_merged(flat, adapters=False), config, *arrays)
    mask = arrays[3]
    np.testing.assert_allclose(stats["ref_logprobs"][mask], expected[mask], atol=2e-4, rtol=2e-4)


def test_lm_head_adapters_are_sharded_like_the_output_projection():
    assert logical_axes("lm_head_lora_a") == ("embed", None)
    assert logical_axes("lm_head_lora_b") == (None, "vocab")
    assert logical_axes("layers.q_proj_lora_a") == ("layers", "embed", None)
    assert logical_axes("layers.q_proj_lora_b") == ("layers", None, "heads")
    config = adapted_config("tied")
    flat = {**random_params(config, seed=9), **random_adapters(config, seed=10)}
    mesh = sharding_lib.make_mesh((1, 2, 4))
    graphdef, state = place_params(config, flat, mesh)
    sharded = nnx.merge(graphdef, state)
    assert sharded.lm_head_lora_a[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert sharded.lm_head_lora_b[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    tokens, valid = left_padded(rows(config))
    got, _ = sharded(jnp.asarray(tokens), jnp.asarray(valid))
    expected, _ = build(config, flat)(jnp.asarray(tokens), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("tie", list(ARCHS))
def test_export_merges_the_lm_head_adapter(tie, tmp_path):
    config = adapted_config(tie)
    flat = {**random_params(config, seed=11), **random_adapters(config, seed=12)}
    params, merged = merge_lora(flat, config)
    assert merged == ("q_proj", "lm_head")
    assert not any("_lora_" in name for name in params)
    head, a, b = numpy_head(flat), flat["lm_head_lora_a"], flat["lm_head_lora_b"]
    expected = np.array([[head[i, j] + SCALE * sum(float(a[i, r]) * float(b[r, j]) for r in range(RANK))
                          for j in range(config.vocab_size)] for i in range(config.hidden_size)])
    np.testing.assert_allclose(params["lm_head"], expected, atol=1e-5)
    np.testing.assert_array_equal(params["embed"], flat["embed"])  # the input embedding is not adapted
    out_config = exported_model_config(config, params)
    assert out_config.tie_word_embeddings is False and out_config.lora_rank == 0
    # Written as a Hugging Face checkpoint and read back, the merged model gives the adapted logits.
    export_hf_checkpoint(out_config, params, tmp_path / "hf")
    loaded_config, loaded = load_hf_checkpoint(tmp_path / "hf")
    assert not loaded_config.tie_word_embeddings
    np.testing.assert_array_equal(loaded["lm_head"], params["lm_head"])
    seqs = rows(config)
    p = numpy_merged(flat, adapters=True)
    merged_model = build(loaded_config, loaded)
    for seq in seqs:
        got, _ = merged_model(jnp.asarray(seq[None]))
        np.testing.assert_allclose(np.asarray(got[0]), forward_row(p, numpy_config(config), seq), atol=2e-4, rtol=2e-4)


def test_export_keeps_a_tied_model_tied_without_an_lm_head_adapter():
    config = adapted_config("tied", targets=("q_proj",))
    flat = {**random_params(config, seed=13), **random_adapters(config, seed=14)}
    params, merged = merge_lora(flat, config)
    assert merged == ("q_proj",) and "lm_head" not in params
    assert exported_model_config(config, params).tie_word_embeddings is True
