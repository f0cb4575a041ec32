"""Parity with transformers' PyTorch models (the reference implementation of Llama / Qwen2).

* SmolLM2-135M-Instruct: our logits and tokenizer against transformers loading the *same*
  GGUF file (`from_pretrained(dir, gguf_file=...)` dequantises it to float32 itself).
* Exported checkpoints: tiny random Llama (llama3 rope scaling) and Qwen2 (biases, tied
  embeddings) models written by `export_hf_checkpoint` and read by `AutoModelForCausalLM`.
* Greedy generation: our sampler against `generate(do_sample=False)`.

Needs the `parity` extra (torch CPU; transformers' GGUF loading also needs `accelerate`).
Deselected by default; run with `python -m pytest tests/test_parity.py -m parity -q -s`
(`-s` shows the measured differences).
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax.engine import presets
from mpo_jax.engine.language_model import LanguageModel, load_model, place_params
from mpo_jax.engine.sampling import SamplingParams
from mpo_jax.engine.tokenizer import Tokenizer
from mpo_jax.models.hf_checkpoint import export_hf_checkpoint, hf_tensors
from mpo_jax.models.params import flat_from_state

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

SMOLLM2 = "smollm2-135m-instruct"
LOGITS_ATOL = 1e-3  # f32 logits of a dequantised GGUF (|logits| reach ~40)
EXPORT_ATOL = 1e-4

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
     {"role": "user", "content": "Explain why the sky is blue to a ten-year-old, mentioning sunlight, "
                                 "air molecules and the way short wavelengths scatter more than long ones."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
]
TOKENIZER_TEXTS = [
    "Hello world, how are you?",
    "  leading spaces, trailing spaces   ",
    "Numbers 1234567890 and 3.14159, dates 2024-06-01.",
    "Unicode: café, naïve, Straße, 東京, emoji 🤖🎉, Ελληνικά",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # square\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "don't won't they're I'll we've",
    "",
]


def _smollm2_path():
    try:
        return presets.resolve(SMOLLM2)
    except presets.PresetNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ours() -> LanguageModel:
    _smollm2_path()
    return load_model(SMOLLM2)


@pytest.fixture(scope="module")
def theirs():
    path = _smollm2_path()
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    model = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    path = _smollm2_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


def _prompt_ids(model: LanguageModel) -> list[list[int]]:
    return [model.encode_prompt(chat) for chat in CHATS]


# -- SmolLM2 GGUF vs transformers -------------------------------------------------------------
def test_smollm2_tokenizer_matches_transformers(ours, hf_tokenizer):
    for text in TOKENIZER_TEXTS:
        expected = hf_tokenizer.encode(text, add_special_tokens=False)
        assert ours.tokenizer.encode(text, add_bos=False) == expected, text
        # default special-token handling agrees too (SmolLM2 adds no BOS)
        assert ours.tokenizer.encode(text) == hf_tokenizer.encode(text), text
        assert ours.tokenizer.decode(expected, skip_special_tokens=False) == hf_tokenizer.decode(expected), text
    for chat in CHATS:
        rendered = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.render(chat) == rendered
        assert ours.encode_prompt(chat) == hf_tokenizer.encode(rendered, add_special_tokens=False)
    assert ours.tokenizer.eos_id == hf_tokenizer.eos_token_id
    assert ours.tokenizer.vocab_size == len(hf_tokenizer)


def test_smollm2_weights_match_transformers(ours, theirs):
    """Both dequantise the same GGUF blocks: every weight agrees exactly once mapped to HF names
    (our Q/K rows are un-permuted from llama.cpp's interleaved RoPE order, as transformers' are)."""
    flat = {k: np.asarray(v) for k, v in flat_from_state(ours.params).items()}
    state = theirs.state_dict()
    for t in hf_tensors(ours.config):
        value = flat[t.key] if t.layer is None else flat[t.key][t.layer]
        np.testing.assert_array_equal(value.T if t.transposed else value, state[t.name].numpy(), err_msg=t.name)


def test_smollm2_logits_match_transformers(ours, theirs):
    prompts = _prompt_ids(ours)
    assert len({len(p) for p in prompts}) == len(prompts), "the prompts should differ in length"
    worst = 0.0
    # one prompt at a time, no padding
    for ids in prompts:
        a = np.asarray(ours.logits(np.array([ids])))
        b = _hf_logits(theirs, np.array([ids]))
        assert a.shape == b.shape == (1, len(ids), ours.config.vocab_size)
        worst = max(worst, float(np.abs(a - b).max()))

    # a right-padded batch with a mask vs transformers' attention_mask (compare real tokens only)
    ids, mask = ours.tokenizer.batch_encode([ours.render(c) for c in CHATS], padding_side="right",
                                            add_bos=False)
    a = np.asarray(ours.logits(ids, mask))
    b = _hf_logits(theirs, ids, mask)
    batch_diff = float(np.abs(a - b)[mask].max())

    # our left-padded batch vs transformers on each prompt alone (rotary positions skip the pads)
    ids_l, mask_l = ours.tokenizer.batch_encode([ours.render(c) for c in CHATS], padding_side="left",
                                                add_bos=False)
    a_l = np.asarray(ours.logits(ids_l, mask_l))
    left_diff = 0.0
    for row, prompt in enumerate(prompts):
        b_row = _hf_logits(theirs, np.array([prompt]))[0]
        left_diff = max(left_diff, float(np.abs(a_l[row][mask_l[row]] - b_row).max()))

    print(f"\nSmolLM2-135M f32 logits vs transformers (same GGUF): max |diff| unpadded {worst:.3g}, "
          f"right-padded batch {batch_diff:.3g}, left-padded batch {left_diff:.3g}, "
          f"max |logit| {np.abs(b).max():.1f}")
    assert worst < LOGITS_ATOL
    assert batch_diff < LOGITS_ATOL
    assert left_diff < LOGITS_ATOL


def test_smollm2_greedy_generation_matches_transformers(ours, theirs):
    new_tokens = 16
    chats = CHATS[:2]
    out = ours.sample(chats, SamplingParams(max_new_tokens=new_tokens))
    eos = list(ours.tokenizer.eos_ids)
    for row, chat in enumerate(chats):
        prompt = ours.encode_prompt(chat)
        with torch.no_grad():
            generated = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                        do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos,
                                        pad_token_id=ours.tokenizer.pad_id)
        expected = generated[0, len(prompt):].tolist()
        got = out.tokens[row][out.mask[row]].tolist()
        print(f"\nrow {row}: ours {ours.tokenizer.decode(got)!r}\n       transformers "
              f"{ours.tokenizer.decode(expected)!r}")
        if len(got) < new_tokens:  # stopped at an end-of-turn token: transformers stops there as well
            assert got[-1] in eos
        assert got == expected[:len(got)] and len(got) == len(expected)


# -- export round trip vs transformers ---------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exported_checkpoint_logits_match_transformers(arch, tmp_path):
    config = tiny_config(arch)
    params = random_params(config, seed=3)
    tokenizer = Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path / "tokenizer"))
    graphdef, state = place_params(config, params, None)
    model = LanguageModel(config, tokenizer, graphdef, state)

    out_dir = tmp_path / "hf"
    export_hf_checkpoint(config, params, out_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    expected_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert type(hf).__name__ == expected_class

    # 40 tokens: past llama3's original_max_position_embeddings (16), so the rope scaling matters
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(2, 40))
    mask = np.ones(ids.shape, bool)
    mask[1, 29:] = False  # right padding
    a = np.asarray(model.logits(ids, mask))
    b = _hf_logits(hf, ids, mask)
    diff = float(np.abs(a - b)[mask].max())
    print(f"\n{arch} export round trip: max |logit diff| {diff:.3g} (max |logit| {np.abs(b).max():.2f})")
    assert diff < EXPORT_ATOL
