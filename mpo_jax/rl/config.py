"""Frozen, validated configuration of the policy-gradient updates (defaults follow TRL's PPO)."""

from __future__ import annotations

import dataclasses

from mpo_jax.errors import InvalidValueError
from mpo_jax.rl.kl import ESTIMATORS
from mpo_jax.rl.rewards import SCORE_POSITIONS


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise InvalidValueError(f"config key {key!r} {message}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-6
    schedule: str = "linear"  # "linear": decay to 0 over total_updates (stepped per update, as TRL), "constant"
    total_updates: int = 1000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
        _check(self.schedule in ("linear", "constant"), "optimizer.schedule", "must be 'linear' or 'constant'")
        _check(self.total_updates >= 1, "optimizer.total_updates", "must be >= 1")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "optimizer.max_grad_norm",
               "must be > 0 or None")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """One `ppo_update`: num_ppo_epochs passes over the rollout batch, each split into
    num_mini_batches optimizer steps, each accumulated over gradient_accumulation_steps
    micro-batches."""

    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    score_position: str = "after_last_token"
    temperature: float = 0.7
    on_nonfinite: str = "skip"  # "skip": keep the old parameters for that step; "raise": stop the run
    optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self) -> None:
        for name in ("num_ppo_epochs", "num_mini_batches", "gradient_accumulation_steps"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.kl_estimator in ESTIMATORS, "kl_estimator", f"must be one of {ESTIMATORS}")
        _check(self.score_position in SCORE_POSITIONS, "score_position", f"must be one of {SCORE_POSITIONS}")
        _check(self.on_nonfinite in ("skip", "raise"), "on_nonfinite", "must be 'skip' or 'raise'")
        _check(self.temperature > 0, "temperature", "must be > 0 (it divides the logits)")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma/lam", "must be in [0, 1]")

    def micro_batches_per_update(self) -> int:
        return self.num_mini_batches * self.gradient_accumulation_steps

    def check_batch_size(self, batch_size: int) -> None:
        per = self.micro_batches_per_update()
        if batch_size % per:
            raise InvalidValueError(f"batch size {batch_size} must be divisible by num_mini_batches x "
                                    f"gradient_accumulation_steps = {per}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO (TRL 0.17 semantics): group-normalised advantages, no critic, KL in the loss."""

    group_size: int = 8
    num_iterations: int = 1
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    cliprange: float = 0.2
    cliprange_high: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    loss_type: str = "grpo"
    scale_rewards: bool = True
    temperature: float = 0.9
    on_nonfinite: str = "skip"
    optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self) -> None:
        _check(self.group_size >= 2, "group_size", "must be >= 2 (advantages compare samples of one prompt)")
        _check(self.loss_type in ("grpo", "bnpo", "dr_grpo"), "loss_type", "must be grpo, bnpo or dr_grpo")
        _check(self.kl_estimator in ESTIMATORS, "kl_estimator", f"must be one of {ESTIMATORS}")
        _check(self.on_nonfinite in ("skip", "raise"), "on_nonfinite", "must be 'skip' or 'raise'")
        _check(self.temperature > 0, "temperature", "must be > 0")

    @property
    def num_ppo_epochs(self) -> int:
        return self.num_iterations

    def micro_batches_per_update(self) -> int:
        return self.num_mini_batches * self.gradient_accumulation_steps

    def check_batch_size(self, batch_size: int) -> None:
        per = self.micro_batches_per_update()
        if batch_size % per or batch_size % self.group_size:
            raise InvalidValueError(f"batch size {batch_size} must be divisible by group_size ({self.group_size}) and "
                                    f"by num_mini_batches x gradient_accumulation_steps = {per}")

