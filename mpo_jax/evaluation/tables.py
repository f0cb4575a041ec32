"""Results tables in the paper's layout (rows = models, columns = metrics / Elo mean ± std) and a
PNG plot of Elo ratings with their spread across runs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo_jax.errors import FileFormatError, InvalidValueError, MissingDependencyError
from mpo_jax.evaluation.elo import EloSummary
from mpo_jax.train.report import markdown_text

ROUGE_COLUMNS = {"rouge1": "R-1", "rouge2": "R-2", "rougeL": "R-L", "rougeLsum": "R-Lsum"}
# Text made only of these characters cannot start Markdown syntax (intraword "_" is not emphasis).
_PLAIN = re.compile(r"[\w .,±()%/@=+-]*")


@dataclass(frozen=True)
class Cell:
    """A table entry: its text and the number that decides which entry of a column is best."""

    text: str
    value: float | None = None


def _md(text: str) -> str:
    """Names and headers as Markdown: plain ones as they are, anything else escaped."""
    text = " ".join(str(text).split())
    return text if _PLAIN.fullmatch(text) and not text.startswith(("-", "+")) else markdown_text(text)


def mean_std_text(mean: float, std: float, digits: int = 0) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def elo_cells(summary: EloSummary, column: str = "Elo") -> dict[str, dict[str, Cell]]:
    """{player: {column: "mean ± std"}} from a tournament summary."""
    mean, std = summary.mean, summary.std
    return {p: {column: Cell(mean_std_text(mean[p], std[p]), mean[p])} for p in summary.players}


def elo_cells_from_json(data: Mapping[str, Any], column: str = "Elo") -> dict[str, dict[str, Cell]]:
    """The same cells from a saved `EloSummary.to_json()` (elo.json)."""
    try:
        mean, std = data["mean"], data["std"]
        return {p: {column: Cell(mean_std_text(float(mean[p]), float(std[p])), float(mean[p]))} for p in mean}
    except (KeyError, TypeError, ValueError):
        raise FileFormatError("the Elo file must hold 'mean' and 'std' per player, as `mpo-jax eval elo` writes "
                              "elo.json") from None


def metric_cells(scores: Mapping[str, Any]) -> dict[str, Cell]:
    """Cells of one model's `score_rows` output: ROUGE F1 columns, or accuracy as "68.60 (3249/4736)"."""
    cells = {label: Cell(f"{float(scores[key]):.2f}", float(scores[key]))
             for key, label in ROUGE_COLUMNS.items() if key in scores}
    if "accuracy" in scores:
        accuracy = float(scores["accuracy"])
        cells["Accuracy"] = Cell(f"{accuracy:.2f} ({int(scores['correct'])}/{int(scores['total'])})", accuracy)
    return cells


def merge_cells(*tables: Mapping[str, Mapping[str, Cell]]) -> dict[str, dict[str, Cell]]:
    """Combine {model: {column: cell}} tables; models keep the order in which they first appear."""
    merged: dict[str, dict[str, Cell]] = {}
    for table in tables:
        for model, cells in table.items():
            merged.setdefault(model, {}).update(cells)
    return merged


def results_table(rows: Mapping[str, Mapping[str, Cell]], columns: Sequence[str] | None = None, *,
                  model_header: str = "Model", bold_best: bool = True) -> str:
    """A Markdown table; the highest value of each column is bold (every tie included)."""
    if not rows:
        raise InvalidValueError("a results table needs at least one model")
    if columns is None:
        columns = list(dict.fromkeys(c for cells in rows.values() for c in cells))
    best = {}
    for column in columns:
        values = [cells[column].value for cells in rows.values() if column in cells and
                  cells[column].value is not None]
        if bold_best and len(values) > 1:
            best[column] = max(values)
    lines = ["| " + " | ".join([_md(model_header)] + [_md(c) for c in columns]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for model, cells in rows.items():
        entries = [_md(model)]
        for column in columns:
            cell = cells.get(column)
            if cell is None:
                entries.append("–")
            elif column in best and cell.value == best[column]:
                entries.append(f"**{cell.text}**")
            else:
                entries.append(cell.text)
        lines.append("| " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


def plot_ratings(summary: EloSummary, path: str | os.PathLike[str], *, title: str = "Elo ratings") -> Path:
    """A bar chart of mean Elo per player (best first) with ± std error bars, as a PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingDependencyError(f"the ratings plot needs matplotlib ({err}); install it with "
                                     "`pip install 'matplotlib>=3.8'`") from err
    players = summary.ranking()
    mean, std = summary.mean, summary.std
    fig = Figure(figsize=(max(4.0, 1.2 * len(players) + 2.0), 3.6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    positions = range(len(players))
    ax.bar(positions, [mean[p] - summary.start for p in players], bottom=summary.start,
           yerr=[std[p] for p in players], capsize=4, color="#4c72b0")
    ax.axhline(summary.start, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(positions), players, rotation=20 if len(players) > 4 else 0, ha="right"
                  if len(players) > 4 else "center")
    ax.set_ylabel("Elo (mean ± std over runs)")
    ax.set_title(f"{title} ({summary.runs} runs × {summary.num_matches} matches, K = {summary.k:g})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


__all__ = ["ROUGE_COLUMNS", "Cell", "elo_cells", "elo_cells_from_json", "mean_std_text", "merge_cells",
           "metric_cells", "plot_ratings", "results_table"]
