"""Bad input to `load_model` fails early with a message that names the problem and the fix."""

import json

import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import load_model
from mpo_jax.models.hf_checkpoint import export_hf_checkpoint


def test_unknown_preset_lists_presets_and_the_path_looked_for():
    with pytest.raises(FileNotFoundError, match=r"smollm2-135m-instruct.*looked for"):
        load_model("smollm3-9000b")


def test_corrupt_gguf_file_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(ValueError, match="broken.gguf"):
        load_model(bad)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"0" * 10)
    with pytest.raises(ValueError, match=r"\.gguf file or a Hugging Face checkpoint"):
        load_model(path)


@pytest.fixture()
def checkpoint(tmp_path):
    config = tiny_config("llama", vocab_size=264)
    out = tmp_path / "ckpt"
    export_hf_checkpoint(config, random_params(config), out)
    tiny_tokenizer_dir(out)
    return config, out


def test_tiny_checkpoint_loads(checkpoint):
    config, path = checkpoint
    model = load_model(path)
    assert model.config.num_layers == config.num_layers
    assert np.isfinite(np.asarray(model.logits([[1, 2, 3]]))).all()


def test_missing_weights_file_is_named(checkpoint):
    _, path = checkpoint
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(path)


def test_truncated_weights_file_is_named(checkpoint):
    _, path = checkpoint
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(path)


def test_config_that_disagrees_with_the_weights(checkpoint):
    _, path = checkpoint
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj|gate_proj"):
        load_model(path)
