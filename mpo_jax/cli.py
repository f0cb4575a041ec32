"""`mpo-jax` command line. Subcommands: `train`, `generate`, `score`, `meta`, `eval`, `export`, `report`, `plan`,
`models`.

A refused input (any `MpoError`: a bad rubric file, config key, model path, ...) prints one line,
`error: <message>`, and exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from mpo_jax.errors import InvalidValueError, MissingFileError, MpoError


def _generate(args: argparse.Namespace) -> int:
    from mpo_jax.engine.language_model import load_model
    from mpo_jax.engine.sampling import SamplingParams
    from mpo_jax.engine.sharding import make_mesh

    try:
        mesh = make_mesh(tuple(int(x) for x in args.mesh.split(","))) if args.mesh else None
    except ValueError as err:
        if isinstance(err, MpoError):
            raise
        raise InvalidValueError(f"--mesh {args.mesh!r} must be integers such as 1,2,4 (data,fsdp,tensor)") from None
    start = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, mesh=mesh)
    loaded = time.perf_counter()
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("error: give --prompt (repeatable) or prompts on standard input, one per line", file=sys.stderr)
        return 2
    inputs = prompts if args.raw else [[{"role": "user", "content": p}] for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, stop=tuple(args.stop or ()), seed=args.seed)
    out = model.sample(inputs, params)
    done = time.perf_counter()
    for text in out.texts:
        print(text)
    if args.verbose:
        generated = int(out.mask.sum())
        print(f"[load {loaded - start:.1f}s, generate {done - loaded:.1f}s, {generated} tokens]", file=sys.stderr)
    return 0


def _models(_: argparse.Namespace) -> int:
    from mpo_jax.engine.presets import PRESETS

    for preset in PRESETS.values():
        print(f"{preset.name:32s} {preset.description}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import logging

    from mpo_jax.train.config import load_config

    config = load_config(args.config, args.overrides)  # every key checked before JAX starts
    from mpo_jax.train import distributed

    distributed.initialize(config.distributed)
    from mpo_jax.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(config)
    last = trainer.run()
    if distributed.is_main():
        run_dir = trainer.run_dir.resolve()
        rubrics = sorted(p.name for p in run_dir.glob("rubric_iter_*.txt"))
        print(f"run directory: {run_dir}")
        print(f"updates: {trainer.update}/{config.num_updates}; rubric versions: {', '.join(rubrics)}")
        if (run_dir / "report" / "report.html").is_file():
            print(f"report: {run_dir / 'report' / 'report.html'} (plots in {run_dir / 'report'})")
        if last:
            print(f"last update: score {last.get('score/mean', float('nan')):.3f}, "
                  f"kl {last.get('objective/kl', float('nan')):.4f}")
    return 0


def _load_judge_side(args: argparse.Namespace):
    """(model, task, rubric) for `score` and `meta`: a local model or an OpenAI-compatible endpoint."""
    from mpo_jax.rubric import Rubric, RubricError
    from mpo_jax.tasks import get_task

    task = get_task(args.task)
    if args.rubric in task.initial_rubrics:
        rubric = task.initial_rubrics[args.rubric]
    else:
        from pathlib import Path

        path = Path(args.rubric)
        if not path.is_file():
            raise MissingFileError(f"--rubric {args.rubric!r} is neither one of this task's rubrics "
                                   f"({', '.join(task.initial_rubrics)}) nor a file")
        try:
            rubric = Rubric.parse(path.read_text(encoding="utf-8"), limits=task.rubric_limits, task=task.name)
        except RubricError as err:
            raise RubricError(f"--rubric {path}: {err}") from err
    if args.base_url:
        from mpo_jax.engine.remote import RemoteChatModel

        model = RemoteChatModel(args.base_url, args.model, api_key_env=args.api_key_env)
    else:
        from mpo_jax.engine.language_model import load_model

        model = load_model(args.model, dtype=args.dtype)
    return model, task, rubric


def _score(args: argparse.Namespace) -> int:
    import json

    from mpo_jax.reward.judge import Judge
    from mpo_jax.reward.offline import read_rows, score_rows

    rows = read_rows(args.input)
    model, task, rubric = _load_judge_side(args)
    judge = Judge(model, task=task, mode="generate" if args.base_url else args.mode,
                  max_rubric_tokens=args.max_rubric_tokens)
    judge.set_rubric(rubric)
    scored = score_rows(judge, rows, args.batch_size)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
        print(f"scored {len(scored)} responses -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _meta(args: argparse.Namespace) -> int:
    from mpo_jax.reward.meta import MetaRewardModel
    from mpo_jax.reward.offline import meta_from_rows, read_rows

    rows = read_rows(args.buffer, need_score=True)
    model, task, rubric = _load_judge_side(args)
    mrm = MetaRewardModel(model, task=task, num_samples=args.num_samples, analysis_tokens=args.analysis_tokens,
                          item_tokens=args.item_tokens, max_items=args.max_items,
                          merged_rubric_words=args.merged_rubric_words, sense_check=not args.no_sense_check)
    judge, gate = _meta_judge(args, task, rubric)
    result = meta_from_rows(mrm, rubric, rows, args.out, seed=args.seed, fits=judge.fits if judge else None,
                            gate=gate, install=judge.set_rubric if judge else None)
    verdict = "accepted" if result.accepted else f"kept the input rubric [{result.reason_code}]"
    print(f"meta step {verdict}: {result.reason}")
    print(f"written to {args.out} (rubric_history.json, rubric_iter_*.txt, meta_evaluation_0.json)")
    return 0


def _meta_judge(args: argparse.Namespace, task, rubric):
    """(judge, canary gate) for `mpo-jax meta --judge-model`, or (None, None): then the text
    checks alone decide, quality heuristics included."""
    if not args.judge_model:
        if args.judge_base_url:
            raise InvalidValueError("--judge-base-url needs --judge-model (the served model name)")
        return None, None
    from mpo_jax.reward.canary import CanaryGate, canary_settings_from_args
    from mpo_jax.reward.judge import Judge

    if args.judge_base_url:
        from mpo_jax.engine.remote import RemoteChatModel

        model = RemoteChatModel(args.judge_base_url, args.judge_model, api_key_env=args.api_key_env)
        mode = "generate"
    else:
        from mpo_jax.engine.language_model import load_model

        model, mode = load_model(args.judge_model, dtype=args.dtype), args.judge_mode
    judge = Judge(model, task=task, mode=mode, max_rubric_tokens=args.judge_max_rubric_tokens)
    judge.set_rubric(rubric)
    settings = canary_settings_from_args(args)
    return judge, None if settings is None else CanaryGate(judge, task, settings, seed=args.seed)


def _judge_side_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="essay, summarization, ethics or math")
    parser.add_argument("--rubric", default="iter0", help="iter0, expert, or a file with <rubric><item>...")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="preset, .gguf or HF folder (or the served model name with --base-url)")
    parser.add_argument("--base-url", help="an OpenAI-compatible endpoint instead of a local model")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def _report(args: argparse.Namespace) -> int:
    from mpo_jax.train.report import run_report

    return run_report(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpo-jax", description="Meta Policy Optimization in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions with a model")
    gen.add_argument("--model", default="smollm2-135m-instruct",
                     help="preset name, .gguf file or Hugging Face checkpoint directory")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default: stdin lines")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--mesh", help="data,fsdp,tensor sizes, e.g. 1,2,4")
    gen.add_argument("--raw", action="store_true", help="use prompts as raw text, without the chat template")
    gen.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")
    gen.set_defaults(func=_generate)

    train = sub.add_parser("train", help="run MPO (or fixed-rubric PPO/GRPO) training from a config file")
    train.add_argument("--config", required=True, help="a config file (e.g. configs/demo_cpu.py)")
    train.set_defaults(func=_train)

    score = sub.add_parser("score", help="judge a JSONL of responses ({record|prompt, response}) with a rubric")
    _judge_side_arguments(score)
    score.add_argument("--input", required=True, help="JSONL: {\"prompt\" or \"record\", \"response\"} per line")
    score.add_argument("--output", help="JSONL out (default: stdout)")
    score.add_argument("--mode", default="logits", choices=["logits", "generate"])
    score.add_argument("--max-rubric-tokens", type=int, default=1024)
    score.add_argument("--batch-size", type=int, default=16)
    score.set_defaults(func=_score)

    meta = sub.add_parser("meta", help="run one meta step on a saved buffer of scored rollouts")
    _judge_side_arguments(meta)
    meta.add_argument("--buffer", required=True, help="JSONL: {\"prompt\" or \"record\", \"response\", \"score\"}")
    meta.add_argument("--out", required=True, help="folder for the new rubric and meta_evaluation_0.json")
    meta.add_argument("--num-samples", type=int, default=16)
    meta.add_argument("--analysis-tokens", type=int, default=2000, help="per meta-analysis (the original's 2,000)")
    meta.add_argument("--item-tokens", type=int, default=500, help="per generated criterion (the original's 500)")
    meta.add_argument("--max-items", type=int, default=0,
                      help="clamp the criteria count (0: only the task's rubric item limit)")
    meta.add_argument("--merged-rubric-words", type=int, default=0,
                      help="whole-rubric word budget asked for in the merge prompt (0: none, as the original)")
    meta.add_argument("--no-sense-check", action="store_true",
                      help="accept criteria that copy the samples or carry no scoring guidance")
    meta.add_argument("--seed", type=int, default=0)
    meta.add_argument("--judge-model", help="judge for the canary gate (preset, .gguf, HF folder, or the served "
                                            "name with --judge-base-url); without it the text checks alone decide")
    meta.add_argument("--judge-mode", default="logits", choices=["logits", "generate"],
                      help="local judge protocol (a remote judge always generates)")
    meta.add_argument("--judge-base-url", help="an OpenAI-compatible endpoint serving --judge-model")
    meta.add_argument("--judge-max-rubric-tokens", type=int, default=2048, help="the judge's rubric prefix budget")
    from mpo_jax.reward.canary import add_canary_arguments

    add_canary_arguments(meta, no_canary_help="with --judge-model: no canary gate (the text checks and the "
                                               "judge's fit decide)")
    meta.set_defaults(func=_meta)

    report = sub.add_parser("report", help="plots and a rubric-history page for a run directory")
    from mpo_jax.train.report import add_report_arguments

    add_report_arguments(report)
    report.set_defaults(func=_report)

    evaluation = sub.add_parser("eval", help="evaluate policies: generate on a test split, task metrics, Elo")
    from mpo_jax.evaluation.cli import add_eval_arguments, run_eval

    add_eval_arguments(evaluation)
    evaluation.set_defaults(func=run_eval)

    export = sub.add_parser("export", help="export a trained policy (LoRA merged) as a Hugging Face checkpoint")
    from mpo_jax.train.export import add_export_arguments, run_export

    add_export_arguments(export)
    export.set_defaults(func=run_export)

    plan = sub.add_parser("plan", help="compile one update's programs for a TPU topology (no TPU, no weights) and "
                                       "check that the run fits its HBM")
    from mpo_jax.plan.cli import add_plan_arguments, run_plan_command

    add_plan_arguments(plan)
    plan.set_defaults(func=run_plan_command)

    models = sub.add_parser("models", help="list the named model presets")
    models.set_defaults(func=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # `--config.a.b=value` overrides are collected apart from the subcommand's own flags.
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    try:
        return args.func(args)
    except MpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
