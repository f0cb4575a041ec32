"""`mpo-jax eval compare`: the arms of one experiment side by side, read from their run directories.

    mpo-jax eval compare ppo_iter0=runs/x/ppo_iter0 mpo_iter0=runs/x/mpo_iter0 --out compare/ [--smooth 5]

The per-run report (`train/report.py`) shows one run; whether MPO beats PPO only shows on shared
axes. This writes into OUT: `training_score.png` (raw, and as a fraction of the range the rubric in
force allows, comparable across rewritten rubrics), `independent_score.png`, `hacks.png` (every arm
on one axis, each arm's accepted rubric changes as vertical lines in its colour), `compare.md`,
`compare.json` (the table's numbers) and `rubrics/<arm>/rubric_iter_N.txt` (copies of each arm's
rubric versions). The arms table says which code ran which updates (the git commit of each
start and resume, from `provenance.jsonl`; "-" for runs that predate it). The first arm is the
reference of a paired table: at each evaluation, every other arm's independent score minus the
reference's on the same held-out prompt, with its standard error.

Arms may be unfinished (one still running): `metrics.jsonl` and `eval_samples.jsonl` are read
leniently, a torn or unreadable line is skipped and noted. Lines that share an update are merged
key by key in file order, so an evaluation line and a training line of the same update both
count, and a line repeated after a resume replaces the earlier values. A missing metric is "-"
in the tables, null in the JSON, and its plot panel says which arms lack it. Responses, prompts
and rubrics are model-written: in compare.md they only ever appear inside fenced code blocks
(`markdown_fence`) and are never rendered as a template.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpo_jax.errors import InvalidValueError, MissingDependencyError
from mpo_jax.fileio import atomic_write_text, read_jsonl_lenient
from mpo_jax.provenance import CodeRange, code_ranges, format_code_ranges
from mpo_jax.train.metrics import decode_value, encode_value, markdown_fence
from mpo_jax.train.report import markdown_text
from mpo_jax.train.report_data import (
    SCORE_FRACTION,
    MetaMarkers,
    ReportError,
    RunData,
    add_score_fractions,
    is_number,
    load_run,
    meta_markers,
    score_fraction,
)
from mpo_jax.train.run_dir import EVAL_SAMPLES_FILE, METRICS_FILE, RUBRIC_FILE_RE

__all__ = ["COMPARE_JSON", "COMPARE_MD", "PLOT_FILES", "Arm", "load_arm", "moving_average", "paired_independent",
           "summarize_arm", "write_comparison"]

COMPARE_MD = "compare.md"
COMPARE_JSON = "compare.json"
RUBRICS_DIR = "rubrics"
PLOT_FILES = ("training_score.png", "independent_score.png", "hacks.png")
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a folder name, a legend label (no `$`, no leading `_`)
_NOT_TRAINING = ("update", "time", "time/eval_s")
_MISSING = "-"


@dataclass(frozen=True)
class Arm:
    """One arm: its run (metrics merged per update), the eval samples at the example index by update, notes."""

    name: str
    run: RunData
    markers: MetaMarkers
    samples: dict[int, dict[str, Any]]
    problems: tuple[str, ...]
    # update -> held-out prompt index -> (prompt, independent judge's score), for paired comparisons
    independent: dict[int, dict[int, tuple[str, float]]] = dataclasses.field(default_factory=dict)


# -- reading --------------------------------------------------------------------------------------


def _jsonl_objects(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The JSON objects with an int `update` >= 0; other lines (a torn last line of a running arm) are skipped."""
    objects, bad = read_jsonl_lenient(path)
    rows = []
    for row in objects:
        update = row.get("update")
        if isinstance(update, int) and not isinstance(update, bool) and update >= 0:
            rows.append(row)
        else:
            bad += 1
    if bad:
        problems.append(f"{path.name}: skipped {bad} unreadable line(s)")
    return rows


def merged_metrics(path: Path, problems: list[str]) -> tuple[dict[str, Any], ...]:
    """One record per update, sorted; lines of the same update merged key by key, the later line winning."""
    by_update: dict[int, dict[str, Any]] = {}
    for row in _jsonl_objects(path, problems):
        by_update.setdefault(row["update"], {}).update({key: decode_value(value) for key, value in row.items()})
    return tuple(by_update[update] for update in sorted(by_update))


_add_score_fractions = add_score_fractions  # one implementation, shared with the run report
__all__ += ["SCORE_FRACTION", "score_fraction"]  # re-exported from train/report_data.py


