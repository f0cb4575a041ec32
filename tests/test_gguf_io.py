"""GGUF loading: tiny files written with gguf.GGUFWriter (float and quantised), plus SmolLM2."""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from mpo_jax.models.config import ModelConfig, RopeScaling, canonical_param_shapes
from mpo_jax.models.gguf_io import llama3_scaling_from_factors, load_gguf

LLAMA = ModelConfig(
    vocab_size=40, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=2048),
    max_position_embeddings=4096, tie_word_embeddings=False, architecture="llama",
    bos_token_id=1, eos_token_id=2)
QWEN2 = ModelConfig(
    vocab_size=48, hidden_size=96, intermediate_size=64, num_layers=2, num_heads=6, num_kv_heads=2,
    rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=512, tie_word_embeddings=True,
    attention_bias=True, architecture="qwen2", bos_token_id=3, eos_token_id=4)

# Quantisation error bound relative to the largest |weight| of the tensor.
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.05, Q.Q5_1: 0.05,
             Q.Q4_0: 0.1, Q.Q4_1: 0.1}
MATRIX_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16, Q.F32]

GGUF_LAYER_NAMES = {  # canonical key -> llama.cpp tensor name (written out independently of the loader)
    "layers.attn_norm": "attn_norm.weight", "layers.q_proj": "attn_q.weight",
    "layers.k_proj": "attn_k.weight", "layers.v_proj": "attn_v.weight", "layers.o_proj": "attn_output.weight",
    "layers.mlp_norm": "ffn_norm.weight", "layers.gate_proj": "ffn_gate.weight",
    "layers.up_proj": "ffn_up.weight", "layers.down_proj": "ffn_down.weight",
    "layers.q_bias": "attn_q.bias", "layers.k_bias": "attn_k.bias", "layers.v_bias": "attn_v.bias",
}
GGUF_GLOBAL_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
                     "lm_head": "output.weight"}


def rope_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's convert `permute` (HF rotate_half -> interleaved pairs)."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def llama3_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it, loop for loop."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling.factor)
        else:
            smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)
            factors.append(1 / ((1 - smooth) / scaling.factor + smooth))
    return np.asarray(factors, np.float32)


