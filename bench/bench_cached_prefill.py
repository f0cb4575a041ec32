"""Memory (and, on a quiet machine, time) of one cached prefill, by query block size: the call that
feeds a long conversation turn into a KV cache, as the meta step's and the judge's chat sessions do.

    python bench/bench_cached_prefill.py                                  # Qwen2.5-1.5B shapes, memory only
    python bench/bench_cached_prefill.py --arch qwen2.5-0.5b --time       # also time it (quiet machine only)
    python bench/bench_cached_prefill.py --markdown-out /tmp/prefill.md

Attention over a KV cache scores every query of the chunk against every cache slot. All queries at
once, that is a [batch, heads, T, capacity] float32 matrix per layer (3.8 GB for the meta step's
16 rows x 2,048 tokens of Qwen2.5-0.5B), plus the masked copy and the probabilities.
`ModelConfig.cache_query_block` takes the queries in blocks instead (`transformer.attention`), so
one block's scores are live at a time. Row 0 is the all-at-once reference.

Method
------
* Memory: XLA's own buffer accounting of the jitted prefill (`build_prefill`, the function the
  sampler compiles, with the cache donated as there), from `compiled.memory_analysis()`, on
  shape-only weights: nothing is allocated, so this part is valid on a busy machine. "temporary" is
  the scratch space XLA assigns for the call (the peak above the weights, inputs and outputs).
* Time (`--time`): random float32 weights of the architecture's shapes, one warm-up call, then the
  median of `--repeats` calls; the load before the run and other processes' CPU share during it are
  printed, and the numbers mean something only when that share is near 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import cpu_seconds, emit_report, machine_info, markdown_table, others_share  # noqa: E402
from flax import nnx  # noqa: E402

from mpo_jax.engine.sampling import build_prefill  # noqa: E402
from mpo_jax.models.config import ModelConfig  # noqa: E402
from mpo_jax.models.kv_cache import KVCache  # noqa: E402
from mpo_jax.models.params import abstract_model  # noqa: E402
from mpo_jax.models.transformer import Transformer  # noqa: E402

_QWEN = dict(vocab_size=151936, architecture="qwen2", attention_bias=True, tie_word_embeddings=True,
             rope_theta=1e6, rms_norm_eps=1e-6)
ARCHS = {  # the GGUF presets' shapes (float32)
    "qwen2.5-0.5b": dict(_QWEN, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2),
    "qwen2.5-1.5b": dict(_QWEN, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, architecture="llama", tie_word_embeddings=True, rope_theta=1e5,
                         rms_norm_eps=1e-5),
}


def model_config(arch: str, block: int) -> ModelConfig:
    return ModelConfig(**ARCHS[arch], cache_query_block=block)


def inputs(config: ModelConfig, batch: int, tokens: int, capacity: int, abstract: bool):
    """Token ids, their valid mask and an empty cache (shapes only when `abstract`)."""
    make_cache = lambda: KVCache.create(config, batch, capacity)  # noqa: E731
    if abstract:
        return (jax.ShapeDtypeStruct((batch, tokens), jnp.int32), jax.ShapeDtypeStruct((batch, tokens), jnp.bool_),
                jax.eval_shape(make_cache))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, tokens)).astype(np.int32)
    return jnp.asarray(ids), jnp.ones((batch, tokens), bool), make_cache()


def memory(arch: str, block: int, batch: int, tokens: int, capacity: int) -> dict[str, float]:
    config = model_config(arch, block)
    graphdef, params = abstract_model(config)
    fn = jax.jit(build_prefill(graphdef), donate_argnums=(3,))
    analysis = fn.lower(params, *inputs(config, batch, tokens, capacity, abstract=True)).compile().memory_analysis()
    return {"temp": analysis.temp_size_in_bytes, "arguments": analysis.argument_size_in_bytes,
            "outputs": analysis.output_size_in_bytes}


def timed(arch: str, blocks: list[int], batch: int, tokens: int, capacity: int, repeats: int) -> dict[int, float]:
    """Median seconds per prefill for each block size, on one set of random weights."""
    state = nnx.state(Transformer(model_config(arch, blocks[0]), rngs=nnx.Rngs(0)))
    seconds = {}
    for block in blocks:
        config = model_config(arch, block)
        graphdef, _ = abstract_model(config)
        fn = jax.jit(build_prefill(graphdef), donate_argnums=(3,))
        times = []
        for i in range(repeats + 1):
            args = inputs(config, batch, tokens, capacity, abstract=False)
            start = time.perf_counter()
            jax.block_until_ready(fn(state, *args))
            if i:
                times.append(time.perf_counter() - start)
        seconds[block] = statistics.median(times)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen2.5-1.5b")
    parser.add_argument("--batch", type=int, default=16, help="rows (the meta step's sessions: 16)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens prefilled per row (a prompt bucket)")
    parser.add_argument("--capacity", type=int, default=2560, help="cache slots per row")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 128, 256, 512],
                        help="cache_query_block values; 0 = all queries at once (the reference)")
    parser.add_argument("--time", action="store_true", help="also time each (needs the weights in memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown-out", type=Path)
    args = parser.parse_args(argv)
    if args.tokens > args.capacity:
        parser.error(f"--tokens ({args.tokens}) must fit in --capacity ({args.capacity})")
    if any(block < 0 for block in args.blocks):
        parser.error("--blocks must be >= 0")
    args.blocks = [0] + sorted({block for block in args.blocks if block})  # the reference comes first

    info = machine_info()
    load_before = os.getloadavg()
    cpu_before, started = cpu_seconds(), time.perf_counter()
    mem = {block: memory(args.arch, block, args.batch, args.tokens, args.capacity) for block in args.blocks}
    seconds = timed(args.arch, args.blocks, args.batch, args.tokens, args.capacity, args.repeats) if args.time else {}
    wall_s = time.perf_counter() - started
    others = others_share(cpu_before, cpu_seconds(), wall_s)

    config = model_config(args.arch, 0)
    scores = args.batch * config.num_heads * args.tokens * args.capacity * 4
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    header = ["query block", "temporary GiB", "arguments GiB", "outputs GiB"] + (["s per prefill", "tokens/s"]
                                                                                 if seconds else [])
    rows = []
    for block in args.blocks:
        row = [block or "all (reference)", gib(mem[block]["temp"]), gib(mem[block]["arguments"]),
               gib(mem[block]["outputs"])]
        if seconds:
            row += [f"{seconds[block]:.2f}", f"{args.batch * args.tokens / seconds[block]:.0f}"]
        rows.append(row)
    out = ["### Machine", ""] + [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- load average before the run (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load_before)}; other "
            f"processes used {'?' if others is None else f'{others:.0%}'} of the CPUs during the run",
            f"- {args.arch} shapes ({config.num_layers} layers, {config.num_heads} query heads), float32; prefill of "
            f"{args.batch} rows x {args.tokens} tokens into a cache of {args.capacity} slots; all queries' scores "
            f"per layer: {gib(scores)} GiB", ""]
    out += ["### Cached prefill by query block", "", markdown_table(header, rows), ""]
    reference = mem[args.blocks[0]]["temp"]
    for block in args.blocks[1:]:
        line = f"- block {block}: temporary memory {mem[block]['temp'] / reference:.2f}x the reference's"
        if seconds:
            line += f", time {seconds[block] / seconds[args.blocks[0]]:.2f}x"
        out.append(line)
    emit_report(out, wall_s, args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
