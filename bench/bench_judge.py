"""Judge throughput (float32): samples/s of `mpo_jax.reward.judge.Judge` in its three configurations,
on one batch of real essay prompts with essays, on the same machine, in the same run. The model is
SmolLM2-135M-Instruct by default; `--model qwen2.5-coder-0.5b-instruct` times the judge that the
CPU experiments use (docs/results/reward_hacking.md).

    python bench/bench_judge.py                                  # batch 16, 2 repeats, 128-token rationales
    python bench/bench_judge.py --skip-generate --repeats 3
    python bench/bench_judge.py --model qwen2.5-coder-0.5b-instruct --markdown-out /tmp/judge05b.md

On the 2-core CPU the default run (135M) takes about 10 minutes: generate mode ~7 (a warm-up call and one
timed call of ~3.5 minutes each), logits without reuse ~2 (calls of ~36 s), logits with reuse ~1.5
(calls of ~22 s). `--skip-generate` takes about 3.5 minutes.

Method
------
* Modes: `generate` (the published item protocol: per item a rationale of up to
  `--rationale-tokens` tokens ending at `<EOE>`, then an integer constrained to digits, the
  conversation carried over from item to item, the rubric prefix read from its KV cache);
  `logits` without prefix reuse (`reuse_prefix=False`: the rubric prefix is prefilled for every row
  of every batch, as a plain judge would); `logits` with prefix reuse (the prefix is prefilled once
  per rubric version into a batch-1 cache that every row reads in place).
* Work: `--batch` rows (default 16). Prompts are the first records of the essay task's test split
  (`load_records("essay", "test")`), each paired with an essay written for it (8 essays of
  ~150-170 words, ~200 tokens; rows past 8 reuse them with the next prompts). The rubric has 2
  items (the task's expert rubric's "Ideas and Content" and "Organization", trimmed to score
  levels 0-5, ~430 tokens); judge `max_rubric_tokens` = 512 (the smallest prefix length that
  holds it; the judge's default is 1024) and `max_items` = 16 (the judge's default; padding items
  skip their forward passes). Both are flags. Greedy decoding.
* Compile time is excluded: each mode's judge scores the same batch once (warm-up, same shapes)
  before it is timed; a timing is the median of `--repeats` calls of `judge.score`. Generate mode
  can be slow on a CPU: `--generate-repeats` (default 1) sets its repeats separately.
* The per-rubric cost is reported apart: the time of `set_rubric` plus the first prefix prefill
  (`judge._prefix(...)` until ready), measured after the warm-up. With prefix reuse the per-batch
  timings exclude it (it is paid once per rubric version); without reuse it is inside every batch.
* Token counts per batch come from wrapping the judge's jitted functions and the sampler's
  `_run` (argument shapes and `SampleOutput` counters), so they are what ran, padding included:
  "prefill slots" = padded token slots pushed through the model in prefill calls (rubric prefix,
  rows' material, item turns, new chat turns); "decode slots" = one-token forward passes x padded
  batch (generate: decode-loop steps x batch; logits: the second-digit probes, items x two-token
  score prefixes x batch, none for 0-5 ranges). "real tokens" counts the unpadded prefill tokens. "KV slots"
  is the largest cache capacity used (every token attends over it under a mask). These, not the
  seconds, are what carries over to a TPU.
* Goals on this CPU: logits with prefix reuse >= 3x generate and >= 1.5x logits without reuse
  (samples/s ratios, printed with whether they are met).

Timings on a shared machine are distorted by other processes: the report gives the load average
before the run and the share of the CPUs that *other* processes used during each mode (from
/proc/stat, minus this process's own CPU time), with a warning above 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _common import cpu_seconds, emit_report, machine_info, markdown_table, others_share  # noqa: E402

from mpo_jax.engine import presets  # noqa: E402
from mpo_jax.engine.language_model import LanguageModel, load_model  # noqa: E402
from mpo_jax.reward.judge import Judge  # noqa: E402
from mpo_jax.rubric import Rubric  # noqa: E402
from mpo_jax.tasks import load_records  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"

# The essay task's expert rubric, first two items, trimmed to levels 0-5 (~400 tokens rendered).
RUBRIC = Rubric((
    """### Ideas and Content (0-5)
