"""The run report: plots, rubric versions and diffs, rejected proposals and example rollouts.

    write_report(run_dir)        # RUN_DIR/report/{report.md, report.html, *.png}; returns that folder
    mpo-jax report RUN_DIR [--out DIR]

The report is built as a short list of blocks (heading, paragraph, table, code, diff, image) and
each block is rendered to Markdown and to HTML by one function per format, so every string is
escaped at exactly one place. Rubric items, responses, prompts, analyses and error texts come from
models and are untrusted: in HTML they are `html.escape`d (the page also carries a Content Security
Policy that forbids scripts), in Markdown they go into fenced code blocks or have every ASCII
punctuation character backslash-escaped. Nothing is rendered as a template.

Optional pieces (rubric history, meta evaluations, rollouts, a metric) may be missing or
unreadable: the report says so instead of failing. A folder with neither `metrics.jsonl` nor
`config.json` is not a run dir and raises `ReportError`.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpo_jax.errors import InvalidValueError, MissingDependencyError, MpoError
from mpo_jax.reward.rubric_history import HISTORY_FILE, HistoryEvent, RubricHistory
from mpo_jax.rubric import Rubric, RubricError, diff
from mpo_jax.train.metrics import METRICS_FILE, markdown_fence, read_metrics

__all__ = [
    "CONFIG_FILE", "ROLLOUTS_FILE", "MetaMarkers", "ReportError", "RunData", "load_run", "markdown_text",
    "meta_markers", "metric_series", "render_html", "render_markdown", "report_main", "write_plots", "write_report",
]

CONFIG_FILE = "config.json"
ROLLOUTS_FILE = "rollouts.jsonl"
REPORT_DIR = "report"
_META_EVAL_RE = re.compile(r"^meta_evaluation_(\d+)\.json$")
_RUBRIC_FILE_RE = re.compile(r"^rubric_iter_(\d+)\.txt$")
# ASCII punctuation that can start or end Markdown syntax (emphasis, links, autolinks, HTML, entities,
# tables, code, block markers, math); `,;/("'?%` cannot once these are escaped and stay readable.
_MD_PUNCTUATION = re.compile(r"([!#$&)*+\-.:<=>@\[\\\]^_`{|}~])")


class ReportError(MpoError, ValueError):
    """The folder is not a run dir, or the report cannot be written there."""


# -- loading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """Everything the report reads from a run dir; `problems` lists optional pieces that were unreadable."""

    run_dir: Path
    config: dict[str, Any] | None
    metrics: tuple[dict[str, Any], ...]
    versions: tuple[Rubric, ...]
    events: tuple[HistoryEvent, ...]
    meta_evaluations: tuple[tuple[int, dict[str, Any]], ...]  # (update, meta_evaluation_{update}.json), by update
    rollouts: tuple[dict[str, Any], ...]
    problems: tuple[str, ...] = ()


def _read_config(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append(f"{CONFIG_FILE} could not be read: {err}")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} holds a {type(config).__name__}, not a JSON object")
        return None
    return config


def _read_rubrics(run_dir: Path, problems: list[str]) -> tuple[tuple[Rubric, ...], tuple[HistoryEvent, ...]]:
    """The history if it loads; otherwise whatever `rubric_iter_{t}.txt` files parse (without events)."""
    if (run_dir / HISTORY_FILE).is_file():
        try:
            history = RubricHistory.load(run_dir)
            return history.versions, history.events
        except (OSError, UnicodeDecodeError, RubricError) as err:
            problems.append(f"{HISTORY_FILE} could not be read: {err}")
    versions = []
    for path in sorted(run_dir.glob("rubric_iter_*.txt")):
        match = _RUBRIC_FILE_RE.match(path.name)
        if not match:
            continue
        try:
            versions.append(Rubric.parse(path.read_text(encoding="utf-8"), iteration=int(match.group(1))))
        except (OSError, UnicodeDecodeError, RubricError) as err:
            problems.append(f"{path.name} could not be read: {err}")
    return tuple(sorted(versions, key=lambda rubric: rubric.iteration)), ()


def _read_meta_evaluations(run_dir: Path, problems: list[str]) -> tuple[tuple[int, dict[str, Any]], ...]:
    found = []
    for path in run_dir.glob("meta_evaluation_*.json"):
        match = _META_EVAL_RE.match(path.name)
        if not match:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{path.name} could not be read: {err}")
            continue
        if not isinstance(data, dict):
            problems.append(f"{path.name} holds a {type(data).__name__}, not a JSON object")
            continue
        found.append((int(match.group(1)), data))
    return tuple(sorted(found, key=lambda pair: pair[0]))


def _read_rollouts(path: Path, problems: list[str]) -> tuple[dict[str, Any], ...]:
    if not path.is_file():
        return ()
    rows = []
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        problems.append(f"{ROLLOUTS_FILE}: skipped {bad} line(s) that are not JSON objects")
    return tuple(rows)


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run dir; raises `ReportError` if it is not one (neither metrics.jsonl nor config.json)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; pass the run dir the trainer wrote (it holds {METRICS_FILE})")
    if not (root / METRICS_FILE).is_file() and not (root / CONFIG_FILE).is_file():
        raise ReportError(f"{root} is not an mpo-jax run dir: it has neither {METRICS_FILE} nor {CONFIG_FILE}; "
                          f"pass the folder the trainer wrote")
    problems: list[str] = []
    metrics: list[dict[str, Any]] = []
    if (root / METRICS_FILE).is_file():
        try:
            metrics = read_metrics(root)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problems.append(f"{METRICS_FILE} could not be read: {err}")
    config = _read_config(root / CONFIG_FILE, problems)
    versions, events = _read_rubrics(root, problems)
    return RunData(run_dir=root, config=config, metrics=tuple(metrics), versions=versions, events=events,
                   meta_evaluations=_read_meta_evaluations(root, problems),
                   rollouts=_read_rollouts(root / ROLLOUTS_FILE, problems), problems=tuple(problems))


# -- series and markers ---------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_series(metrics: Sequence[dict[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(updates, values) of one metric over the records that have it as a number (NaN kept)."""
    pairs = [(record["update"], float(record[name])) for record in metrics if _is_number(record.get(name))]
    updates = np.array([pair[0] for pair in pairs], dtype=np.int64)
    return updates, np.array([pair[1] for pair in pairs], dtype=np.float64)


