"""HF checkpoints loaded shard by shard: the same parameters as the whole-file loader bit for bit,
on 8 fake CPU devices and several meshes; peak host memory of one shard plus one tensor; and,
over two processes, each process reading from the files only the regions its devices hold."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from safetensors import safe_open
from tiny import random_params, tiny_tokenizer_dir

from mpo_jax import load_model
from mpo_jax.engine.language_model import place_params
from mpo_jax.engine.shard_loading import load_hf_params
from mpo_jax.engine.sharding import make_mesh
from mpo_jax.errors import FileFormatError, MpoError
from mpo_jax.models import hf_checkpoint
from mpo_jax.models.config import ModelConfig, canonical_param_shapes
from mpo_jax.models.hf_checkpoint import export_hf_checkpoint, load_hf_checkpoint
from mpo_jax.models.hf_slices import HFSliceReader
from mpo_jax.models.params import flat_from_state

ROOT = Path(__file__).resolve().parents[1]
MESHES = [(1, 2, 4), (2, 2, 2), (1, 8, 1)]
CONFIGS = {
    "llama": ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8, architecture="llama"),
    # Qwen2: q/k/v biases, an untied head and a critic head stored in the checkpoint
    "qwen2_untied": ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                                num_kv_heads=2, head_dim=8, attention_bias=True, tie_word_embeddings=False,
                                architecture="qwen2", value_head=True),
    # tied embeddings; a vocabulary that 4 does not divide, so it stays whole on the tensor axis
    "qwen2_tied": ModelConfig(vocab_size=90, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                              num_kv_heads=4, head_dim=8, attention_bias=True, tie_word_embeddings=True,
                              architecture="qwen2"),
}

# The partition rules, restated: rows (the model width) over fsdp; heads, MLP and vocabulary over
# tensor; the layer axis and norms whole. An axis of size 1, or one that does not divide, is dropped.
RULES: dict[str, tuple[str | None, ...]] = {
    "embed": ("tensor", "fsdp"), "final_norm": (None,), "lm_head": ("fsdp", "tensor"),
    "value_head.kernel": ("fsdp", None), "value_head.bias": (None,),
    "layers.attn_norm": (None, None), "layers.mlp_norm": (None, None),
    "layers.q_proj": (None, "fsdp", "tensor"), "layers.k_proj": (None, "fsdp", "tensor"),
    "layers.v_proj": (None, "fsdp", "tensor"), "layers.o_proj": (None, "tensor", "fsdp"),
    "layers.gate_proj": (None, "fsdp", "tensor"), "layers.up_proj": (None, "fsdp", "tensor"),
    "layers.down_proj": (None, "tensor", "fsdp"),
    "layers.q_bias": (None, "tensor"), "layers.k_bias": (None, "tensor"), "layers.v_bias": (None, "tensor"),
}
# Canonical name -> (HF name with {i} for the layer, stored transposed as (out, in)).
HF_NAMES: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False), "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True), "value_head.kernel": ("value_head.weight", True),
    "value_head.bias": ("value_head.bias", False),
    "layers.attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "layers.mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    **{f"layers.{p}_proj": (f"model.layers.{{i}}.self_attn.{p}_proj.weight", True) for p in "qkvo"},
    **{f"layers.{p}": (f"model.layers.{{i}}.mlp.{p}.weight", True) for p in ("gate_proj", "up_proj", "down_proj")},
    **{f"layers.{p}_bias": (f"model.layers.{{i}}.self_attn.{p}_proj.bias", False) for p in "qkv"},
}


def expected_spec(name: str, shape: tuple[int, ...], mesh_shape: tuple[int, int, int]) -> PartitionSpec:
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh_shape))
    return PartitionSpec(*(axis if axis and sizes[axis] > 1 and dim % sizes[axis] == 0 else None
                           for axis, dim in zip(RULES[name], shape, strict=True)))


def bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict[str, np.ndarray]]]:
    """Every config exported as one file and as a sharded index (several files)."""
    assert jax.device_count() == 8, "tests/conftest.py must set 8 fake devices before jax is imported"
    out = {}
    for name, config in CONFIGS.items():
        params = random_params(config, seed=len(out))
        for layout, limit in (("single", None), ("sharded", 6000)):
            path = tmp_path_factory.mktemp(f"{name}_{layout}")
            export_hf_checkpoint(config, params, path, max_shard_bytes=limit)
            files = sorted(p.name for p in path.glob("*.safetensors"))
            assert (len(files) == 1) == (layout == "single"), files
            out[name, layout] = path, params
    return out


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_load_equals_the_whole_file_loader_bit_for_bit(checkpoints, name, layout, mesh_shape):
    path, params = checkpoints[name, layout]
    old_config, old = load_hf_checkpoint(path)
    mesh = make_mesh(mesh_shape)
    config, new = load_hf_params(path, mesh=mesh)
    assert config == old_config == CONFIGS[name]
    assert sorted(new) == sorted(old) == sorted(canonical_param_shapes(CONFIGS[name]))
    for key, array in new.items():
        assert array.dtype == np.float32, key
        assert np.array_equal(np.asarray(array), old[key]), key
        assert np.array_equal(old[key], params[key]), key  # and both are the exported weights
        assert array.sharding.spec == expected_spec(key, array.shape, mesh_shape), key
        assert array.sharding.mesh.devices.tolist() == mesh.devices.tolist()
        for shard in array.addressable_shards:  # each device holds its own slice of the weights
            assert np.array_equal(np.asarray(shard.data), params[key][shard.index]), (key, shard.index)
    # the tiny configs really are split: over fsdp and tensor (1, 2, 4), fsdp only (1, 8, 1)
    q = new["layers.q_proj"]
    assert q.addressable_shards[0].data.shape == (3 if name != "qwen2_tied" else 2, 32 // mesh_shape[1],
                                                  32 // mesh_shape[2])


@pytest.mark.parametrize(("file_dtype", "load_dtype"), [("float32", "bfloat16"), ("bfloat16", "float32"),
                                                        ("bfloat16", "bfloat16")])
def test_dtype_casts_per_slice_match_the_whole_file_loader(tmp_path, file_dtype, load_dtype):
    config = CONFIGS["qwen2_untied"]
    export_hf_checkpoint(config, random_params(config, seed=5), tmp_path, dtype=file_dtype, max_shard_bytes=6000)
    _, old = load_hf_checkpoint(tmp_path, dtype=load_dtype)
    _, new = load_hf_params(tmp_path, dtype=load_dtype, mesh=make_mesh((1, 2, 4)))
    want = ml_dtypes.bfloat16 if load_dtype == "bfloat16" else np.float32
    bits = np.uint16 if load_dtype == "bfloat16" else np.uint32
    for key in old:
        assert new[key].dtype == want and old[key].dtype == want, key
        assert np.array_equal(np.asarray(new[key]).view(bits), old[key].view(bits)), key


def test_any_region_reads_the_same_values_as_the_whole_parameter(checkpoints):
    """Layer ranges and row/column windows that no current mesh uses (the reader is not tied to them)."""
    path, params = checkpoints["qwen2_untied", "sharded"]
    rng = np.random.default_rng(3)
    with HFSliceReader(path) as reader:
        assert np.array_equal(reader.read("layers.q_proj"), params["layers.q_proj"])
        for key, shape in canonical_param_shapes(CONFIGS["qwen2_untied"]).items():
            for _ in range(4):
                lo = [int(rng.integers(0, n)) for n in shape]
                region = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, shape))
                assert np.array_equal(reader.read(key, region), params[key][region]), (key, region)
        with pytest.raises(MpoError, match="step 2"):
            reader.read("embed", (slice(0, 8, 2), slice(None)))
        with pytest.raises(MpoError, match="not a parameter"):
            reader.read("lm_head_lora_a")


def test_a_shape_mismatch_fails_before_any_weight_is_read(checkpoints, tmp_path):
    path, _ = checkpoints["llama", "single"]
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 40}))
    with pytest.raises(FileFormatError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(48, 32\)"):
        load_hf_params(tmp_path, mesh=make_mesh((1, 2, 4)))


def test_load_model_reads_hf_directories_shard_by_shard(checkpoints, tmp_path, monkeypatch):
    """The trainer's entry point: no whole-file read, same weights, fresh adapters and value head too."""
    path, params = checkpoints["llama", "sharded"]
    tiny_tokenizer_dir(path)
    monkeypatch.setattr(hf_checkpoint, "load_hf_checkpoint", lambda *a, **k: pytest.fail("whole-file read"))
    mesh = make_mesh((1, 2, 4))
    sharded = flat_from_state(load_model(path, mesh=mesh, lora_rank=2, value_head=True).params)
    single = flat_from_state(load_model(path).params)
    for key in params:
        assert np.array_equal(np.asarray(sharded[key]), params[key]), key
        assert np.array_equal(np.asarray(single[key]), params[key]), key
        assert single[key].devices() == {jax.devices()[0]}
        assert sharded[key].sharding.spec == expected_spec(key, params[key].shape, (1, 2, 4)), key
    assert {"layers.q_proj_lora_a", "value_head.kernel"} <= set(sharded)
    assert sharded["layers.q_proj_lora_a"].sharding.spec == PartitionSpec(None, "fsdp", None)
    assert not np.any(np.asarray(sharded["layers.q_proj_lora_b"]))


