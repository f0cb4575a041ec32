"""Read the key/value metadata of a GGUF file as plain Python values (no tensors loaded)."""

from __future__ import annotations

import os
from typing import Any

from mpo_jax.errors import FileFormatError, MissingFileError


def open_gguf(path: str | os.PathLike):
    """Open a GGUF file with a clear error when it is missing or not a GGUF file."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"GGUF file not found: {path!r}")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/struct errors on corrupt files
        raise FileFormatError(
            f"{path!r} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "re-download or re-convert it") from exc


def read_gguf_metadata(path_or_reader: Any) -> dict[str, Any]:
    """All metadata fields of a GGUF file (`tokenizer.ggml.tokens`, `llama.block_count`, ...)."""
    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike)) else path_or_reader
    return {key: field.contents() for key, field in reader.fields.items()}
