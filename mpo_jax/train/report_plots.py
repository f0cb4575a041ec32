"""The report's plots: one PNG per metric group, with the updates of meta steps marked.

A solid red line marks an update where a new rubric was accepted, a dotted grey line one where a
meta step ran and kept the rubric, so a change in the score or the KL can be read against the
rubric that caused it. Plots with no data are not written (and a stale one is removed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpo_jax.errors import MissingDependencyError
from mpo_jax.train.report_data import MetaMarkers, RunData, meta_markers, metric_series

__all__ = ["PLOTS", "PlotSpec", "draw_markers", "write_plots"]


@dataclass(frozen=True)
class PlotSpec:
    """One PNG: the metrics drawn on the left axis and, optionally, on a right axis."""

    name: str
    title: str
    left: tuple[str, ...]
    left_label: str
    right: tuple[str, ...] = ()
    right_label: str = ""
    band: tuple[str, str] | None = None  # (mean metric, std metric) drawn as mean ± std
    steps: bool = False  # piecewise-constant metrics (rubric sizes) drawn as steps
    prefix: str = ""  # also draw every metric whose name starts with this (e.g. one line per hack detector)


PLOTS: tuple[PlotSpec, ...] = (
    # The right axis: the score as a fraction of the range the rubric in force allows
    # (`report_data.SCORE_FRACTION`), so a new rubric with a wider scale is not drawn as progress.
    PlotSpec("score", "Judge score", ("score/mean", "objective/scores"), "score", ("score/fraction_of_range",),
             "fraction of the rubric's range", band=("score/mean", "score/std")),
    PlotSpec("kl", "KL(policy || reference)", ("objective/kl",), "KL"),
    PlotSpec("response_length", "Response length", ("response/length_mean",), "tokens"),
    PlotSpec("rubric_length", "Rubric length", ("rubric/items",), "items", ("rubric/tokens",), "tokens", steps=True),
    PlotSpec("eval_scores", "Held-out prompts: training judge and independent judge",
             ("eval/judge_score", "eval/independent_score"), "score", ("eval/length_mean",), "tokens"),
    PlotSpec("eval_hacks", "Held-out prompts: hack detectors (share of responses flagged)", ("eval/hack/any",),
             "rate", prefix="eval/hack/"),
)


_RIGHT_COLORS = ("tab:purple", "tab:brown", "tab:olive")  # never the markers' red or grey


def draw_markers(ax: Any, markers: MetaMarkers) -> None:
    for index, update in enumerate(markers.accepted):
        ax.axvline(update, color="tab:red", linestyle="-", linewidth=1.2, alpha=0.7,
                   label="new rubric" if index == 0 else None)
    for index, update in enumerate(markers.kept):
        ax.axvline(update, color="0.5", linestyle=":", linewidth=1.0, alpha=0.8,
                   label="meta step, rubric kept" if index == 0 else None)


def _rubric_item_steps(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    """Items per rubric version at the update it took effect (initial version at the first update)."""
    first = run.metrics[0]["update"] if run.metrics else 0
    points = [(rubric.created_step if rubric.created_step is not None else first, rubric.num_items)
              for rubric in run.versions]
    if run.metrics and points:
        points.append((run.metrics[-1]["update"], points[-1][1]))
    points.sort()
    return np.array([p[0] for p in points], dtype=np.int64), np.array([p[1] for p in points], dtype=np.float64)


def _plot_one(spec: PlotSpec, run: RunData, markers: MetaMarkers, path: Path) -> bool:
    """Draw `spec` to `path`; False (and no file) when none of its metrics has data."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    left = list(spec.left)
    if spec.prefix:
        left += sorted({k for m in run.metrics for k in m if k.startswith(spec.prefix) and k not in left})
    lines = [(name, *metric_series(run.metrics, name)) for name in left]
    lines = [line for line in lines if line[1].size]
    right = [(name, *metric_series(run.metrics, name)) for name in spec.right]
    right = [line for line in right if line[1].size]
    if not lines and spec.name == "rubric_length" and run.versions:
        lines = [("items (from rubric history)", *_rubric_item_steps(run))]
    if not lines and not right:
        return False
    fig = Figure(figsize=(7.5, 3.6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for name, updates, values in lines:
        ax.plot(updates, values, marker="." if updates.size < 60 else None, label=name,
                drawstyle="steps-post" if spec.steps else "default")
    if spec.band is not None:
        mean_updates, mean = metric_series(run.metrics, spec.band[0])
        std_updates, std = metric_series(run.metrics, spec.band[1])
        if mean.size and std.size and np.array_equal(mean_updates, std_updates):
            ax.fill_between(mean_updates, mean - std, mean + std, alpha=0.2, label=f"± {spec.band[1]}")
    draw_markers(ax, markers)
    ax.set_title(spec.title)
    ax.set_xlabel("update")
    ax.set_ylabel(spec.left_label)
    if spec.steps:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        twin = ax.twinx()
        for index, (name, updates, values) in enumerate(right):
            twin.plot(updates, values, color=_RIGHT_COLORS[index % len(_RIGHT_COLORS)], linestyle="--", label=name,
                      drawstyle="steps-post" if spec.steps else "default")
        twin.set_ylabel(spec.right_label)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def write_plots(run: RunData, out_dir: str | os.PathLike[str],
                markers: MetaMarkers | None = None) -> dict[str, Path]:
    """Write one PNG per `PLOTS` entry that has data; returns {plot name: path}."""
    try:
        import matplotlib  # noqa: F401 - checked here so the error names the missing package
    except ImportError as err:
        raise MissingDependencyError(f"the report's plots need matplotlib ({err}); install it with "
                                     f"`pip install 'matplotlib>=3.8'`") from err
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markers = meta_markers(run) if markers is None else markers
    written = {}
    for spec in PLOTS:
        path = out / f"{spec.name}.png"
        if _plot_one(spec, run, markers, path):
            written[spec.name] = path
        else:
            path.unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
    return written
