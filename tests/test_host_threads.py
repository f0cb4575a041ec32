"""XLA:CPU thread pools for several CPU devices (mpo_jax/engine/host_threads.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from mpo_jax.engine import host_threads

EIGHT = "--xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("environ, expected", [
    ({}, 1),
    ({"XLA_FLAGS": EIGHT}, 8),
    ({"XLA_FLAGS": f"--xla_dump_to=/tmp/x {EIGHT} --xla_force_host_platform_device_count=3"}, 3),
    ({"XLA_FLAGS": EIGHT, "JAX_NUM_CPU_DEVICES": "2"}, 2),
    ({"JAX_NUM_CPU_DEVICES": "4"}, 4),
    ({"JAX_NUM_CPU_DEVICES": "-1", "XLA_FLAGS": EIGHT}, 8),
])
def test_the_device_count_is_read_as_xla_and_jax_read_it(environ, expected):
    assert host_threads.requested_cpu_devices(environ) == expected


def test_each_device_gets_room_for_its_concurrent_collectives():
    per_device = host_threads.COLLECTIVE_THREADS_PER_DEVICE
    assert per_device >= 2  # the aborted decode loop needed two at once on one device
    assert host_threads.pool_threads(8, cores=2) == 8 * per_device
    assert host_threads.pool_threads(8, cores=64) == 64
    assert host_threads.pool_threads(1, cores=2) == 2


def test_a_pool_size_the_user_chose_is_kept():
    for name in ("PJRT_NPROC", "NPROC"):
        environ = {"XLA_FLAGS": EIGHT, name: "5"}
        assert host_threads.configure_cpu_pools(environ, cores=2) is None
        assert environ == {"XLA_FLAGS": EIGHT, name: "5"}


def test_single_device_runs_are_left_alone():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    assert host_threads.configure_cpu_pools(environ, cores=2) is None
    assert "PJRT_NPROC" not in environ


def _xla_thread_count(env: dict[str, str], import_first: str) -> int:
    """Threads of XLA's intra-op pool in a fresh interpreter, counted by the kernel's task names."""
    script = textwrap.dedent(f"""
        {import_first}
        import os, jax, jax.numpy as jnp
        jnp.ones(4).block_until_ready()
        names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        print(sum("XLAEigen" in n for n in names))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")
def test_importing_mpo_jax_gives_xla_the_larger_pool_before_jax_starts():
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    env.update(XLA_FLAGS=EIGHT, JAX_PLATFORMS="cpu")
    cores = len(os.sched_getaffinity(0))
    with_mpo = _xla_thread_count(env, "import mpo_jax")
    without = _xla_thread_count(env, "")
    assert without == max(cores, 8)  # XLA's own default, which starved
    assert with_mpo == max(cores, 8 * host_threads.COLLECTIVE_THREADS_PER_DEVICE)
