"""The same model on one device and sharded over a (data, fsdp, tensor) mesh of 8 fake CPUs."""

import jax
import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import SamplingParams, Tokenizer
from mpo_jax.engine.language_model import LanguageModel, place_params
from mpo_jax.engine.sharding import batch_parallelism, make_mesh


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    assert jax.device_count() == 8, "tests/conftest.py must set 8 fake devices before jax is imported"
    tokenizer = Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    config = tiny_config("llama", vocab_size=264, num_heads=8, num_kv_heads=4, hidden_size=64,
                         intermediate_size=128)
    params = random_params(config, seed=11)
    kwargs = dict(prompt_buckets=(16, 32), generation_buckets=(8, 16), batch_buckets=(1, 2, 4, 8))
    single = LanguageModel(config, tokenizer, *place_params(config, params, None), **kwargs)
    # exactly what jax.make_mesh returns (Explicit axes in jax >= 0.9)
    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))
    from mpo_jax.engine.sharding import as_auto_mesh

    auto = as_auto_mesh(mesh)
    sharded = LanguageModel(config, tokenizer, *place_params(config, params, auto), mesh=auto, **kwargs)
    return single, sharded


def test_parameters_are_really_sharded(models):
    _, sharded = models
    q = sharded.params["layers"]["q_proj"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    shard_shapes = {s.data.shape for s in q.addressable_shards}
    assert shard_shapes == {(q.shape[0], q.shape[1] // 2, q.shape[2] // 4)}


def test_sharded_logits_equal_single_device_logits(models):
    single, sharded = models
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 264, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :5] = False
    a = np.asarray(single.logits(ids, mask))
    b = np.asarray(sharded.logits(ids, mask))
    assert np.max(np.abs(a - b)[mask]) < 1e-4


def test_sharded_sampling_equals_single_device_for_the_same_seed(models):
    single, sharded = models
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=42, stop_token_ids=())
    a, b = single.sampler.generate(prompts, params), sharded.sampler.generate(prompts, params)
    assert np.array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_batch_is_padded_to_a_multiple_of_the_batch_parallelism(models):
    _, sharded = models
    assert batch_parallelism(sharded.mesh) == 2
    assert sharded.sampler.padded_batch(1) == 2


def test_mesh_that_does_not_fit_the_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 12 devices but 8 are available"):
        make_mesh((1, 3, 4))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 8})


def test_load_model_takes_jax_make_mesh_as_it_is(tmp_path):
    from mpo_jax import load_model
    from mpo_jax.models.hf_checkpoint import export_hf_checkpoint

    config = tiny_config("qwen2", vocab_size=264, num_heads=8, num_kv_heads=4, hidden_size=64, intermediate_size=128)
    export_hf_checkpoint(config, random_params(config, seed=2), tmp_path)
    tiny_tokenizer_dir(tmp_path)
    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))  # Explicit axes
    sharded = load_model(tmp_path, mesh=mesh)
    single = load_model(tmp_path)
    ids = np.random.default_rng(1).integers(0, 264, (2, 9)).astype(np.int32)
    assert np.max(np.abs(np.asarray(sharded.logits(ids)) - np.asarray(single.logits(ids)))) < 1e-4
    assert sharded.params["layers"]["down_proj"][...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor",
                                                                                                   "fsdp")
