"""Fixed-rubric PPO against MPO on the essay task at CPU scale (docs/results/reward_hacking.md).

    mpo-jax train --config configs/experiments/reward_hacking.py:ppo_iter0
    mpo-jax train --config configs/experiments/reward_hacking.py:ppo_expert
    mpo-jax train --config configs/experiments/reward_hacking.py:mpo_iter0
    # a second seed: --config.seed=1 --config.run_dir=runs/reward_hacking/<arm>_seed1

The final comparison (the paper's): held-out test prompts for every arm and the base policy, a
pairwise Elo tournament by the independent judge (both orders of every pair), detector rates and
lengths, then the arms side by side over training:

    for arm in ppo_iter0 ppo_expert mpo_iter0; do
      mpo-jax eval generate --model runs/reward_hacking/$arm --task essay --limit 16 --max-new-tokens 160 \
        --out runs/reward_hacking/gen/$arm.jsonl
    done
    mpo-jax eval generate --model smollm2-135m-instruct --task essay --limit 16 --max-new-tokens 160 \
      --out runs/reward_hacking/gen/base.jsonl
    mpo-jax eval elo runs/reward_hacking/gen/*.jsonl --judge qwen2.5-coder-1.5b-instruct \
      --out runs/reward_hacking/elo
    mpo-jax eval score runs/reward_hacking/gen/*.jsonl --elo runs/reward_hacking/elo/elo.json \
      --out runs/reward_hacking/final_table.md
    mpo-jax eval compare runs/reward_hacking/ppo_iter0 runs/reward_hacking/ppo_expert \
      runs/reward_hacking/mpo_iter0 --out docs/results/reward_hacking

Arms share the seed, the update budget, the data order and the held-out evaluation; they differ
only in the rubric (fixed iter0, fixed expert, or iter0 rewritten by the meta step). Each arm is
resumable: rerun the same command after an interruption and it continues from its last
checkpoint (every 2 updates).

Models: policy SmolLM2-135M-Instruct (LoRA r=16 and a value head); training judge
Qwen2.5-Coder-0.5B-Instruct in logits mode with the fenced prompt; meta-reward model
Qwen2.5-Coder-1.5B-Instruct, every 10 updates; independent evaluation judge
Qwen2.5-Coder-1.5B-Instruct with the oracle rubric, which training never sees (the meta model and
the evaluation judge share one loaded copy). Downloads: `make models-1.5b` (1.1 GB) and the 0.5B
parts that `make test-slow` installs (491 MB).

The 0.5B model as meta model was tried first and dropped: its first rubric (update 5) was one
criterion whose score levels alternate "Write a well-developed story." and "... essay."
(docs/results/reward_hacking.md).

Optimisation pressure is high on purpose (learning rate 1e-4 on the adapters, KL coefficient
0.01, responses up to 160 tokens) so that a fixed rubric's loopholes show within ~40 updates.
"""

from mpo_jax.train.config import default_config

ARMS = {  # arm -> (initial rubric, meta steps on)
    "ppo_iter0": ("iter0", False),
    "ppo_expert": ("expert", False),
    "mpo_iter0": ("iter0", True),
}
JUDGE = "qwen2.5-coder-0.5b-instruct"
META = "qwen2.5-coder-1.5b-instruct"
EVAL_JUDGE = "qwen2.5-coder-1.5b-instruct"


def get_config(arm: str = "mpo_iter0"):
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    rubric, meta = ARMS[arm]
    config = default_config()
    config.run_dir = f"runs/reward_hacking/{arm}"
    config.task = "essay"
    config.seed = 0
    config.num_updates = 40

    config.policy.name = "smollm2-135m-instruct"
    config.policy.lora_rank = 16
    config.policy.lora_alpha = 32.0

    config.judge.model.name = JUDGE
    config.judge.mode = "logits"
    config.judge.fence = True
    config.judge.initial_rubric = rubric

    config.meta.enabled = meta
    config.meta.model.name = META
    config.meta.interval = 10
    config.meta.num_samples = 8
    config.meta.analysis_tokens = 256
    config.meta.analysis_words = 150
    config.meta.item_tokens = 160
    config.meta.item_words = 100
    config.meta.max_items = 5
    config.meta.merge_words = 3000

    config.data.batch_size = 8
    config.data.max_prompt_tokens = 128
    config.rollout.max_new_tokens = 160

    ppo = config.ppo
    ppo.num_ppo_epochs = 2
    ppo.num_mini_batches = 2
    ppo.kl_coef = 0.01
    ppo.optimizer.learning_rate = 1e-4
    ppo.optimizer.total_updates = config.num_updates

    config.eval.every = 5
    config.eval.num_prompts = 8
    config.eval.max_new_tokens = 160
    config.eval.judge.name = EVAL_JUDGE
    config.eval.judge_rubric = "oracle"

    config.checkpoint.every = 2
    config.checkpoint.keep = 2
    return config
