"""Throughput of one PPO update (SmolLM2-135M policy + a separate SmolLM2-135M critic, full
fine-tuning, AdamW, float32, per-layer remat) with mpo-jax's jitted `ppo_update`, next to a
PyTorch implementation of the same loss and update (transformers' `LlamaForCausalLM`), on the
same data, on the same machine, in the same run.

    python bench/bench_ppo.py                                   # batch 8, prompt 256 + response 128
    python bench/bench_ppo.py --repeats 2 --no-torch
    python bench/bench_ppo.py --epochs 2 --accum 2 --markdown-out /tmp/ppo.md
    python bench/bench_ppo.py --profile                         # + where the JAX update's time goes
    python bench/bench_ppo.py --attention blocked               # JAX attention in causal query blocks

About 7 minutes on a 2-core CPU at the defaults (each engine: ~45 s per update, 1 warm-up + 3
timed); `--profile` adds about 2 minutes.

Method
------
* The update is TRL's PPOTrainer step as mpo-jax implements it (`mpo_jax.rl.ppo.make_ppo_update`,
  PPOConfig defaults: temperature 0.7, kl_coef 0.05 (k1), vf_coef 0.1, cliprange 0.2 / 0.2,
  gamma 1, lam 0.95, AdamW lr 3e-6, global-norm clipping 1.0, no weight decay): reward shaping,
  GAE, advantage whitening over the batch, then `--epochs` x 1 mini-batch x `--accum` micro-batches
  (gradient accumulation) of policy + critic forward/backward and one optimizer step per
  mini-batch. Policy: `load_model(MODEL, remat=True)`; critic: `load_model(MODEL, value_head=True,
  remat=True)` (`--attention blocked`: both with `attention_impl="blocked"`, which skips the score blocks
  above the causal diagonal; same loss and gradients); the train state holds the frozen reference copy of
  the policy, as TRL keeps a reference model.
* The PyTorch side is written from the same math (TRL's PPOTrainer, reference §D.2), in `_torch_ppo.py`:
  `LlamaForCausalLM` loaded from the same GGUF as policy, a second copy's `LlamaModel` trunk plus a
  `Linear(D, 1)` value head (initialised with mpo-jax's value-head weights) as critic, a third copy
  as frozen reference, `activation_checkpointing_enable()` (formerly `gradient_checkpointing_enable`;
  per-layer recompute, like remat),
  `torch.optim.AdamW` (foreach) and `clip_grad_norm_`, torch threads = cores. Like mpo-jax, it
  computes the policy logits only at the response positions (TRL computes them on every position
  and slices; that would cost the PyTorch side ~8% more FLOPs). Reward shaping, GAE (TRL's Python
  loop) and whitening are inside its timed update, as they are inside `ppo_update`. Micro-batches
  use the permutation mpo-jax draws from the same key.
* Data: random token ids (specials excluded) with realistic masks: 3 of every 8 prompts left-padded
  (lengths from P/2 up), responses of varying length ending in EOS, one of every 8 truncated at R
  without EOS (`contains_eos` false). Old log-probs and critic values come from a forward pass of
  the initial policy/critic (mpo-jax), then get Gaussian noise (0.1 on log-probs and values, 0.2 for
  the reference log-probs) so that KL, ratio clipping and value clipping are all exercised: with
  exactly on-policy log-probs the whitened advantages make the first step's policy loss ~0, which
  would make the loss-equality check meaningless. Scores ~ N(0, 1). Both engines read these arrays
  from one file.
* Like for like: both engines report the update's loss (the mean over its micro-batches; at
  1 epoch x 1 micro-batch it is the first micro-batch's loss), its parts and the pre-clipping
  gradient norm from the first (warm-up) update at the initial weights; the report gives the
  relative differences (goal: loss within 1e-3).
* Timing: each engine runs in its own subprocess (so peak memory is per engine). JAX: the update is
  lowered and compiled first (compile time reported), run once (warm-up, reported), then timed
  `--repeats` times; PyTorch: one warm-up update, then `--repeats` timed ones. tok/s = batch x
  (prompt + response) x epochs / median update seconds (padding included: both engines compute on
  it).
* Memory: "peak RSS" is the process's `ru_maxrss` (includes loading the GGUF); "update peak" is the
  kernel's VmHWM after it was reset (`/proc/self/clear_refs`) once the models, optimizer and data
  were in place, i.e. the high-water mark of the updates themselves.
* Peak: a 2048^3 float32 matmul, jitted in JAX and in torch, best of 10, measured in each engine's
  process before and after its updates (best kept); the machine's peak is the better engine's.
* FLOPs ("model FLOPs", per update): per epoch 3 x forward (forward + backward = 3 forwards), with
  forward = tokens x (2 N_block + 4 L T d_attn) for each of policy and critic trunks, plus
  2 D V per response position for the policy's (tied) LM head and 2 D for the value head. N_block
  = the layers' matrix parameters (norms and embeddings excluded), d_attn = heads x head_dim,
  T = prompt + response, and the attention term counts the full T x T score and value products
  (both engines compute them under a mask). Remat recomputes each layer's forward once more in the
  backward pass: + tokens x (2 N_block + 4 L T d_attn) per trunk per epoch, counted only in the
  "incl. remat" column. Elementwise work (norms, softmax, RoPE, AdamW) is not counted.

Timings on a shared machine are distorted by other processes: the report gives the load average
before the run and the share of the CPUs that *other* processes used during it (from /proc/stat,
minus the bench's own processes' CPU time), with a warning above 10%.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from _common import cpu_seconds, machine_info, markdown_table, others_share  # noqa: E402
from _ppo_inputs import add_rollout_noise, flops, make_arrays  # noqa: E402

MODEL = "smollm2-135m-instruct"
MATMUL_N = 2048
GOAL_SPEEDUP = 1.3
GOAL_PEAK_FRACTION = 0.60


# -- shared helpers ---------------------------------------------------------------------------------
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM (peak RSS) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# -- the JAX engine -------------------------------------------------------------------------------------
def run_jax(args: argparse.Namespace) -> dict:
    import flax
    import jax
    import jax.numpy as jnp
    import optax

    from mpo_jax.engine.language_model import load_model
    from mpo_jax.rl.batch import RolloutBatch
    from mpo_jax.rl.compiled import compile_update, place_batch
    from mpo_jax.rl.config import PPOConfig
    from mpo_jax.rl.forward import response_logprobs, response_values
    from mpo_jax.rl.ppo import make_ppo_update
    from mpo_jax.rl.train_state import create_train_state

    def matmul_peak() -> float:
        a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        jax.block_until_ready(f(a, a))
        return 2 * MATMUL_N**3 / best_time(lambda: jax.block_until_ready(f(a, a)), 10) / 1e9

    peak = [matmul_peak()]
    log(f"[jax] f32 matmul {peak[0]:.0f} GFLOP/s; loading models")
    attention = dict(attention_impl=args.attention, attention_block=args.attention_block)
    policy = load_model(MODEL, remat=True, remat_policy=args.remat_policy, **attention)
    critic = load_model(MODEL, value_head=True, remat=True, remat_policy=args.remat_policy, **attention)
    config = PPOConfig(num_ppo_epochs=args.epochs, num_mini_batches=1, gradient_accumulation_steps=args.accum)
    config.check_batch_size(args.batch)
    state = create_train_state(policy, critic, config.optimizer)
    c = policy.config
    tok = policy.tokenizer
    eos_id = tok.eos_ids[0]
    special = sorted(set(tok.eos_ids) | {tok.pad_id} | ({tok.bos_id} if getattr(tok, "bos_id", None) is not None
                                                        else set()))
    dims = dict(layers=c.num_layers, hidden=c.hidden_size, intermediate=c.intermediate_size, heads=c.num_heads,
                kv_heads=c.num_kv_heads, head_dim=c.head_dim, vocab=c.vocab_size, tied=c.tie_word_embeddings,
                pad_id=tok.pad_id, eos_id=eos_id)
    head = state.params["critic"]["value_head"]
    value_head = (np.asarray(head["kernel"][...]), np.asarray(head["bias"][...]))
    n_params = {role: int(sum(np.size(x) for x in jax.tree.leaves(p))) for role, p in state.params.items()}
    del policy, critic  # the train state holds the weights (and the reference copy)

    # rollout statistics of the initial networks, then noise (see the docstring)
    rng = np.random.default_rng(args.seed)
    arrays = make_arrays(rng, args.batch, args.prompt, args.response, c.vocab_size, tok.pad_id, eos_id, special)

    @jax.jit
    def rollout_stats(state, query, query_mask, response, response_mask):
        rows = RolloutBatch(query=query, query_mask=query_mask, response=response, response_mask=response_mask,
                            logprobs=None, ref_logprobs=None, values=None, scores=None, contains_eos=None)
        logprobs = response_logprobs(state.policy.merge(state.params["policy"]), rows, config.temperature)
        return logprobs, response_values(state.critic.merge(state.params["critic"]), rows)

    start = time.perf_counter()
    logprobs, values = jax.device_get(rollout_stats(state, *(jnp.asarray(arrays[k]) for k in
                                                              ("query", "query_mask", "response", "response_mask"))))
    log(f"[jax] rollout log-probs and values in {time.perf_counter() - start:.1f} s (incl. compile)")
    add_rollout_noise(arrays, logprobs, values, rng)
    keys = [jax.random.key(i) for i in range(args.repeats + 1)]
    orders = np.stack([np.asarray(jax.random.permutation(k, args.batch))
                       for k in jax.random.split(keys[0], args.epochs)])
    np.savez(args.data, **arrays, orders=orders, value_kernel=value_head[0], value_bias=value_head[1],
             dims=json.dumps(dims))
    batch = place_batch(RolloutBatch(**arrays), None)

    update = compile_update(make_ppo_update(config), state, None)
    reset = reset_peak_rss()
    start = time.perf_counter()
    compiled = update.lower(state, batch, keys[0]).compile()
    compile_s = time.perf_counter() - start
    log(f"[jax] compiled the update in {compile_s:.1f} s")

    def run(key):
        nonlocal state
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - start, {k: float(v) for k, v in jax.device_get(metrics).items()}

    warmup_s, metrics = run(keys[0])
    log(f"[jax] warm-up update {warmup_s:.1f} s, loss {metrics['loss']:.6f}")
    times = []
    for key in keys[1:]:
        times.append(run(key)[0])
        log(f"[jax] update {times[-1]:.1f} s")
    update_peak = vm_hwm_mib() if reset else None

    profile = {}
    if args.profile:
        profile = profile_jax(state, batch, config, args)
    peak.append(matmul_peak())
    return dict(engine="jax", times=times, warmup_s=warmup_s, compile_s=compile_s, metrics=metrics,
                max_rss_mib=max_rss_mib(), update_peak_mib=update_peak, matmul_gflops=max(peak),
                dims=dims, n_params=n_params, profile=profile,
                versions={"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                          "numpy": np.__version__, "device": ", ".join(str(d) for d in jax.devices())})


def profile_jax(state, batch, config, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of pieces of the update, each jitted alone on the whole batch (remat as loaded),
    compiled ahead, run once untimed, then timed once: the policy's forward, the policy's and the
    critic's forward+backward, the critic's again with the attention function replaced by a
    shape-preserving no-op (the difference is what attention costs), and one optimizer step
    (global-norm clipping, AdamW and the non-finite guard's select, as `optimize` does)."""
    import jax
    import jax.numpy as jnp
    import optax

    from mpo_jax.models import transformer
    from mpo_jax.rl.forward import response_hidden
    from mpo_jax.rl.losses import token_logprobs
    from mpo_jax.rl.optimize import all_finite

    def policy_loss(params):
        policy = state.policy.merge(params)
        hidden = response_hidden(policy, batch.query, batch.query_mask, batch.response, batch.response_mask)
        return jnp.mean(token_logprobs(policy.logits_from_hidden(hidden), batch.response, config.temperature))

    def critic_loss(params):
        critic = state.critic.merge(params)
        hidden = response_hidden(critic, batch.query, batch.query_mask, batch.response, batch.response_mask)
        return jnp.mean(jnp.square(critic.values_from_hidden(hidden)))

    def optimizer_step(params, opt_state, grads):
        finite = all_finite(grads)
        updates, new_opt_state = state.tx.update(grads, opt_state, params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        return keep(optax.apply_updates(params, updates), params), keep(new_opt_state, opt_state)

    def no_attention(q, k, v, *_mask):  # same shapes, no T x T work: what attention costs (dense or blocked)
        return q + jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)

    result = {}
    pieces = (("policy forward", policy_loss, (state.params["policy"],)),
              ("policy forward+backward", jax.grad(policy_loss), (state.params["policy"],)),
              ("critic forward+backward", jax.grad(critic_loss), (state.params["critic"],)),
              ("critic forward+backward, attention removed", jax.grad(critic_loss), (state.params["critic"],)),
              ("optimizer step", optimizer_step, (state.params, state.opt_state, state.params)))
    for name, fn, inputs in pieces:
        patch = "attention removed" in name
        if patch:
            saved = transformer.attention, transformer.blocked_causal_attention
            transformer.attention = transformer.blocked_causal_attention = no_attention
        try:
            compiled = jax.jit(fn).lower(*inputs).compile()
        finally:
            if patch:
                transformer.attention, transformer.blocked_causal_attention = saved
        jax.block_until_ready(compiled(*inputs))  # the first run also pays for allocating and paging in
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        result[name] = time.perf_counter() - start
        log(f"[jax] profile: {name} {result[name]:.1f} s")
    return result