def load_arm(name: str, run_dir: str | os.PathLike[str], example_index: int = 0) -> Arm:
    """Read one arm; `ReportError` names the folder when it is not a run dir."""
    if not _ARM_NAME.match(name):
        raise InvalidValueError(f"arm name {name!r} must start with a letter or digit and hold only letters, digits, "
                                f"'_', '.', '+' and '-' (it names a folder and a legend entry); pass NAME=RUN_DIR")
    run = load_run(run_dir)
    problems = [problem for problem in run.problems if not problem.startswith(METRICS_FILE)]
    run = dataclasses.replace(run, metrics=merged_metrics(run.run_dir / METRICS_FILE, problems))
    run = _add_score_fractions(run, problems)
    samples: dict[int, dict[str, Any]] = {}
    independent: dict[int, dict[int, tuple[str, float]]] = {}
    for row in _jsonl_objects(run.run_dir / EVAL_SAMPLES_FILE, problems):  # a row repeated after a resume:
        if row.get("index") == example_index:                             # the later one wins
            samples[row["update"]] = row
        index, score = row.get("index"), row.get("independent_score")
        if isinstance(index, int) and not isinstance(index, bool) and is_number(score) and math.isfinite(score):
            independent.setdefault(row["update"], {})[index] = (str(row.get("prompt")), float(score))
    return Arm(name, run, meta_markers(run), samples, tuple(problems), independent)


def _series(arm: Arm, metric: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(record["update"], float(record[metric])) for record in arm.run.metrics if is_number(record.get(metric))]
    return np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.float64)


def moving_average(values: np.ndarray, k: int, segments: np.ndarray | None = None) -> np.ndarray:
    """Trailing mean over the last `k` points (fewer at the start), ignoring non-finite values.
    `segments` (one label per point, non-decreasing): the window never reaches back into an earlier
    segment, so scores under one rubric are not averaged with scores under the next."""
    out = np.full(len(values), math.nan)
    for i in range(len(values)):
        window = values[max(0, i - k + 1): i + 1]
        if segments is not None:
            window = window[segments[max(0, i - k + 1): i + 1] == segments[i]]
        window = window[np.isfinite(window)]
        if window.size:
            out[i] = window.mean()
    return out


# -- the numbers ----------------------------------------------------------------------------------


def _number(record: Mapping[str, Any], key: str) -> float | None:
    return float(record[key]) if is_number(record.get(key)) else None


