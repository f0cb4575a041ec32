"""`mpo-jax export`: a tiny run trained for two updates, exported to a Hugging Face folder and read back.

The expected logits come from the trainer's own state (adapters on), not from the export code;
merged weights are checked against W + (alpha / rank) * A @ B computed here in numpy, and the
tokenizer files against the source tokenizer and transformers' `AutoTokenizer`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny import fixture_data_dir

from mpo_jax.engine.tokenizer import Tokenizer
from mpo_jax.errors import MissingFileError
from mpo_jax.models.config import ModelConfig
from mpo_jax.train.config import load_config
from mpo_jax.train.export import (
    ExportError,
    add_export_arguments,
    export_policy,
    merge_lora,
    run_export,
    save_tokenizer,
)
from mpo_jax.train.run_dir import RunDirError, locate_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.py"
FAST = ["--config.num_updates=2", "--config.meta.enabled=false", "--config.rollout.max_new_tokens=8",
        "--config.policy.tiny_hidden_size=32", "--config.judge.model.tiny_hidden_size=32",
        "--config.data.batch_size=8", "--config.checkpoint.every=1", "--config.checkpoint.keep=5",
        "--config.log.report=false", "--config.log.tensorboard=false"]
SAMPLE = "Write an essay about the quick brown fox: 3 good ideas!\n<|im_end|>"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "  two  spaces and 1234567890 digits",
         "Unicode: café, Straße, 東京 🤖", "code:\n\tdef f(x):\n\t\treturn x ** 2\n",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", ""]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_env):
    """(run dir, final TrainState, {update: policy trainable params copied to host at that update})."""
    from mpo_jax.train.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("export") / "run"
    data = fixture_data_dir(tmp_path_factory.mktemp("data"))
    trainer = Trainer(load_config(TINY, [*FAST, f"--config.run_dir={run_dir}", f"--config.data.data_dir={data}"]))
    snapshots: dict[int, object] = {}
    save = trainer.checkpointer.save

    def save_and_copy(update, state, *args, **kwargs):
        snapshots[update] = jax.tree.map(np.array, state.params["policy"])
        return save(update, state, *args, **kwargs)

    trainer.checkpointer.save = save_and_copy
    trainer.run()
    return run_dir, trainer.state, snapshots


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    run_dir, _, _ = trained
    out = tmp_path_factory.mktemp("hf") / "policy"
    return export_policy(run_dir, out)


def tokens_and_mask() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 300, size=(2, 12)).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[1, :4] = False  # left padding on the second row
    return tokens, mask


def policy_logits(state, trainable, *, adapters: bool = True) -> np.ndarray:
    """Logits of the trained network itself: the trainer's graph with these trainable params."""
    module = state.policy.merge(jax.tree.map(jnp.asarray, trainable))
    tokens, mask = tokens_and_mask()
    logits, _ = module(jnp.asarray(tokens), jnp.asarray(mask), adapters=adapters)
    return np.asarray(logits)


def trainable_flat(trainable) -> dict[str, np.ndarray]:
    from flax import nnx

    from mpo_jax.models.params import flatten

    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(trainable)).items()}


def frozen_flat(state) -> dict[str, np.ndarray]:
    from flax import nnx

    from mpo_jax.models.params import flatten

    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(state.policy.frozen)).items()}


# -- the exported model ----------------------------------------------------------------------------


def test_exported_policy_gives_the_trained_logits(trained, exported):
    import mpo_jax

    _, state, _ = trained
    adapters = trainable_flat(state.params["policy"])
    assert any(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("_lora_b")), "training left B at 0"
    expected = policy_logits(state, state.params["policy"])
    base = policy_logits(state, state.params["policy"], adapters=False)

    lm = mpo_jax.load_model(exported.out_dir)
    assert (lm.config.lora_rank, lm.config.value_head) == (0, False)
    tokens, mask = tokens_and_mask()
    got = np.asarray(lm.logits(tokens, mask))
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-5, rtol=0)
    # the adapters' effect is far above the tolerance, so an unmerged export would fail the check above
    assert np.abs(got[mask] - base[mask]).max() > 1e-3
    assert exported.update == 2 and exported.lora_merged == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert exported.value_head_dropped


