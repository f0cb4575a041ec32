"""Where a decode step's time goes: the weight matmuls of one SmolLM2-135M decode step at M = batch
rows, in XLA:CPU (jitted JAX, the way mpo-jax's decode loop calls them) and in PyTorch (the way
transformers' `nn.Linear` calls them), on the same machine, in the same run.

    python bench/bench_decode_pieces.py                      # batches 1, 8, 32; ~3 minutes on 2 cores
    python bench/bench_decode_pieces.py --markdown-out /tmp/pieces.md

`bench/bench_generate.py` times whole decode steps. This script times the two pieces that carry
all the weights, so that a step's time can be split into matmuls and the rest (cache update,
attention, norms, sampling, loop bookkeeping) and the engines' matmul kernels compared directly.

Method
------
* Weights: random float32 arrays of SmolLM2-135M's shapes (30 layers of q/k/v/o 576x576, 576x192,
  576x192, 576x576 and MLP gate/up 576x1536, down 1536x576; a tied 49152x576 embedding). Only the
  shapes matter for the time.
* "layer matmuls": the 7 projections of all 30 layers applied in sequence to x [batch, 576]
  (each layer: q, k, v, o from the residual stream, gate and up, down of gate*up; the residual
  adds o and down, and a tiny multiple of k and v so that nothing is dead code). No attention, no
  norms. JAX: one jitted function taking every layer's matrices as separate arguments, unrolled,
  as mpo-jax's decode loop reads them (`Transformer.decode_weights`); `x @ W` with W [in, out].
  PyTorch: `torch.nn.functional.linear` with W [out, in], as `nn.Linear` stores it, under
  `torch.inference_mode()`.
* "LM head": x @ embed.T for the tied 49152x576 embedding. JAX: `tied_logits_over_blocks` on the
  embedding's 8 row blocks (what the decode loop runs); PyTorch: `F.linear(x, embed)`.
* Timing: a warm-up call, then the median of `--repeats` timed calls, each `--inner` back-to-back
  calls (JAX results blocked on). Bytes read = the matrices' float32 bytes (the floor a step must
  read); GFLOP/s counts 2 x batch x the matrices' elements.
* torch uses as many threads as the machine has cores (`torch.get_num_threads()` is printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import cpu_seconds, emit_report, machine_info, markdown_table, others_share  # noqa: E402

from mpo_jax.models.transformer import tied_logits_over_blocks  # noqa: E402

HIDDEN, KV, MLP, LAYERS, VOCAB, VOCAB_BLOCKS = 576, 192, 1536, 30, 49152, 8
# name -> (in, out), in the order a layer applies them
PROJECTIONS = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
               "gate": (HIDDEN, MLP), "up": (HIDDEN, MLP), "down": (MLP, HIDDEN)}


def layer_elements() -> int:
    return LAYERS * sum(i * o for i, o in PROJECTIONS.values())


def random_weights(seed: int = 0) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Per layer name -> [in, out] float32 matrix, and the [vocab, hidden] embedding."""
    rng = np.random.default_rng(seed)
    layers = [{name: (rng.standard_normal((i, o), np.float32) / np.float32(np.sqrt(i)))
               for name, (i, o) in PROJECTIONS.items()} for _ in range(LAYERS)]
    embed = rng.standard_normal((VOCAB, HIDDEN), np.float32) * 0.02
    return layers, embed