@dataclass(frozen=True)
class MetaMarkers:
    """Updates to mark on the plots: a new rubric was accepted, or a meta step kept the old one."""

    accepted: tuple[int, ...]
    kept: tuple[int, ...]


def meta_markers(run: RunData) -> MetaMarkers:
    """Accepted: `created_step` of every non-initial rubric version and accepted meta evaluations.

    Kept: the other updates where a meta step ran (`meta/step` != 0 in the metrics, or a
    meta_evaluation file) and the rubric did not change.
    """
    accepted = {rubric.created_step for rubric in run.versions
                if rubric.parent is not None and rubric.created_step is not None}
    accepted |= {update for update, data in run.meta_evaluations if data.get("accepted") is True}
    ran = {record["update"] for record in run.metrics
           if _is_number(record.get("meta/step")) and math.isfinite(record["meta/step"]) and record["meta/step"] != 0}
    ran |= {update for update, _ in run.meta_evaluations}
    return MetaMarkers(accepted=tuple(sorted(accepted)), kept=tuple(sorted(ran - accepted)))


# -- plots ----------------------------------------------------------------------------------------


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
    PlotSpec("score", "Judge score", ("score/mean", "objective/scores"), "score", band=("score/mean", "score/std")),
    PlotSpec("kl", "KL(policy || reference)", ("objective/kl",), "KL"),
    PlotSpec("response_length", "Response length", ("response/length_mean",), "tokens"),
    PlotSpec("rubric_length", "Rubric length", ("rubric/items",), "items", ("rubric/tokens",), "tokens", steps=True),
    PlotSpec("eval_scores", "Held-out prompts: training judge and independent judge",
             ("eval/judge_score", "eval/independent_score"), "score", ("eval/length_mean",), "tokens"),
    PlotSpec("eval_hacks", "Held-out prompts: hack detectors (share of responses flagged)", ("eval/hack/any",),
             "rate", prefix="eval/hack/"),
)


_RIGHT_COLORS = ("tab:purple", "tab:brown", "tab:olive")  # never the markers' red or grey


def _draw_markers(ax: Any, markers: MetaMarkers) -> None:
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
    _draw_markers(ax, markers)
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


# -- document blocks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


@dataclass(frozen=True)
class Diff:
    text: str


@dataclass(frozen=True)
class Image:
    path: Path
    alt: str


Block = Heading | Para | Table | Code | Diff | Image


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… [{len(text) - limit} more characters not shown]"


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


