"""`plan(config, topology)`: every program of one update compiled for a TPU slice, and whether it all fits.

    topology -> abstract devices (libtpu) -> the config's mesh on them (the trainer's `make_run_mesh`)
    -> shape-only models and train state -> programs (the runtime's builders) -> compile each
    -> per chip: each program's HBM; resident weights and optimizer state + the largest working set

One process holds every model and the train state for the whole run, while only one program runs at
a time. So the process fits when the resident bytes per chip plus the largest program's working set
(what it needs beyond its resident arguments: other inputs, outputs that do not reuse a donated
buffer, temporaries) stay within the chip's HBM, and every program compiles.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from mpo_jax.engine.abstract import per_device_bytes
from mpo_jax.errors import MpoError
from mpo_jax.plan.aot import Compiled, compile_program
from mpo_jax.plan.estimate import PhaseTime, phase_times
from mpo_jax.plan.models import DEFAULT_MODEL_CONFIGS, PlannedModel, plan_models, plan_state
from mpo_jax.plan.programs import Program, build_programs
from mpo_jax.plan.topology import Topology, topology_devices
from mpo_jax.train.config import TrainConfig

_LOG = logging.getLogger(__name__)


class MeshMismatchError(MpoError, ValueError):
    """The config's mesh does not cover the topology's devices as the trainer requires."""


@dataclasses.dataclass(frozen=True)
class Resident:
    """A piece that stays in HBM for the whole run: a model's weights or the optimizer state."""

    name: str
    bytes_per_chip: int
    source: str = ""


@dataclasses.dataclass(frozen=True)
class PlanResult:
    config_name: str
    topology: Topology
    mesh: tuple[int, int, int]
    processes: int
    compiled: list[Compiled]
    resident: list[Resident]
    phases: list[PhaseTime]

    @property
    def resident_bytes(self) -> int:
        return sum(r.bytes_per_chip for r in self.resident)

    def working_set(self, result: Compiled) -> int:
        """Bytes a program needs beyond the resident pieces among its arguments."""
        held = sum(r.bytes_per_chip for r in self.resident if r.name in result.program.resident
                   or (r.name == "optimizer state" and "state" in result.program.resident))
        return max(result.hbm_bytes - held, 0)

    @property
    def largest(self) -> Compiled | None:
        fitting = [c for c in self.compiled if c.fits]
        return max(fitting, key=self.working_set) if fitting else None

    @property
    def total_bytes(self) -> int:
        largest = self.largest
        return self.resident_bytes + (self.working_set(largest) if largest else 0)

    @property
    def margin_bytes(self) -> int:
        return self.topology.chip.hbm_limit_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.compiled) and self.margin_bytes >= 0


def check_mesh(config: TrainConfig, topology: Topology, processes: int) -> None:
    """The trainer's rule (`check_resources`): the mesh covers every device of a multi-host slice,
    or divides one host's devices."""
    size, devices = math.prod(config.mesh), topology.devices_total
    ok = size == devices if processes > 1 else devices % size == 0
    if not ok:
        need = f"is {devices}" if processes > 1 else f"divides {devices}"
        raise MeshMismatchError(
            f"config.mesh = {tuple(config.mesh)} uses {size} devices, but {topology.describe()} over {processes} "
            f"process(es); set --config.mesh=(data, fsdp, tensor) with a product that {need}, with data x fsdp "
            f"dividing the {config.rollouts_per_update} rollouts per update")


def _resident(models: dict[str, PlannedModel], state: Any) -> list[Resident]:
    """Per-chip bytes of each model's weights and of the optimizer state (the train state's own copy of the
    trainable weights replaces the loaded one, so the policy and critic count once)."""
    pieces = [Resident(role, per_device_bytes(m.model.params), m.source) for role, m in models.items()]
    extra = per_device_bytes(state.opt_state) + per_device_bytes(state.step)
    if state.ref_params is not None:
        extra += per_device_bytes(state.ref_params)
    pieces.append(Resident("optimizer state", extra))
    return pieces


def run_plan(config: TrainConfig, topology: Topology, *, config_name: str = "", judge_modes: tuple[str, ...] = (),
             model_configs: Path | None = DEFAULT_MODEL_CONFIGS, only: tuple[str, ...] = (),
             progress: Any = None) -> PlanResult:
    """Build and compile every program of one update of `config` for `topology`."""
    from mpo_jax.train.trainer import make_run_mesh

    devices = topology_devices(topology)
    processes = len({d.process_index for d in devices})
    check_mesh(config, topology, processes)
    mesh = make_run_mesh(config, devices=devices, always=True)
    models = plan_models(config, mesh, model_configs)
    state = plan_state(config, models)
    modes = judge_modes or (config.judge.mode,)
    programs: list[Program] = build_programs(config, models, state, mesh, judge_modes=modes)
    if only:
        programs = [p for p in programs if any(p.name.startswith(o) for o in only)]
    outputs: dict[str, Any] = {}
    compiled = []
    for program in programs:
        if progress is not None:
            progress(f"compiling {program.name} ({program.role}) ...")
        result = compile_program(program, outputs)
        if progress is not None:
            status = f"{result.hbm_bytes / 2**30:.2f} GiB per chip" if result.fits else "DOES NOT FIT"
            progress(f"  {program.name}: {status}, {result.compile_s:.1f} s")
        compiled.append(result)
    return PlanResult(config_name=config_name, topology=topology, mesh=tuple(config.mesh), processes=processes,
                      compiled=compiled, resident=_resident(models, state), phases=phase_times(programs, topology))