def timed(fn: Callable[[], object], repeats: int, inner: int) -> float:
    """Median seconds of one call over `repeats` timings of `inner` calls, after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


# -- JAX ------------------------------------------------------------------------------------------
def jax_layer_matmuls(x: jax.Array, layers: Sequence[dict[str, jax.Array]]) -> jax.Array:
    for w in layers:
        q = x @ w["q"]
        k = x @ w["k"]
        v = x @ w["v"]
        o = q @ w["o"]
        down = (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
        x = x + o + down + 1e-6 * (k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True))
    return x


def bench_jax(layers_np, embed_np, batches: Sequence[int], repeats: int, inner: int) -> dict[tuple[str, int], float]:
    layers = [{k: jnp.asarray(v) for k, v in w.items()} for w in layers_np]
    blocks = tuple(jnp.asarray(b) for b in np.split(embed_np, VOCAB_BLOCKS))
    layer_fn = jax.jit(jax_layer_matmuls)
    head_fn = jax.jit(tied_logits_over_blocks)
    out = {}
    for b in batches:
        x = jnp.asarray(np.random.default_rng(b).standard_normal((b, HIDDEN), np.float32))
        out["layer matmuls", b] = timed(lambda x=x: jax.block_until_ready(layer_fn(x, layers)), repeats, inner)
        out["LM head", b] = timed(lambda x=x: jax.block_until_ready(head_fn(x, blocks)), repeats, inner)
        print(f"  jax   batch {b}: layers {out['layer matmuls', b] * 1e3:.1f} ms, "
              f"head {out['LM head', b] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return out


# -- PyTorch --------------------------------------------------------------------------------------
def bench_torch(layers_np, embed_np, batches: Sequence[int], repeats: int, inner: int
                ) -> tuple[dict[tuple[str, int], float], str]:
    import torch
    import torch.nn.functional as F

    layers = [{k: torch.from_numpy(np.ascontiguousarray(v.T)) for k, v in w.items()} for w in layers_np]  # [out, in]
    embed = torch.from_numpy(embed_np)

    def layer_matmuls(x):
        for w in layers:
            q = F.linear(x, w["q"])
            k = F.linear(x, w["k"])
            v = F.linear(x, w["v"])
            o = F.linear(q, w["o"])
            down = F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])
            x = x + o + down + 1e-6 * (k.sum(-1, keepdim=True) + v.sum(-1, keepdim=True))
        return x

    out = {}
    with torch.inference_mode():
        for b in batches:
            x = torch.from_numpy(np.random.default_rng(b).standard_normal((b, HIDDEN), np.float32))
            out["layer matmuls", b] = timed(lambda x=x: layer_matmuls(x), repeats, inner)
            out["LM head", b] = timed(lambda x=x: F.linear(x, embed), repeats, inner)
            print(f"  torch batch {b}: layers {out['layer matmuls', b] * 1e3:.1f} ms, "
                  f"head {out['LM head', b] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return out, f"{torch.__version__} ({torch.get_num_threads()} threads)"


# -- report ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--markdown-out", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    load_before = os.getloadavg()
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    layers_np, embed_np = random_weights()
    info = {**machine_info(), "jax": jax.__version__}
    results = {"mpo-jax (XLA:CPU)": bench_jax(layers_np, embed_np, batches, args.repeats, args.inner)}
    if not args.no_torch:
        try:
            torch_results, info["torch"] = bench_torch(layers_np, embed_np, batches, args.repeats, args.inner)
            results["PyTorch"] = torch_results
        except ImportError:
            info["torch"] = "not installed"
    wall_s = time.perf_counter() - started
    others = others_share(cpu_before, cpu_seconds(), wall_s)

    sizes = {"layer matmuls": layer_elements(), "LM head": VOCAB * HIDDEN}
    rows = []
    for piece, elements in sizes.items():
        for b in batches:
            for engine, res in results.items():
                s = res[piece, b]
                rows.append([piece, b, engine, f"{s * 1e3:.2f}", f"{4 * elements / s / 1e9:.1f}",
                             f"{2 * b * elements / s / 1e9:.1f}"])
    ratios = []
    if len(results) == 2:
        jx, pt = results.values()
        for piece in sizes:
            for b in batches:
                ratios.append(f"- {piece}, batch {b}: PyTorch / mpo-jax time = **{pt[piece, b] / jx[piece, b]:.2f}x**")
    out = ["### Machine", ""] + [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- load average before the run (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load_before)}; other "
            f"processes used {'?' if others is None else f'{others:.0%}'} of the CPUs during the run",
            f"- SmolLM2-135M shapes, float32, random weights; {LAYERS} layers x 7 projections "
            f"({4 * sizes['layer matmuls'] / 1e6:.0f} MB), LM head {VOCAB}x{HIDDEN} "
            f"({4 * sizes['LM head'] / 1e6:.0f} MB); median of {args.repeats} x {args.inner} calls", ""]
    out += ["### Weight matmuls of one decode step", ""]
    out.append(markdown_table(["piece", "batch", "engine", "ms", "GB/s of weights", "GFLOP/s"], rows))
    out += ["", *ratios]
    emit_report(out, wall_s, args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
