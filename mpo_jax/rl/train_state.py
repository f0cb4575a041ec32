"""Training state for the policy (and critic): trainable / frozen parameter split and optax.

Only trainable parameters get optimizer state. With LoRA the trainable set is the adapters (and
a value head if the critic shares the policy trunk); the reference policy is then the same
weights with adapters switched off, so no second copy is kept. With full fine-tuning the
reference is a frozen copy of the initial policy parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from mpo_jax.errors import InvalidValueError
from mpo_jax.models.transformer import LoRAParam
from mpo_jax.rl.config import OptimizerConfig


@struct.dataclass
class Role:
    """One network: how to rebuild it (static) and its frozen parameters."""

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    frozen: nnx.State

    def merge(self, trainable: nnx.State):
        return nnx.merge(self.graphdef, trainable, self.frozen)


@struct.dataclass
class TrainState:
    step: jax.Array  # updates done (the learning-rate schedule counts these, as TRL does)
    params: dict[str, nnx.State]  # trainable: {"policy": ..., "critic": ...} (critic absent if shared)
    opt_state: optax.OptState
    policy: Role
    critic: Role | None
    ref_params: nnx.State | None  # full fine-tuning: the initial trainable policy params
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @property
    def uses_lora(self) -> bool:
        return self.ref_params is None


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW behind global-norm clipping; the learning rate is a hyper-parameter set per update.

    The hyper-parameters and the first moment are float32 whatever the parameters' dtype: optax
    would otherwise keep the hyper-parameters in bf16 for bf16 parameters, where b2 = 0.999 rounds
    to 1.0 and the per-update learning rate (float32) would change the state's types after the
    first update. The second moment keeps the parameters' dtype.
    """
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mu_dtype",), hyperparam_dtype=jnp.float32)(
        learning_rate=config.learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mu_dtype=jnp.float32)
    if config.max_grad_norm is None:
        return optax.chain(optax.identity(), adamw)
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


def learning_rate(config: OptimizerConfig, update: jax.Array) -> jax.Array:
    """TRL's schedule: linear decay from the base rate to 0 over total_updates, stepped per update."""
    if config.schedule == "constant":
        return jnp.asarray(config.learning_rate, jnp.float32)
    frac = 1.0 - update.astype(jnp.float32) / config.total_updates
    return config.learning_rate * jnp.clip(frac, 0.0, 1.0)


def with_learning_rate(opt_state: optax.OptState, lr: jax.Array) -> optax.OptState:
    adam_state = opt_state[1]
    hyper = dict(adam_state.hyperparams, learning_rate=lr)
    return (opt_state[0], adam_state._replace(hyperparams=hyper))


def split_role(graphdef: nnx.GraphDef, params: nnx.State, *, lora: bool) -> tuple[Role, nnx.State]:
    """(frozen role, trainable params) for a model given as graph definition + full state."""
    model = nnx.merge(graphdef, params)
    trainable_filter = nnx.Any(LoRAParam, nnx.PathContains("value_head")) if lora else nnx.Param
    graph, trainable, frozen = nnx.split(model, trainable_filter, ...)
    return Role(graphdef=graph, frozen=frozen), trainable


def create_train_state(policy: Any, critic: Any | None, config: OptimizerConfig, *,
                       needs_values: bool = True, abstract: bool = False) -> TrainState:
    """Build the state from `LanguageModel`s (policy; critic with a value head, or None).

    LoRA is used when the policy's config has `lora_rank > 0`. With `critic=None` and
    `needs_values` (PPO) the policy itself must have a value head (a critic sharing the policy
    trunk); GRPO passes `needs_values=False`. `abstract=True` takes models whose parameters are
    `jax.ShapeDtypeStruct`s (`mpo_jax.plan`) and allocates nothing: the optimizer state comes from
    `jax.eval_shape`, its moments carrying their parameters' shardings as the real ones do.
    """
    lora = policy.config.lora_rank > 0
    if critic is None and needs_values and not policy.config.value_head:
        raise InvalidValueError("without a separate critic the policy needs a value head: "
                                "load it with value_head=True, or pass a critic model")
    if critic is not None and not critic.config.value_head:
        raise InvalidValueError("the critic needs a value head: load it with value_head=True")
    policy_role, policy_params = split_role(policy.graphdef, policy.params, lora=lora)
    params = {"policy": policy_params}
    critic_role = None
    if critic is not None:
        critic_role, params["critic"] = split_role(critic.graphdef, critic.params, lora=critic.config.lora_rank > 0)
    tx = make_optimizer(config)
    if abstract:
        step, opt_state = jax.ShapeDtypeStruct((), jnp.int32), abstract_opt_state(tx, params)
        ref = None if lora else policy_params  # shape-only: the copy is the same description
    else:
        step, opt_state = jnp.zeros((), jnp.int32), tx.init(params)
        ref = None if lora else jax.tree.map(jnp.copy, policy_params)
    return TrainState(step=step, params=params, opt_state=opt_state, policy=policy_role,
                      critic=critic_role, ref_params=ref, tx=tx)


def abstract_opt_state(tx: optax.GradientTransformation, params: Any) -> optax.OptState:
    """`tx.init(params)` as shapes: moments sharded like their parameters (as `zeros_like` of a
    sharded array is), everything else (counters, hyper-parameters) without a sharding (replicated)."""
    shapes = jax.eval_shape(tx.init, params)
    tree = jax.tree.structure(params)

    def like_params(node: Any) -> Any:
        if jax.tree.structure(node) != tree:  # a counter or hyper-parameter
            return node
        return jax.tree.map(lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(p, "sharding", None)),
                            node, params)

    return jax.tree.map(like_params, shapes, is_leaf=lambda node: jax.tree.structure(node) == tree)
