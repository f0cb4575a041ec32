"""Generation throughput of SmolLM2-135M-Instruct (float32) with mpo-jax's sampler, next to
transformers' PyTorch `generate` on the same prompts, on the same machine, in the same run.

    python bench/bench_generate.py                       # batches 1, 8, 32; ~128-token prompts; 64 new tokens
    python bench/bench_generate.py --batches 1,8 --no-torch
    python bench/bench_generate.py --markdown-out docs/bench.md
    python bench/bench_generate.py --batches 8 --layer-scan   # + the decode loop with its layers under a scan

Method
------
* Prompts are real text: a passage plus an instruction rendered with the model's chat template
  (SmolLM2's default system prompt included), each cut to at most `--prompt-tokens` tokens.
  Rows of a batch use different passages and instructions, so their lengths differ a little; both
  engines get the same token ids, left-padded. "prompt tok" counts real (unpadded) tokens.
* Decoding is greedy and exactly `--new-tokens` long for both engines: our sampler gets a
  constraint that forbids the end-of-turn tokens (the same compiled loop as unconstrained
  sampling: the mask is applied every step anyway) and transformers gets
  `min_new_tokens = max_new_tokens` with the same end-of-turn ids, which does the same.
* Compile time is excluded: every batch size is run once (same prompt, generation and batch
  buckets) before it is timed. Each timing is the median of `--repeats` runs.
* Prefill (ours) is the jitted prefill function alone (`model.sampler.prefill_program()`) on the
  padded [batch, prompt bucket] ids and a fresh KV cache, until its logits are ready. Prefill
  (transformers) is `generate(max_new_tokens=1)`, i.e. one forward pass over the prompts.
* Decode time is (end-to-end generate time - prefill time). It includes the host work of one
  `generate` call (KV-cache allocation, stop tables, detokenising), which is small next to 64
  steps. Decode tok/s = batch x decoder forward passes after the prefill / decode time: 64 for
  our loop (it also feeds the last sampled token, so the returned cache holds the whole reply),
  63 for transformers (its first token comes out of the prefill pass).
* The decode floor: at batch 1 every decode step must read all the weights once, so a step takes
  at least weight bytes / memory bandwidth. The read bandwidth is measured in this run, before
  and after the generation benches (the best of a numpy and a jitted-jax sum over a 512 MiB
  float32 array, best of 5 runs each time; on the 2-core VM it varied between runs, 34-51 GB/s).
  "% of the floor's speed" at batch B is floor step time / measured step time (100% = bandwidth
  bound; the KV cache reads, which grow with batch and length, are not counted in the floor).
* `--layer-scan` adds a row for the same sampler with `unroll_layers=False`: the decode step runs
  the layers under a `lax.scan` over the stacked weights (which XLA:CPU copies out layer by layer)
  instead of on per-layer views made once per call (`Transformer.decode_weights`); "same tokens"
  compares it with the default loop.
* Multi-turn continuation: `--chat-batch` chats get a first reply (`chat`, `--new-tokens`
  tokens), then one more user message each. `chat_continue` prefills only the new turn (the
  conversation is in the KV cache); the alternative re-renders and re-prefills the whole
  conversation with `chat`. Both generate 1 token, so the time is the new turn's latency to its
  first token; prefill slots are the padded [batch x bucket] slots the sampler reports.

Timings on a shared machine are distorted by other processes: the report gives the load average
before the run and the share of the CPUs that *other* processes used during it (from /proc/stat,
minus this process's own CPU time), with a warning above 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import cpu_seconds, emit_report, machine_info, markdown_table, others_share  # noqa: E402

from mpo_jax.engine import constraints as constraints_lib  # noqa: E402
from mpo_jax.engine import presets  # noqa: E402
from mpo_jax.engine.language_model import LanguageModel, load_model  # noqa: E402
from mpo_jax.engine.sampling import SamplingParams, bucket, cache_capacity  # noqa: E402

MODEL = "smollm2-135m-instruct"

PASSAGES = [
    "The printing press, developed in Europe in the middle of the fifteenth century, changed how "
    "knowledge travelled. Before it, books were copied by hand, slowly and with errors, and a library of a "
    "few hundred volumes was a treasure. Within fifty years of the first printed bibles, millions of books "
    "were in circulation. Prices fell, literacy spread beyond the clergy and the nobility, and scholars in "
    "distant cities could read the same text, page for page, and argue about it in letters. Printers also "
    "standardised spelling and punctuation, because a type case rewards consistency. Some historians argue "
    "that the scientific revolution would have been impossible without this shared, stable record.",
    "A honeybee colony is a single organism spread over tens of thousands of bodies. The queen lays the "
    "eggs, but she does not rule: decisions emerge from many small interactions. When the colony needs a "
    "new home, scouts inspect hollow trees and report back with a waggle dance whose length and vigour "
    "encode the quality of the site. Other bees follow the most enthusiastic dancers, inspect the site "
    "themselves, and dance in turn. Support for poor sites fades while support for good ones grows, until "
    "a quorum of scouts gathers at one place and the swarm lifts off together. The process is slow but "
    "remarkably reliable, and engineers have borrowed it for distributed algorithms.",
    "Sourdough bread is leavened by a culture of wild yeasts and lactic acid bacteria rather than by "
    "commercial yeast. The baker keeps a starter of flour and water, feeding it regularly so that the "
    "microbes stay active. The bacteria produce lactic and acetic acids, which give the bread its tangy "
    "flavour and help it keep longer, while the yeasts produce the carbon dioxide that makes the dough "
    "rise. Because the culture works slowly, a loaf may take a full day from mixing to baking. Long "
    "fermentation also breaks down some of the starches and proteins in the flour, which is why many people "
    "find sourdough easier to digest than quickly made bread.",
    "Plate tectonics explains why earthquakes and volcanoes cluster along certain lines on the map. The "
    "outer shell of the Earth is broken into large plates that float on the hotter, softer mantle below and "
    "move a few centimetres a year, about as fast as fingernails grow. Where plates pull apart, as in the "
    "middle of the Atlantic, molten rock rises and forms new ocean floor. Where they collide, one plate may "
    "sink beneath the other, building chains of volcanoes such as the Andes, or both may crumple upwards "
    "into mountains like the Himalayas. Where they slide past each other, strain builds for decades and "
    "is released suddenly in earthquakes.",
]
INSTRUCTIONS = [
    "Summarise the following passage in three sentences.",
    "Read the passage below and explain its main idea to a twelve-year-old.",
    "List the key facts in this passage as bullet points.",
    "Write a short critical commentary on the following text.",
    "What questions would a curious student ask after reading this? Passage:",
]
FOLLOW_UPS = [
    "Thanks. Now give me a one-sentence version of your answer.",
    "Can you give a concrete example of that?",
    "Which part of this is the most surprising, and why?",
]


def chat_prompt(tokenizer, instruction: str, passage: str, max_tokens: int) -> list[dict]:
    """The longest word-prefix of `passage` whose rendered chat fits in `max_tokens` tokens."""
    words = passage.split()

    def chat(n: int) -> list[dict]:
        return [{"role": "user", "content": f"{instruction}\n\n{' '.join(words[:n])}"}]

    def length(n: int) -> int:
        text = tokenizer.apply_chat_template(chat(n), add_generation_prompt=True)
        return len(tokenizer.encode(text, add_bos=False))

    lo, hi = 0, len(words)
    if length(0) > max_tokens:
        raise SystemExit(f"--prompt-tokens {max_tokens} is shorter than the chat template itself")
    while lo < hi:  # largest n with length(n) <= max_tokens
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(mid) <= max_tokens else (lo, mid - 1)
    return chat(lo)


def make_chats(tokenizer, count: int, max_tokens: int) -> list[list[dict]]:
    return [chat_prompt(tokenizer, INSTRUCTIONS[i % len(INSTRUCTIONS)], PASSAGES[i % len(PASSAGES)], max_tokens)
            for i in range(count)]


def median_time(fn: Callable[..., object], repeats: int, setup: Callable[[], object] | None = None
                ) -> tuple[float, object]:
    """Median wall time of `fn()` (or `fn(setup())`, setup untimed) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        arg = setup() if setup else None
        start = time.perf_counter()
        result = fn() if setup is None else fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def no_eos_constraint(model: LanguageModel) -> constraints_lib.TokenConstraint:
    """Every token but the end-of-turn ones (what transformers' min_new_tokens does)."""
    vocab = model.config.vocab_size
    allowed = np.ones((1, vocab), bool)
    allowed[0, list(model.tokenizer.eos_ids)] = False
    return constraints_lib.TokenConstraint(allowed, np.zeros((1, vocab), np.int32), "no end-of-turn")


