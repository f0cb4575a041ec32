"""Accelerator figures: the PPO update's model-FLOP utilisation (MFU) and decode's fraction of HBM
bandwidth at batch 1 and 32, in bfloat16, with randomly initialised weights of the
Qwen2.5-Coder-1.5B shape (the architecture mpo-jax reads from that model's GGUF; nothing is
downloaded), next to transformers' `generate` on the same shape in the same run.

    python bench/bench_accelerator.py --markdown-out /tmp/accel.md   # on a GPU or TPU host
    python bench/bench_accelerator.py --shape tiny --no-torch        # the same code on a CPU, in seconds

A few minutes on one H200 (most of it compiling the 1.5B update).

Method
------
* Peaks, measured here: a bf16 8192^3 matmul (best of 10) and a device-to-device copy of 2 GiB
  (bytes read + written, best of 10). Where the device is known, the data-sheet peaks are shown
  too (dense bf16 FLOP/s and HBM bytes/s); MFU and bandwidth fractions are given against both.
* PPO update: `make_ppo_update` as the trainer runs it (policy and a separate critic, full
  fine-tuning, AdamW, per-layer remat as the trainer's default, frozen reference copy in the
  state) on `bench_ppo`'s random rollout batch (`_ppo_inputs.make_arrays`), compiled once, one
  warm-up, then `--repeats` timed updates (median). Model FLOPs per update as in `bench_ppo.py`
  (3 x forward for policy and critic trunks, LM head at response positions; remat recompute
  not counted). Peak device memory from the runtime's `peak_bytes_in_use`.
* Decode: the library's sampler (prefill, then one jitted `while_loop` over decode steps),
  greedy, a 128-token prompt per row. The per-token step time is the difference of two runs that
  decode 160 and 256 tokens in the same compiled shapes (cache capacity 128 + 256) divided by
  the 96 extra steps, so prefill, compile and host transfers cancel out (best of 3 each). Bytes
  one step must read: every weight except the input embedding (of which it gathers B rows) plus
  the keys and values; "as run" counts the whole cache capacity (what the attention reads
  today), "minimum" only the filled slots (on average 128 + 208 at the measured steps).
  "Forward alone": one jitted T = 1 forward against the cache, LM head and argmax, called from
  Python in a loop; the loop's step minus this is what the `while_loop` and sampling add.
  transformers: `Qwen2ForCausalLM` with the same shape and `generate` (default dynamic cache,
  `min_new_tokens` = `max_new_tokens`), the same difference method.
* `--attention blocked` times the update with `models/blocked_attention.py` instead of the dense
  attention; `--no-decode` times the update alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# JAX takes 75% of an accelerator's memory up front; leave room for the transformers reference.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import numpy as np  # noqa: E402
from _common import machine_info, markdown_table  # noqa: E402
from _ppo_inputs import add_rollout_noise, flops, make_arrays  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Data-sheet peaks (dense bf16 FLOP/s, HBM bytes/s) by `device_kind`.
DATASHEET = {
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.04e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 0.82e12),
    "TPU v5": (459e12, 2.76e12),
    "TPU v6 lite": (918e12, 1.64e12),
}
PROMPT_TOKENS = 128
DECODE_SHORT, DECODE_LONG = 160, 256  # both in the 256-token generation bucket: one compiled shape


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def model_config(shape: str, tokenizer):
    """The Qwen2.5-Coder-1.5B architecture (as mpo-jax reads its GGUF) or a tiny one, in bf16."""
    from mpo_jax.models.config import ModelConfig

    if shape == "tiny":
        return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, rope_theta=1e6, attention_bias=True, architecture="qwen2",
                           dtype="bfloat16", param_dtype="bfloat16", eos_token_id=tokenizer.eos_id)
    return ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                       num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=True,
                       architecture="qwen2", dtype="bfloat16", param_dtype="bfloat16",
                       eos_token_id=tokenizer.eos_id)


def measured_peaks(jax, jnp, n: int) -> dict[str, float]:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, a))
    flops_s = 2 * n**3 / best_time(lambda: jax.block_until_ready(matmul(a, a)), 10)
    x = jnp.zeros((2**30 // 2 if n >= 4096 else 2**22,), jnp.bfloat16)  # 2 GiB on an accelerator
    copy = jax.jit(lambda v: v + jnp.bfloat16(1))
    jax.block_until_ready(copy(x))
    bytes_s = 2 * x.nbytes / best_time(lambda: jax.block_until_ready(copy(x)), 10)
    return {"matmul_flops_s": flops_s, "copy_bytes_s": bytes_s, "matmul_n": n, "copy_bytes": 2 * x.nbytes}


def decode_bytes(c, batch: int, slots: float) -> float:
    """Bytes one decode step reads: weights (the input embedding only B rows) and K/V of `slots`."""
    d, f, layers = c.hidden_size, c.intermediate_size, c.num_layers
    d_q, d_kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = d * d_q * 2 + d * d_kv * 2 + 3 * d * f + (d_q + 2 * d_kv) + 2 * d  # matrices, biases, norms
    head = d * c.vocab_size
    weights = (layers * per_layer + d + head + batch * d) * 2  # bf16
    kv = 2 * layers * batch * slots * d_kv * 2
    return weights + kv


def run_decode_jax(model, batch: int, rng: np.random.Generator) -> dict:
    from mpo_jax.engine.sampling import SamplingParams

    vocab = model.tokenizer.vocab_size if hasattr(model.tokenizer, "vocab_size") else 300
    prompts = [rng.integers(3, min(vocab, model.config.vocab_size), PROMPT_TOKENS).tolist() for _ in range(batch)]
    out: dict = {}
    for n in (DECODE_SHORT, DECODE_LONG):
        params = SamplingParams(max_new_tokens=n, temperature=0.0)
        first = model.sampler.generate(prompts, params)  # compiles (once for both lengths)
        out[f"steps_{n}"] = int(first.decode_steps)
        out[f"s_{n}"] = best_time(lambda p=params: model.sampler.generate(prompts, p), 3)
    steps = out[f"steps_{DECODE_LONG}"] - out[f"steps_{DECODE_SHORT}"]
    out["step_s"] = (out[f"s_{DECODE_LONG}"] - out[f"s_{DECODE_SHORT}"]) / max(steps, 1)
    out["extra_steps"] = steps
    return out


def run_decode_step_probe(model, batch: int, steps: int = 64) -> dict:
    """Seconds of one jitted decode forward (T = 1 against the cache, LM head, argmax) called alone,
    outside the sampler's `while_loop` and without its sampling bookkeeping: the loop's per-step time
    minus this is what the loop and sampling add."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mpo_jax.models.kv_cache import KVCache

    graphdef = model.sampler.graphdef

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, cache, token):
        module = nnx.merge(graphdef, params)
        hidden, cache = module.hidden_states(token[:, None], jnp.ones((token.shape[0], 1), bool), cache)
        return jnp.argmax(module.logits_from_hidden(hidden[:, 0]), axis=-1).astype(jnp.int32), cache

    cache = KVCache.create(model.config, batch, PROMPT_TOKENS + 256)
    token = jnp.full((batch,), 5, jnp.int32)
    for _ in range(PROMPT_TOKENS):  # fill the cache as a prompt would (and compile)
        token, cache = step(model.params, cache, token)
    jax.block_until_ready(token)
    start = time.perf_counter()
    for _ in range(steps):
        token, cache = step(model.params, cache, token)
    jax.block_until_ready(token)
    return {"forward_step_s": (time.perf_counter() - start) / steps}