class TinyGGUF:
    """Writes a GGUF file the way llama.cpp's converter lays it out, and records what it wrote."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        self.config = config
        rng = np.random.default_rng(seed)
        self.params = {k: rng.standard_normal(s).astype(np.float32)
                       for k, s in canonical_param_shapes(config).items()}
        self.expected: dict[str, np.ndarray] = {k: np.empty_like(v) for k, v in self.params.items()}
        self.qtypes: dict[str, list[Q]] = {k: [] for k in self.params}

    def write(self, path: Path, *, skip: Collection[str] = (),
              extra: dict[str, tuple[np.ndarray, Q]] | None = None, vocab_key: bool = True) -> Path:
        """Write the file; `skip` leaves tensors out, `extra` adds raw (data, type) tensors."""
        c = self.config
        writer = gguf.GGUFWriter(str(path), c.architecture)
        writer.add_block_count(c.num_layers)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_heads)
        writer.add_head_count_kv(c.num_kv_heads)
        writer.add_key_length(c.head_dim)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        if vocab_key:
            writer.add_vocab_size(c.vocab_size)
        writer.add_token_list([f"t{i}" for i in range(c.vocab_size)])
        if c.bos_token_id is not None:
            writer.add_bos_token_id(c.bos_token_id)
        if c.eos_token_id is not None:
            writer.add_eos_token_id(c.eos_token_id)
        if c.rope_scaling is not None:
            writer.add_tensor("rope_freqs.weight", llama3_factors(c.rope_scaling, c.rope_theta, c.head_dim))
        types = iter(MATRIX_TYPES * 100)
        for key, value in self.params.items():
            for layer in range(c.num_layers) if key.startswith("layers.") else [None]:
                name = GGUF_GLOBAL_NAMES[key] if layer is None else f"blk.{layer}.{GGUF_LAYER_NAMES[key]}"
                if name not in skip:
                    slot = slice(None) if layer is None else layer
                    self._add(writer, name, key, value[slot], self.expected[key][slot],
                              next(types) if value[slot].ndim == 2 else Q.F32)
        for name, (data, qtype) in (extra or {}).items():
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    def _add(self, writer: gguf.GGUFWriter, name: str, key: str, value: np.ndarray, expected: np.ndarray,
             qtype: Q) -> None:
        """Store one tensor in HF (out, in) layout, Q/K rows permuted for llama; record what loads back."""
        c = self.config
        hf = value.T if value.ndim == 2 and key != "embed" else value
        heads = {"layers.q_proj": c.num_heads, "layers.q_bias": c.num_heads,
                 "layers.k_proj": c.num_kv_heads, "layers.k_bias": c.num_kv_heads}.get(key)
        order = rope_row_order(hf.shape[0], heads) if c.architecture == "llama" and heads else None
        if order is not None:
            hf = hf[order]
        data = gguf.quants.quantize(np.ascontiguousarray(hf), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        stored = gguf.quants.dequantize(data, qtype).reshape(hf.shape)
        if order is not None:
            stored = stored[np.argsort(order)]
        expected[...] = stored.T if value.ndim == 2 and key != "embed" else stored
        self.qtypes[key].append(qtype)


def check_loaded(tiny: TinyGGUF, params: dict[str, np.ndarray]) -> None:
    assert params.keys() == tiny.params.keys()
    for key, value in params.items():
        assert value.dtype == np.float32 and value.shape == tiny.params[key].shape, key
        np.testing.assert_array_equal(value, tiny.expected[key], err_msg=key)
        bound = max(TOLERANCE[q] for q in tiny.qtypes[key]) * np.abs(tiny.params[key]).max()
        assert np.abs(value - tiny.params[key]).max() <= bound, key


def test_llama_quantised_with_permuted_qk_and_llama3_rope(tmp_path):
    tiny = TinyGGUF(LLAMA)
    config, params = load_gguf(tiny.write(tmp_path / "llama.gguf"))
    assert config == LLAMA
    check_loaded(tiny, params)
    assert {q for qs in tiny.qtypes.values() for q in qs} == set(MATRIX_TYPES) | {Q.F32}


def test_qwen2_biases_are_not_permuted_and_vocab_falls_back_to_tokens(tmp_path):
    tiny = TinyGGUF(QWEN2, seed=1)
    config, params = load_gguf(tiny.write(tmp_path / "qwen2.gguf", vocab_key=False))
    assert config == QWEN2
    check_loaded(tiny, params)
    np.testing.assert_array_equal(params["layers.q_bias"], tiny.params["layers.q_bias"])


def test_loading_as_bfloat16(tmp_path):
    import ml_dtypes

    tiny = TinyGGUF(QWEN2, seed=2)
    config, params = load_gguf(tiny.write(tmp_path / "qwen2.gguf"), dtype="bfloat16")
    assert config == QWEN2.replace(param_dtype="bfloat16")
    for key, value in params.items():
        assert value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(value, tiny.expected[key].astype(ml_dtypes.bfloat16), err_msg=key)


def _rope(x: np.ndarray, theta: float, interleaved: bool) -> np.ndarray:
    """RoPE over (positions, heads, head_dim): HF rotate_half pairs (j, j+d/2), ggml pairs (2j, 2j+1)."""
    d = x.shape[-1]
    angle = np.arange(x.shape[0])[:, None, None] * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return np.stack([ra, rb], -1).reshape(x.shape) if interleaved else np.concatenate([ra, rb], -1)


def test_unpermuted_qk_with_rotate_half_match_llama_cpp_attention_scores(tmp_path):
    """The loader's Q/K under HF RoPE give the scores llama.cpp's interleaved RoPE gives on the file."""
    config = LLAMA.replace(rope_scaling=None)
    tiny = TinyGGUF(config, seed=3)
    _, params = load_gguf(tiny.write(tmp_path / "llama.gguf"))
    reader = gguf.GGUFReader(tmp_path / "llama.gguf")
    raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    x = np.random.default_rng(0).standard_normal((7, config.hidden_size))
    group = config.num_heads // config.num_kv_heads

    def scores(wq: np.ndarray, wk: np.ndarray, interleaved: bool) -> np.ndarray:
        q = _rope((x @ wq).reshape(7, config.num_heads, -1), config.rope_theta, interleaved)
        k = _rope((x @ wk).reshape(7, config.num_kv_heads, -1), config.rope_theta, interleaved)
        return np.einsum("thd,uhd->htu", q, np.repeat(k, group, axis=1))

    ours = scores(params["layers.q_proj"][1], params["layers.k_proj"][1], interleaved=False)
    llama_cpp = scores(raw["blk.1.attn_q.weight"].T, raw["blk.1.attn_k.weight"].T, interleaved=True)
    np.testing.assert_allclose(ours, llama_cpp, rtol=1e-4, atol=1e-3)


def _q4_k_block(rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """One Q4_K block with every 6-bit scale and min = 1, decoded by hand: y = d*q - dmin."""
    d, dmin = np.float16(rng.uniform(0.01, 0.1)), np.float16(rng.uniform(0, 0.5))
    scales = bytes([1] * 8 + [0x11] * 4)
    qs = rng.integers(0, 256, 128, dtype=np.uint8)
    q = np.concatenate([np.concatenate([qs[c * 32:(c + 1) * 32] & 0xF, qs[c * 32:(c + 1) * 32] >> 4])
                        for c in range(4)])
    return (d.tobytes() + dmin.tobytes() + scales + qs.tobytes(),
            np.float32(d) * q.astype(np.float32) - np.float32(dmin))


def _q6_k_block(rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """One Q6_K block with all 6-bit quants = 48 (ql = 0, qh = 0b11): y = d * scale[k // 16] * 16."""
    scales = rng.integers(-128, 128, 16, dtype=np.int8)
    d = np.float16(rng.uniform(0.001, 0.01))
    block = bytes(128) + bytes([0xFF] * 64) + scales.tobytes() + d.tobytes()
    return block, np.float32(d) * np.repeat(scales.astype(np.float32), 16) * 16


def test_k_quants_dequantise_hand_built_blocks(tmp_path):
    """gguf cannot quantise K-quants, so Q4_K/Q6_K rows are assembled byte by byte."""
    config = ModelConfig(vocab_size=8, hidden_size=256, intermediate_size=256, num_layers=1, num_heads=2,
                         num_kv_heads=1, tie_word_embeddings=True, architecture="qwen2", attention_bias=True)
    rng = np.random.default_rng(4)
    raw, expected = {}, {}
    for name, qtype, make_block in (("blk.0.ffn_gate.weight", Q.Q4_K, _q4_k_block),
                                    ("blk.0.ffn_up.weight", Q.Q6_K, _q6_k_block)):
        blocks = [make_block(rng) for _ in range(256)]  # 256 rows, one 256-value block each
        raw[name] = (np.frombuffer(b"".join(b for b, _ in blocks), np.uint8).reshape(256, -1), qtype)
        expected[name] = np.stack([v for _, v in blocks])
    path = TinyGGUF(config).write(tmp_path / "k.gguf", skip=raw.keys(), extra=raw)
    _, params = load_gguf(path)
    np.testing.assert_allclose(params["layers.gate_proj"][0], expected["blk.0.ffn_gate.weight"].T, rtol=1e-6)
    np.testing.assert_allclose(params["layers.up_proj"][0], expected["blk.0.ffn_up.weight"].T, rtol=1e-6)


@pytest.mark.parametrize("head_dim, factor", [(128, 8.0), (64, 32.0)])  # Llama 3.1 8B, Llama 3.2 1B
def test_llama3_rope_scaling_recovered_from_real_sized_rope_freqs(head_dim, factor):
    scaling = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    factors = llama3_factors(scaling, 500000.0, head_dim)
    assert llama3_scaling_from_factors(factors, 500000.0, head_dim) == scaling
    assert llama3_scaling_from_factors(np.ones_like(factors), 500000.0, head_dim) is None


def test_unsupported_rope_freqs_are_rejected():
    with pytest.raises(NotImplementedError, match="rope_freqs.weight does not follow the Llama 3"):
        llama3_scaling_from_factors(np.linspace(1, 4, 32, dtype=np.float32), 500000.0, 64)


def test_missing_tensor_is_named(tmp_path):
    path = TinyGGUF(LLAMA).write(tmp_path / "llama.gguf", skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight' is missing from .*llama\.gguf"):
        load_gguf(path)


def test_unknown_tensor_is_rejected(tmp_path):
    extra = {"blk.0.attn_output.bias": (np.ones(64, np.float32), Q.F32)}
    path = TinyGGUF(LLAMA).write(tmp_path / "llama.gguf", extra=extra)
    with pytest.raises(ValueError, match=r"does not support: \['blk\.0\.attn_output\.bias'\]"):
        load_gguf(path)


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_gguf(tmp_path / "junk.gguf")


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'.*\('llama', 'qwen2'\)"):
        load_gguf(tmp_path / "gpt2.gguf")


@pytest.mark.slow
def test_real_smollm2_gguf(smollm2_gguf):
    start = time.perf_counter()
    config, params = load_gguf(smollm2_gguf)
    seconds = time.perf_counter() - start
    assert config == ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, architecture="llama", bos_token_id=1, eos_token_id=2)
    assert {k: v.shape for k, v in params.items()} == canonical_param_shapes(config)
    assert "lm_head" not in params
    assert all(np.isfinite(v).all() for v in params.values())
    assert seconds < 30, f"loading took {seconds:.1f}s"