# -- the PyTorch engine ----------------------------------------------------------------------------------
def run_torch(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantisation progress bars
    import torch
    import transformers
    from _torch_ppo import PPOHyper, ppo_update, trunk_hidden

    from mpo_jax.engine import presets

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    def matmul_peak() -> float:
        a = torch.randn(MATMUL_N, MATMUL_N)
        a @ a
        return 2 * MATMUL_N**3 / best_time(lambda: a @ a, 10) / 1e9

    peak = [matmul_peak()]
    log(f"[torch] f32 matmul {peak[0]:.0f} GFLOP/s; loading models")
    data = np.load(args.data)
    dims = json.loads(str(data["dims"]))
    path = presets.resolve(MODEL)

    def load():
        return transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32)

    policy = load()
    critic = load().model  # the trunk; its tied LM head is the embedding and is not used
    ref = load().eval().requires_grad_(False)  # TRL keeps a reference policy; mpo-jax's state does too
    for model in (policy, critic):
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()  # per-layer recompute (the newer name of gradient_checkpointing_enable)
        model.config.use_cache = False
        model.train()  # dropout is 0 in these configs; train mode turns checkpointing on
    value_head = torch.nn.Linear(dims["hidden"], 1)
    with torch.no_grad():
        value_head.weight.copy_(torch.from_numpy(data["value_kernel"]).T)
        value_head.bias.copy_(torch.from_numpy(data["value_bias"]))
    params = list(policy.parameters()) + list(critic.parameters()) + list(value_head.parameters())
    config = dict(lr=3e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)  # PPOConfig's optimizer defaults
    optimizer = torch.optim.AdamW(params, foreach=True, **config)
    n_params = {"policy": sum(p.numel() for p in policy.parameters()),
                "critic": sum(p.numel() for p in critic.parameters()) + sum(p.numel() for p in value_head.parameters())}

    t = {k: torch.from_numpy(np.asarray(data[k])) for k in ("query", "query_mask", "response", "response_mask",
                                                           "logprobs", "ref_logprobs", "values", "scores",
                                                           "contains_eos")}
    orders = data["orders"]
    hyper = PPOHyper(temperature=0.7, kl_coef=0.05, vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0,
                     lam=0.95, max_grad_norm=1.0)

    def outputs(idx):
        logits = policy.lm_head(trunk_hidden(policy.model, t, idx))
        return logits, value_head(trunk_hidden(critic, t, idx))[..., 0]

    def update() -> dict[str, float]:
        """TRL PPOTrainer's reward shaping, GAE, whitening and PPO epochs (`_torch_ppo.ppo_update`)."""
        return ppo_update(t, orders, outputs, params, optimizer, hyper, num_mini_batches=1, accum=args.accum)

    reset = reset_peak_rss()
    start = time.perf_counter()
    metrics = update()
    warmup_s = time.perf_counter() - start
    log(f"[torch] warm-up update {warmup_s:.1f} s, loss {metrics['loss']:.6f}")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        update()
        times.append(time.perf_counter() - start)
        log(f"[torch] update {times[-1]:.1f} s")
    update_peak = vm_hwm_mib() if reset else None
    peak.append(matmul_peak())
    del ref
    return dict(engine="torch", times=times, warmup_s=warmup_s, compile_s=None, metrics=metrics,
                max_rss_mib=max_rss_mib(), update_peak_mib=update_peak, matmul_gflops=max(peak), n_params=n_params,
                attn=policy.config._attn_implementation,
                versions={"torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
                          "transformers": transformers.__version__})