def run_decode_torch(c, batch: int, rng: np.random.Generator) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, torch_dtype="bfloat16", eos_token_id=None, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.as_tensor(rng.integers(3, c.vocab_size, (batch, PROMPT_TOKENS)), device=device)
    mask = torch.ones_like(ids)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    with torch.inference_mode():
        for n in (DECODE_SHORT, DECODE_LONG):
            def gen(n=n):
                result = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False)
                sync()
                return result

            out[f"steps_{n}"] = int(gen().shape[1] - PROMPT_TOKENS)
            out[f"s_{n}"] = best_time(gen, 3)
    steps = out[f"steps_{DECODE_LONG}"] - out[f"steps_{DECODE_SHORT}"]
    out["step_s"] = (out[f"s_{DECODE_LONG}"] - out[f"s_{DECODE_SHORT}"]) / max(steps, 1)
    out["extra_steps"] = steps
    return out


def peak_memory_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices and some runtimes have none
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def run_ppo(policy, critic, args, rng: np.random.Generator) -> dict:
    import jax
    import jax.numpy as jnp

    from mpo_jax.rl.batch import RolloutBatch
    from mpo_jax.rl.compiled import compile_update, place_batch
    from mpo_jax.rl.config import PPOConfig
    from mpo_jax.rl.forward import response_logprobs, response_values
    from mpo_jax.rl.ppo import make_ppo_update
    from mpo_jax.rl.train_state import create_train_state

    config = PPOConfig(num_ppo_epochs=1, num_mini_batches=1, gradient_accumulation_steps=1)
    config.check_batch_size(args.batch)
    state = create_train_state(policy, critic, config.optimizer)
    c, tok = policy.config, policy.tokenizer
    eos_id = tok.eos_ids[0]
    special = sorted(set(tok.eos_ids) | {tok.pad_id})
    arrays = make_arrays(rng, args.batch, args.prompt, args.response, c.vocab_size, tok.pad_id, eos_id, special)

    @jax.jit
    def rollout_stats(state, query, query_mask, response, response_mask):
        rows = RolloutBatch(query=query, query_mask=query_mask, response=response, response_mask=response_mask,
                            logprobs=None, ref_logprobs=None, values=None, scores=None, contains_eos=None)
        logprobs = response_logprobs(state.policy.merge(state.params["policy"]), rows, config.temperature)
        return logprobs, response_values(state.critic.merge(state.params["critic"]), rows)

    logprobs, values = jax.device_get(rollout_stats(state, *(jnp.asarray(arrays[k]) for k in
                                                              ("query", "query_mask", "response", "response_mask"))))
    add_rollout_noise(arrays, logprobs, values, rng)
    batch = place_batch(RolloutBatch(**arrays), None)
    keys = [jax.random.key(i) for i in range(args.repeats + 1)]
    update = compile_update(make_ppo_update(config), state, None)
    start = time.perf_counter()
    compiled = update.lower(state, batch, keys[0]).compile()
    compile_s = time.perf_counter() - start
    log(f"[ppo] compiled in {compile_s:.1f} s")

    def run(key):
        nonlocal state
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - start, float(jax.device_get(metrics["loss"]))

    warmup_s, loss = run(keys[0])
    times = [run(k)[0] for k in keys[1:]]
    log(f"[ppo] warm-up {warmup_s:.2f} s, updates {', '.join(f'{t:.3f}' for t in times)} s, loss {loss:.4f}")
    dims = dict(layers=c.num_layers, hidden=c.hidden_size, intermediate=c.intermediate_size, heads=c.num_heads,
                kv_heads=c.num_kv_heads, head_dim=c.head_dim, vocab=c.vocab_size)
    n_params = {role: int(sum(np.size(x) for x in jax.tree.leaves(p))) for role, p in state.params.items()}
    return dict(times=times, warmup_s=warmup_s, compile_s=compile_s, loss=loss, finite=bool(np.isfinite(loss)),
                flops=flops(dims, args.batch, args.prompt, args.response, 1), n_params=n_params,
                peak_bytes=peak_memory_bytes(jax.devices()[0]))


