"""Evaluation of trained policies as in the MPO paper: test-split generation, pairwise-judge Elo
(K = 4, start 1000, both orders per pair, mean ± std over shuffled runs), ROUGE, verdict and MATH
accuracy, Markdown tables and rating plots. `mpo-jax eval` is `cli.add_eval_arguments` /
`cli.run_eval`.
"""

from mpo_jax.evaluation.cli import add_eval_arguments, run_eval
from mpo_jax.evaluation.elo import EloSummary, Match, elo_ratings, elo_update, expected_score, run_tournament
from mpo_jax.evaluation.generate import generate_split, load_policy_from_run, read_generations
from mpo_jax.evaluation.metrics import (
    AccuracyResult,
    RougeResult,
    math_accuracy,
    predict_verdict,
    rouge_scores,
    score_generations,
    verdict_accuracy,
)
from mpo_jax.evaluation.pairwise import Judgment, PairwiseJudge, Verdict, judge_all_pairs, position_consistency
from mpo_jax.evaluation.tables import Cell, plot_ratings, results_table

__all__ = [
    "AccuracyResult", "Cell", "EloSummary", "Judgment", "Match", "PairwiseJudge", "RougeResult", "Verdict",
    "add_eval_arguments", "elo_ratings", "elo_update", "expected_score", "generate_split", "judge_all_pairs",
    "load_policy_from_run", "math_accuracy", "plot_ratings", "position_consistency", "predict_verdict",
    "read_generations", "results_table", "rouge_scores", "run_eval", "run_tournament", "score_generations",
    "verdict_accuracy",
]
