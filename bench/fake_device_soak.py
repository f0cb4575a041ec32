"""Train the tiny config on 8 fake CPU devices with the pod's (2, 2, 2) mesh N times in a row.

XLA:CPU aborts a run (exit 134) whose collectives wait past its rendezvous timeout; this
script counts such runs, so a change to how fake-device runs are configured can be checked
(mpo_jax/engine/host_threads.py). `--load` starts a CPU-bound process beside every run.

    python bench/fake_device_soak.py --runs 10 [--load] [--out /tmp/soak]

Prints one row per run (exit status, wall seconds, whether XLA reported a stuck rendezvous)
and exits non-zero if any run failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUCK_MARKERS = ("rendezvous", "may be stuck", "Termination timeout")


def train_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mpo_jax.cli", "train", "--config", str(REPO / "configs" / "tiny_cpu.py"),
            "--config.num_updates=6", "--config.ppo.optimizer.total_updates=6", "--config.log.report=false",
            "--config.mesh=(2, 2, 2)", f"--config.run_dir={run_dir}"]


def cpu_hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--load", action="store_true", help="run a CPU-bound process beside every run")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mpo_fake_device_soak"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env.pop("JAX_PLATFORMS", None)
    print("| run | exit | wall s | stuck rendezvous | load |\n|---|---|---|---|---|", flush=True)
    failures = 0
    for run in range(1, args.runs + 1):
        run_dir = args.out / f"run{run}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        hog = cpu_hog() if args.load else None
        start = time.perf_counter()
        try:
            proc = subprocess.run(train_command(run_dir), env=env, cwd=REPO, capture_output=True, text=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        wall = time.perf_counter() - start
        log = proc.stdout + proc.stderr
        (args.out / f"run{run}.log").write_text(log, encoding="utf-8")
        stuck = any(marker in log for marker in STUCK_MARKERS)
        failures += proc.returncode != 0 or stuck
        print(f"| {run} | {proc.returncode} | {wall:.0f} | {'yes' if stuck else 'no'} | "
              f"{'1 busy process' if args.load else 'none'} |", flush=True)
    print(f"\n{args.runs - failures} of {args.runs} runs finished without an abort or a stuck rendezvous")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