def run(args) -> dict:
    import flax
    import jax
    import jax.numpy as jnp

    from mpo_jax.engine.language_model import from_random
    from mpo_jax.engine.tiny import tiny_tokenizer

    device = jax.devices()[0]
    result: dict = {"device": f"{device.device_kind} ({device.platform}), {jax.device_count()} device(s)",
                    "device_kind": device.device_kind,
                    "versions": {"jax": jax.__version__, "flax": flax.__version__}}
    log(f"device: {result['device']}")
    result["peaks"] = measured_peaks(jax, jnp, 8192 if device.platform != "cpu" else 512)
    log(f"peaks: {result['peaks']}")
    tokenizer = tiny_tokenizer(320)
    config = model_config(args.shape, tokenizer)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    train = dict(remat=True, remat_policy=args.remat_policy, attention_impl=args.attention)
    policy = from_random(config.replace(**train), tokenizer, seed=0)
    log(f"policy initialised in {time.perf_counter() - start:.1f} s")
    result["config"] = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                        "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                                        "tie_word_embeddings")}
    mean_filled = PROMPT_TOKENS + (DECODE_SHORT + DECODE_LONG) / 2
    result["decode"] = {}
    for batch in [] if args.no_decode else args.decode_batches:
        result["decode"][batch] = run_decode_jax(policy, batch, rng)
        result["decode"][batch].update(run_decode_step_probe(policy, batch))
        result["decode"][batch].update(bytes_minimum=decode_bytes(config, batch, mean_filled),
                                       bytes_whole_cache=decode_bytes(config, batch, PROMPT_TOKENS + 256))
        log(f"[decode jax] batch {batch}: {result['decode'][batch]}")
    result["decode_torch"] = {}
    if not args.no_torch and not args.no_decode:
        try:
            for batch in args.decode_batches:
                result["decode_torch"][batch] = run_decode_torch(config, batch, rng)
                result["decode_torch"][batch]["bytes_minimum"] = decode_bytes(config, batch, mean_filled)
                log(f"[decode torch] batch {batch}: {result['decode_torch'][batch]}")
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the reference's weights went with its function's frame
        except ImportError as exc:
            log(f"transformers reference skipped: {exc}")
    critic = from_random(config.replace(value_head=True, **train), tokenizer, seed=1)
    result["ppo"] = run_ppo(policy, critic, args, rng)
    return result