@dataclasses.dataclass
class Row:
    engine: str
    batch: int
    prompt_tokens: int  # real tokens, all rows
    prefill_s: float
    decode_steps: int  # decoder forward passes after the prefill
    total_s: float
    tokens: np.ndarray | None = None  # [B, new] generated ids (agreement check)
    same_tokens: str = "-"  # rows whose greedy tokens equal mpo-jax's

    @property
    def decode_s(self) -> float:
        return self.total_s - self.prefill_s

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tps(self) -> float:
        return self.batch * self.decode_steps / self.decode_s


# -- our sampler ---------------------------------------------------------------------------------
def bench_ours(model: LanguageModel, prompts: list[list[int]], new_tokens: int, repeats: int,
               engine: str = "mpo-jax (JAX)") -> Row:
    sampler = model.sampler
    params = SamplingParams(max_new_tokens=new_tokens)
    constraint = no_eos_constraint(model)
    batch = sampler.padded_batch(len(prompts))
    prompt_len = bucket(max(map(len, prompts)), sampler.prompt_buckets, "prompt length")
    gen_len = bucket(new_tokens, sampler.generation_buckets, "new tokens")
    tokens = np.full((batch, prompt_len), model.tokenizer.pad_id, np.int32)
    valid = np.zeros((batch, prompt_len), bool)
    for i, ids in enumerate(prompts):
        tokens[i, prompt_len - len(ids):] = ids
        valid[i, prompt_len - len(ids):] = True
    tokens_d, valid_d = sampler._put(tokens), sampler._put(valid)
    prefill = sampler.prefill_program()

    def fresh_cache():
        return jax.block_until_ready(sampler._new_cache(batch, cache_capacity(prompt_len, gen_len)))

    def run_prefill(cache):
        logits, cache = prefill(sampler.params, tokens_d, valid_d, cache)
        jax.block_until_ready(logits)

    out = sampler.generate(prompts, params, constraint)  # warm-up: compiles prefill and decode
    run_prefill(fresh_cache())
    prefill_s, _ = median_time(run_prefill, repeats, setup=fresh_cache)
    total_s, _ = median_time(lambda: sampler.generate(prompts, params, constraint), repeats)
    forced = out.decode_steps == new_tokens and out.mask[:, :new_tokens].all()
    assert forced, "the no-EOS constraint should force every token"
    return Row(engine, len(prompts), sum(map(len, prompts)), prefill_s, out.decode_steps, total_s,
               out.tokens[:, :new_tokens])


