"""The CPU demo: SmolLM2-135M-Instruct as policy (LoRA + value head), judge and meta model, essay task.

    make demo            # or: mpo-jax train --config configs/demo_cpu.py

Sized for a 2-core CPU (about 10-15 minutes, most of it compiling): 6 updates of 4 prompts, a meta step
every 2 updates. A 135M judge barely discriminates between essays, so the scores and the rubrics
it writes show the machinery, not MPO's effect; the paper's setups (configs/paper.py) use
judges of 7B and more.
"""

from mpo_jax.train.config import default_config


def get_config():
    config = default_config()
    config.run_dir = "runs/demo_cpu"
    config.task = "essay"
    config.num_updates = 6
    config.policy.name = "smollm2-135m-instruct"
    config.policy.lora_rank = 16
    config.policy.lora_alpha = 32.0
    config.judge.model.name = "smollm2-135m-instruct"
    config.judge.initial_rubric = "iter0"
    config.meta.interval = 2
    config.meta.num_samples = 2
    config.meta.analysis_tokens = 96
    config.meta.analysis_words = 80
    config.meta.item_tokens = 48
    config.meta.item_words = 40
    config.meta.max_items = 3
    config.meta.merge_words = 400
    config.data.batch_size = 4
    config.data.max_prompt_tokens = 128
    config.rollout.max_new_tokens = 64
    config.ppo.num_ppo_epochs = 1
    config.ppo.num_mini_batches = 1
    config.ppo.optimizer.learning_rate = 5e-5
    config.ppo.optimizer.total_updates = 6
    config.checkpoint.every = 2
    config.checkpoint.keep = 2
    return config
