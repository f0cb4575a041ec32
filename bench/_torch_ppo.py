"""The PyTorch side of the PPO benchmarks: TRL PPOTrainer's update (reference §D.2) written from the
same math as mpo-jax's `ppo_update`, and low-rank adapters for transformers' decoder layers.

`bench_ppo.py` uses the update with full fine-tuning and a separate critic trunk;
`bench_mpo_step.py` with LoRA adapters on the policy and a value head on the policy's own trunk
(mpo-jax's layout when `config.critic.name` is empty). The caller supplies the forward pass as
`outputs(idx) -> (logits, values)` at the response positions of the rows `idx`; everything else
(reward shaping, GAE, whitening, the clipped losses, gradient accumulation, global-norm clipping and
the optimizer steps) is here, so both benchmarks time the same PyTorch code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

INVALID_LOGPROB = 1.0  # TRL fills log-probs at padded positions with this, so differences there are 0


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    """The loss's hyper-parameters (mpo-jax's PPOConfig names; defaults are PPOConfig's)."""

    temperature: float = 0.7
    kl_coef: float = 0.05
    vf_coef: float = 0.1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    var = var * n / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def trunk_hidden(trunk: torch.nn.Module, t: Mapping[str, torch.Tensor], idx) -> torch.Tensor:
    """Final hidden states [b, R, D] at the positions that predict each response token of rows `idx`
    (the left-padded query followed by the response; padding masked out of attention)."""
    p_len = t["query"].shape[1]
    tokens = torch.cat([t["query"][idx], t["response"][idx]], 1).long()
    mask = torch.cat([t["query_mask"][idx], t["response_mask"][idx]], 1).long()
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = trunk(input_ids=tokens, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return hidden.last_hidden_state[:, p_len - 1:-1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens` (TRL divides by temperature + 1e-7)."""
    logits = logits / (temperature + 1e-7)
    return torch.gather(logits.log_softmax(-1), 2, tokens.long()[..., None])[..., 0]


def mini_batches(order: np.ndarray, num_mini_batches: int, accum: int) -> list[np.ndarray]:
    """One epoch's permutation split into [mini-batch][micro-batch] row indices."""
    return list(np.asarray(order).reshape(num_mini_batches, accum, -1))


def ppo_update(t: Mapping[str, torch.Tensor], orders: Sequence[np.ndarray],
               outputs: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, hyper: PPOHyper, *,
               num_mini_batches: int = 1, accum: int = 1) -> dict[str, float]:
    """TRL PPOTrainer's reward shaping, GAE, whitening and PPO epochs (reference §D.2).

    `t` holds the rollout batch (query, query_mask, response, response_mask, logprobs, ref_logprobs,
    values, scores); `orders` one row permutation per epoch (mpo-jax's, drawn from the same key);
    `outputs(idx)` the raw policy logits [b, R, V] and values [b, R] of rows `idx`. Returns the
    metrics averaged over all micro-batches, as mpo-jax's `ppo_update` reports them.
    """
    with torch.no_grad():
        response_mask = t["response_mask"]
        r = response_mask.shape[1]
        seq_len = response_mask.long().sum(1) - 1
        idxs = torch.arange(r)[None]
        padding = idxs > seq_len[:, None]
        padding_p1 = idxs > (seq_len + 1)[:, None]
        logprobs = t["logprobs"].masked_fill(padding, INVALID_LOGPROB)
        ref_logprobs = t["ref_logprobs"].masked_fill(padding, INVALID_LOGPROB)
        values = t["values"].masked_fill(padding_p1, 0.0)
        kl = -(ref_logprobs - logprobs)  # k1
        rewards = -hyper.kl_coef * kl
        end = torch.where(seq_len + 1 < r, seq_len + 1, seq_len)
        rewards[torch.arange(rewards.shape[0]), end] += t["scores"]
        lastgaelam, reversed_adv = 0.0, []
        for i in reversed(range(r)):
            next_values = values[:, i + 1] if i < r - 1 else 0.0
            delta = rewards[:, i] + hyper.gamma * next_values - values[:, i]
            lastgaelam = delta + hyper.gamma * hyper.lam * lastgaelam
            reversed_adv.append(lastgaelam)
        advantages = torch.stack(reversed_adv[::-1], 1)
        returns = advantages + values
        advantages = masked_whiten(advantages, (~padding).float()).masked_fill(padding, 0.0)

    sums: dict[str, float] = {}
    count = 0
    for order in orders:
        for mini in mini_batches(order, num_mini_batches, accum):
            for idx in mini:
                idx = torch.from_numpy(np.asarray(idx)).long()
                pol_mask, val_mask = (~padding[idx]).float(), (~padding_p1[idx]).float()
                raw_logits, raw_values = outputs(idx)
                logits = raw_logits / (hyper.temperature + 1e-7)
                new_logprobs = torch.gather(logits.log_softmax(-1), 2, t["response"][idx].long()[..., None])[..., 0]
                new_logprobs = new_logprobs.masked_fill(padding[idx], INVALID_LOGPROB)
                vpred = raw_values.masked_fill(padding_p1[idx], 0.0)
                mb_values, mb_returns, mb_adv = values[idx], returns[idx], advantages[idx]
                vclipped = torch.clamp(vpred, mb_values - hyper.cliprange_value, mb_values + hyper.cliprange_value)
                vf1, vf2 = (vpred - mb_returns) ** 2, (vclipped - mb_returns) ** 2
                vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), val_mask)
                diff = new_logprobs - logprobs[idx]
                ratio = torch.exp(diff)
                pg1 = -mb_adv * ratio
                pg2 = -mb_adv * torch.clamp(ratio, 1.0 - hyper.cliprange, 1.0 + hyper.cliprange)
                pg_loss = masked_mean(torch.max(pg1, pg2), pol_mask)
                loss = pg_loss + hyper.vf_coef * vf_loss
                (loss / accum).backward()
                with torch.no_grad():
                    probs = torch.softmax(logits, -1)
                    entropy = torch.logsumexp(logits, -1) - (probs * logits).sum(-1)
                    got = {"loss": loss, "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
                           "policy/entropy_avg": masked_mean(entropy, pol_mask),
                           "policy/approxkl_avg": 0.5 * (diff**2).mean(),
                           "policy/clipfrac_avg": masked_mean((pg2 > pg1).float(), pol_mask),
                           "val/clipfrac_avg": masked_mean((vf2 > vf1).float(), val_mask)}
                for k, v in got.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                count += 1
            norm = torch.nn.utils.clip_grad_norm_(params, hyper.max_grad_norm)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(norm) * accum
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {k: v / count for k, v in sums.items()}


# -- low-rank adapters ---------------------------------------------------------------------------------
class LoRALinear(torch.nn.Module):
    """`base(x) + scale * (x @ A) @ B` (mpo-jax's adapter: A [in, r], B [r, out], scale = alpha / r)."""

    def __init__(self, base: torch.nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Parameter(torch.from_numpy(np.array(a, np.float32)))
        self.lora_b = torch.nn.Parameter(torch.from_numpy(np.array(b, np.float32)))
        self.scale = scale
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + self.scale * ((x @ self.lora_a) @ self.lora_b)
        return y


def add_lora(model: torch.nn.Module, adapters: Mapping[str, np.ndarray], scale: float) -> list[LoRALinear]:
    """Freeze `model` and wrap each attention projection named in `adapters` with a `LoRALinear`.

    `adapters` maps "{q,k,v,o}_proj_lora_{a,b}" to mpo-jax's stacked arrays ([L, in, r] / [L, r, out]).
    """
    model.requires_grad_(False)
    targets = sorted({name.rsplit("_lora_", 1)[0] for name in adapters})
    wrapped = []
    for i, layer in enumerate(model.model.layers):
        for target in targets:
            module = LoRALinear(getattr(layer.self_attn, target), adapters[f"{target}_lora_a"][i],
                                adapters[f"{target}_lora_b"][i], scale)
            setattr(layer.self_attn, target, module)
            wrapped.append(module)
    return wrapped


@contextlib.contextmanager
def adapters_off(modules: Sequence[LoRALinear]) -> Iterator[None]:
    """The base model (the PPO reference policy), as PEFT's `disable_adapter()`."""
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True