def _prompt_text(prompt: Any) -> str:
    """A prompt as text: chat messages become 'role: content' lines, anything else its JSON."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        return "\n\n".join(f"{m.get('role', '?')}: {m['content']}" for m in prompt)
    return json.dumps(prompt, indent=2, ensure_ascii=False, default=str)


def _overview(run: RunData, markers: MetaMarkers) -> list[Block]:
    updates = [record["update"] for record in run.metrics]
    rejected = [event for event in run.events if not event.accepted]
    rows = [
        ("run dir", str(run.run_dir)),
        ("updates recorded", f"{len(updates)}" + (f" ({updates[0]} to {updates[-1]})" if updates else "")),
        ("rubric versions", str(len(run.versions))),
        ("new rubrics accepted at updates", ", ".join(map(str, markers.accepted)) or "none"),
        ("meta steps that kept the rubric", ", ".join(map(str, markers.kept)) or "none"),
        ("rejected rubric proposals", str(len(rejected))),
        ("example rollouts", str(len(run.rollouts))),
    ]
    blocks: list[Block] = [Heading(2, "Overview"), Table(("", ""), tuple(rows))]
    if run.problems:
        blocks.append(Para("Some optional files could not be read:"))
        blocks.extend(Code(problem) for problem in run.problems)
    return blocks


def _plots_section(run: RunData, plots: dict[str, Path]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Plots")]
    if plots:
        blocks.append(Para("Solid red lines: a new rubric was accepted at that update. Dotted grey lines: a meta "
                           "step ran and the rubric was kept."))
    for spec in PLOTS:
        if spec.name in plots:
            blocks.append(Image(plots[spec.name], spec.title))
        else:
            names = ", ".join(spec.left + spec.right)
            blocks.append(Para(f"{spec.title}: no data ({names} not in {METRICS_FILE})."))
    return blocks


def _last_metrics(run: RunData) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Last metrics")]
    if not run.metrics:
        return blocks + [Para(f"No metrics yet ({METRICS_FILE} is missing or empty).")]
    last = run.metrics[-1]
    blocks.append(Para(f"Update {last['update']}, written at "
                       f"{_format_time(last.get('time'))}."))
    rows = tuple((name, _format_number(last[name])) for name in sorted(last) if name not in ("update", "time"))
    return blocks + [Table(("metric", "value"), rows)]


def _format_time(value: Any) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def _rubric_section(run: RunData, text_limit: int) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Rubric versions")]
    if not run.versions:
        return blocks + [Para(f"No rubric versions found ({HISTORY_FILE} and rubric_iter_*.txt are missing).")]
    if len(run.versions) == 1:
        blocks.append(Para("No meta step has produced a new rubric yet; only the initial rubric exists."))
    reasons = {event.iteration: event.reason for event in run.events if event.accepted}
    previous: Rubric | None = None
    for rubric in run.versions:
        created = "unknown" if rubric.created_step is None else str(rubric.created_step)
        parent = "none" if rubric.parent is None else str(rubric.parent)
        blocks.append(Heading(3, f"Iteration {rubric.iteration}"))
        blocks.append(Para(f"Created at update {created}; refined from iteration {parent}; "
                           f"{rubric.num_items} items, {rubric.total_chars} characters."))
        if rubric.iteration in reasons:
            blocks.append(Para(f"Reason: {_clip(reasons[rubric.iteration], text_limit)}"))
        for number, item in enumerate(rubric.items, start=1):
            blocks.append(Para(f"Item {number}:"))
            blocks.append(Code(_clip(item, text_limit)))
        if previous is not None:
            blocks.append(Para(f"Changes from iteration {previous.iteration}:"))
            blocks.append(Diff(_clip(diff(previous, rubric), 4 * text_limit)))
        previous = rubric
    return blocks


def _rejected_section(run: RunData, text_limit: int) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Rejected rubric proposals")]
    rejected = [event for event in run.events if not event.accepted]
    if not rejected:
        known = "" if run.events else f" ({HISTORY_FILE} is missing, so rejections are unknown)"
        return blocks + [Para(f"No rejected proposals{known}.")]
    for event in rejected:
        step = "unknown" if event.created_step is None else str(event.created_step)
        blocks.append(Heading(3, f"Attempt {event.attempt} at update {step}"))
        blocks.append(Para(f"Rubric iteration {event.parent} stayed in force. Reason: "
                           f"{_clip(event.reason, text_limit)}"))
        if event.error:
            blocks.append(Para("Error:"))
            blocks.append(Code(_clip(event.error, text_limit)))
        if event.raw is not None:
            blocks.append(Para("Proposed text:"))
            blocks.append(Code(_clip(event.raw, text_limit)))
    return blocks


def _meta_section(run: RunData, text_limit: int, analyses_per_step: int) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Meta evaluations")]
    if not run.meta_evaluations:
        return blocks + [Para("No meta step has run yet (no meta_evaluation_*.json files).")]
    for update, data in run.meta_evaluations:
        blocks.append(Heading(3, f"Meta step at update {update}"))
        outcome = "accepted" if data.get("accepted") is True else "kept the previous rubric"
        timing = data.get("timing_s") if isinstance(data.get("timing_s"), dict) else {}
        timing_text = ", ".join(f"{key} {_format_number(value)} s" for key, value in timing.items())
        blocks.append(Para(f"Outcome: {outcome}; rubric iteration {data.get('iteration', '?')}"
                           + (f"; timing: {timing_text}" if timing_text else "") + "."))
        if data.get("reason"):
            blocks.append(Para(f"Reason: {_clip(str(data['reason']), text_limit)}"))
        samples = data.get("samples") if isinstance(data.get("samples"), list) else []
        for sample in samples[:analyses_per_step]:
            if not isinstance(sample, dict):
                continue
            blocks.append(Para(f"Sample {sample.get('index', '?')} (score {_format_number(sample.get('score'))}), "
                               f"meta analysis:"))
            blocks.append(Code(_clip(str(sample.get("meta_analysis", "")), text_limit)))
        if len(samples) > analyses_per_step:
            blocks.append(Para(f"{len(samples) - analyses_per_step} more samples in meta_evaluation_{update}.json."))
    return blocks


def _rollout_sort_key(iteration: Any) -> tuple[int, int, str]:
    """Numbered rubric iterations first, in order, then any other labels."""
    return (0, iteration, "") if isinstance(iteration, int) else (1, 0, str(iteration))


def _rollouts_section(run: RunData, per_version: int, text_limit: int) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Example rollouts")]
    if not run.rollouts:
        return blocks + [Para(f"No example rollouts ({ROLLOUTS_FILE} is missing or empty).")]
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in run.rollouts:
        groups.setdefault(row.get("rubric_iteration", "unknown"), []).append(row)
    blocks.append(Para(f"The {per_version} most recent rollouts under each rubric version."))
    for iteration in sorted(groups, key=_rollout_sort_key):
        rows = sorted(groups[iteration], key=lambda r: r.get("update") if isinstance(r.get("update"), int) else -1)
        blocks.append(Heading(3, f"Rubric iteration {iteration}"))
        for row in rows[-per_version:]:
            blocks.append(Para(f"Update {row.get('update', '?')}, score {_format_number(row.get('score'))}. "
                               f"Prompt:"))
            blocks.append(Code(_clip(_prompt_text(row.get("prompt", "")), text_limit)))
            blocks.append(Para("Response:"))
            blocks.append(Code(_clip(str(row.get("response", "")), text_limit)))
    return blocks


def _config_section(run: RunData) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Config")]
    if run.config is None:
        return blocks + [Para(f"No {CONFIG_FILE}.")]
    return blocks + [Code(json.dumps(run.config, indent=2, ensure_ascii=False, default=str), "json")]


def build_blocks(run: RunData, plots: dict[str, Path], markers: MetaMarkers, *, rollouts_per_version: int = 3,
                 text_limit: int = 3000, analyses_per_step: int = 2) -> list[Block]:
    """The report as a list of blocks, in page order."""
    name = run.run_dir.resolve().name or str(run.run_dir)
    return [
        Heading(1, f"MPO run report: {name}"),
        Para(f"Generated {_format_time(time.time())}."),
        *_overview(run, markers),
        *_plots_section(run, plots),
        *_last_metrics(run),
        *_rubric_section(run, text_limit),
        *_rejected_section(run, text_limit),
        *_meta_section(run, text_limit, analyses_per_step),
        *_rollouts_section(run, rollouts_per_version, text_limit),
        *_config_section(run),
    ]


# -- Markdown -------------------------------------------------------------------------------------


def markdown_text(text: str) -> str:
    """Plain text safe as Markdown inline content: one line, markup punctuation backslash-escaped.

    CommonMark lets any ASCII punctuation be escaped; escaping every character that can begin or
    close syntax means no emphasis, link, HTML tag, entity, table pipe or autolink can form.
    """
    return _MD_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))


def _markdown_block(block: Block, out_dir: Path) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {markdown_text(block.text)}"
    if isinstance(block, Para):
        return markdown_text(block.text)
    if isinstance(block, Table):
        lines = ["| " + " | ".join(markdown_text(cell) or " " for cell in block.header) + " |",
                 "|" + "---|" * len(block.header)]
        lines += ["| " + " | ".join(markdown_text(cell) for cell in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Code):
        return markdown_fence(block.text, block.language)
    if isinstance(block, Diff):
        return markdown_fence(block.text, "diff")
    if isinstance(block, Image):
        target = os.path.relpath(block.path, out_dir).replace(os.sep, "/")
        return f"![{markdown_text(block.alt)}]({urllib.parse.quote(target)})"
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_markdown(blocks: Sequence[Block], out_dir: str | os.PathLike[str]) -> str:
    """The Markdown page; image links are relative to `out_dir`."""
    return "\n\n".join(_markdown_block(block, Path(out_dir)) for block in blocks) + "\n"


# -- HTML -----------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
pre { background: #f6f8fa; padding: .6rem; overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2rem .5rem; text-align: left; }
img { max-width: 100%; } .add { color: #116329; background: #dafbe1; } .del { color: #82071e; background: #ffebe9; }
.hunk { color: #6e7781; }
"""
# Defence in depth: even if some text escaped its escaping, the page may not run scripts or load anything.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _diff_html(text: str) -> str:
    lines = []
    for line in text.split("\n"):
        kind = ("hunk" if line.startswith(("@@", "---", "+++")) else "add" if line.startswith("+")
                else "del" if line.startswith("-") else "")
        escaped = html.escape(line)
        lines.append(f'<span class="{kind}">{escaped}</span>' if kind else escaped)
    return "<pre>" + "\n".join(lines) + "</pre>"


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{e(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{e(cell)}</th>" for cell in block.header)
        body = "".join("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Code):
        return f"<pre><code>{e(block.text)}</code></pre>"
    if isinstance(block, Diff):
        return _diff_html(block.text)
    if isinstance(block, Image):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        return f'<p><img alt="{e(block.alt)}" src="data:image/png;base64,{data}"></p>'
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_html(blocks: Sequence[Block], title: str = "MPO run report") -> str:
    """A self-contained HTML page (images inlined as data URIs, inline CSS, no scripts)."""
    body = "\n".join(_html_block(block) for block in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


# -- writing --------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
                 rollouts_per_version: int = 3, text_limit: int = 3000) -> Path:
    """Write plots, `report.md` and `report.html` to `out_dir` (default RUN_DIR/report); returns that folder."""
    for name, value in (("rollouts_per_version", rollouts_per_version), ("text_limit", text_limit)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidValueError(f"{name} must be a positive int, got {value!r}")
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / REPORT_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create the report folder {out}: {err}; pass --out to write elsewhere") from err
    markers = meta_markers(run)
    plots = write_plots(run, out, markers)
    blocks = build_blocks(run, plots, markers, rollouts_per_version=rollouts_per_version, text_limit=text_limit)
    _atomic_write_text(out / "report.md", render_markdown(blocks, out))
    title = blocks[0].text if isinstance(blocks[0], Heading) else "MPO run report"
    _atomic_write_text(out / "report.html", render_html(blocks, title))
    return out


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `report` subcommand's arguments (shared by `report_main` and the `mpo-jax` parser)."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run dir written by the trainer (holds metrics.jsonl)")
    parser.add_argument("--out", help="folder for the report (default: RUN_DIR/report)")
    parser.add_argument("--rollouts-per-version", type=int, default=3,
                        help="example rollouts shown per rubric version (default 3)")
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Write the report for parsed arguments; prints where it went, or a refused input (`MpoError`) as
    `error: ...` (exit status 2)."""
    try:
        out = write_report(args.run_dir, args.out, rollouts_per_version=args.rollouts_per_version)
    except MpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {out}: {out / 'report.html'}, {out / 'report.md'}")
    return 0


def report_main(argv: Sequence[str] | None = None) -> int:
    """`mpo-jax report RUN_DIR [--out DIR]`: returns the exit status."""
    parser = add_report_arguments(argparse.ArgumentParser(
        prog="mpo-jax report", description="Write plots, report.md and report.html for an MPO run dir"))
    return run_report(parser.parse_args(argv))
