"""Evaluation of trained policies as in the MPO paper: test-split generation, pairwise-judge Elo
(K = 4, start 1000, both orders per pair, mean ± std over shuffled runs), Markdown tables and
rating plots, and the rubric-repair benchmark. The reference metrics (ROUGE, verdict and MATH
accuracy) are the tasks' own (`mpo_jax.tasks.metrics`). `mpo-jax eval` is
`cli.add_eval_arguments` / `cli.run_eval`.
"""

from mpo_jax.evaluation.cli import add_eval_arguments, run_eval
from mpo_jax.evaluation.elo import EloSummary, Match, elo_ratings, elo_update, expected_score, run_tournament
from mpo_jax.evaluation.generate import generate_split, load_policy_from_run, read_generations
from mpo_jax.evaluation.pairwise import Judgment, PairwiseJudge, Verdict, judge_all_pairs, position_consistency
from mpo_jax.evaluation.tables import Cell, plot_ratings, results_table

__all__ = [
    "Cell", "EloSummary", "Judgment", "Match", "PairwiseJudge", "Verdict", "add_eval_arguments", "elo_ratings",
    "elo_update", "expected_score", "generate_split", "judge_all_pairs", "load_policy_from_run", "plot_ratings",
    "position_consistency", "read_generations", "results_table", "run_eval", "run_tournament",
]
