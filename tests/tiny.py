"""Tiny random models for tests: configs and numpy weights made here, not by the model code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mpo_jax.models.config import ModelConfig, RopeScaling, canonical_param_shapes


def tiny_config(arch: str = "llama", **overrides) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                 num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, architecture=arch)
    if arch == "qwen2":
        base.update(attention_bias=True, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)
    else:
        base.update(rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=16))
    base.update(overrides)
    return ModelConfig(**base)


def random_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in canonical_param_shapes(config).items():
        if name.endswith("norm"):
            params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            scale = 0.5 if name == "embed" else 1.0 / np.sqrt(shape[-2] if len(shape) > 1 else 1.0)
            params[name] = scale * rng.standard_normal(shape)
    return {k: v.astype(dtype) for k, v in params.items()}


def numpy_config(config: ModelConfig) -> dict:
    s = config.rope_scaling
    return dict(layers=config.num_layers, heads=config.num_heads, kv_heads=config.num_kv_heads,
                head_dim=config.head_dim, eps=config.rms_norm_eps, theta=config.rope_theta,
                scaling=None if s is None else (s.factor, s.low_freq_factor, s.high_freq_factor,
                                                s.original_max_position_embeddings))


def tiny_tokenizer_dir(path, vocab_size: int = 96) -> Path:
    """The project's tiny tokenizer (`mpo_jax.engine.tiny`) written to `path`. At 96 entries, fewer
    than the 256 byte tokens, it has no merges: the byte tokens and the ChatML specials."""
    from mpo_jax.engine.tiny import write_tiny_tokenizer

    return write_tiny_tokenizer(path, vocab_size)


def fixture_data_dir(root) -> Path:
    """A data folder for all four tasks built from tests/fixtures/tasks_samples.json (records copied
    from ../shared/data with their licence notes), each split repeated to 16 records, so that
    trainer tests do not need the shared data folder next to the checkout."""
    import json

    from mpo_jax.tasks import get_task

    samples = json.loads((Path(__file__).parent / "fixtures" / "tasks_samples.json").read_text(encoding="utf-8"))
    root = Path(root)
    for name in ("essay", "summarization", "ethics", "math"):
        folder = root / get_task(name).data_folder
        folder.mkdir(parents=True, exist_ok=True)
        records = samples[name]["records"]
        rows = [dict(records[i % len(records)], id=f"{records[i % len(records)].get('id', name)}#{i}")
                for i in range(16)]
        for split in ("train", "test"):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root