# -- the parent: runs both engines, reports ----------------------------------------------------------------
def run_engine(engine: str, args: argparse.Namespace, data: Path, workdir: Path) -> dict:
    result = workdir / f"{engine}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", engine, "--data", str(data),
           "--result", str(result), "--batch", str(args.batch), "--prompt", str(args.prompt),
           "--response", str(args.response), "--epochs", str(args.epochs), "--accum", str(args.accum),
           "--repeats", str(args.repeats), "--seed", str(args.seed), "--remat-policy", args.remat_policy,
           "--attention", args.attention, "--attention-block", str(args.attention_block)] + (
               ["--profile"] if args.profile else [])
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text(encoding="utf-8"))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def report(args, info, jx: dict, th: dict | None, load_before, others, wall_s: float) -> str:
    tokens = args.batch * (args.prompt + args.response) * args.epochs
    fl = flops(jx["dims"], args.batch, args.prompt, args.response, args.epochs)
    peak = max(jx["matmul_gflops"], th["matmul_gflops"] if th else 0.0)
    out = ["### Machine", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- {k}: {v}" for k, v in jx["versions"].items()]
    if th:
        out += [f"- {k}: {v}" for k, v in th["versions"].items()]
        out += [f"- transformers attention: {th['attn']}"]
    busy = others is not None and others > 0.10
    out += [f"- load average before the run (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load_before)}; other "
            f"processes used {'?' if others is None else f'{others:.0%}'} of the CPUs during the run"
            + (" — **the machine was busy: timings are pessimistic**" if busy else ""),
            f"- SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32) as policy and as critic (+ value head), "
            f"full fine-tuning, AdamW, per-layer remat / gradient checkpointing (JAX remat policy "
            f"'{args.remat_policy}', attention '{args.attention}'"
            + (f" in blocks of {args.attention_block} queries" if args.attention == "blocked" else "")
            + f"); batch {args.batch}, prompt "
            f"{args.prompt} + response {args.response} tokens, {args.epochs} epoch(s) x 1 mini-batch x "
            f"{args.accum} micro-batch(es); median of {args.repeats} updates after a warm-up", ""]

    out += ["### PPO update throughput", ""]
    rows = []
    for r in (jx, th):
        if r is None:
            continue
        med = statistics.median(r["times"])
        gflops = fl["model"] / med / 1e9
        rows.append(["mpo-jax (JAX)" if r["engine"] == "jax" else "PyTorch (transformers)",
                     f"{med:.1f}", f"{min(r['times']):.1f}-{max(r['times']):.1f}", f"{tokens / med:.1f}",
                     f"{r['warmup_s']:.1f}", "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                     f"{r['max_rss_mib'] / 1024:.2f}",
                     "?" if r["update_peak_mib"] is None else f"{r['update_peak_mib'] / 1024:.2f}",
                     f"{gflops:.0f}", f"{gflops / peak:.0%}",
                     f"{(fl['model'] + fl['recompute']) / med / 1e9 / peak:.0%}"])
    out.append(markdown_table(["engine", "update s (median)", "range", "tok/s", "warm-up s", "compile s",
                               "peak RSS GiB", "update peak GiB", "model GFLOP/s", "of f32 peak",
                               "incl. remat"], rows))
    jmed = statistics.median(jx["times"])
    out += ["", f"- f32 matmul peak ({MATMUL_N}^3, best of 10): JAX {jx['matmul_gflops']:.0f} GFLOP/s"
            + (f", torch {th['matmul_gflops']:.0f} GFLOP/s" if th else "") + f"; the machine's peak is taken as "
            f"{peak:.0f} GFLOP/s",
            f"- FLOPs per update: model {fl['model'] / 1e12:.2f} TFLOP (policy + critic forward+backward: 3 x "
            f"[2 trunks x {fl['trunk_fwd'] / 1e9:.0f} GFLOP + LM head {fl['lm_head_fwd'] / 1e9:.0f} GFLOP] per "
            f"epoch; N_block = {fl['n_block'] / 1e6:.1f}M matrix parameters per trunk), remat recompute "
            f"+{fl['recompute'] / 1e12:.2f} TFLOP; trainable parameters (JAX) "
            + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in jx["n_params"].items()),
            f"- goal ≥ {GOAL_PEAK_FRACTION:.0%} of the f32 peak: JAX reaches "
            f"{fl['model'] / jmed / 1e9 / peak:.0%} (model FLOPs) — "
            f"{'met' if fl['model'] / jmed / 1e9 / peak >= GOAL_PEAK_FRACTION else 'not met'}"]
    if th:
        speedup = statistics.median(th["times"]) / jmed
        out.append(f"- goal ≥ {GOAL_SPEEDUP}x PyTorch tokens/s: JAX is {speedup:.2f}x — "
                   f"{'met' if speedup >= GOAL_SPEEDUP else 'not met'}")
        out += ["", "### Same loss and update (first update, initial weights)", ""]
        names = ["loss", "loss/policy_avg", "loss/value_avg", "policy/entropy_avg", "policy/approxkl_avg",
                 "policy/clipfrac_avg", "val/clipfrac_avg", "grad_norm"]
        out.append(markdown_table(["metric", "mpo-jax", "PyTorch", "relative difference"],
                                  [[n, f"{jx['metrics'][n]:.7g}", f"{th['metrics'][n]:.7g}",
                                    f"{rel(jx['metrics'][n], th['metrics'][n]):.1e}"] for n in names]))
        ok = rel(jx["metrics"]["loss"], th["metrics"]["loss"]) <= 1e-3
        out += ["", f"- loss equal within 1e-3 relative: {'yes' if ok else '**no**'} (loss = mean over the "
                f"update's micro-batches; with 1 epoch x 1 micro-batch that is the first micro-batch's loss; "
                f"grad_norm is before clipping)"]
    if jx["profile"]:
        out += ["", "### Where the JAX update's time goes (whole batch, jitted, remat on)", ""]
        prof = jx["profile"]
        one = fl["trunk_fwd"]
        expect = {"policy forward": one + fl["lm_head_fwd"], "policy forward+backward": 3 * one
                  + 3 * fl["lm_head_fwd"], "critic forward+backward": 3 * one,
                  "critic forward+backward, attention removed": 3 * (one - fl["attn_fwd"])}
        rows = [[k, f"{v:.1f}", f"{expect[k] / v / 1e9:.0f}" if k in expect else "",
                 f"{expect[k] / v / 1e9 / peak:.0%}" if k in expect else ""] for k, v in prof.items()]
        parts = sum(prof.get(k, 0) for k in ("policy forward+backward", "critic forward+backward", "optimizer step"))
        no_attn = prof.get("critic forward+backward, attention removed")
        if no_attn is not None:
            rows.append(["attention in one trunk's forward+backward (difference)",
                         f"{prof['critic forward+backward'] - no_attn:.1f}", "", ""])
        rows.append(["sum of the two forward+backward and the step", f"{parts:.1f}", "", ""])
        rows.append(["whole update (median, per epoch)", f"{jmed / args.epochs:.1f}", "", ""])
        out.append(markdown_table(["part", "seconds", "model GFLOP/s", "of f32 peak"], rows))
    out += ["", f"_Bench wall time {wall_s:.0f} s._"]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (left-padded)")
    parser.add_argument("--response", type=int, default=128, help="response tokens (right-padded)")
    parser.add_argument("--epochs", type=int, default=1, help="num_ppo_epochs")
    parser.add_argument("--accum", type=int, default=1, help="gradient_accumulation_steps (micro-batches)")
    parser.add_argument("--repeats", type=int, default=3, help="timed updates per engine (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--remat-policy", choices=("full", "dots"), default="full",
                        help="JAX layers: 'full' recomputes the whole layer in the backward pass (as PyTorch's "
                             "activation checkpointing does); 'dots' keeps the weight-matmul outputs")
    parser.add_argument("--attention", choices=("dense", "blocked"), default="dense",
                        help="JAX side only: 'dense' masks the full T x T scores; 'blocked' computes causal query "
                             "blocks, skipping those above the diagonal (ModelConfig.attention_impl)")
    parser.add_argument("--attention-block", type=int, default=64,
                        help="JAX side, --attention blocked: query rows per block")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch implementation")
    parser.add_argument("--profile", action="store_true",
                        help="also time pieces of the JAX update alone (about +2 minutes)")
    parser.add_argument("--markdown-out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--engine", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.engine:
        result = (run_jax if args.engine == "jax" else run_torch)(args)
        args.result.write_text(json.dumps(result), encoding="utf-8")
        return 0

    started = time.perf_counter()
    info = machine_info()  # the commit that runs, read before anything can change it
    load_before = os.getloadavg()
    cpu_before = cpu_seconds(include_children=True)
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        workdir = Path(tmp)
        data = workdir / "data.npz"
        jx = run_engine("jax", args, data, workdir)
        th = None
        if not args.no_torch:
            needed = ("torch", "transformers", "accelerate", "gguf")
            missing = [m for m in needed if importlib.util.find_spec(m) is None]
            if missing:
                log(f"the PyTorch implementation is not benchmarked: {', '.join(missing)} not installed "
                    "(pip install -e '.[parity]')")
            else:
                th = run_engine("torch", args, data, workdir)
    wall_s = time.perf_counter() - started
    others = others_share(cpu_before, cpu_seconds(include_children=True), wall_s)
    text = report(args, info, jx, th, load_before, others, wall_s)
    print(text)
    if args.markdown_out:
        args.markdown_out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