def test_exported_weights_are_base_plus_scaled_adapters(trained, exported):
    _, state, _ = trained
    config = json.loads((trained[0] / "config.json").read_text())["policy"]
    scale = config["lora_alpha"] / config["lora_rank"]  # 8 / 4 in configs/tiny_cpu.py
    assert scale == 2.0
    frozen, adapters = frozen_flat(state), trainable_flat(state.params["policy"])
    weights = load_file(str(exported.out_dir / "model.safetensors"))
    assert not any("value_head" in name or "lora" in name for name in weights)
    for layer in range(2):
        for target, hf_name in (("q_proj", "self_attn.q_proj"), ("o_proj", "self_attn.o_proj")):
            w = frozen[f"layers.{target}"][layer]
            a = adapters[f"layers.{target}_lora_a"][layer]
            b = adapters[f"layers.{target}_lora_b"][layer]
            expected = np.zeros_like(w)
            for i in range(w.shape[0]):  # (in, out) layout, transposed to HF's (out, in) on export
                for j in range(w.shape[1]):
                    expected[i, j] = w[i, j] + scale * float(np.dot(a[i, :], b[:, j]))
            np.testing.assert_allclose(weights[f"model.layers.{layer}.{hf_name}.weight"], expected.T, atol=1e-6)
        # modules without adapters are exported unchanged
        np.testing.assert_array_equal(weights[f"model.layers.{layer}.mlp.gate_proj.weight"],
                                      frozen["layers.gate_proj"][layer].T)


def test_tokenizer_files_round_trip(exported, cache_env):
    from transformers import AutoTokenizer

    from mpo_jax.engine.tiny import tiny_tokenizer

    source = tiny_tokenizer(320)
    reloaded = Tokenizer.from_dir(exported.out_dir)
    hf = AutoTokenizer.from_pretrained(exported.out_dir)
    chat = [{"role": "user", "content": "Write about {{ the fox }}."}]
    for text in [SAMPLE, *TEXTS]:
        assert reloaded.encode(text) == source.encode(text), text
        assert hf.encode(text) == source.encode(text), text
    assert (reloaded.bos_id, reloaded.eos_ids, reloaded.pad_id) == (source.bos_id, source.eos_ids, source.pad_id)
    assert reloaded.apply_chat_template(chat) == source.apply_chat_template(chat)
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nWrite about {{ the fox }}.<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((exported.out_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(source.eos_ids)


def test_a_checkpoint_folder_exports_that_update(trained, tmp_path, capsys):
    import mpo_jax

    run_dir, state, snapshots = trained
    parser = add_export_arguments(argparse.ArgumentParser())
    out = tmp_path / "update1"
    args = parser.parse_args([str(run_dir / "checkpoints" / "1"), "--format", "hf", str(out)])
    assert run_export(args) == 0
    assert "exported update 1" in capsys.readouterr().out
    expected = policy_logits(state, snapshots[1])
    latest = policy_logits(state, snapshots[2])
    tokens, mask = tokens_and_mask()
    got = np.asarray(mpo_jax.load_model(out).logits(tokens, mask))
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-5, rtol=0)
    assert np.abs(got[mask] - latest[mask]).max() > 1e-4
    assert json.loads((out / "mpo_export.json").read_text())["update"] == 1


# -- errors ----------------------------------------------------------------------------------------


def test_not_a_run_directory(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        export_policy(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="not a run directory"):
        export_policy(tmp_path / "empty", tmp_path / "out")


def test_run_without_checkpoint(trained, tmp_path):
    run = tmp_path / "fresh"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained[0] / "config.json", run / "config.json")
    with pytest.raises(MissingFileError, match="no finished checkpoint"):
        export_policy(run, tmp_path / "out")


def test_missing_update_and_conflicting_update(trained, tmp_path):
    run_dir = trained[0]
    with pytest.raises(MissingFileError, match=r"no checkpoint for update 7; available updates: \[1, 2\]"):
        export_policy(run_dir, tmp_path / "out", update=7)
    with pytest.raises(RunDirError, match="update 1 but update=2"):
        locate_run(run_dir / "checkpoints" / "1", update=2)
    assert locate_run(run_dir / "checkpoints").run_dir == run_dir


def test_unknown_format_and_unsafe_output(trained, tmp_path, capsys):
    run_dir = trained[0]
    with pytest.raises(ExportError, match="unknown export format 'gguf'; supported: hf"):
        export_policy(run_dir, tmp_path / "out", format="gguf")
    with pytest.raises(ExportError, match="overwrite the run's own files"):
        export_policy(run_dir, run_dir)
    with pytest.raises(ExportError, match="overwrite the run's own files"):
        export_policy(run_dir, run_dir / "checkpoints" / "x")
    args = add_export_arguments(argparse.ArgumentParser()).parse_args([str(run_dir), "--format", "onnx", "o"])
    assert run_export(args) == 2
    assert capsys.readouterr().err.startswith("error: unknown export format 'onnx'")
    assert not (tmp_path / "out").exists()


# -- merging without a run -------------------------------------------------------------------------


def test_merge_lora_formula_dtype_and_value_head():
    config = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
                         num_kv_heads=1, lora_rank=2, lora_alpha=3.0, lora_targets=("k_proj", "down_proj"),
                         value_head=True, param_dtype="bfloat16")
    rng = np.random.default_rng(1)
    flat = {"layers.k_proj": rng.standard_normal((2, 8, 4)).astype(ml_dtypes.bfloat16),
            "layers.down_proj": rng.standard_normal((2, 12, 8)).astype(ml_dtypes.bfloat16),
            "layers.k_proj_lora_a": rng.standard_normal((2, 8, 2)).astype(ml_dtypes.bfloat16),
            "layers.k_proj_lora_b": rng.standard_normal((2, 2, 4)).astype(ml_dtypes.bfloat16),
            "layers.down_proj_lora_a": rng.standard_normal((2, 12, 2)).astype(ml_dtypes.bfloat16),
            "layers.down_proj_lora_b": rng.standard_normal((2, 2, 8)).astype(ml_dtypes.bfloat16),
            "value_head.kernel": np.ones((8, 1), ml_dtypes.bfloat16), "value_head.bias": np.ones(1, ml_dtypes.bfloat16)}
    params, merged = merge_lora(flat, config)
    assert merged == ("k_proj", "down_proj")
    assert sorted(params) == ["layers.down_proj", "layers.k_proj"]
    for target in merged:
        w, a, b = (flat[f"layers.{target}{s}"].astype(np.float32) for s in ("", "_lora_a", "_lora_b"))
        expected = np.stack([w[layer] + 1.5 * sum(np.outer(a[layer][:, r], b[layer][r]) for r in range(2))
                             for layer in range(2)])
        got = params[f"layers.{target}"]
        assert got.dtype == ml_dtypes.bfloat16
        # within bfloat16 rounding of the exact sum
        assert np.all(np.abs(got.astype(np.float32) - expected) <= np.abs(expected) * 2.0**-8 + 1e-6)
    stray = {**flat, "layers.q_proj_lora_a": np.zeros((2, 8, 2), np.float32)}
    with pytest.raises(ExportError, match="q_proj_lora_a"):
        merge_lora(stray, config)


