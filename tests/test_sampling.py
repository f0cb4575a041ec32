"""The jitted sampler against step-by-step oracles built on full forward passes."""

import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import SamplingParams, Tokenizer
from mpo_jax.engine.compilation import count_compilations
from mpo_jax.engine.language_model import LanguageModel, place_params

VOCAB = 264


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tokenizer = Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    config = tiny_config("qwen2", vocab_size=VOCAB, num_layers=2)
    graphdef, params = place_params(config, random_params(config, seed=7), None)
    return LanguageModel(config, tokenizer, graphdef, params, prompt_buckets=(16, 32, 64, 128),
                         generation_buckets=(8, 16, 32), batch_buckets=(1, 2, 4, 8, 64))


def full_logits(model, ids):
    return np.asarray(model.logits(np.asarray([ids], np.int32)))[0, -1].astype(np.float64)


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def greedy_oracle(model, prompt, steps, stop_ids=()):
    ids, out, logps = list(prompt), [], []
    for _ in range(steps):
        logits = full_logits(model, ids)
        token = int(np.argmax(logits))
        out.append(token)
        logps.append(log_softmax(logits)[token])
        ids.append(token)
        if token in stop_ids:
            break
    return out, logps


def test_greedy_matches_argmax_of_full_forward_passes(model):
    prompts = [[10, 20, 30, 40, 50], [7, 8], [100, 101, 102, 103, 104, 105, 106, 107, 108]]
    out = model.sampler.generate(prompts, SamplingParams(max_new_tokens=6, stop_token_ids=()))
    for row, prompt in enumerate(prompts):
        expected, expected_logps = greedy_oracle(model, prompt, 6, model.tokenizer.eos_ids)
        n = len(expected)
        assert out.tokens[row, :n].tolist() == expected
        np.testing.assert_allclose(out.logprobs[row, :n], expected_logps, atol=1e-4)
        assert out.mask[row].sum() == n


def test_rows_stop_at_their_own_end_token(model):
    prompt = [11, 12, 13]
    free, _ = greedy_oracle(model, prompt, 6)
    stop_at = free[2]
    out = model.sampler.generate([prompt, [50, 51]], SamplingParams(max_new_tokens=6, stop_token_ids=(stop_at,)))
    first = free.index(stop_at) + 1
    assert out.mask[0].sum() == first and out.finished[0]
    assert out.tokens[0, :first].tolist() == free[:first]
    assert np.all(out.tokens[0, first:] == model.tokenizer.pad_id)


def test_sampling_follows_the_softmax_distribution(model):
    prompt = [20, 21, 22]
    probs = np.exp(log_softmax(full_logits(model, prompt) / 0.7))
    n = 64
    counts = np.zeros(VOCAB)
    for seed in range(4):
        out = model.sampler.generate([prompt] * n, SamplingParams(max_new_tokens=1, temperature=0.7, seed=seed))
        np.add.at(counts, out.tokens[:, 0], 1)
        np.testing.assert_allclose(out.logprobs[:, 0], np.log(probs[out.tokens[:, 0]]), atol=1e-4)
    top = np.argsort(-probs)[:5]
    # the most likely tokens appear about as often as their probability says (4 sigma)
    for t in top:
        expected = probs[t] * 4 * n
        assert abs(counts[t] - expected) <= 4 * np.sqrt(expected * (1 - probs[t])) + 1, (t, counts[t], expected)


def test_same_seed_same_samples_and_top_k_top_p_limits(model):
    prompts = [[30, 31], [40, 41, 42]]
    knobs = dict(max_new_tokens=5, temperature=1.0, stop_token_ids=())
    a = model.sampler.generate(prompts, SamplingParams(seed=3, **knobs))
    b = model.sampler.generate(prompts, SamplingParams(seed=3, **knobs))
    c = model.sampler.generate(prompts, SamplingParams(seed=4, **knobs))
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)
    greedy = model.sampler.generate(prompts, SamplingParams(max_new_tokens=5))
    for extra in (dict(top_k=1), dict(top_p=1e-6)):
        out = model.sampler.generate(prompts, SamplingParams(seed=5, **knobs, **extra))
        n = greedy.mask.sum(1)
        for row in range(2):
            assert out.tokens[row, :n[row]].tolist() == greedy.tokens[row, :n[row]].tolist()
    out = model.sampler.generate([prompts[0]] * 16, SamplingParams(max_new_tokens=1, temperature=2.0, top_k=3))
    allowed = set(np.argsort(-full_logits(model, prompts[0]))[:3].tolist())
    assert set(out.tokens[:, 0].tolist()) <= allowed


