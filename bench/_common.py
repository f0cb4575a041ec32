"""What every benchmark script reports next to its numbers: the machine, the commit, and how much
of the CPUs other processes used while it ran (timings on a shared machine are distorted)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_quiet(cmd: Sequence[str]) -> str:
    """A command's stdout, or "?" when it is missing or fails."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def cpu_seconds(include_children: bool = False) -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, by this process [and its finished children]) so far;
    None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(values) - values[3] - values[4]  # minus idle and iowait
    usages = [resource.getrusage(resource.RUSAGE_SELF)]
    if include_children:
        usages.append(resource.getrusage(resource.RUSAGE_CHILDREN))
    return busy / os.sysconf("SC_CLK_TCK"), sum(u.ru_utime + u.ru_stime for u in usages)


def others_share(before: tuple[float, float] | None, after: tuple[float, float] | None,
                 wall_s: float) -> float | None:
    """Fraction of all CPUs' time that other processes used between two `cpu_seconds()` calls."""
    if before is None or after is None or wall_s <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(others, 0.0) / (wall_s * (os.cpu_count() or 1))


def machine_info() -> dict[str, str]:
    """CPU model, cores and RAM, Python, and the commit (marked when tracked files have changes)."""
    cpu = next((line.split(":", 1)[1].strip() for line in run_quiet(["lscpu"]).splitlines()
                if line.startswith("Model name")), platform.processor() or "?")
    mem = "?"
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo", encoding="ascii") as f:
            mem = next((f"{int(line.split()[1]) / 2**20:.0f} GiB" for line in f if line.startswith("MemTotal")), "?")
    commit = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {"cpu": f"{cpu}, {os.cpu_count()} cores, {mem} RAM", "python": platform.python_version(),
            "commit": commit + (" (with uncommitted changes to tracked files)" if dirty not in ("", "?") else "")}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def emit_report(lines: Sequence[str], wall_s: float, markdown_out: Path | None) -> None:
    """Print the report (ending in the bench's wall time) and write it to `markdown_out` when given."""
    report = "\n".join([*lines, "", f"_Bench wall time {wall_s:.0f} s._"])
    print(report)
    if markdown_out:
        markdown_out.write_text(report + "\n", encoding="utf-8")