class HostMemory:
    """Peak numpy host memory of a load (tracemalloc), less the buffers a CPU device took over.

    XLA's CPU client keeps a 64-byte-aligned numpy buffer as the device buffer itself (zero copy;
    jax's numpy path ignores `may_alias=False`), so from that moment it is device memory, which a
    TPU host would have copied to HBM and freed. Each `jax.device_put` whose result points at its
    input's memory starts a new interval; the peak of each interval less what devices own is kept.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.peak = 0
        self._adopted: dict[int, int] = {}
        real_put = jax.device_put

        def put(x, *args, **kwargs):
            out = real_put(x, *args, **kwargs)
            if isinstance(x, np.ndarray) and isinstance(out, jax.Array):
                out.block_until_ready()
                if x.ctypes.data not in self._adopted and any(
                        s.data.unsafe_buffer_pointer() == x.ctypes.data for s in out.addressable_shards):
                    self._close_interval()
                    self._adopted[x.ctypes.data] = x.nbytes
            return out

        monkeypatch.setattr(jax, "device_put", put)

    def _close_interval(self) -> None:
        self.peak = max(self.peak, tracemalloc.get_traced_memory()[1] - sum(self._adopted.values()))
        tracemalloc.reset_peak()

    def __enter__(self) -> HostMemory:
        tracemalloc.start()
        tracemalloc.reset_peak()
        self._base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc) -> None:
        self._close_interval()
        self.peak -= self._base
        tracemalloc.stop()


# Many layers, so that the whole model (28 MB) dwarfs one shard plus one tensor (about 1 MB).
DEEP = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=48, num_heads=4,
                   num_kv_heads=2, head_dim=32, attention_bias=True, tie_word_embeddings=False,
                   architecture="qwen2")
BOOKKEEPING = 512 * 1024  # Python objects of the load itself: tensor tables, shardings, file handles


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deep")
    export_hf_checkpoint(DEEP, random_params(DEEP, seed=9), path, max_shard_bytes=4 << 20)
    return path


def tensor_bytes(path: Path) -> list[int]:
    """Size of every tensor in the files, from their headers."""
    sizes = []
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="numpy") as f:
            sizes += [int(np.prod(f.get_slice(n).get_shape())) * 4 for n in f.keys()]
    return sizes


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (1, 8, 1), None])
def test_peak_host_memory_is_one_shard_plus_one_tensor(deep_checkpoint, mesh_shape, monkeypatch):
    mesh = make_mesh(mesh_shape) if mesh_shape else None
    load_hf_params(deep_checkpoint, mesh=mesh)  # warm up jax's caches outside the measurement
    with HostMemory(monkeypatch) as new:
        _, params = load_hf_params(deep_checkpoint, mesh=mesh)
    shard = max(int(np.prod(a.addressable_shards[0].data.shape)) * a.dtype.itemsize for a in params.values())
    model, tensor = sum(tensor_bytes(deep_checkpoint)), max(tensor_bytes(deep_checkpoint))
    bound = shard + tensor + BOOKKEEPING
    del params
    with HostMemory(monkeypatch) as old:  # the whole-file path, measured the same way
        config, flat = load_hf_checkpoint(deep_checkpoint)
        place_params(config, flat, mesh)
        del flat
    print(f"mesh {mesh_shape}: model {model} B, bound {bound} B (shard {shard} + tensor {tensor} + "
          f"{BOOKKEEPING}); peak host memory: shard by shard {new.peak} B, whole file {old.peak} B")
    assert model > (4 * bound if mesh else bound)  # without a mesh, one whole parameter is the shard
    assert new.peak <= bound
    assert old.peak > model > bound  # the measurement catches a whole-model load


CHILD = textwrap.dedent("""
    import json, os, sys
    process_id, port, ckpt, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    from mpo_jax.train import distributed
    from mpo_jax.train.config import DistributedSpec
    distributed.initialize(DistributedSpec(initialize=True, coordinator_address=f"127.0.0.1:{port}",
                                           num_processes=2, process_id=process_id))
    import jax
    import numpy as np
    assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
    from mpo_jax.models import hf_checkpoint

    reads = []  # every read from the safetensors files: (tensor, [[start, stop], ...] or None: whole)

    class Slice:
        def __init__(self, real, name):
            self.real, self.name = real, name
        def get_shape(self):
            return self.real.get_shape()
        def __getitem__(self, region):
            reads.append([self.name, [list(s.indices(n)[:2]) for s, n in zip(region, self.real.get_shape())]])
            return self.real[region]

    class Handle:
        def __init__(self, real):
            self.real = real
        def __enter__(self):
            self.real.__enter__()
            return self
        def __exit__(self, *exc):
            return self.real.__exit__(*exc)
        def keys(self):
            return self.real.keys()
        def get_slice(self, name):
            return Slice(self.real.get_slice(name), name)
        def get_tensor(self, name):
            reads.append([name, None])
            return self.real.get_tensor(name)

    real_open = hf_checkpoint._open_safetensors
    hf_checkpoint._open_safetensors = lambda file: Handle(real_open(file))
    from mpo_jax import load_model
    from mpo_jax.engine.sharding import make_mesh
    from mpo_jax.models.params import flat_from_state
    flat = flat_from_state(load_model(ckpt, mesh=make_mesh((1, 2, 4))).params)
    shards, data = {}, {}
    for key, array in flat.items():
        shards[key] = []
        for k, shard in enumerate(array.addressable_shards):
            shards[key].append([list(s.indices(n)[:2]) for s, n in zip(shard.index, array.shape)])
            data[f"{key}#{k}"] = np.asarray(shard.data)
    np.savez(out + ".npz", **data)
    with open(out + ".json", "w") as f:
        json.dump({"reads": reads, "shards": shards, "devices": [d.id for d in jax.local_devices()]}, f)
    print("LOADED")
