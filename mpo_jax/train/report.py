"""The run report: plots, rubric versions and diffs, rejected proposals and example rollouts.

    write_report(run_dir)        # RUN_DIR/report/{report.md, report.html, *.png}; returns that folder
    mpo-jax report RUN_DIR [--out DIR]

Three modules: `report_data` reads the run directory, `report_plots` draws the PNGs, and this one
lays the report out as a short list of blocks (heading, paragraph, table, code, diff, image) and
renders each block to Markdown and to HTML by one function per format, so every string is escaped
at exactly one place. Rubric items, responses, prompts, analyses and error texts come from models
and are untrusted: in HTML they are `html.escape`d (the page also carries a Content Security
Policy that forbids scripts); in Markdown they go into fenced code blocks, which show them
literally, and the report's own sentences escape only the characters that would start markup
where they stand, so report.md also reads well as plain text. Nothing is rendered as a template.

Optional pieces (rubric history, meta evaluations, rollouts, a metric) may be missing or
unreadable: the report says so instead of failing. A folder with neither `metrics.jsonl` nor
`config.json` is not a run dir and raises `ReportError`.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import json
import math
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mpo_jax.errors import InvalidValueError, MpoError
from mpo_jax.fileio import atomic_write_text
from mpo_jax.provenance import code_ranges, format_code_ranges
from mpo_jax.rubric import Rubric, diff
from mpo_jax.train.metrics import markdown_fence
from mpo_jax.train.report_data import (
    MetaMarkers,
    ReportError,
    RunData,
    add_score_fractions,
    is_number,
    load_run,
    meta_markers,
    metric_series,
)
from mpo_jax.train.report_plots import PLOTS, write_plots
from mpo_jax.train.run_dir import (
    CONFIG_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    REPORT_DIR,
    ROLLOUTS_FILE,
)

__all__ = [
    "CONFIG_FILE", "ROLLOUTS_FILE", "MetaMarkers", "ReportError", "RunData", "load_run", "markdown_text",
    "meta_markers", "metric_series", "render_html", "render_markdown", "report_main", "write_plots", "write_report",
]

# Inline Markdown that can start anywhere in a line: backslash escapes, code spans, emphasis and
# strikethrough, raw HTML and autolinks, links and images, math (GitHub's `$`).
_MD_ANYWHERE = re.compile(r"[\\`*~<\[$]")
_MD_ENTITY = re.compile(r"&(?=#?[0-9A-Za-z]+;)")  # `&amp;` would show as `&`
_MD_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")  # intraword `_` is never emphasis
# At the start of a paragraph: a heading, a block quote, a bullet or a thematic break ...
_MD_BLOCK_MARK = re.compile(r"^(?:#{1,6}(?=\s|$)|>|[-+](?=\s|$)|-(?=(?:\s*-){2,}\s*$))")
_MD_ORDERED_MARK = re.compile(r"^(\d{1,9})([.)])(?=\s|$)")  # ... or a numbered list item
_MD_HEADING_END = re.compile(r"(?<=\s)#(?=#*\s*$)")  # a closing `#` run would be dropped from a heading
MarkdownContext = Literal["any", "paragraph", "heading", "cell", "alt"]


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
        ("code (updates)", format_code_ranges(code_ranges(run.provenance, max(updates, default=0)))),
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


def _share(value: Any) -> str:
    return f"{value:.2f}" if is_number(value) and math.isfinite(value) else "n/a"


def _issues_text(issues: Any) -> str:
    if not isinstance(issues, list) or not issues:
        return ""
    return "; ".join(f"#{i.get('item', '?')} {i.get('code', '?')}" for i in issues if isinstance(i, dict))


def _decisions_section(run: RunData) -> list[Block]:
    """Each meta step's decision and why, where a reader looks first: outcome, reason code,
    the canary gate's shares (overall and per degradation kind) and the text checks' findings."""
    blocks: list[Block] = [Heading(2, "Meta step decisions")]
    if not run.meta_evaluations:
        return blocks + [Para("No meta step has run yet.")]
    rows, kinds_rows = [], []
    for update, data in run.meta_evaluations:
        canary = data.get("canary") if isinstance(data.get("canary"), dict) else None
        if canary is None:
            gate = "off"
        elif not canary.get("ran"):
            gate = "not run (refused before it)"
        else:
            gate = (f"{canary.get('decision', '?')}: current {_share(canary.get('current_share'))}, proposal "
                    f"{_share(canary.get('proposal_share'))} ({canary.get('pairs', '?')} pairs, "
                    f"{_format_number(canary.get('seconds'))} s)")
            current, proposal = canary.get("current_by_kind") or {}, canary.get("proposal_by_kind") or {}
            for kind in current:
                kinds_rows.append((str(update), kind, _share(current.get(kind)), _share(proposal.get(kind))))
        outcome = "installed" if data.get("accepted") is True else "kept"
        checks = _issues_text(data.get("sense_check"))
        warnings = _issues_text(data.get("sense_check_warnings"))
        text = "; ".join(part for part in (checks and f"refused: {checks}", warnings and f"warnings: {warnings}")
                         if part) or "passed"
        rows.append((str(update), outcome, str(data.get("reason_code", "?")), gate, text,
                     _clip(" ".join(str(data.get("reason", "")).split()), 300)))
    blocks.append(Para("Canary shares: the share of (sampled answer, its degraded copy) pairs in which the judge "
                       "scores the answer higher, ties half, under the current rubric and under the proposal."))
    blocks.append(Table(("update", "outcome", "reason code", "canary gate", "text checks", "reason"), tuple(rows)))
    if kinds_rows:
        blocks.append(Para("Canary shares per degradation kind:"))
        blocks.append(Table(("update", "kind", "current", "proposal"), tuple(kinds_rows)))
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
    if not is_number(value) or not math.isfinite(value):
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
        *_decisions_section(run),
        *_plots_section(run, plots),
        *_last_metrics(run),
        *_rubric_section(run, text_limit),
        *_rejected_section(run, text_limit),
        *_meta_section(run, text_limit, analyses_per_step),
        *_rollouts_section(run, rollouts_per_version, text_limit),
        *_config_section(run),
    ]


# -- Markdown -------------------------------------------------------------------------------------


def markdown_text(text: str, context: MarkdownContext = "any") -> str:
    """Plain text as one line of Markdown inline content, with only the characters escaped that
    would start markup where the text stands.

    Everywhere: backslash, backtick, `*`, `~`, `<`, `[`, `$`, an `&` that spells an entity and
    `_` at a word edge. A paragraph: a heading, quote, list or rule marker at its start. A
    heading: a closing `#` run. A table cell: `|`. Image alt text: `]`. "any" applies all of
    them, so its result is safe in each of those places. `:`, `-`, `.` and the like stay as they are.
    """
    text = _MD_ANYWHERE.sub(r"\\\g<0>", " ".join(str(text).split()))
    text = _MD_UNDERSCORE.sub(r"\\_", _MD_ENTITY.sub(r"\\&", text))
    if context in ("any", "cell"):
        text = text.replace("|", r"\|")
    if context in ("any", "alt"):
        text = text.replace("]", r"\]")
    if context in ("any", "heading"):
        text = _MD_HEADING_END.sub(r"\\#", text)
    if context in ("any", "paragraph"):
        text = _MD_ORDERED_MARK.sub(r"\1\\\2", _MD_BLOCK_MARK.sub(r"\\\g<0>", text))
    return text


def _markdown_block(block: Block, out_dir: Path) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {markdown_text(block.text, 'heading')}"
    if isinstance(block, Para):
        return markdown_text(block.text, "paragraph")
    if isinstance(block, Table):
        lines = ["| " + " | ".join(markdown_text(cell, "cell") or " " for cell in block.header) + " |",
                 "|" + "---|" * len(block.header)]
        lines += ["| " + " | ".join(markdown_text(cell, "cell") for cell in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Code):
        return markdown_fence(block.text, block.language)
    if isinstance(block, Diff):
        return markdown_fence(block.text, "diff")
    if isinstance(block, Image):
        target = os.path.relpath(block.path, out_dir).replace(os.sep, "/")
        return f"![{markdown_text(block.alt, 'alt')}]({urllib.parse.quote(target)})"
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
    problems = list(run.problems)
    run = dataclasses.replace(add_score_fractions(run, problems), problems=tuple(problems))
    markers = meta_markers(run)
    plots = write_plots(run, out, markers)
    blocks = build_blocks(run, plots, markers, rollouts_per_version=rollouts_per_version, text_limit=text_limit)
    atomic_write_text(out / "report.md", render_markdown(blocks, out))
    title = blocks[0].text if isinstance(blocks[0], Heading) else "MPO run report"
    atomic_write_text(out / "report.html", render_html(blocks, title))
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