# -- transformers --------------------------------------------------------------------------------
def load_transformers(path: Path):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32)
    return model.eval()


def bench_torch(hf_model, model: LanguageModel, prompts: list[list[int]], new_tokens: int, repeats: int) -> Row:
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), model.tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    eos = list(model.tokenizer.eos_ids)

    def generate(n: int):
        with torch.inference_mode():
            return hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                     eos_token_id=eos, pad_token_id=model.tokenizer.pad_id)

    generate(2)  # warm-up
    prefill_s, _ = median_time(lambda: generate(1), repeats)
    total_s, out = median_time(lambda: generate(new_tokens), repeats)
    return Row("transformers (PyTorch)", len(prompts), sum(map(len, prompts)), prefill_s, new_tokens - 1, total_s,
               out[:, width:].numpy())


# -- memory bandwidth and the decode floor ------------------------------------------------------------
def measure_bandwidth(mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (GB/s) of a sum over a large float32 array, numpy and jitted jax; copy too."""
    n = mib * 2**20 // 4
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    x = jnp.ones(n, jnp.float32)
    jsum = jax.jit(jnp.sum)
    jax.block_until_ready(jsum(x))
    best = lambda fn: min(median_time(fn, 1)[0] for _ in range(repeats))
    result = {
        "numpy sum": a.nbytes / best(a.sum) / 1e9,
        "jax sum": a.nbytes / best(lambda: jax.block_until_ready(jsum(x))) / 1e9,
        "numpy copy (read+write)": 2 * a.nbytes / best(lambda: np.copyto(b, a)) / 1e9,
    }
    return result


# -- multi-turn continuation ----------------------------------------------------------------------------
def bench_continuation(model: LanguageModel, chats: list[list[dict]], new_tokens: int, repeats: int):
    first = SamplingParams(max_new_tokens=new_tokens)
    constraint = no_eos_constraint(model)
    one = SamplingParams(max_new_tokens=1)
    follow = [{"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]} for i in range(len(chats))]

    def first_turn():
        return model.chat(chats, first, constraint)

    def cont(conv):
        return model.chat_continue(conv, follow, one)

    def reprefill(conv):
        return model.chat([h + [m] for h, m in zip(conv.messages, follow)], one)

    results = {}
    for name, fn in (("chat_continue (KV cache reused)", cont), ("chat on the whole conversation", reprefill)):
        out = fn(first_turn())  # warm-up (compiles this path's buckets)
        seconds, _ = median_time(fn, repeats, setup=first_turn)
        results[name] = (out.prefill_tokens, seconds)
    conv = first_turn()
    context_tokens = [len(model.tokenizer.encode(c, add_bos=False)) for c in conv.context]
    return results, context_tokens


# -- report ---------------------------------------------------------------------------------------------
def machine_info_with(with_torch: bool) -> dict[str, str]:
    info = {**machine_info(), "accelerator": ", ".join(str(d) for d in jax.devices()), "jax": jax.__version__}
    if with_torch:
        import torch
        import transformers

        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
        info["transformers"] = transformers.__version__
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="max prompt length incl. template")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--chat-batch", type=int, default=8, help="conversations in the continuation bench")
    parser.add_argument("--no-torch", action="store_true", help="skip transformers even if torch is installed")
    parser.add_argument("--no-chat", action="store_true", help="skip the multi-turn continuation bench")
    parser.add_argument("--layer-scan", action="store_true",
                        help="also time mpo-jax's decode with the layers under a scan (the pre-unrolled loop)")
    parser.add_argument("--markdown-out", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    started = time.perf_counter()
    load_before = os.getloadavg()
    cpu_before = cpu_seconds()
    model = load_model(MODEL)
    scanned = (LanguageModel(model.config, model.tokenizer, model.graphdef, model.params, unroll_layers=False)
               if args.layer_scan else None)
    weight_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(model.params))
    hf_model = None
    if not args.no_torch:
        missing = [m for m in ("torch", "transformers", "accelerate", "gguf") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"transformers' PyTorch model is not benchmarked: {', '.join(missing)} not installed "
                  "(pip install -e '.[parity]' accelerate)", file=sys.stderr)
        else:
            hf_model = load_transformers(presets.resolve(MODEL))
    info = machine_info_with(with_torch=hf_model is not None)
    bandwidth_start = measure_bandwidth()  # measured again at the end; the best of both is kept

    rows: list[Row] = []
    for b in batches:
        prompts = [model.encode_prompt(c) for c in make_chats(model.tokenizer, b, args.prompt_tokens)]
        rows.append(bench_ours(model, prompts, args.new_tokens, args.repeats))
        print(f"  ours  batch {b}: prefill {rows[-1].prefill_tps:.0f} tok/s, decode {rows[-1].decode_tps:.1f} tok/s",
              file=sys.stderr, flush=True)
        if scanned is not None:
            rows.append(bench_ours(scanned, prompts, args.new_tokens, args.repeats, "mpo-jax, layer scan"))
            same = int(sum(np.array_equal(x, y) for x, y in zip(rows[-2].tokens, rows[-1].tokens)))
            rows[-1].same_tokens = f"{same}/{b}"
            print(f"  scan  batch {b}: decode {rows[-1].decode_tps:.1f} tok/s", file=sys.stderr, flush=True)
        if hf_model is not None:
            rows.append(bench_torch(hf_model, model, prompts, args.new_tokens, args.repeats))
            ours = next(r for r in reversed(rows) if r.engine == "mpo-jax (JAX)")
            same = int(sum(np.array_equal(x, y) for x, y in zip(ours.tokens, rows[-1].tokens)))
            rows[-1].same_tokens = f"{same}/{b}"
            print(f"  torch batch {b}: prefill {rows[-1].prefill_tps:.0f} tok/s, decode {rows[-1].decode_tps:.1f} "
                  f"tok/s", file=sys.stderr, flush=True)

    bandwidth = {k: max(v, bandwidth_start[k]) for k, v in measure_bandwidth().items()}
    read_bw = max(bandwidth["numpy sum"], bandwidth["jax sum"])
    floor_s = weight_bytes / (read_bw * 1e9)

    chat = None
    if not args.no_chat:
        chats = make_chats(model.tokenizer, args.chat_batch, args.prompt_tokens)
        chat = bench_continuation(model, chats, args.new_tokens, args.repeats)
    wall_s = time.perf_counter() - started
    others = others_share(cpu_before, cpu_seconds(), wall_s)

    # -- the Markdown report --
    out = ["### Machine", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    busy = others is not None and others > 0.10
    out += [f"- load average before the run (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load_before)}; other "
            f"processes used {'?' if others is None else f'{others:.0%}'} of the CPUs during the run"
            + (" — **the machine was busy: timings are pessimistic**" if busy else ""),
            f"- SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32), greedy; prompts of at most "
            f"{args.prompt_tokens} tokens (chat template applied), {args.new_tokens} new tokens; "
            f"median of {args.repeats} runs after a warm-up", ""]
    out += ["### Generation throughput", ""]
    table = []
    for r in rows:
        table.append([r.engine, r.batch, r.prompt_tokens, f"{r.prefill_s:.3f}", f"{r.prefill_tps:,.0f}",
                      r.decode_steps, f"{r.decode_s:.2f}", f"{r.decode_tps:,.1f}",
                      f"{1e3 * r.decode_s / r.decode_steps:.1f}", f"{r.total_s:.2f}", r.same_tokens])
    out.append(markdown_table(["engine", "batch", "prompt tok", "prefill s", "prefill tok/s", "decode steps",
                               "decode s", "decode tok/s", "ms/step", "total s", "same tokens"], table))
    out += ["", "### Decode floor", ""]
    out += ["- memory bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth.items())]
    out += [f"- weights: {weight_bytes / 1e6:.0f} MB float32 -> floor {1e3 * floor_s:.1f} ms per decode step "
            f"(read bandwidth {read_bw:.1f} GB/s) = {1 / floor_s:.1f} tok/s at batch 1"]
    for r in rows:
        if r.engine.startswith("mpo-jax"):
            step = r.decode_s / r.decode_steps
            out.append(f"- {r.engine} batch {r.batch}: {1e3 * step:.1f} ms per step = {floor_s / step:.0%} of the "
                       f"floor's speed")
    if chat is not None:
        results, context = chat
        out += ["", "### Multi-turn continuation", "",
                f"{args.chat_batch} conversations, first reply {args.new_tokens} tokens (conversation "
                f"{min(context)}-{max(context)} tokens), then one more user message each; time to the first "
                f"token of the next reply:", ""]
        out.append(markdown_table(["path", "prefill token slots", "seconds"],
                                  [[name, tokens, f"{secs:.3f}"] for name, (tokens, secs) in results.items()]))
    emit_report(out, wall_s, args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
