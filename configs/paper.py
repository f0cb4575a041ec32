"""The paper's setups (MPO and its fixed-rubric baselines), one config file with named variants.

    mpo-jax train --config configs/paper.py:essay_mpo --config.mesh="(1, 4, 1)"
    mpo-jax train --config configs/paper.py:essay_ppo_expert         # fixed expert rubric
    mpo-jax train --config configs/paper.py:math_grpo_mpo             # GRPO variant

Variant = "{task}_{algorithm}_{rubric}" with task in essay / summarization / ethics / math,
algorithm ppo / grpo, rubric mpo (iter0 rubric evolved by the meta step) / iter0 / expert (fixed).
Policy: Qwen2-1.5B-Instruct, LoRA r=64 alpha=128 on q/k/v/o/gate/up/down and lm_head (the
original's target modules), a separate full critic (TRL's value model); judge and meta model:
Qwen2.5-72B-Instruct (a 7B/32B judge is one override away: --config.judge.model.name=...).
Hyper-parameters follow the published launch scripts (lr 3e-6, kl 0.02, missing-EOS penalty 1.0,
4 PPO epochs, batch 64, temperature 0.7).

Updates per task are those the paper's meta-step counts imply at its intervals: essay 407
(26,013 prompts / 64; 40 meta steps at interval 10), summarization 580 (29 at interval 20),
ethics 203 (13K / 64; 20 at interval 10), math 118 (7,500 / 64, interval 30). No meta step runs
after the last update (no update would use its rubric), so summarization's 29th, at update 580, is
skipped. Summarization prompts over 4,000 tokens are filtered out, as in the original.

The judge follows the published protocol: per rubric item a rationale of up to 300 tokens (the
original's max_tokens), then an integer score (`judge.mode = "generate"`). The documented fast
option is `--config.judge.mode=logits`: per item the expected score under the next-token
distribution where the score would be written, with no rationale and no decoding. The meta
model's budgets are the original's: 2,000 tokens per meta-analysis and 500 per generated
criterion; the judge's rubric length and item count derive from them.

Model paths are local folders (Hugging Face checkpoints: config.json + safetensors); on a TPU VM
download them once (`huggingface-cli download Qwen/Qwen2-1.5B-Instruct --local-dir ...`) or point
them at a mounted bucket. Meshes (data, fsdp, tensor), by slice, from `mpo-jax plan` (every program
compiled for the slice on a CPU host; docs/tpu.md, "Planning a run"), not run on hardware:
  v5p-64 (32 chips): (2, 4, 4)  72B judge and MRM local: the judge's programs compile (~52 GiB of 95.74 per chip)
  v5e-16 (16 chips): (1, 8, 2)  the policy side fits; the 72B judge and MRM do not (use a 7B/32B or remote judge)
  v4-8  (4 chips):  (1, 4, 1)  policy/critic fsdp; a 72B judge does not fit (not yet planned: run mpo-jax plan)
These configs are untested at full scale: this repository's CI runs on a 2-core CPU.
"""

from mpo_jax.train.config import default_config

TASKS = {  # task -> (meta interval, updates, response tokens, max prompt tokens)
    "essay": (10, 407, 400, 256),
    "summarization": (20, 580, 400, 4000),
    "ethics": (10, 203, 400, 1024),
    "math": (30, 118, 1000, 512),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
MODELS = "/models"  # override: --config.policy.name=... etc.


def get_config(variant: str = "essay_ppo_mpo"):
    parts = variant.split("_")
    if len(parts) == 2:  # "essay_mpo" = "essay_ppo_mpo"
        parts = [parts[0], "ppo", parts[1]]
    if len(parts) != 3 or parts[0] not in TASKS or parts[1] not in ("ppo", "grpo") or \
            parts[2] not in ("mpo", "iter0", "expert"):
        raise ValueError(f"unknown paper variant {variant!r}: use {{task}}_{{ppo|grpo}}_{{mpo|iter0|expert}} with "
                         f"task in {', '.join(TASKS)} (e.g. essay_ppo_mpo)")
    task, algorithm, rubric = parts
    interval, updates, response_tokens, prompt_tokens = TASKS[task]
    config = default_config()
    config.run_dir = f"runs/paper_{variant}"
    config.task = task
    config.algorithm = algorithm
    config.seed = 42
    config.num_updates = updates
    config.mesh = (1, 4, 1)

    config.policy.name = f"{MODELS}/Qwen2-1.5B-Instruct"
    config.policy.dtype = "bfloat16"
    config.policy.lora_rank = 64
    config.policy.lora_alpha = 128.0
    config.policy.lora_targets = LORA_TARGETS
    config.critic.name = f"{MODELS}/Qwen2-1.5B-Instruct" if algorithm == "ppo" else ""
    config.critic.dtype = "bfloat16"
    config.judge.model.name = f"{MODELS}/Qwen2.5-72B-Instruct"
    config.judge.model.dtype = "bfloat16"
    config.judge.mode = "generate"  # the published protocol; "logits" is the fast option
    config.judge.rationale_tokens = 300  # the original's max_tokens per rationale
    config.judge.initial_rubric = "iter0" if rubric in ("mpo", "iter0") else "expert"
    config.meta.enabled = rubric == "mpo"
    config.meta.interval = interval
    config.meta.num_samples = 16
    config.meta.model.name = ""  # the judge's model
    config.meta.analysis_tokens = 2000
    config.meta.item_tokens = 500

    config.data.batch_size = 64 if algorithm == "ppo" else 8
    config.data.max_prompt_tokens = prompt_tokens
    config.rollout.max_new_tokens = response_tokens
    ppo = config.ppo
    ppo.num_ppo_epochs, ppo.kl_coef, ppo.missing_eos_penalty, ppo.temperature = 4, 0.02, 1.0, 0.7
    ppo.gradient_accumulation_steps = 8
    ppo.optimizer.learning_rate = 3e-6
    ppo.optimizer.total_updates = config.num_updates
    grpo = config.grpo
    grpo.group_size, grpo.beta, grpo.temperature = 8, 0.04, 0.9
    grpo.gradient_accumulation_steps = 8
    grpo.optimizer.learning_rate = 3e-6
    grpo.optimizer.total_updates = config.num_updates
    config.checkpoint.every = 20
    return config
