"""Lowering and compiling one program for the abstract topology, and what the compiler says about it.

`jit(...).lower(abstract args).compile()` runs the TPU compiler for the target devices. Its memory
analysis is per device (one chip): arguments, outputs, temporaries and the outputs that alias
donated arguments; the compiler refuses a program whose arguments + outputs + temporaries -
aliased exceed the chip's HBM with a RESOURCE_EXHAUSTED error, which is a plan that does not fit,
not a crash. The FLOPs the compiler counts see each loop body once, so they are not used for time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from mpo_jax.plan.programs import Program

OOM_MARKERS = ("resource_exhausted", "ran out of memory", "exceeds available hbm")


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A program's compile outcome: per-chip bytes from the compiler, or the compiler's refusal."""

    program: Program
    compile_s: float
    fits: bool
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    alias_bytes: int = 0
    error: str = ""

    @property
    def hbm_bytes(self) -> int:
        """What the compiler checks against the chip's HBM: arguments + outputs + temporaries - aliased."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def is_oom(error: Exception) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in OOM_MARKERS)


def _abstract_outputs(lowered: Any, compiled: Any) -> Any:
    """The program's outputs as shapes with the shardings the compiler chose (input to the next program)."""
    info = lowered.out_info
    shardings = compiled.output_shardings
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), info, shardings)


def compile_program(program: Program, outputs: dict[str, Any]) -> Compiled:
    """Compile `program` (its args may come from `outputs` of earlier ones); record its outputs there."""
    args = program.args(outputs) if callable(program.args) else program.args
    start = time.perf_counter()
    try:
        lowered = program.fn.lower(*args)
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        if not is_oom(err):
            raise
        message = str(err).strip().splitlines()[0]
        return Compiled(program, time.perf_counter() - start, fits=False, error=message)
    elapsed = time.perf_counter() - start
    outputs[program.name] = _abstract_outputs(lowered, compiled)
    memory = compiled.memory_analysis()
    return Compiled(program, elapsed, fits=True, argument_bytes=int(memory.argument_size_in_bytes),
                    output_bytes=int(memory.output_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
                    alias_bytes=int(memory.alias_size_in_bytes))