def _eval_summary(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    hacks = {key.removeprefix("eval/hack/"): float(value) for key, value in sorted(record.items())
             if key.startswith("eval/hack/") and key != "eval/hack/any" and is_number(value) and value != 0}
    return {"update": record["update"], "judge_score": _number(record, "eval/judge_score"),
            "independent_score": _number(record, "eval/independent_score"),
            "length_mean": _number(record, "eval/length_mean"), "words_mean": _number(record, "eval/words_mean"),
            "hack_any": _number(record, "eval/hack/any"), "hacks": hacks}


def summarize_arm(arm: Arm, smooth: int) -> dict[str, Any]:
    """The table's numbers for one arm (None where a metric is missing)."""
    metrics = arm.run.metrics
    trained = [r["update"] for r in metrics
               if any(k not in _NOT_TRAINING and not k.startswith("eval/") for k in r)]
    evals = [r for r in metrics if any(k.startswith("eval/") and is_number(v) for k, v in r.items())]
    scores = _series(arm, "score/mean")[1][-smooth:]
    scores = scores[np.isfinite(scores)]
    fractions = _series(arm, SCORE_FRACTION)[1][-smooth:]
    fractions = fractions[np.isfinite(fractions)]
    updates_done = max(trained, default=0)
    code = [dataclasses.asdict(span) for span in code_ranges(arm.run.provenance, updates_done)]
    return {"run_dir": str(arm.run.run_dir), "updates_done": updates_done, "code": code,
            "training_score_last_mean": float(scores.mean()) if scores.size else None,
            "score_fraction_last_mean": float(fractions.mean()) if fractions.size else None,
            "evaluations": len(evals), "first_eval": _eval_summary(evals[0] if evals else None),
            "last_eval": _eval_summary(evals[-1] if evals else None),
            "rubric_versions": len(arm.run.versions), "rubric_changes_at": list(arm.markers.accepted),
            "problems": list(arm.problems)}


def paired_independent(arm: Arm, reference: Arm) -> list[dict[str, Any]]:
    """At every evaluation both arms made: the mean over held-out prompts of the arm's independent
    score minus the reference's on the same prompt, and its standard error.

    The arms share the held-out prompts, so pairing removes how hard each prompt is; with a handful
    of prompts that spread is most of the noise. Only prompts with the same text in both arms count.
    """
    rows = []
    for update in sorted(set(arm.independent) & set(reference.independent)):
        ours, theirs = arm.independent[update], reference.independent[update]
        shared = [i for i in sorted(set(ours) & set(theirs)) if ours[i][0] == theirs[i][0]]
        if not shared:
            continue
        differences = np.array([ours[i][1] - theirs[i][1] for i in shared])
        error = float(differences.std(ddof=1) / math.sqrt(differences.size)) if differences.size > 1 else None
        rows.append({"update": update, "prompts": len(shared), "mean_difference": float(differences.mean()),
                     "standard_error": error})
    return rows


def _json_safe(value: Any) -> Any:
    """NaN and inf as the strings metrics.jsonl uses, so compare.json is strict JSON."""
    if isinstance(value, float):
        return encode_value("", value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


# -- plots ----------------------------------------------------------------------------------------

_PanelSpec = tuple[str, str, str]  # (metric, title, y label)


def _plot(path: Path, arms: Sequence[Arm], panels: Sequence[_PanelSpec], smooth: int | None = None) -> None:
    """One panel per metric, every arm in its own colour; `smooth`: thin raw lines plus a moving average."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.5, 1.2 + 3.0 * len(panels)), dpi=110)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (metric, title, ylabel) in zip(axes, panels):
        missing = []
        for index, arm in enumerate(arms):
            color = f"C{index % 10}"
            updates, values = _series(arm, metric)
            if not updates.size:
                missing.append(arm.name)
                continue
            if smooth is None:
                ax.plot(updates, values, color=color, marker="." if updates.size < 60 else None, label=arm.name)
            else:
                ax.plot(updates, values, color=color, linewidth=0.8, alpha=0.45)
                rubric_in_force = np.searchsorted(np.asarray(arm.markers.accepted), updates, side="left")
                ax.plot(updates, moving_average(values, smooth, rubric_in_force), color=color, linewidth=1.8,
                        label=f"{arm.name} (mean of {smooth})")
            for number, update in enumerate(arm.markers.accepted):
                ax.axvline(update, color=color, linestyle="--", linewidth=1.0, alpha=0.8,
                           label=f"{arm.name}: new rubric" if number == 0 else None)
        if len(missing) == len(arms):
            ax.text(0.5, 0.5, f"no arm recorded {metric}", transform=ax.transAxes, ha="center", va="center")
        else:  # a legend entry, which `loc="best"` keeps off the data
            for name in missing:
                ax.plot([], [], linestyle="none", label=f"{name}: not recorded")
        ax.set_title(f"{title} ({metric})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("update")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, format="png")


def _write_plots(arms: Sequence[Arm], out: Path, smooth: int) -> None:
    try:
        import matplotlib  # noqa: F401 - checked here so the error names the missing package
    except ImportError as err:
        raise MissingDependencyError(f"the comparison's plots need matplotlib ({err}); install it with "
                                     f"`pip install 'matplotlib>=3.8'`") from err
    _plot(out / PLOT_FILES[0], arms, [("score/mean", "Training judge score", "score"),
                                      (SCORE_FRACTION, "Training judge score as a fraction of the rubric's range",
                                       "fraction")], smooth)
    _plot(out / PLOT_FILES[1], arms, [("eval/independent_score", "Held-out: independent judge", "score"),
                                      ("eval/judge_score", "Held-out: training judge", "score")])
    _plot(out / PLOT_FILES[2], arms, [("eval/hack/any", "Held-out: share of responses flagged by any hack "
                                                        "detector", "rate"),
                                      ("eval/length_mean", "Held-out: response length", "tokens")])


# -- rubric copies --------------------------------------------------------------------------------


def _copy_rubrics(arm: Arm, out: Path) -> list[tuple[int, Path]]:
    """(iteration, copy) of every rubric_iter_N.txt of the arm, by iteration; stale copies are removed."""
    folder = out / RUBRICS_DIR / arm.name
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted((int(m.group(1)), path) for path in arm.run.run_dir.iterdir()
                   if (m := RUBRIC_FILE_RE.match(path.name)) and path.is_file())
    for old in folder.glob("rubric_iter_*.txt"):
        if old.name not in {path.name for _, path in found}:
            old.unlink()
    for _, path in found:
        shutil.copyfile(path, folder / path.name)
    return [(iteration, folder / path.name) for iteration, path in found]


# -- compare.md -----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _clip(text: str, limit: int, where: str = "") -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… [{len(text) - limit} more characters{where}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(markdown_text(cell, "cell") for cell in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(markdown_text(cell, "cell") or " " for cell in row) + " |"
                              for row in rows])


def _link(target: Path, out: Path) -> str:
    relative = os.path.relpath(target, out).replace(os.sep, "/")
    return f"[{markdown_text(relative, 'alt')}]({urllib.parse.quote(relative)})"


def _sample_text(label: str, sample: Mapping[str, Any] | None, update: int, index: int) -> str:
    if sample is None:
        return markdown_text(f"{label} (update {update}): no eval sample with index {index} in {EVAL_SAMPLES_FILE}.",
                             "paragraph")
    hacks = sample.get("hacks") if isinstance(sample.get("hacks"), list) else []
    return markdown_text(f"{label} (update {update}): training judge {_cell(_number(sample, 'judge_score'))}, "
                         f"independent judge {_cell(_number(sample, 'independent_score'))}, "
                         f"{_cell(sample.get('response_tokens'))} tokens, flagged: "
                         f"{', '.join(map(str, hacks)) or 'none'}.", "paragraph")


def _examples(arms: Sequence[Arm], summaries: Mapping[str, Mapping[str, Any]], index: int, limit: int) -> list[str]:
    parts = [f"## Example outputs (held-out prompt index {index})",
             markdown_text(f"Responses clipped to {limit} characters; the full text is in each run's "
                           f"{EVAL_SAMPLES_FILE}.", "paragraph")]
    shown_prompt = None
    for arm in arms:
        parts.append(f"### {markdown_text(arm.name, 'heading')}")
        evals = [summaries[arm.name][key] for key in ("first_eval", "last_eval") if summaries[arm.name][key]]
        if not evals:
            parts.append("No evaluation yet.")
            continue
        if evals[0]["update"] == evals[-1]["update"]:
            evals = evals[:1]
        for label, summary in zip(("First evaluation", "Last evaluation"), evals):
            sample = arm.samples.get(summary["update"])
            if sample is not None and sample.get("prompt") != shown_prompt:
                shown_prompt = sample.get("prompt")
                parts += ["Prompt:", markdown_fence(_clip(str(shown_prompt), limit))]
            elif sample is not None and label.startswith("First"):
                parts.append("Same prompt as above.")
            parts.append(_sample_text(label, sample, summary["update"], index))
            if sample is not None:
                parts.append(markdown_fence(_clip(str(sample.get("response", "")), limit)))
    return parts


def _rubrics(arms: Sequence[Arm], copies: Mapping[str, list[tuple[int, Path]]], out: Path, limit: int) -> list[str]:
    parts = ["## Rubric versions"]
    for arm in arms:
        parts.append(f"### {markdown_text(arm.name, 'heading')}")
        if not copies[arm.name]:
            parts.append(markdown_text("No rubric_iter_N.txt files in the run dir.", "paragraph"))
        created = {rubric.iteration: rubric.created_step for rubric in arm.run.versions}
        for iteration, path in copies[arm.name]:
            step = created.get(iteration)
            when = "initial" if iteration == 0 else "update unknown" if step is None else f"accepted at update {step}"
            parts.append(f"Iteration {iteration} ({markdown_text(when)}): {_link(path, out)}")
            text = path.read_text(encoding="utf-8", errors="replace").rstrip("\n")
            parts.append(markdown_fence(_clip(text, limit, f" not shown; see {path.name}")))
    return parts


def render_markdown(arms: Sequence[Arm], summaries: Mapping[str, Mapping[str, Any]],
                    copies: Mapping[str, list[tuple[int, Path]]], out: Path, *, smooth: int, example_index: int,
                    text_limit: int) -> str:
    """compare.md: arm table, evaluation table, plots, example outputs, rubric versions, notes."""
    overview = [(arm.name, s["run_dir"], _cell(s["updates_done"]),
                 format_code_ranges([CodeRange(**span) for span in s["code"]]),
                 _cell(s["training_score_last_mean"]),
                 _cell(s["score_fraction_last_mean"]), _cell(s["evaluations"]), _cell(s["rubric_versions"]),
                 ", ".join(map(str, s["rubric_changes_at"])) or "none")
                for arm in arms for s in [summaries[arm.name]]]
    evaluations = []
    for arm in arms:
        for label in ("first", "last"):
            e = summaries[arm.name][f"{label}_eval"] or {}
            kinds = ", ".join(f"{kind} {rate:.3g}" for kind, rate in e.get("hacks", {}).items())
            evaluations.append((arm.name, label, _cell(e.get("update")), _cell(e.get("judge_score")),
                                _cell(e.get("independent_score")), _cell(e.get("length_mean")),
                                _cell(e.get("hack_any")), kinds or (_MISSING if not e else "none")))
    paired = []
    for arm in arms[1:]:
        for row in paired_independent(arm, arms[0]):
            paired.append((arm.name, _cell(row["update"]), _cell(row["prompts"]), _cell(row["mean_difference"]),
                           _cell(row["standard_error"])))
    paired_parts = [] if not paired else [
        f"## Independent judge, paired by held-out prompt (against {markdown_text(arms[0].name, 'heading')})",
        markdown_text(f"At each evaluation both arms made: the mean over the shared held-out prompts of the arm's "
                      f"independent score minus {arms[0].name}'s on the same prompt, and its standard error "
                      "(sample standard deviation of the differences over the square root of their number).",
                      "paragraph"),
        _table(("arm", "update", "prompts", f"mean difference vs {arms[0].name}", "standard error"), paired),
    ]
    parts = [
        "# Experiment comparison",
        "## Arms",
        _table(("arm", "run dir", "updates done", "code (updates)", f"training score, mean of last {smooth}",
                "as a fraction of the rubric's range", "evaluations", "rubric versions", "new rubric at updates"),
               overview),
        "## Held-out evaluations",
        markdown_text("First and last in-training evaluation of each arm. \"-\": not recorded (no evaluation yet, "
                      "or no independent judge).", "paragraph"),
        _table(("arm", "evaluation", "update", "training judge", "independent judge", "length (tokens)",
                "hack rate (any)", "hack kinds flagged"), evaluations),
        *paired_parts,
        "## Plots",
        markdown_text("Dashed vertical lines, in an arm's colour: that arm accepted a new rubric at that update. "
                      f"Training score: thin lines raw, thick lines the mean of the last {smooth} updates "
                      "under the same rubric.",
                      "paragraph"),
        *(f"![{markdown_text(name.removesuffix('.png'), 'alt')}]({name})" for name in PLOT_FILES),
        *_examples(arms, summaries, example_index, text_limit),
        *_rubrics(arms, copies, out, 4 * text_limit),
    ]
    notes = [(arm.name, problem) for arm in arms for problem in arm.problems]
    if notes:
        parts += ["## Notes", *(f"- {markdown_text(f'{name}: {problem}')}" for name, problem in notes)]
    return "\n\n".join(parts) + "\n"


# -- writing --------------------------------------------------------------------------------------


def write_comparison(runs: Mapping[str, str | os.PathLike[str]], out_dir: str | os.PathLike[str], *, smooth: int = 5,
                     example_index: int = 0, text_limit: int = 2000) -> dict[str, Any]:
    """Write the plots, compare.md, compare.json and rubric copies to `out_dir`; returns compare.json's content."""
    for flag, value, least in (("--smooth", smooth, 1), ("--example-index", example_index, 0),
                               ("--text-limit", text_limit, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InvalidValueError(f"{flag} must be an int >= {least}, got {value!r}")
    if not runs:
        raise InvalidValueError("give at least one run dir to compare (NAME=RUN_DIR or RUN_DIR)")
    arms = [load_arm(name, path, example_index) for name, path in runs.items()]
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create the output folder {out}: {err}; pass another --out") from err
    summaries = {arm.name: summarize_arm(arm, smooth) for arm in arms}
    _write_plots(arms, out, smooth)
    copies = {arm.name: _copy_rubrics(arm, out) for arm in arms}
    atomic_write_text(out / COMPARE_MD, render_markdown(arms, summaries, copies, out, smooth=smooth,
                                                        example_index=example_index, text_limit=text_limit))
    record = {"smooth": smooth, "example_index": example_index, "arms": summaries,
              "paired_independent": {"reference": arms[0].name,
                                     "arms": {arm.name: paired_independent(arm, arms[0]) for arm in arms[1:]}}}
    atomic_write_text(out / COMPARE_JSON, json.dumps(_json_safe(record), indent=2, allow_nan=False) + "\n")
    return record
