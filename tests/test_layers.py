"""The package's layers hold: import-linter checks the contracts in pyproject.toml ([tool.importlinter]).

The layers, low to high, are drawn in docs/architecture.md; a module imports only from its own layer
and the layers below it. import-linter reads the package from the file system, and `models/` is
installed as `mpo_jax.models` (setup.py's package_dir), so the check runs on a folder of links laid
out as the installed package: the checkout's `mpo_jax/` with `models/` inside it.

`python tests/test_layers.py` (`make lint`) prints import-linter's report and exits with its status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_RUN = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def installed_layout(folder: Path) -> Path:
    """`folder/mpo_jax` as pip installs it, made of links to the checkout; returns `folder`."""
    package = folder / "mpo_jax"
    package.mkdir()
    for entry in (ROOT / "mpo_jax").iterdir():
        if entry.name not in ("models", "__pycache__"):
            (package / entry.name).symlink_to(entry)
    (package / "models").symlink_to(ROOT / "models")
    return folder


def lint_imports(folder: Path, config: Path = ROOT / "pyproject.toml") -> subprocess.CompletedProcess[str]:
    """Run import-linter with `config` on the package in `folder` (its own interpreter: a fresh sys.path)."""
    return subprocess.run([sys.executable, "-c", _RUN, str(config)], cwd=folder, capture_output=True, text=True,
                          check=False, env=dict(os.environ, PYTHONPATH=str(folder)))


def _import_linter_missing() -> str:
    import importlib.util

    if importlib.util.find_spec("importlinter") is None:
        return "import-linter is not installed; install the test extra: pip install -e '.[test]' (or make install)"
    return ""


def test_the_layer_contracts_hold(tmp_path):
    assert not _import_linter_missing(), _import_linter_missing()
    done = lint_imports(installed_layout(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Lower layers never import higher ones KEPT" in done.stdout


def test_an_upward_import_is_reported(tmp_path):
    """The check is live: a task module that imports the judge breaks the layers contract."""
    assert not _import_linter_missing(), _import_linter_missing()
    folder = installed_layout(tmp_path)
    tasks = folder / "mpo_jax" / "tasks"
    tasks.unlink()
    tasks.mkdir()
    for entry in (ROOT / "mpo_jax" / "tasks").glob("*.py"):
        (tasks / entry.name).symlink_to(entry)
    (tasks / "upward.py").write_text("from mpo_jax.reward.judge import Judge\n", encoding="utf-8")
    done = lint_imports(folder)
    assert done.returncode != 0, done.stdout
    assert "BROKEN" in done.stdout and "mpo_jax.tasks.upward -> mpo_jax.reward.judge" in done.stdout


def main() -> int:
    if _import_linter_missing():
        print(_import_linter_missing(), file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as folder:
        done = lint_imports(installed_layout(Path(folder)))
    print(done.stdout, end="")
    print(done.stderr, end="", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
