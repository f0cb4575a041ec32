"""Round trips and error reports of the HF safetensors loader/exporter (tiny random models)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from mpo_jax.models.config import ModelConfig, RopeScaling, canonical_param_shapes
from mpo_jax.models.hf_checkpoint import export_hf_checkpoint, load_hf_checkpoint

LLAMA = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-6, rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64),
    max_position_embeddings=256, tie_word_embeddings=False, architecture="llama",
    bos_token_id=1, eos_token_id=2)
QWEN2 = ModelConfig(
    vocab_size=80, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=6, num_kv_heads=2,
    rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=128, tie_word_embeddings=True,
    attention_bias=True, architecture="qwen2", bos_token_id=None, eos_token_id=7)


def random_params(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in canonical_param_shapes(config).items()}


def expected_hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF names and (out, in) shapes, written out independently of the exporter's tables."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    D, F = c.hidden_size, c.intermediate_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, D), "model.norm.weight": (D,)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
        if c.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, D)
    return shapes


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert actual[k].dtype == np.float32, k
        np.testing.assert_array_equal(actual[k], expected[k], err_msg=k)


def test_llama_round_trip_with_llama3_rope(tmp_path):
    from transformers import AutoConfig, LlamaConfig

    params = random_params(LLAMA)
    export_hf_checkpoint(LLAMA, params, tmp_path)

    hf = AutoConfig.from_pretrained(tmp_path)
    assert type(hf) is LlamaConfig
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size) == (64, 32, 48)
    assert (hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (3, 4, 2)
    assert hf.head_dim == 16
    assert hf.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}
    assert (hf.rms_norm_eps, hf.max_position_embeddings, hf.tie_word_embeddings) == (1e-6, 256, False)
    assert (hf.attention_bias, hf.bos_token_id, hf.eos_token_id) == (False, 1, 2)

    stored = load_file(tmp_path / "model.safetensors")
    assert {k: v.shape for k, v in stored.items()} == expected_hf_shapes(LLAMA)
    q1 = stored["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q1, params["layers.q_proj"][1].T)
    np.testing.assert_array_equal(stored["lm_head.weight"], params["lm_head"].T)

    config, loaded = load_hf_checkpoint(tmp_path)
    assert config == LLAMA
    assert_same(loaded, params)


def test_qwen2_round_trip_with_biases_and_tied_embeddings(tmp_path):
    from transformers import AutoConfig, Qwen2Config

    params = random_params(QWEN2, seed=1)
    export_hf_checkpoint(QWEN2, params, tmp_path)

    hf = AutoConfig.from_pretrained(tmp_path)
    assert type(hf) is Qwen2Config
    assert (hf.vocab_size, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads) == (80, 24, 6, 2)
    assert hf.rope_parameters["rope_theta"] == 1000000.0 and hf.tie_word_embeddings
    assert (hf.bos_token_id, hf.eos_token_id) == (None, 7)

    stored = load_file(tmp_path / "model.safetensors")
    assert {k: v.shape for k, v in stored.items()} == expected_hf_shapes(QWEN2)
    np.testing.assert_array_equal(stored["model.layers.0.self_attn.k_proj.bias"], params["layers.k_bias"][0])

    config, loaded = load_hf_checkpoint(tmp_path)
    assert config == QWEN2
    assert_same(loaded, params)


def test_sharded_export_loads_identically(tmp_path):
    params = random_params(LLAMA, seed=2)
    export_hf_checkpoint(LLAMA, params, tmp_path, max_shard_bytes=20_000)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(shards + ["config.json", "model.safetensors.index.json"])
    assert index["weight_map"].keys() == expected_hf_shapes(LLAMA).keys()
    for shard in shards:
        with safe_open(tmp_path / shard, framework="numpy") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())

    config, loaded = load_hf_checkpoint(tmp_path)
    assert config == LLAMA
    assert_same(loaded, params)


def test_bfloat16_export_and_value_head(tmp_path):
    config = QWEN2.replace(value_head=True)
    params = random_params(config, seed=3)
    export_hf_checkpoint(config, params, tmp_path, dtype="bfloat16")

    stored = load_file(tmp_path / "model.safetensors")
    assert stored["value_head.weight"].shape == (1, 24) and stored["value_head.bias"].shape == (1,)
    assert stored["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16

    loaded_config, loaded = load_hf_checkpoint(tmp_path)
    assert loaded_config == config
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in params.items()}
    assert_same(loaded, rounded)

    bf16_config, bf16 = load_hf_checkpoint(tmp_path, dtype="bfloat16")
    assert bf16_config.param_dtype == "bfloat16" and bf16["layers.q_proj"].dtype == ml_dtypes.bfloat16


def test_llama_attention_bias_writes_zero_o_proj_bias(tmp_path):
    """HF Llama's attention_bias also creates o_proj.bias; our model has none, so it must be zero."""
    config = LLAMA.replace(attention_bias=True)
    params = random_params(config, seed=4)
    export_hf_checkpoint(config, params, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert not stored["model.layers.0.self_attn.o_proj.bias"].any()
    assert load_hf_checkpoint(tmp_path)[0] == config

    stored["model.layers.2.self_attn.o_proj.bias"][3] = 1.0
    save_file(stored, tmp_path / "model.safetensors")
    with pytest.raises(NotImplementedError, match=r"non-zero 'model\.layers\.2\.self_attn\.o_proj\.bias'"):
        load_hf_checkpoint(tmp_path)


def test_transformers4_style_config_is_read(tmp_path):
    """Older checkpoints keep rope_theta top-level, rope_scaling apart, and eos as a list."""
    export_hf_checkpoint(LLAMA, random_params(LLAMA), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = rope
    hf["eos_token_id"] = [2, 5]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert load_hf_checkpoint(tmp_path)[0] == LLAMA


def test_missing_tensor_is_named(tmp_path):
    export_hf_checkpoint(LLAMA, random_params(LLAMA), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' is missing"
                                         r".*model\.safetensors"):
        load_hf_checkpoint(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    export_hf_checkpoint(LLAMA, random_params(LLAMA), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["intermediate_size"] = 50
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight'.*\(48, 32\), "
                                         r"expected \(50, 32\).*config\.json and the weights disagree"):
        load_hf_checkpoint(tmp_path)


def test_truncated_file_is_named(tmp_path):
    export_hf_checkpoint(QWEN2, random_params(QWEN2), tmp_path, max_shard_bytes=4_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / sorted(set(index["weight_map"].values()))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated or corrupt"):
        load_hf_checkpoint(tmp_path)


def test_unknown_model_type(tmp_path):
    export_hf_checkpoint(LLAMA, random_params(LLAMA), tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*\('llama', 'qwen2'\)"):
        load_hf_checkpoint(tmp_path)


def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf_checkpoint(tmp_path)


def test_export_rejects_params_that_do_not_match_config(tmp_path):
    params = random_params(LLAMA)
    params["layers.q_proj"] = params["layers.q_proj"][:, :, :8]
    del params["final_norm"]
    with pytest.raises(ValueError, match=r"missing 'final_norm'.*'layers\.q_proj' has shape \(3, 32, 8\)"):
        export_hf_checkpoint(LLAMA, params, tmp_path)