""")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expected_reads(key: str, shard_bounds: list[list[list[int]]]) -> list[tuple[str, tuple]]:
    """The HF regions behind each distinct shard of a canonical parameter, one per layer."""
    name, transposed = HF_NAMES[key]
    reads = []
    for b in {tuple(map(tuple, s)) for s in shard_bounds}:
        layers, rest = ([range(*b[0]), b[1:]] if key.startswith("layers.") else [[None], b])
        for i in layers:
            reads.append((name.format(i=i), tuple(rest[::-1] if transposed else rest)))
    return reads


def test_two_processes_each_read_only_their_own_shards(checkpoints, tmp_path):
    """2 processes x 4 CPU devices, a (1, 2, 4) mesh: the fsdp halves live on different processes."""
    path, params = checkpoints["qwen2_untied", "sharded"]
    tiny_tokenizer_dir(path)
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(i), str(port), str(path), str(tmp_path / f"p{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
        assert "LOADED" in out
    total = sum(int(np.prod(v.shape)) * 4 for v in params.values())
    held_rows, devices = [], []
    for i in range(2):
        report = json.loads((tmp_path / f"p{i}.json").read_text())
        data = np.load(tmp_path / f"p{i}.npz")
        devices.append(set(report["devices"]))
        expected = collections.Counter()
        for key in params:
            expected.update(expected_reads(key, report["shards"][key]))
            for k, b in enumerate(report["shards"][key]):  # and each local shard holds the right values
                window = tuple(slice(lo, hi) for lo, hi in b)
                assert np.array_equal(data[f"{key}#{k}"], params[key][window]), (i, key, b)
        got = collections.Counter((name, tuple(map(tuple, region)) if region else None)
                                  for name, region in report["reads"])
        assert got == expected  # exactly the regions of this process's shards, each once, nothing else
        read_bytes = sum(4 * int(np.prod([hi - lo for lo, hi in region])) for _, region in got.elements())
        assert read_bytes < 0.75 * total, (read_bytes, total)
        held_rows.append({tuple(b[1]) for b in report["shards"]["layers.q_proj"]})
    assert len(devices[0]) == len(devices[1]) == 4 and not devices[0] & devices[1]
    assert held_rows == [{(0, 16)}, {(16, 32)}]  # the processes hold different halves of the rows