# -- tokenizers without tokenizer files (GGUF) -----------------------------------------------------


def test_gguf_tokenizer_is_written_as_tokenizer_json(tmp_path, smollm2_gguf):
    from transformers import AutoTokenizer

    source = Tokenizer.from_gguf(smollm2_gguf)
    files = save_tokenizer(source, tmp_path)
    assert files == ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    reloaded = Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert reloaded.encode(text) == source.encode(text), text
        assert hf.encode(text) == source.encode(text), text
        ids = source.encode(text)
        assert hf.decode(ids) == source.decode(ids, skip_special_tokens=False), text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {{ x }}"}]
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        source.apply_chat_template(chat)
    assert reloaded.eos_ids == source.eos_ids and hf.eos_token == "<|im_end|>"


def test_sentencepiece_style_gguf_keeps_its_bos(tmp_path):
    """Llama-2-style GGUF metadata: BOS is prepended by the written tokenizer.json too."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([TEXTS[0], TEXTS[1], "Rubrics score essays; the policy learns."] * 20),
                      encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), minloglevel=2,
                                   vocab_size=400, model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    kind = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": kind,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id()}
    source = Tokenizer.from_gguf(meta)
    out = tmp_path / "out"
    save_tokenizer(source, out)
    reloaded = Tokenizer.from_dir(out)
    hf = AutoTokenizer.from_pretrained(out)
    for text in ["The quick brown fox.", "  two  spaces", "new\nline"]:
        expected = [sp.bos_id(), *sp.encode(text)]
        assert source.encode(text) == expected, text
        assert reloaded.encode(text) == expected, text
        assert hf.encode(text) == expected, text


# -- transformers' PyTorch model -------------------------------------------------------------------


@pytest.mark.parity
def test_transformers_reads_the_exported_policy(trained, exported):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mpo_jax.engine.tiny import tiny_tokenizer

    _, state, _ = trained
    expected = policy_logits(state, state.params["policy"])
    model = AutoModelForCausalLM.from_pretrained(exported.out_dir, dtype=torch.float32).eval()
    tokens, mask = tokens_and_mask()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long))
    got = out.logits.float().numpy()
    # the left-padded row: transformers' positions count from the first column, ours from the first
    # real token, so compare it on its own without padding
    np.testing.assert_allclose(got[0], expected[0], atol=1e-4, rtol=0)
    with torch.no_grad():
        unpadded = model(input_ids=torch.as_tensor(tokens[1:, 4:], dtype=torch.long)).logits.float().numpy()
    np.testing.assert_allclose(unpadded[0], expected[1, 4:], atol=1e-4, rtol=0)
    hf_tokenizer = AutoTokenizer.from_pretrained(exported.out_dir)
    assert hf_tokenizer.encode(SAMPLE) == tiny_tokenizer(320).encode(SAMPLE)
