"""mpo-jax: Meta Policy Optimization (evolving-rubric RLAIF) in JAX/Flax.

The LM engine is exposed here: `load_model` returns a `LanguageModel` (config, tokenizer,
parameters, `logits`, `generate`, multi-turn `chat`), built on the Flax NNX decoder in
`mpo_jax.models` and the jitted sampler in `mpo_jax.sampling`.
"""

from mpo_jax.judge import Judge, JudgeResult
from mpo_jax.language_model import Conversation, LanguageModel, from_random, load_model
from mpo_jax.meta import MetaResult, MetaRewardModel, MetaSample
from mpo_jax.models.config import ModelConfig, RopeScaling
from mpo_jax.presets import DEFAULT_MODEL, PRESETS
from mpo_jax.rubric import Rubric, RubricHistory
from mpo_jax.sampling import SampleOutput, SamplingParams
from mpo_jax.sharding import make_mesh
from mpo_jax.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "PRESETS", "Conversation", "Judge", "JudgeResult", "LanguageModel", "MetaResult",
    "MetaRewardModel", "MetaSample", "ModelConfig", "RopeScaling", "Rubric", "RubricHistory", "SampleOutput",
    "SamplingParams", "Tokenizer", "from_random", "load_model", "make_mesh",
]
