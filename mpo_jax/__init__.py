"""mpo-jax: Meta Policy Optimization (evolving-rubric RLAIF) in JAX/Flax.

The LM engine is exposed here: `load_model` returns a `LanguageModel` (config, tokenizer,
parameters, `logits`, `generate`, multi-turn `chat`), built on the Flax NNX decoder in
`mpo_jax.models` and the jitted sampler in `mpo_jax.engine.sampling`.
"""

from mpo_jax.engine.language_model import Conversation, LanguageModel, from_random, load_model
from mpo_jax.engine.presets import DEFAULT_MODEL, PRESETS
from mpo_jax.engine.sampling import SampleOutput, SamplingParams
from mpo_jax.engine.sharding import make_mesh
from mpo_jax.engine.tokenizer import Tokenizer
from mpo_jax.models.config import ModelConfig, RopeScaling
from mpo_jax.reward.judge import Judge, JudgeResult
from mpo_jax.reward.meta import MetaResult, MetaRewardModel, MetaSample
from mpo_jax.reward.rubric_history import RubricHistory
from mpo_jax.rubric import Rubric

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "PRESETS", "Conversation", "Judge", "JudgeResult", "LanguageModel", "MetaResult",
    "MetaRewardModel", "MetaSample", "ModelConfig", "RopeScaling", "Rubric", "RubricHistory", "SampleOutput",
    "SamplingParams", "Tokenizer", "from_random", "load_model", "make_mesh",
]
