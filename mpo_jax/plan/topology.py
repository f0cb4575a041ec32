"""Cloud TPU accelerator types as abstract JAX devices, and each chip's published limits.

`v5e-16` (or `v5litepod-16`), `v4-32`, `v5p-64`, `v6e-8` name a slice as `tpu_scripts/tpu.py` and
gcloud do: v4 and v5p count TensorCores (two per chip, one "megacore" JAX device), v5e and v6e
count chips. libtpu (the `tpu` extra) builds the slice's devices without the hardware
(`jax.experimental.topologies.get_topology_desc`), with one JAX process per host as on the VMs,
so programs lower and compile for them from a CPU-only machine. The chip figures are the
published data-sheet peaks and the HBM limit the compiler enforces per device (read off its
RESOURCE_EXHAUSTED messages with libtpu 0.0.42.1, compiling oversized arrays for each generation).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from mpo_jax.errors import InvalidValueError, MissingDependencyError

GIB = 1024**3
TPU_EXTRA = "pip install -e '.[tpu]' (or `pip install \"jax[tpu]==<your jax version>\"`), which brings libtpu"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's chip: how it is named to libtpu and what it can do (per JAX device)."""

    name: str  # as in accelerator types: v4, v5e, v5p, v6e
    libtpu_name: str  # the generation in libtpu's topology names ("v5" for v5p)
    chip_config: str  # "megacore" where two TensorCores make one JAX device
    cores_per_chip: int  # how the accelerator type counts (TensorCores or chips)
    single_host_chips: int  # slices up to this many chips are one host, larger ones have 4 chips per host
    dims: int  # 3 for the 3D-torus generations, 2 for v5e/v6e
    hbm_limit_bytes: int  # what the compiler allows one device (below the physical HBM)
    hbm_bytes: int  # physical HBM per chip (data sheet)
    peak_flops: float  # dense bf16 FLOP/s per chip (data sheet)
    hbm_bandwidth: float  # bytes/s per chip (data sheet)
    ici_bandwidth: float  # bytes/s per chip, bidirectional, all links (data sheet; 0 where not published)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "v4", "megacore", 2, 4, 3, int(30.75 * GIB), 32 * GIB, 275e12, 1.2e12, 0.0),
    "v5e": Chip("v5e", "v5e", "default", 1, 8, 2, int(15.75 * GIB), 16 * GIB, 197e12, 819e9, 400e9),
    "v5p": Chip("v5p", "v5", "megacore", 2, 4, 3, int(95.74 * GIB), 95 * GIB, 459e12, 2765e9, 1200e9),
    "v6e": Chip("v6e", "v6e", "default", 1, 8, 2, int(31.25 * GIB), 32 * GIB, 918e12, 1638e9, 800e9),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """One accelerator type (times `slices`) as libtpu's topology arguments."""

    accelerator: str  # as given, normalised: "v5e-16"
    chip: Chip
    chips: int  # per slice
    grid: tuple[int, ...]  # chip grid per slice
    slices: int = 1

    @property
    def devices_total(self) -> int:
        return self.chips * self.slices

    @property
    def hosts(self) -> int:
        """Hosts per slice (one JAX process each), as on the TPU VMs and in `tpu_scripts/tpu.py`."""
        return 1 if self.chips <= self.chip.single_host_chips else self.chips // 4

    @property
    def topology_name(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(str(d) for d in self.grid)}"

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        if self.hosts == 1:  # every chip on one host (v5e-8: a 2x4 board)
            grid = (*self.grid, 1, 1)
            return grid[0], grid[1], grid[2]
        return (2, 2, 1)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus wrap-around links: full 3D slices from 64 chips; v5e/v6e from 128 chips (MaxText's table)."""
        if self.chip.dims == 3:
            return (True, True, True) if self.chips >= 64 else (False, False, False)
        if self.chips >= 256:
            return (True, True, False)
        return (False, True, False) if self.chips >= 128 else (False, False, False)

    def describe(self) -> str:
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return (f"{self.accelerator}{slices}: {self.devices_total} chips ({self.topology_name}), "
                f"{self.hosts * self.slices} host(s), {self.chip.hbm_limit_bytes / GIB:.2f} GiB HBM per chip")


def _grid(chip: Chip, chips: int) -> tuple[int, ...]:
    if chips & (chips - 1):
        raise InvalidValueError(f"{chips} {chip.name} chips: the plan knows power-of-two slices only")
    if chip.dims == 2:
        side = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
        if chips not in side:
            raise InvalidValueError(f"{chip.name} slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips, not {chips}")
        return side[chips]
    small = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
    if chips in small:
        return small[chips]
    dims = [4, 4, 4]
    total, i = 64, 2
    while total < chips:
        dims[i] *= 2
        total *= 2
        i = (i - 1) % 3
    if total != chips:
        raise InvalidValueError(f"{chip.name} slices of {chips} chips are not in the plan's table")
    return tuple(sorted(dims))


def parse_topology(text: str, slices: int = 1) -> Topology:
    """`v5e-16`, `v5litepod-16`, `v4-32`, `v5p-64`, `v6e-8` -> Topology, or an error listing what is known."""
    match = re.fullmatch(r"(v[0-9][a-z]*)-([0-9]+)", text.strip().lower())
    known = ", ".join(CHIPS)
    if not match:
        raise InvalidValueError(f"--topology {text!r} is not a Cloud TPU accelerator type; use e.g. v4-32, v5e-16 "
                                f"(v5litepod-16), v5p-64 or v6e-8 (generations: {known})")
    name = ALIASES.get(match.group(1), match.group(1))
    if name not in CHIPS:
        raise InvalidValueError(f"--topology {text!r}: TPU generation {match.group(1)!r} is not planned here; "
                                f"use one of {known}")
    if slices < 1:
        raise InvalidValueError(f"--slices must be >= 1, got {slices}")
    chip = CHIPS[name]
    size = int(match.group(2))
    if size % chip.cores_per_chip:
        raise InvalidValueError(f"--topology {text!r}: {name} types count TensorCores, two per chip; use an even size")
    chips = size // chip.cores_per_chip
    try:
        grid = _grid(chip, chips)
    except InvalidValueError as err:
        raise InvalidValueError(f"--topology {text!r}: {err}") from None
    return Topology(accelerator=f"{name}-{size}", chip=chip, chips=chips, grid=grid, slices=slices)


def topology_devices(topology: Topology) -> list[Any]:
    """The slice's abstract devices from libtpu (no TPU needed); a clear error when libtpu is missing."""
    # Another JAX process on this machine (any run, with libtpu installed) holds libtpu's lock file;
    # compiling for an abstract topology needs no exclusive access to a chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"planning for a TPU needs libtpu: {TPU_EXTRA}") from None
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name,
                                        chip_config_name=topology.chip.chip_config,
                                        chips_per_host_bounds=topology.host_bounds, wrap=topology.wrap,
                                        num_slices=topology.slices)
    devices = list(desc.devices)
    if len(devices) != topology.devices_total:
        raise InvalidValueError(f"libtpu made {len(devices)} devices for {topology.describe()}, expected "
                                f"{topology.devices_total}; check the chip table in mpo_jax/plan/topology.py")
    return devices


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True
