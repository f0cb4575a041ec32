"""Training runs: the MPO loop and everything a run directory holds.

- `config`: `TrainConfig` from `ml_collections` config files and `--config.*` overrides
- `trainer`: `Trainer`, the MPO loop (sample, judge, PPO/GRPO update, meta step, checkpoints)
- `rollout`: policy samples as fixed-shape query/response arrays
- `model_specs`: builds the policy, critic, judge and meta models from their specs
- `run_dir`: the run directory's layout, finding a run (local or `checkpoint.directory`), restoring its policy
- `checkpoint`: `Checkpointer` (orbax, checksummed, falls back past corrupt checkpoints) and `PreemptionGuard`;
  `distributed`: multi-host set-up
- `evaluator`: `TrainingEvaluator`, the in-training evaluation on held-out prompts
- `metrics`: `MetricsWriter` (metrics.jsonl, TensorBoard); `report_data`, `report_plots`, `report`: reading a
  run, its plots, and the rendered report
- `export`: a trained policy as a Hugging Face checkpoint (`mpo-jax export`)
"""
