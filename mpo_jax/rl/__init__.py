"""Policy-gradient updates (PPO as in TRL, and GRPO) as pure functions over a device mesh."""

from mpo_jax.rl.batch import RolloutBatch
from mpo_jax.rl.compiled import check_finite, compile_rollout_stats, compile_update, place_batch, place_state
from mpo_jax.rl.config import GRPOConfig, OptimizerConfig, PPOConfig
from mpo_jax.rl.grpo import make_grpo_update
from mpo_jax.rl.ppo import make_ppo_update, make_rollout_stats
from mpo_jax.rl.train_state import TrainState, create_train_state

__all__ = ["GRPOConfig", "OptimizerConfig", "PPOConfig", "RolloutBatch", "TrainState", "check_finite",
           "compile_rollout_stats", "compile_update", "create_train_state", "make_grpo_update", "make_ppo_update",
           "make_rollout_stats", "place_batch", "place_state"]
