"""Thread pools for several XLA:CPU devices in one process (fake devices in tests, the CLI on a CPU).

Why: XLA:CPU runs each program as a dataflow graph of thunks, and independent thunks of one
device run at once on the client's shared intra-op pool, which holds `max(cores, devices)`
threads. A collective thunk holds its thread until every device of its group arrives. When two
independent collectives of one program start in a different order on two devices (the decode
loop's log-softmax all-reduce and its sampling branch's all-reduce, for example), each device
needs a second thread to reach the other one, and with 8 devices on 8 threads all of them can be
held by waiting collectives: nothing progresses and XLA aborts the process after its 40 s
rendezvous timeout. One program, one launching thread; the pool is simply too small.

`PJRT_NPROC`, read once when the CPU client is created, sizes both pools. Giving each device
`COLLECTIVE_THREADS_PER_DEVICE` threads leaves every device room to enter all the collectives
that can be ready at once in our programs. TPUs run each program's collectives in one compiled
order per chip, so none of this applies there.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, MutableMapping

COLLECTIVE_THREADS_PER_DEVICE = 4
POOL_ENV = "PJRT_NPROC"
_USER_POOL_ENVS = (POOL_ENV, "NPROC")
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def requested_cpu_devices(environ: Mapping[str, str]) -> int:
    """The XLA:CPU device count the environment asks for (XLA_FLAGS or JAX_NUM_CPU_DEVICES); 1 if none."""
    jax_count = environ.get("JAX_NUM_CPU_DEVICES", "").strip()
    if jax_count.isdigit() and int(jax_count) > 0:  # jax passes it to the client over the XLA flag
        return int(jax_count)
    flags = _DEVICE_COUNT_FLAG.findall(environ.get("XLA_FLAGS", ""))
    return int(flags[-1]) if flags else 1  # XLA reads the last occurrence


def pool_threads(devices: int, cores: int) -> int:
    """Threads for a CPU client with `devices` devices: enough for every device's concurrent collectives."""
    return max(cores, devices * COLLECTIVE_THREADS_PER_DEVICE) if devices > 1 else cores


def configure_cpu_pools(environ: MutableMapping[str, str] | None = None, cores: int | None = None) -> int | None:
    """Set `PJRT_NPROC` for a multi-device CPU run unless the user set a pool size; returns what was set."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name, "").strip() for name in _USER_POOL_ENVS):
        return None
    devices = requested_cpu_devices(environ)
    if devices <= 1:
        return None
    threads = pool_threads(devices, cores or os.cpu_count() or 1)
    environ[POOL_ENV] = str(threads)
    return threads


def warn_if_configured_too_late() -> None:
    """Say so when the CPU client already exists with several devices and a pool that can starve."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - jax is a dependency
        return
    if not xla_bridge.backends_are_initialized():
        return
    import jax

    try:
        count = jax.local_device_count("cpu")
    except RuntimeError:
        return
    if count > 1 and not any(os.environ.get(name, "").strip() for name in _USER_POOL_ENVS):
        warnings.warn(f"jax created its {count} CPU devices before mpo_jax was imported, with a thread pool of "
                      f"max(cores, devices) threads, in which sharded programs can stall and abort in XLA's "
                      f"collective rendezvous; import mpo_jax first, or set {POOL_ENV}="
                      f"{pool_threads(count, os.cpu_count() or 1)} before jax starts", RuntimeWarning, stacklevel=3)


__all__ = ["COLLECTIVE_THREADS_PER_DEVICE", "POOL_ENV", "configure_cpu_pools", "pool_threads",
           "requested_cpu_devices", "warn_if_configured_too_late"]
