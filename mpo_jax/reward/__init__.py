"""The reward side of MPO: the judge that scores responses under a rubric, and the meta-reward
model that rewrites the rubric.

- `judge`, `judge_engine`: `Judge` (logits and generate protocols) and its jitted pieces
- `meta`: `MetaRewardModel.meta_step` (analyse, refine, merge, validate); `sense_check`: pure
  checks on the criteria it writes
- `rubric_history`: `RubricHistory`, every rubric version and rejected proposal of a run
- `hacks`: code-made reward hacks and detectors for them (pure functions)
- `offline`: the judge and one meta step on JSONL files (`mpo-jax score`, `mpo-jax meta`)

The rubric value itself (`Rubric`, parsing, limits, scales) is `mpo_jax.rubric`, below both the
tasks and this package.
"""
