"""Sequential online Elo over pairwise match results, averaged over shuffled match orders.

MPO reports Elo as in its `elo_simulation.py` (reference §G.2): every player starts at 1000,
each match moves both ratings by `K * (S - E)` with K = 4, and matches are applied one after the
other (an online update, not a Bradley-Terry fit). Because the final ratings depend on the order
of the matches, the evaluation repeats the tournament over several shuffled orders and reports
the mean and the population standard deviation across runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpo_jax.errors import InvalidValueError

DEFAULT_K = 4.0
DEFAULT_START = 1000.0
DEFAULT_RUNS = 5


@dataclass(frozen=True)
class Match:
    """One decided comparison: `score_a` is 1 when `a` won, 0 when `b` won, 0.5 for a draw."""

    a: str
    b: str
    score_a: float

    def __post_init__(self) -> None:
        if not isinstance(self.a, str) or not isinstance(self.b, str) or not self.a or not self.b:
            raise ValueError(f"match players must be non-empty names, got {self.a!r} and {self.b!r}")
        if self.a == self.b:
            raise ValueError(f"a match needs two different players, got {self.a!r} twice")
        score = float(self.score_a)
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score_a must be in [0, 1] (1 = a won, 0 = b won), got {self.score_a!r}")
        object.__setattr__(self, "score_a", score)


@dataclass(frozen=True)
class EloSummary:
    """Final ratings of every run, with their mean and population standard deviation."""

    players: tuple[str, ...]
    per_run: tuple[Mapping[str, float], ...]
    k: float
    start: float
    num_matches: int

    @property
    def runs(self) -> int:
        return len(self.per_run)

    @property
    def mean(self) -> dict[str, float]:
        return {p: float(np.mean([run[p] for run in self.per_run])) for p in self.players}

    @property
    def std(self) -> dict[str, float]:
        """Population std (ddof 0) across runs, as the paper reports it."""
        return {p: float(np.std([run[p] for run in self.per_run])) for p in self.players}

    def ranking(self) -> list[str]:
        """Players from the highest mean rating down (ties by name)."""
        mean = self.mean
        return sorted(self.players, key=lambda p: (-mean[p], p))

    def to_json(self) -> dict[str, Any]:
        return {"players": list(self.players), "mean": self.mean, "std": self.std, "k": self.k,
                "start": self.start, "runs": self.runs, "matches_per_run": self.num_matches,
                "per_run": [dict(run) for run in self.per_run]}


def expected_score(ra: float, rb: float) -> float:
    """Probability that a player rated `ra` beats one rated `rb` under the Elo model."""
    return 1.0 / (1.0 + 10.0 ** ((rb - ra) / 400.0))


def elo_update(ra: float, rb: float, score_a: float, k: float = DEFAULT_K) -> tuple[float, float]:
    """Ratings of a and b after one match in which a scored `score_a` (1 win, 0.5 draw, 0 loss)."""
    if not 0.0 <= score_a <= 1.0:
        raise InvalidValueError(f"score_a must be in [0, 1], got {score_a!r}")
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        raise InvalidValueError(f"k must be a positive number, got {k!r}")
    ea = expected_score(ra, rb)
    eb = 1.0 - ea
    return ra + k * (score_a - ea), rb + k * ((1.0 - score_a) - eb)


def _player_names(players: Iterable[str], matches: Sequence[Match]) -> tuple[str, ...]:
    names = tuple(players)
    if len(set(names)) != len(names):
        raise InvalidValueError(f"player names must be unique, got {list(names)}")
    known = set(names)
    for index, match in enumerate(matches):
        for name in (match.a, match.b):
            if name not in known:
                raise InvalidValueError(f"match #{index} names player {name!r}, who is not among the players "
                                        f"{sorted(known)}; add it to the players")
    return names


def run_tournament(players: Iterable[str], matches: Sequence[Match], *, k: float = DEFAULT_K,
                   start: float = DEFAULT_START) -> dict[str, float]:
    """Final ratings after applying `matches` in the given order, every player starting at `start`."""
    names = _player_names(players, matches)
    ratings = {name: float(start) for name in names}
    for match in matches:
        ratings[match.a], ratings[match.b] = elo_update(ratings[match.a], ratings[match.b], match.score_a, k)
    return ratings


def elo_ratings(results: Sequence[Match], *, runs: int = DEFAULT_RUNS, seed: int = 0, k: float = DEFAULT_K,
                start: float = DEFAULT_START, players: Iterable[str] | None = None) -> EloSummary:
    """`runs` tournaments over the same matches, each in its own random order (from `seed`, run)."""
    if not isinstance(runs, int) or runs < 1:
        raise InvalidValueError(f"runs must be a positive integer, got {runs!r}")
    results = list(results)
    if not results:
        raise InvalidValueError("no match results to rate; judge some pairs first")
    if players is None:
        players = sorted({m.a for m in results} | {m.b for m in results})
    names = _player_names(players, results)
    per_run = []
    for run in range(runs):
        order = np.random.default_rng([seed, run]).permutation(len(results))
        per_run.append(run_tournament(names, [results[i] for i in order], k=k, start=start))
    return EloSummary(players=names, per_run=tuple(per_run), k=float(k), start=float(start),
                      num_matches=len(results))


__all__ = ["DEFAULT_K", "DEFAULT_RUNS", "DEFAULT_START", "EloSummary", "Match", "elo_ratings", "elo_update",
           "expected_score", "run_tournament"]