def report(args, info: dict, r: dict, wall_s: float) -> str:
    sheet = DATASHEET.get(r["device_kind"])
    peak_flops, peak_bw = r["peaks"]["matmul_flops_s"], r["peaks"]["copy_bytes_s"]
    out = ["### Machine", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- accelerator: {r['device']}", "- " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())]
    if r["decode_torch"]:
        first = next(iter(r["decode_torch"].values()))
        out.append("- reference: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()))
    n, moved = r["peaks"]["matmul_n"], r["peaks"]["copy_bytes"]
    out += [f"- measured peaks: bf16 matmul {n}^3 {peak_flops / 1e12:.1f} TFLOP/s; device copy of "
            f"{moved / 2**30:.2f} GiB {peak_bw / 1e12:.2f} TB/s (read + write)"
            + (f"; data sheet: {sheet[0] / 1e12:.0f} TFLOP/s dense bf16, {sheet[1] / 1e12:.2f} TB/s HBM"
               if sheet else "; no data-sheet figures for this device"),
            f"- model: the Qwen2.5-Coder-1.5B shape ({r['config']}), random weights, bf16 parameters and compute"
            if args.shape == "full" else f"- model: tiny smoke shape {r['config']}", ""]

    ppo = r["ppo"]
    med = statistics.median(ppo["times"])
    model_flops = ppo["flops"]["model"]
    tokens = args.batch * (args.prompt + args.response)
    out += [f"### PPO update (policy + critic, full fine-tuning, AdamW, {args.attention} attention, remat "
            f"'{args.remat_policy}'; batch {args.batch}, prompt {args.prompt} + response {args.response})", ""]
    row = [f"{med:.3f}", f"{tokens / med:,.0f}", f"{model_flops / 1e12:.1f}", f"{model_flops / med / 1e12:.0f}",
           f"{model_flops / med / peak_flops:.0%}", f"{model_flops / med / sheet[0]:.0%}" if sheet else "-",
           f"{(model_flops + ppo['flops']['recompute']) / med / peak_flops:.0%}", f"{ppo['compile_s']:.0f}",
           "?" if ppo["peak_bytes"] is None else f"{ppo['peak_bytes'] / 2**30:.1f}"]
    out.append(markdown_table(["update s (median)", "tok/s", "model TFLOP", "TFLOP/s", "MFU (measured peak)",
                               "MFU (data sheet)", "incl. remat (measured peak)", "compile s",
                               "peak device GiB"], [row]))
    out += ["", f"- {len(ppo['times'])} timed updates: {', '.join(f'{t:.3f}' for t in ppo['times'])} s; "
            f"loss {ppo['loss']:.4f} ({'finite' if ppo['finite'] else '**not finite**'}); parameters "
            + ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in ppo["n_params"].items()), ""]

    if r["decode"]:
        out += decode_section(r, sheet, peak_bw)
    out += ["", f"_Bench wall time {wall_s:.0f} s._"]
    return "\n".join(out)


def decode_section(r: dict, sheet: tuple[float, float] | None, peak_bw: float) -> list[str]:
    out = [f"### Decode (greedy, prompt {PROMPT_TOKENS}, cache {PROMPT_TOKENS} + 256 slots; per-token step from "
           f"{DECODE_LONG} - {DECODE_SHORT} decoded tokens)", ""]
    rows = []
    for engine, table in (("mpo-jax", r["decode"]), ("transformers generate", r["decode_torch"])):
        for batch, d in table.items():
            step = d["step_s"]
            as_run = d["bytes_whole_cache"] if engine == "mpo-jax" else None
            minimum = d["bytes_minimum"]
            forward = d.get("forward_step_s")
            rows.append([engine, int(batch), f"{step * 1e3:.2f}", "-" if forward is None else f"{forward * 1e3:.2f}",
                         f"{int(batch) / step:,.0f}", f"{minimum / 2**20:.0f}", f"{minimum / step / 1e12:.2f}",
                         f"{minimum / step / sheet[1]:.0%}" if sheet else "-", f"{minimum / step / peak_bw:.0%}",
                         "-" if as_run is None else f"{as_run / step / peak_bw:.0%}", f"{d['extra_steps']}"])
    out.append(markdown_table(["engine", "batch", "ms / step", "forward alone ms", "tok/s",
                               "MiB read / step (minimum)", "TB/s", "of HBM (data sheet)", "of measured copy",
                               "as run (whole cache)", "steps"], rows))
    out += ["", "- forward alone: one jitted T = 1 forward against the cache plus LM head and argmax, called from "
            "Python in a loop (no `while_loop`, no sampling bookkeeping)"]
    for batch in r["decode"]:
        if batch in r["decode_torch"]:
            jx, th = r["decode"][batch], r["decode_torch"][batch]
            out.append(f"- batch {batch}: mpo-jax {th['step_s'] / jx['step_s']:.2f}x transformers per step")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("full", "tiny"), default="full",
                        help="'full': the Qwen2.5-Coder-1.5B shape; 'tiny': a smoke run of the same code")
    parser.add_argument("--batch", type=int, default=32, help="PPO rollout batch")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--remat-policy", choices=("full", "dots"), default="full")
    parser.add_argument("--attention", choices=("dense", "blocked"), default="dense",
                        help="training attention of the PPO update (ModelConfig.attention_impl)")
    parser.add_argument("--no-decode", action="store_true", help="time the PPO update only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers decode reference")
    parser.add_argument("--markdown-out", type=Path)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    info = machine_info()  # the commit that runs, read before anything can change it
    started = time.perf_counter()
    result = run(args)
    wall_s = time.perf_counter() - started
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    text = report(args, info, result, wall_s)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