def test_digit_and_choice_constraints(model):
    strings = model.tokenizer.token_strings()
    out = model.sampler.generate([[5, 6, 7]] * 4, SamplingParams(max_new_tokens=4, temperature=1.5, seed=1),
                                 model.digits_constraint(max_digits=3))
    for row in range(4):
        text = "".join(strings[t] for t in out.tokens[row][out.mask[row]] if t not in model.tokenizer.eos_ids)
        assert text.isdigit() and 1 <= len(text) <= 3, text
    options = ["good", "ok", "bad"]
    out = model.sampler.generate([[5, 6, 7]] * 8, SamplingParams(max_new_tokens=8, temperature=1.5, seed=2),
                                 model.choice_constraint(options))
    assert all(t in options for t in out.texts), out.texts
    assert out.finished.all()


def test_stop_strings_cut_the_text(model):
    free = model.generate(["the quick"], max_new_tokens=12)[0]
    assert len(free) > 4
    stop = free[2:4]
    cut = model.generate(["the quick"], max_new_tokens=12, stop=[stop])[0]
    assert cut == free[:free.find(stop)]


def test_same_bucket_prompts_do_not_recompile(model):
    params = SamplingParams(max_new_tokens=5, temperature=0.8, seed=1)
    model.sampler.generate([[1, 2, 3], [4, 5]], params)
    with count_compilations() as compiled:
        model.sampler.generate([[9, 8, 7, 6, 5, 4], [3]], SamplingParams(max_new_tokens=7, temperature=0.5, seed=2))
    assert compiled == []
    with count_compilations() as compiled:
        model.sampler.generate([[1] * 40], params)  # a longer prompt bucket compiles
    assert compiled


def test_chat_continuation_reuses_the_cache_and_matches_a_fresh_prefill(model):
    params = SamplingParams(max_new_tokens=6)
    chats = [[{"role": "user", "content": "what is the capital"}], [{"role": "user", "content": "yes"}]]
    first = model.chat(chats, params)
    second = model.chat_continue(first, [{"role": "user", "content": "good"}, {"role": "user", "content": "no"}],
                                 params)
    # Oracle: the whole second-turn conversation rendered and prefilled from scratch.
    contexts = [model.render(messages[:-1]) for messages in second.messages]
    fresh = model.sampler.generate([model.tokenizer.encode(c, add_bos=False) for c in contexts], params)
    assert second.replies == fresh.texts
    assert second.state.cursor > first.state.cursor
    # only the new turn was prefilled: one 16-token chunk per row, not the whole conversation
    assert second.prefill_tokens < fresh.prefill_tokens


