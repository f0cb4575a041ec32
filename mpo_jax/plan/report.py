"""The plan as a table (terminal) and as JSON (`--json FILE`, and `tpu.py launch`'s check)."""

from __future__ import annotations

from typing import Any

from mpo_jax.plan.aot import Compiled
from mpo_jax.plan.estimate import STATED_DECODE_BANDWIDTH, STATED_MFU
from mpo_jax.plan.plan import PlanResult

GIB = 1024**3


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _shapes(shapes: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in shapes.items())


def to_json(result: PlanResult) -> dict[str, Any]:
    top = result.topology
    largest = result.largest
    return {
        "config": result.config_name,
        "topology": {"accelerator": top.accelerator, "slices": top.slices, "chips": top.devices_total,
                     "processes": result.processes, "libtpu_topology": top.topology_name,
                     "hbm_limit_bytes_per_chip": top.chip.hbm_limit_bytes, "peak_flops_per_chip": top.chip.peak_flops,
                     "hbm_bandwidth_per_chip": top.chip.hbm_bandwidth},
        "mesh": dict(zip(("data", "fsdp", "tensor"), result.mesh)),
        "fits": result.fits,
        "margin_bytes_per_chip": result.margin_bytes,
        "total_bytes_per_chip": result.total_bytes,
        "resident_bytes_per_chip": result.resident_bytes,
        "largest_program": largest.program.name if largest else None,
        "largest_working_set_bytes_per_chip": result.working_set(largest) if largest else None,
        "models": {r.name: {"resident_bytes_per_chip": r.bytes_per_chip, "source": r.source}
                   for r in result.resident},
        "programs": {c.program.name: _program_json(result, c) for c in result.compiled},
        "time_per_update_estimate": {
            "method": "analytic FLOPs and bytes (decode loops at their full budgets); peak: data-sheet chip peaks; "
                      f"stated: {STATED_MFU:.0%} MFU and {STATED_DECODE_BANDWIDTH:.0%} of HBM bandwidth, "
                      "the NVIDIA H200 measurements in docs/benchmarks.md",
            "phases": {p.phase: {"peak_s": p.peak_s, "stated_s": p.stated_s} for p in result.phases},
            "total_peak_s": sum(p.peak_s for p in result.phases),
            "total_stated_s": sum(p.stated_s for p in result.phases),
        },
    }


def _program_json(result: PlanResult, c: Compiled) -> dict[str, Any]:
    out = {"role": c.program.role, "phase": c.program.phase, "fits": c.fits, "compile_s": round(c.compile_s, 2),
           "shapes": c.program.shapes, "calls_per_update": c.program.calls}
    if c.program.note:
        out["note"] = c.program.note
    if c.fits:
        out.update(hbm_bytes_per_chip=c.hbm_bytes, argument_bytes=c.argument_bytes, output_bytes=c.output_bytes,
                   temp_bytes=c.temp_bytes, alias_bytes=c.alias_bytes, working_set_bytes=result.working_set(c))
    else:
        out.update(hbm_bytes_per_chip=None, error=c.error, fix=c.program.fix)
    return out


def render(result: PlanResult) -> str:
    top = result.topology
    lines = [f"plan: {result.config_name} on {top.describe()}, {result.processes} process(es), mesh (data, fsdp, "
             f"tensor) = {result.mesh}", "",
             "per chip, GiB          | args  | out   | temp  | alias | HBM   | work  | compile s | shapes",
             "-----------------------|-------|-------|-------|-------|-------|-------|-----------|-------"]
    for c in result.compiled:
        name = c.program.name[:22].ljust(22)
        if c.fits:
            lines.append(f"{name} | {_gib(c.argument_bytes):>5} | {_gib(c.output_bytes):>5} | {_gib(c.temp_bytes):>5} "
                         f"| {_gib(c.alias_bytes):>5} | {_gib(c.hbm_bytes):>5} | {_gib(result.working_set(c)):>5} "
                         f"| {c.compile_s:9.1f} | {_shapes(c.program.shapes)}")
        else:
            lines.append(f"{name} | DOES NOT FIT ({c.compile_s:.1f} s): {c.error}")
            lines.append(f"{'':22} |   what to change: {c.program.fix}")
    notes = [f"  {c.program.name}: {c.program.note}" for c in result.compiled if c.program.note]
    if notes:
        lines += ["", "limits the run would hit:", *notes]
    lines += ["", "resident per chip (whole run):"]
    lines += [f"  {r.name:16s} {_gib(r.bytes_per_chip):>7} GiB  {r.source}" for r in result.resident]
    largest = result.largest
    if largest is not None:
        lines.append(f"  + largest working set ({largest.program.name}) {_gib(result.working_set(largest))} GiB")
    limit = top.chip.hbm_limit_bytes
    verdict = "FITS" if result.fits else "DOES NOT FIT"
    lines.append(f"  = {_gib(result.total_bytes)} of {_gib(limit)} GiB per chip: {verdict}, margin "
                 f"{_gib(result.margin_bytes)} GiB")
    lines += ["", "time per update (estimates: analytic FLOPs and bytes; decode loops at their full budgets)",
              f"  phase          | at peak s | at {STATED_MFU:.0%} MFU / {STATED_DECODE_BANDWIDTH:.0%} HBM BW s",
              "  ---------------|-----------|------------"]
    for p in result.phases:
        note = " (one meta step / meta.interval)" if p.phase == "meta" else ""
        lines.append(f"  {p.phase:14s} | {p.peak_s:9.2f} | {p.stated_s:10.2f}{note}")
    lines.append(f"  {'total':14s} | {sum(p.peak_s for p in result.phases):9.2f} | "
                 f"{sum(p.stated_s for p in result.phases):10.2f}")
    lines.append("  stated efficiencies: the NVIDIA H200's PPO MFU and decode bandwidth fraction (docs/benchmarks.md), "
                 "not TPU measurements")
    return "\n".join(lines)
