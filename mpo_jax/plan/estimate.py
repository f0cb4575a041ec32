"""Time per update, estimated from analytic FLOPs and bytes (the compiler's counts see loops once).

Lower bound: every program at the chip's data-sheet peak. Compute phases (prefills, rollout
statistics, the update) take FLOPs / (chips x peak FLOP/s); a decode step takes the longest of its
FLOPs at peak, the bytes it reads per chip at the HBM bandwidth, and the weight shards it gathers
over ICI at the ICI bandwidth. "Stated" divides by the efficiencies measured on the NVIDIA H200
(docs/benchmarks.md, "Accelerator figures"): the PPO update's 34% MFU against the data sheet for
compute, the decode loop's 17% of the data-sheet HBM bandwidth for reads. Neither is a TPU
measurement; both are estimates, and decode loops are taken at their full token budgets.
"""

from __future__ import annotations

import dataclasses

from mpo_jax.plan.programs import Program
from mpo_jax.plan.topology import Topology

STATED_MFU = 0.34  # PPO update on the H200 against its data-sheet bf16 peak (docs/benchmarks.md)
STATED_DECODE_BANDWIDTH = 0.17  # decode's share of the H200's data-sheet HBM bandwidth (docs/benchmarks.md)
PHASES = ("rollout", "rollout_stats", "judge", "update", "meta")


@dataclasses.dataclass(frozen=True)
class PhaseTime:
    phase: str
    peak_s: float  # lower bound at the data-sheet peaks
    stated_s: float  # at the stated efficiencies


def program_seconds(program: Program, topology: Topology, *, mfu: float = 1.0, bandwidth: float = 1.0) -> float:
    """One update's share of a program's time (calls x one call) at the given efficiencies."""
    chip, chips = topology.chip, topology.devices_total
    compute = program.flops / (chips * chip.peak_flops * mfu)
    step = 0.0
    if program.decode_steps:
        step = max(program.step_flops / (chips * chip.peak_flops * mfu),
                   program.step_hbm_bytes / (chip.hbm_bandwidth * bandwidth),
                   program.step_ici_bytes / chip.ici_bandwidth if chip.ici_bandwidth else 0.0)
    return program.calls * (compute + program.decode_steps * step)


def phase_times(programs: list[Program], topology: Topology) -> list[PhaseTime]:
    out = []
    for phase in PHASES:
        chosen = [p for p in programs if p.phase == phase]
        if not chosen:
            continue
        peak = sum(program_seconds(p, topology) for p in chosen)
        stated = sum(program_seconds(p, topology, mfu=STATED_MFU, bandwidth=STATED_DECODE_BANDWIDTH) for p in chosen)
        out.append(PhaseTime(phase, peak, stated))
    return out