def test_prompt_longer_than_the_largest_bucket_is_a_clear_error(model):
    with pytest.raises(ValueError, match="prompt length.*larger than the largest bucket"):
        model.sampler.generate([[1] * 129], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_left_pad_right_aligns_rows_and_fills_the_batch():
    from mpo_jax.engine.sampling import left_pad

    rows = [[5, 6, 7], [], np.array([9], np.int32)]
    tokens, valid = left_pad(rows, 4, 99, batch=5)
    # by hand: each row's last token in the last column, pads (99) before it, filler rows all padding
    expected = np.array([[99, 5, 6, 7], [99, 99, 99, 99], [99, 99, 99, 9], [99] * 4, [99] * 4], np.int32)
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(valid, expected != 99)
    assert tokens.dtype == np.int32 and valid.dtype == bool
    tokens, valid = left_pad([[1, 2], [3]], 2, 0)  # one row per input by default
    np.testing.assert_array_equal(tokens, [[1, 2], [0, 3]])
    np.testing.assert_array_equal(valid, [[True, True], [False, True]])


def test_left_pad_refuses_rows_that_do_not_fit():
    from mpo_jax.engine.sampling import left_pad

    with pytest.raises(ValueError, match="prompt 1 has 3 tokens, more than the padded length 2"):
        left_pad([[1], [1, 2, 3]], 2, 0, what="prompt")
    with pytest.raises(ValueError, match="2 rows do not fit a batch of 1"):
        left_pad([[1], [2]], 3, 0, batch=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied head with LoRA on it; tied head, biases
def test_unrolled_decode_matches_full_forward_passes_and_the_layer_scan(arch, tmp_path):
    """The decode loop's per-layer weight views (adapters included) give the scan's tokens and log-probs."""
    from mpo_jax.models.config import lora_param_shapes

    tokenizer = Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path))
    config = tiny_config(arch, vocab_size=VOCAB, num_layers=3, lora_rank=2, lora_alpha=4.0,
                         lora_targets=("q_proj", "v_proj", "down_proj", "lm_head"))
    rng = np.random.default_rng(3)
    flat = random_params(config, seed=5)
    flat.update({name: (0.3 * rng.standard_normal(shape)).astype(np.float32)  # B != 0: adapters matter
                 for name, shape in lora_param_shapes(config).items()})
    graphdef, params = place_params(config, flat, None)
    buckets = dict(prompt_buckets=(16,), generation_buckets=(8,), batch_buckets=(4,))
    unrolled = LanguageModel(config, tokenizer, graphdef, params, **buckets)
    scanned = LanguageModel(config, tokenizer, graphdef, params, unroll_layers=False, **buckets)
    assert unrolled.sampler.unroll_layers and not scanned.sampler.unroll_layers
    prompts = [[10, 20, 30, 40, 50], [7, 8], [100, 101, 102]]
    greedy = SamplingParams(max_new_tokens=7)
    out = unrolled.sampler.generate(prompts, greedy)
    for row, prompt in enumerate(prompts):
        expected, expected_logps = greedy_oracle(unrolled, prompt, 7, unrolled.tokenizer.eos_ids)
        assert out.tokens[row, :len(expected)].tolist() == expected
        np.testing.assert_allclose(out.logprobs[row, :len(expected)], expected_logps, atol=1e-4)
    sampled = SamplingParams(max_new_tokens=7, temperature=1.0, seed=11)
    a, b = unrolled.sampler.generate(prompts, sampled), scanned.sampler.generate(prompts, sampled)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_prefill_pads_to_the_fine_prompt_bucket_and_the_cache_to_a_power_of_two(model):
    """A 40-token prompt prefills 48 slots per row but shares the 64-slot cache shape of its decode loop."""
    fine = LanguageModel(model.config, model.tokenizer, model.graphdef, model.params,
                         generation_buckets=(8,), batch_buckets=(2,))
    prompts = [list(range(60, 100)), [5, 6, 7]]
    out = fine.sampler.generate(prompts, SamplingParams(max_new_tokens=5, stop_token_ids=()))
    assert out.prefill_tokens == 2 * 48
    assert out.state.cache.capacity == 64 + 8
    for row, prompt in enumerate(prompts):
        expected, _ = greedy_oracle(model, prompt, 5, model.tokenizer.eos_ids)
        assert out.tokens[row, :len(expected)].tolist() == expected


def test_auto_unrolls_the_decode_layers_only_below_the_weight_budget(model, monkeypatch):
    from mpo_jax.engine import sampling
    from mpo_jax.models.config import canonical_param_shapes

    layer_bytes = sum(4 * int(np.prod(shape)) for name, shape in canonical_param_shapes(model.config).items()
                      if name.startswith("layers."))
    assert sampling.layer_weight_bytes(model.params) == layer_bytes
    assert LanguageModel(model.config, model.tokenizer, model.graphdef, model.params).sampler.unroll_layers
    monkeypatch.setattr(sampling, "UNROLL_MAX_LAYER_BYTES", layer_bytes - 1)
    assert not LanguageModel(model.config, model.tokenizer, model.graphdef, model.params).sampler.unroll_layers
    with pytest.raises(ValueError, match="unroll_layers must be"):
        LanguageModel(model.config, model.tokenizer, model.graphdef, model.params, unroll_layers="yes")
