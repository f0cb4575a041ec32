"""Read any rectangular region of a canonical parameter straight from HF safetensors files.

A pod host must not hold a whole 72B checkpoint, so `load_model` asks for one device's shard
at a time: `HFSliceReader.read("layers.q_proj", (layers, rows, cols))` reads, for each layer
of the range, only the rows and columns of `model.layers.{i}.self_attn.q_proj.weight` that the
shard covers (`safe_open(...).get_slice(name)[...]`), transposes HF's (out, in) slice to the
canonical (in, out) layout and casts it into the shard's buffer. The conversion is the one of
`load_hf_checkpoint` (same names, same transposes, same numpy cast), applied per slice, so the
values are identical bit for bit. Host memory: the shard being built plus one slice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType

import numpy as np
import numpy.typing as npt

from mpo_jax.errors import InvalidValueError
from mpo_jax.models.config import ModelConfig, canonical_param_shapes
from mpo_jax.models.hf_checkpoint import (
    HFTensor,
    SafetensorsFiles,
    hf_tensors,
    read_hf_config,
    require_zero,
    resolve_param_dtype,
)

Region = tuple[slice, ...]


class HFSliceReader:
    """A HF checkpoint directory opened for reading parameter regions; use it as a context manager.

    Opening reads only `config.json`, the index and the safetensors headers: every tensor is
    checked for presence and shape (and an unused o_proj bias for being zero) before any
    weight is read, so a bad checkpoint fails before anything is placed on a device.
    """

    def __init__(self, path: str | os.PathLike, *, dtype: npt.DTypeLike = np.float32) -> None:
        self.config: ModelConfig
        self.config, weight_map = read_hf_config(path, dtype=dtype)
        self.dtype = resolve_param_dtype(dtype)
        self.shapes: dict[str, tuple[int, ...]] = canonical_param_shapes(self.config)
        self._files = SafetensorsFiles(weight_map)
        self._sources: dict[str, list[HFTensor]] = {key: [] for key in self.shapes}
        try:
            for t in hf_tensors(self.config):
                if t.key is None:
                    require_zero(t, self._files)
                else:
                    self._files.open_slice(t.name, t.shape)
                    self._sources[t.key].append(t)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> HFSliceReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._files.close()

    def read(self, key: str, index: Sequence[slice] | None = None) -> np.ndarray:
        """`params[key][index]` as `load_hf_checkpoint` would return it, reading only that region.

        `index` holds one slice per dimension (step 1; `slice(None)` is the whole axis), as
        `Sharding.addressable_devices_indices_map` gives it; None reads the whole parameter.
        """
        shape = self.shapes.get(key)
        if shape is None:
            raise InvalidValueError(f"{key!r} is not a parameter of this checkpoint; "
                                    f"it has {sorted(self.shapes)}")
        region = normalize_region(index, shape)
        out = np.empty(tuple(s.stop - s.start for s in region), self.dtype)
        sources = self._sources[key]
        if sources[0].layer is None:
            out[...] = self._read_tensor(sources[0], region)
        else:
            for row, layer in enumerate(range(region[0].start, region[0].stop)):
                out[row] = self._read_tensor(sources[layer], region[1:])
        return out

    def _read_tensor(self, t: HFTensor, region: Region) -> np.ndarray:
        """The canonical-layout `region` of one HF tensor, in the file's dtype."""
        if not t.transposed:
            return self._files.read_region(t.name, t.shape, region)
        return self._files.read_region(t.name, t.shape, region[::-1]).T


def normalize_region(index: Sequence[slice] | None, shape: tuple[int, ...]) -> Region:
    """Explicit `slice(start, stop)` per dimension; refuses steps, which no sharding produces."""
    if index is None:
        index = (slice(None),) * len(shape)
    index = tuple(index)
    if len(index) != len(shape):
        raise InvalidValueError(f"region {index} has {len(index)} entries for a {len(shape)}-d parameter "
                                f"of shape {shape}; give one slice per dimension")
    region = []
    for s, n in zip(index, shape, strict=True):
        if not isinstance(s, slice):
            raise InvalidValueError(f"region entries must be slices, got {s!r}; use slice(i, i + 1)")
        start, stop, step = s.indices(n)
        if step != 1:
            raise InvalidValueError(f"region {index} has step {step}; only contiguous slices can be read")
        region.append(slice(start, max(start, stop)))
    return tuple(region)