Judge how clear, focused and well developed the central idea is, and how well it answers the instruction.
- 5: A clear, focused and original central idea that fully answers the instruction, developed with relevant, \
specific and well-chosen details, examples or reasons.
- 4: A clear central idea that answers the instruction, developed with relevant details; a few points could go \
deeper.
- 3: The central idea is clear, but development is uneven: some details are general, thin or only loosely \
connected.
- 2: The central idea is broad or partly off the instruction; support is limited or repetitive.
- 1: The main point is hard to find or only touches the instruction; details are few, vague or unrelated.
- 0: No central idea, or the text does not address the instruction at all (only a title, a list of keywords, a \
repeated word or an unrelated text).
A response of three sentences or fewer cannot score above 2 on this item.""",
    """### Organization (0-5)
Judge the structure: the opening, the order of ideas, the transitions and the ending.
- 5: An inviting opening, a logical and effective order of ideas, smooth transitions that show how ideas relate, \
and a satisfying conclusion.
- 4: A clear opening and ending and a logical order; transitions mostly work.
- 3: A recognisable beginning, middle and end; the order is sometimes loose and some transitions are missing.
- 2: Some structure, but the order is hard to follow in places, or the opening or the ending is missing.
- 1: Little structure: ideas are strung together with few transitions and no clear beginning or end.
- 0: No visible organization, or no real text to organise.
A response of three sentences or fewer cannot score above 2 on this item.""",
), task="essay")

# Essays for the first 8 records of essay_writing/test.jsonl, in file order.
ESSAYS = [
    "Western culture has been useful to the world, not because it is superior, but because many of its ideas "
    "travel well. In art, the Renaissance developed linear perspective and oil painting techniques that artists "
    "everywhere later adopted and transformed. In literature, the novel, from Cervantes to Austen, gave readers a "
    "form for exploring the inner lives of ordinary people. Science offers the clearest case: the experimental "
    "method, peer review and the habit of publishing results let discoveries in medicine and physics be checked "
    "and shared, which is why vaccines and electricity reached every continent. In politics, ideas such as the "
    "rule of law, elected parliaments and written rights have been borrowed by movements that used them to "
    "challenge colonial rulers themselves. Western culture has also caused great harm, and its usefulness "
    "depends on being open to criticism. Still, its best tools are now shared property, and the world is "
    "better for them.",
    "A country of more than three hundred million people spread over a continent may simply be too large to "
    "govern from one capital. Splitting the United States into several independent countries would let each "
    "region choose policies that fit its values. Today, voters in California and Alabama fight over the same "
    "federal laws on guns, health care and energy, and every election leaves roughly half the nation feeling "
    "ruled by strangers. Smaller countries such as Switzerland or Denmark show that compact democracies can be "
    "prosperous and stable. Regional nations could still cooperate through a trade union and a defence "
    "alliance, much as European states do, so the economic cost of separation need not be large. Critics warn "
    "about dividing the military and the national debt, and these are real problems, but they are problems of "
    "negotiation, not reasons to keep a union that satisfies fewer people each year.",
    "Debates about economics often assume that one side must be right: either low taxes and light regulation, "
    "or a strong welfare state and public services. The record suggests that both conservative and liberal "
    "economies can work very well, and that the details decide the outcome. Switzerland keeps taxes low and "
    "government small, yet it has excellent schools, careful banking rules and one of the highest incomes in "
    "the world. Denmark taxes heavily, but it also makes it easy to hire and fire workers and keeps its budget "
    "balanced, so its firms stay competitive. Both countries would fail if the details went wrong: low-tax "
    "systems without honest courts invite corruption, and generous welfare without good management creates "
    "debt. What matters is whether institutions are trusted, whether rules are enforced fairly, and whether "
    "policies change when evidence shows they are failing. Voters should judge economic programs by their "
    "design and results, not by their label.",
    "Reducing poverty should come before reducing inequality, because poverty causes direct and measurable "
    "harm. A family that cannot afford food, housing or medicine suffers whether or not its neighbours are "
    "rich. Programs that lift incomes at the bottom, such as child benefits, affordable housing and access to "
    "health care, have clear results: children stay in school longer, adults live longer, and crime falls. "
    "Reducing inequality, by contrast, can be achieved simply by making the rich poorer, which does nothing "
    "for the poor. Still, inequality has real costs that should not be ignored. When wealth is concentrated, "
    "the wealthy can buy political influence, shape laws in their favour and make it harder for others to "
    "rise. Extreme gaps can also weaken trust. The best approach is therefore to end poverty first while "
    "watching inequality closely, and to act against it when it starts to corrupt democracy or block "
    "opportunity.",
    "Some people claim that enlisting in the military is a cop-out, a way to avoid the hard choices of college "
    "or a career, and that military culture is toxic. This view is unfair. Enlisting is a demanding decision: "
    "recruits accept strict discipline, long separations from family and the real possibility of danger. Many "
    "join to pay for education, learn a trade or serve their country, and these are responsible goals rather "
    "than escapes. The military also offers training in medicine, engineering, logistics and leadership that "
    "later helps veterans in civilian jobs. It is true that some units have had problems with harassment and "
    "a culture of silence, and those problems deserve attention. But the armed forces have created reporting "
    "systems, leadership training and outside oversight to address them, and many service members describe a "
    "culture of loyalty and mutual support. Judging every recruit by the worst examples ignores the courage "
    "that enlisting requires.",
    "I agree only partly that team sports at school are the best way to teach children to cooperate. Sports do "
    "teach useful lessons. A football or basketball team wins only when players pass, communicate and trust "
    "each other, and children feel the results of teamwork immediately on the field. Coaches can reward "
    "helpful behaviour and show how individual talent matters less than a shared plan. However, sports are not "
    "the best tool for every child. Competitive games can leave less athletic children on the bench, and a "
    "focus on winning can teach rivalry as much as cooperation. Group projects in the classroom, school "
    "gardens, music ensembles and drama productions also require children to share tasks and solve problems "
    "together, and they include students who dislike sport. The best approach is to combine several kinds of "
    "group activity, so that every child finds a setting where cooperation feels natural and rewarding.",
    "When a supporter of Donald Trump accuses a critic of having Trump Derangement Syndrome, the phrase is "
    "usually meant as a dismissal, but it does not prove that the critic is a hater. Criticising a "
    "politician's policies is a normal part of democracy. A person may object to tariffs, immigration rules or "
    "statements about elections because of evidence and values, not because of personal hatred. For example, "
    "economists who warned about the costs of trade wars based their views on data about prices and jobs. "
    "Similarly, voters who care about the independence of courts may criticise attacks on judges without "
    "wishing harm on anyone. Labelling such arguments as a syndrome avoids discussing them. It is true that "
    "some critics react emotionally to everything Trump does, and that exaggeration weakens their case. But "
    "some overreaction does not make all criticism hateful. A healthy debate answers arguments with arguments "
    "instead of diagnoses.",
    "Every person sees the world from a particular place, shaped by culture, history and experience, and this "
    "is why many perspectives deserve equal respect. When doctors listen to patients' own descriptions of "
    "pain, treatment improves. When cities ask residents of different neighbourhoods how they travel, they "
    "design better transport. Literature shows the same thing: reading novels from Nigeria, India or Brazil "
    "lets readers understand lives very different from their own. Diverse views help groups notice mistakes "
    "that a single perspective would miss, and research on teams shows that varied groups often solve complex "
    "problems better. Treating every view as equally worth hearing also protects minorities, whose "
    "experiences are easily ignored by the majority. Of course, some claims can be tested against evidence, "
    "and not every factual statement is correct. But on questions of value and meaning, listening to all "
    "views makes our understanding of the world richer, fairer and more complete.",
]


# -- cost accounting ------------------------------------------------------------------------------
@dataclasses.dataclass
class Counts:
    prefill_slots: int = 0  # padded token slots in prefill calls
    real_tokens: int = 0  # unpadded tokens among them
    decode_slots: int = 0  # one-token forward passes x padded batch
    decode_steps: int = 0  # sequential one-token steps (batch-wide)
    prefix_slots: int = 0  # of prefill_slots: the rubric prefix
    kv_slots: int = 0  # the largest KV-cache capacity used

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0)


def instrument(judge: Judge, model: LanguageModel, counts: Counts) -> Callable[[], None]:
    """Wrap the judge's jitted functions and the sampler's `_run` to count what they compute.

    Returns a function that removes the sampler wrapper again (the judge's stay: it is not reused).
    """
    prefill_prefix, score_items, run = judge._prefill_prefix, judge._score_items, model.sampler._run

    def counted_prefix(params, tokens, valid, cache):
        counts.prefill_slots += tokens.size
        counts.prefix_slots += tokens.size
        counts.real_tokens += int(np.asarray(valid).sum())
        counts.kv_slots = max(counts.kv_slots, cache.capacity)
        return prefill_prefix(params, tokens, valid, cache)

    def counted_scores(params, prefix_cache, sample_tokens, sample_valid, item_tokens, item_valid, *rest):
        # Padding items (past the rubric's) and absent two-token prefixes (-1) skip their forward
        # passes at run time (lax.cond), so only the rubric's items and real prefixes are counted.
        items = len(judge.rubric.items)
        batch, item_len = item_tokens.shape[1:]
        probes = int((np.asarray(rest[-3])[:items] >= 0).sum())  # rest[-3]: [K, D] two-token score prefixes
        counts.prefill_slots += sample_tokens.size + items * batch * item_len
        counts.real_tokens += int(np.asarray(sample_valid).sum()) + int(np.asarray(item_valid[:items]).sum())
        counts.decode_slots += probes * batch
        counts.decode_steps += probes
        counts.kv_slots = max(counts.kv_slots, prefix_cache.capacity)
        return score_items(params, prefix_cache, sample_tokens, sample_valid, item_tokens, item_valid, *rest)

    def counted_run(state, prompt_ids, prompt_len, gen_len, params, constraint):
        out = run(state, prompt_ids, prompt_len, gen_len, params, constraint)
        batch = state.cache.batch_size
        counts.prefill_slots += out.prefill_tokens
        counts.real_tokens += sum(len(p) for p in prompt_ids)
        counts.decode_slots += out.decode_steps * batch
        counts.decode_steps += out.decode_steps
        counts.kv_slots = max(counts.kv_slots, out.state.cache.capacity)
        return out

    judge._prefill_prefix, judge._score_items = counted_prefix, counted_scores
    model.sampler._run = counted_run
    return lambda: vars(model.sampler).pop("_run", None)


# -- timing ---------------------------------------------------------------------------------------
def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


@dataclasses.dataclass
class ModeResult:
    name: str
    batch: int
    seconds: float  # median per batch
    runs: list[float]
    warmup_s: float
    counts: Counts  # per batch (one timed call)
    rubric_s: float | None  # set_rubric + first prefix prefill, when it is outside the batches
    rubric_counts: Counts | None
    others: float | None
    scores: np.ndarray

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.seconds


def bench_mode(model: LanguageModel, name: str, judge: Judge, records, responses, repeats: int) -> ModeResult:
    counts = Counts()
    restore = instrument(judge, model, counts)
    try:
        return _bench_mode(name, judge, records, responses, repeats, counts)
    finally:
        restore()


def _bench_mode(name: str, judge: Judge, records, responses, repeats: int, counts: Counts) -> ModeResult:
    cpu_before, started = cpu_seconds(), time.perf_counter()
    judge.set_rubric(RUBRIC)
    start = time.perf_counter()
    judge.score(records, responses)  # warm-up: compiles every shape this mode uses
    warmup_s = time.perf_counter() - start
    capacity = counts.kv_slots if judge.mode == "logits" else judge.max_rubric_tokens

    rubric_s = rubric_counts = None
    if judge.reuse_prefix:  # the per-rubric cost, paid once per rubric version
        counts.reset()
        start = time.perf_counter()
        judge.set_rubric(RUBRIC)
        jax.block_until_ready(judge._prefix(capacity))
        rubric_s, rubric_counts = time.perf_counter() - start, dataclasses.replace(counts)

    scores = None

    def one_batch():
        nonlocal scores
        counts.reset()
        scores = judge.score(records, responses)  # host numpy: the call has finished

    seconds, runs = median_time(one_batch, repeats)
    others = others_share(cpu_before, cpu_seconds(), time.perf_counter() - started)
    print(f"  {name}: {seconds:.2f} s/batch ({len(responses) / seconds:.2f} samples/s), warm-up {warmup_s:.1f} s, "
          f"runs {', '.join(f'{t:.2f}' for t in runs)}", file=sys.stderr, flush=True)
    return ModeResult(name, len(responses), seconds, runs, warmup_s, dataclasses.replace(counts), rubric_s,
                      rubric_counts, others, scores)


# -- report -----------------------------------------------------------------------------------------
def model_description(name: str) -> str:
    preset = presets.PRESETS.get(name)
    return preset.description if preset else f"model {name}"


def share(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"the judge: a preset ({', '.join(sorted(presets.PRESETS))}) or a local .gguf or "
                        f"checkpoint directory (default {DEFAULT_MODEL})")
    parser.add_argument("--batch", type=int, default=16, help="rows per judge call (default 16)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per logits mode (median)")
    parser.add_argument("--generate-repeats", type=int, default=1, help="timed calls in generate mode (median)")
    parser.add_argument("--rationale-tokens", type=int, default=128, help="rationale budget per item (generate)")
    parser.add_argument("--max-rubric-tokens", type=int, default=512, help="the judge's padded rubric prefix")
    parser.add_argument("--max-items", type=int, default=16, help="the judge's max_items (padded item count; "
                        "padding items skip their forward passes)")
    parser.add_argument("--skip-generate", action="store_true", help="skip the generate mode")
    parser.add_argument("--markdown-out", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    load_before = os.getloadavg()
    cpu_before = cpu_seconds()
    model = load_model(args.model)
    info = {**machine_info(), "accelerator": ", ".join(str(d) for d in jax.devices()), "jax": jax.__version__}
    records = load_records("essay", "test", limit=args.batch)
    if len(records) < args.batch:
        raise SystemExit(f"the essay test split has only {len(records)} records; use --batch {len(records)}")
    responses = [ESSAYS[i % len(ESSAYS)] for i in range(args.batch)]
    tok = model.tokenizer
    rubric_tokens = len(tok.encode(RUBRIC.render(), add_bos=False))
    essay_tokens = [len(tok.encode(e, add_bos=False)) for e in ESSAYS]

    common = dict(task="essay", max_rubric_tokens=args.max_rubric_tokens, max_items=args.max_items)
    judges = []
    if not args.skip_generate:
        judges.append(("generate", Judge(model, mode="generate", rationale_tokens=args.rationale_tokens, **common),
                       args.generate_repeats))
    judges.append(("logits, no prefix reuse", Judge(model, reuse_prefix=False, **common), args.repeats))
    judges.append(("logits + prefix reuse", Judge(model, **common), args.repeats))
    prefix_tokens = judges[-1][1].rubric_tokens(RUBRIC)
    results = []
    for name, judge, repeats in judges:
        results.append(bench_mode(model, name, judge, records, responses, repeats))
    wall_s = time.perf_counter() - started
    others = others_share(cpu_before, cpu_seconds(), wall_s)

    # -- the Markdown report --
    busy = others is not None and others > 0.10
    out = ["### Machine", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- load average before the run (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load_before)}; other "
            f"processes used {share(others)} of the CPUs during the run (per mode: "
            + ", ".join(f"{r.name} {share(r.others)}" for r in results) + ")"
            + (" — **the machine was busy: timings are pessimistic**" if busy else ""),
            f"- {model_description(args.model)}, dequantised to float32; batch {args.batch}; essay prompts from "
            f"the test split with essays of {min(essay_tokens)}-{max(essay_tokens)} tokens; 2-item rubric of "
            f"{rubric_tokens} tokens (judge prefix {prefix_tokens} tokens, padded to {args.max_rubric_tokens}); "
            f"judge max_items {args.max_items}; generate mode: {args.rationale_tokens}-token rationale budget per "
            f"item, greedy; median of {args.repeats} calls (generate: {args.generate_repeats}) after a warm-up "
            f"call with the same shapes", ""]
    out += ["### Judge throughput (per batch)", ""]
    rows = []
    for r in results:
        c = r.counts
        rows.append([r.name, f"{r.samples_per_s:.2f}", f"{r.seconds:.2f}", f"{c.prefill_slots:,}",
                     f"{c.prefix_slots:,}", f"{c.real_tokens:,}", c.decode_steps, f"{c.decode_slots:,}",
                     f"{c.kv_slots:,}", f"{r.warmup_s:.1f}"])
    out.append(markdown_table(["mode", "samples/s", "s/batch", "prefill slots", "of which prefix",
                               "real prefill tok", "decode steps", "decode slots", "KV slots", "warm-up s"], rows))
    out += ["", "### Per rubric version (set_rubric + first prefix prefill)", ""]
    rubric_rows = [[r.name, f"{r.rubric_s:.2f}", f"{r.rubric_counts.prefill_slots:,}", f"{r.rubric_counts.kv_slots:,}"]
                   for r in results if r.rubric_s is not None]
    rubric_rows += [[r.name, "in every batch", "-", "-"] for r in results if r.rubric_s is None]
    out.append(markdown_table(["mode", "seconds", "prefill slots", "KV slots"], rubric_rows))

    by_name = {r.name: r for r in results}
    fast = by_name["logits + prefix reuse"]
    out += ["", "### Goals", ""]
    for other, goal in (("generate", 3.0), ("logits, no prefix reuse", 1.5)):
        if other in by_name:
            ratio = fast.samples_per_s / by_name[other].samples_per_s
            out.append(f"- logits + prefix reuse vs {other}: **{ratio:.2f}x** (goal >= {goal:g}x: "
                       f"{'met' if ratio >= goal else 'NOT met'})")
        else:
            out.append(f"- logits + prefix reuse vs {other}: not measured (--skip-generate)")
    out += ["", "### Scores (first rows)", ""]
    out.append(markdown_table(["mode"] + [f"row {i}" for i in range(min(8, args.batch))],
                              [[r.name] + [f"{s:.2f}" for s in r.scores[:8]] for r in results]))
    emit_report(out, wall_s, args.markdown_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
