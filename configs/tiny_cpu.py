"""Tiny random models over a tiny tokenizer: the whole MPO loop, meta steps included, in about a minute.

    mpo-jax train --config configs/tiny_cpu.py --config.run_dir=/tmp/mpo_tiny

The scores mean nothing (random judge); this checks the machinery end to end and is the base
of the trainer tests.
"""

from mpo_jax.train.config import default_config


def get_config():
    config = default_config()
    config.run_dir = "runs/tiny_cpu"
    config.task = "essay"
    config.num_updates = 4
    for spec in (config.policy, config.judge.model):
        spec.name = "tiny-random"
        spec.remat = False
    config.policy.lora_rank = 4
    config.policy.lora_alpha = 8.0
    config.judge.model.seed = 1
    config.judge.max_rubric_tokens = 1024
    config.judge.item_turn_tokens = 128
    config.judge.max_items = 4
    config.meta.interval = 2
    config.meta.num_samples = 2
    config.meta.analysis_tokens = 16
    config.meta.item_tokens = 12
    config.meta.max_items = 2
    config.data.batch_size = 4
    config.data.max_prompt_tokens = 256
    config.rollout.max_new_tokens = 16
    config.ppo.num_ppo_epochs = 1
    config.ppo.num_mini_batches = 2
    config.ppo.optimizer.learning_rate = 1e-3
    config.ppo.optimizer.total_updates = 4
    config.checkpoint.every = 1
    config.checkpoint.keep = 2
    config.log.progress = False
    return config
