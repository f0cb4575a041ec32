"""Flax NNX architectures and weight converters (installed as `mpo_jax.models`)."""

from mpo_jax.models.config import ModelConfig, RopeScaling, canonical_param_shapes

__all__ = ["ModelConfig", "RopeScaling", "canonical_param_shapes"]
