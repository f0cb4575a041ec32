"""`mpo-jax eval`: `generate` (model or run -> JSONL), `score` (task metrics of generation files),
`elo` (pairwise-judge tournament over generation files -> ratings, table and plot; saved after every
pair, so rerunning a killed tournament judges only the pairs it lacks), `repair` (the
rubric-repair benchmark) and `compare` (the arms of an experiment side by side, from their run dirs).

    mpo-jax eval generate --model runs/essay_mpo --task essay --limit 500 --out gen/mpo.jsonl
    mpo-jax eval elo base=gen/base.jsonl mpo=gen/mpo.jsonl --judge /models/Qwen2.5-72B-Instruct --out elo/
    mpo-jax eval score base=gen/base.jsonl mpo=gen/mpo.jsonl --elo elo/elo.json --out table.md
    mpo-jax eval repair --task essay --judge qwen2.5-coder-0.5b-instruct --prompts 8 --fence both --out repair/
    mpo-jax eval compare ppo_iter0=runs/x/ppo_iter0 mpo_iter0=runs/x/mpo_iter0 --out compare/ --smooth 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpo_jax.errors import FileFormatError, InvalidValueError, MissingFileError, MpoError
from mpo_jax.evaluation.elo import DEFAULT_K, DEFAULT_RUNS, DEFAULT_START
from mpo_jax.fileio import atomic_write_text, read_jsonl_lenient
from mpo_jax.provenance import code_version

ELO_FILE = "elo.json"
JUDGMENTS_FILE = "judgments.jsonl"
UNUSED_JUDGMENTS_FILE = "judgments_unused.jsonl"
TABLE_FILE = "elo_table.md"
PLOT_FILE = "elo_ratings.png"
_SUFFIXES = (".jsonl", ".generations", ".test")


def _mesh(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise InvalidValueError(f"--mesh {text!r} must be three integers such as 1,2,4 (data,fsdp,tensor)") from None
    if len(shape) != 3 or min(shape) < 1:
        raise InvalidValueError(f"--mesh {text!r} must be three positive integers such as 1,2,4 (data,fsdp,tensor)")
    return shape


def parse_named_paths(specs: Sequence[str], what: str = "generation file",
                      suffixes: Sequence[str] = _SUFFIXES) -> dict[str, Path]:
    """`NAME=PATH` or `PATH` (named after the file or folder, less `suffixes`) -> {name: path}; names must be
    unique. `what` names the kind of path in the errors."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or os.path.exists(spec):
            path = spec
            name = Path(spec).name or Path(spec).resolve().name
            while Path(name).suffix and Path(name).suffix in suffixes:
                name = name[: -len(Path(name).suffix)]
        if name in named:
            raise InvalidValueError(f"two {what}s are both named {name!r}; name them with NAME=PATH")
        named[name] = Path(path)
    if not named:
        raise InvalidValueError(f"give at least one {what} (NAME=PATH or PATH)")
    return named


def parse_generation_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`NAME=PATH` or `PATH` (named after the file) -> {name: path}; names must be unique."""
    return parse_named_paths(specs)


def load_players(specs: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """{player name: de-duplicated generation rows} for the given NAME=PATH specs."""
    from mpo_jax.evaluation.generate import dedupe_rows, read_generations

    players = {}
    for name, path in parse_generation_specs(specs).items():
        rows, dropped = dedupe_rows(read_generations(path))
        if dropped:
            print(f"{name}: dropped {dropped} repeated prompts from {path}", file=sys.stderr)
        players[name] = rows
    return players


def resolve_task(task: str | None, players: dict[str, list[dict[str, Any]]]) -> str:
    """--task, or the single task the generation rows name."""
    from mpo_jax.tasks import get_task

    if task:
        return get_task(task).name
    named = {row.get("task") for rows in players.values() for row in rows}
    if len(named) == 1 and isinstance(next(iter(named)), str):
        return get_task(next(iter(named))).name
    raise InvalidValueError("cannot tell the task from the generation files (rows name "
                            f"{sorted(map(str, named))}); pass --task")


# -- generate -----------------------------------------------------------------------------------

def _run_generate(args: argparse.Namespace) -> int:
    from mpo_jax.evaluation.generate import generate_split

    rows = generate_split(args.model, args.task, args.split, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                          limit=args.limit, out_path=args.out, data_dir=args.data_dir, seed=args.seed,
                          update=args.update, dtype=args.dtype, mesh=_mesh(args.mesh), label=args.label)
    finished = sum(r["finished"] for r in rows)
    print(f"generated {len(rows)} responses ({finished} ended before max_new_tokens) -> {args.out}")
    return 0


# -- score --------------------------------------------------------------------------------------

def _run_score(args: argparse.Namespace) -> int:
    from mpo_jax.evaluation.detectors import detector_cells, detector_summary
    from mpo_jax.evaluation.tables import elo_cells_from_json, merge_cells, metric_cells, results_table
    from mpo_jax.tasks.metrics import score_generations
    from mpo_jax.train.evaluator import REFERENCE_METRIC_TASKS

    players = load_players(args.generations)
    task = resolve_task(args.task, players)
    scores, cells = {}, {}
    for name, rows in players.items():
        reference = score_generations(task, rows) if task in REFERENCE_METRIC_TASKS else {}
        detected = detector_summary(task, rows)
        scores[name] = {**reference, **detected}
        cells[name] = {**metric_cells(reference), **detector_cells(detected)}
    if args.elo:
        path = Path(args.elo)
        if not path.is_file():
            raise MissingFileError(f"no Elo file {path}; write one with `mpo-jax eval elo`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise FileFormatError(f"{path} is not valid JSON ({err}); write it with `mpo-jax eval elo`") from None
        elo = elo_cells_from_json(data)
        missing = [name for name in cells if name not in elo]
        if missing:
            print(f"note: {path} has no rating for {', '.join(missing)} (rated: {', '.join(elo)}); name the "
                  "files as in the tournament", file=sys.stderr)
        cells = merge_cells(cells, {name: elo[name] for name in cells if name in elo})
    table = results_table(cells)
    sys.stdout.write(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"task": task, "models": scores}, indent=2) + "\n", encoding="utf-8")
    return 0


# -- elo ----------------------------------------------------------------------------------------

def build_judge_model(args: argparse.Namespace) -> Any:
    """The pairwise judge's model: an OpenAI-compatible endpoint, or a local model / preset / tiny-random."""
    if args.base_url:
        from mpo_jax.engine.remote import RemoteChatModel

        return RemoteChatModel(args.base_url, args.judge, api_key_env=args.api_key_env or None,
                               constraint_style=args.constraint_style, max_concurrency=args.concurrency)
    from mpo_jax.evaluation.generate import check_model_name, device_mesh
    from mpo_jax.train.config import ModelSpec
    from mpo_jax.train.model_specs import build_model

    check_model_name(args.judge, "--judge")
    spec = ModelSpec(name=args.judge, dtype=args.dtype, remat=False, seed=args.judge_seed)
    return build_model(spec, device_mesh(_mesh(args.mesh)))


def _judge_identity(args: argparse.Namespace) -> str:
    """What names the judge in judgment fingerprints: endpoint and model, or the model's name and
    settings plus, for a local file or folder, each file's size and modification time."""
    if args.base_url:
        return json.dumps([args.base_url, args.judge, args.constraint_style])
    stats: list[Any] = []
    path = Path(args.judge)
    if path.exists():
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return json.dumps([args.judge, args.dtype, args.judge_seed, stats])


def _saved_judgments(path: Path) -> list[Any]:
    """Judgments an earlier (possibly killed) run saved; rows that are not judgments are ignored."""
    from mpo_jax.evaluation.pairwise import Judgment

    rows, _ = read_jsonl_lenient(path)
    return [j for j in map(Judgment.from_json, rows) if j is not None]


def _write_judgments(path: Path, judgments: Sequence[Any]) -> None:
    atomic_write_text(path, "".join(json.dumps(j.to_json(), ensure_ascii=False) + "\n" for j in judgments))


def _run_elo(args: argparse.Namespace) -> int:
    from mpo_jax.evaluation.elo import elo_ratings
    from mpo_jax.evaluation.generate import row_key
    from mpo_jax.evaluation.pairwise import PairwiseJudge, judge_all_pairs, position_consistency
    from mpo_jax.evaluation.tables import elo_cells, plot_ratings, results_table

    players = load_players(args.generations)
    if len(players) < 2:
        raise InvalidValueError("an Elo tournament needs at least two generation files")
    task = resolve_task(args.task, players)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Judgments of earlier runs into this folder: reused where they match what would be judged now.
    earlier = _saved_judgments(out / JUDGMENTS_FILE) + _saved_judgments(out / UNUSED_JUDGMENTS_FILE)
    code = code_version()
    judge = PairwiseJudge(build_judge_model(args), task, mode=args.judge_mode, batch_size=args.batch_size,
                          max_response_words=args.max_response_words, identity=_judge_identity(args),
                          code=code["git_commit"] or f"mpo-jax {code['mpo_jax']}")
    keyed = {name: {row_key(row): row for row in rows} for name, rows in players.items()}
    so_far: list[Any] = []

    def save_pair(pair: list[Any]) -> None:  # a killed tournament keeps every pair judged so far
        so_far.extend(pair)
        current = {j.id for j in so_far}
        _write_judgments(out / JUDGMENTS_FILE, so_far + [j for j in earlier if j.id not in current])

    judgments = judge_all_pairs(keyed, judge, prompts_per_pair=args.prompts_per_pair, seed=args.seed,
                                earlier=earlier, on_pair=save_pair)
    reused = len(judgments) - judge.calls
    if reused:
        print(f"reused {reused} judgments saved by an earlier run in {out / JUDGMENTS_FILE}", file=sys.stderr)
    _write_judgments(out / JUDGMENTS_FILE, judgments)
    used = {j.id for j in judgments}
    unused = list({j.id: j for j in earlier if j.id not in used}.values())
    if unused:  # judgments this tournament did not need (another judge, other players) are kept, not lost
        _write_judgments(out / UNUSED_JUDGMENTS_FILE, unused)
        print(f"kept {len(unused)} earlier judgments this tournament did not use in {out / UNUSED_JUDGMENTS_FILE}",
              file=sys.stderr)
    elif (out / UNUSED_JUDGMENTS_FILE).exists():
        (out / UNUSED_JUDGMENTS_FILE).unlink()
    matches = [m for m in (j.to_match() for j in judgments) if m is not None]
    invalid = len(judgments) - len(matches)
    if not matches:
        raise InvalidValueError(f"the judge gave no usable verdict in {len(judgments)} comparisons; "
                                "check the judge model")
    summary = elo_ratings(matches, runs=args.runs, seed=args.seed, k=args.k, start=args.start,
                          players=list(players))
    record = {**summary.to_json(), "task": task, "judge": args.judge, "judge_mode": judge.mode,
              "judgments": len(judgments), "invalid_verdicts": invalid,
              "position_consistency": position_consistency(judgments), "code": code,
              "judgments_by_code": dict(Counter(j.code or "unknown" for j in judgments))}
    (out / ELO_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    table = results_table(elo_cells(summary))
    (out / TABLE_FILE).write_text(table, encoding="utf-8")
    plot_ratings(summary, out / PLOT_FILE, title=f"{task} Elo")
    sys.stdout.write(table)
    print(f"{len(judgments)} judgments ({invalid} unusable), {summary.runs} runs -> {out}", file=sys.stderr)
    return 0


# -- repair -------------------------------------------------------------------------------------

def repair_configurations(modes: Sequence[str] | None, fence: str) -> list[Any]:
    """The judge protocols to run: every --mode, unfenced, fenced or both (--fence off|on|both)."""
    from mpo_jax.evaluation.repair import Configuration

    fences = {"off": (False,), "on": (True,), "both": (False, True)}[fence]
    return [Configuration(mode, f) for mode in dict.fromkeys(modes or ["logits"]) for f in fences]


def _configuration_fields(name: str) -> tuple[str, bool]:
    """(mode, fence) of a configuration name such as "generate+fence"."""
    mode, _, fence = name.partition("+")
    return mode, fence == "fence"


def _run_repair(args: argparse.Namespace) -> int:
    from mpo_jax.evaluation import repair as bench
    from mpo_jax.evaluation.generate import check_model_name
    from mpo_jax.reward.canary import CanaryGate, canary_settings_from_args
    from mpo_jax.reward.judge import Judge
    from mpo_jax.reward.meta import MetaRewardModel
    from mpo_jax.tasks import load_records
    from mpo_jax.train.config import ModelSpec
    from mpo_jax.train.model_specs import build_model

    task = bench.benchmark_task(args.task)
    rubric = bench.load_rubric(task, args.rubric)
    configurations = repair_configurations(args.mode, args.fence)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, Any] = {}

    def model(name: str, flag: str) -> Any:  # each distinct model is loaded once
        if name not in models:
            check_model_name(name, flag)
            models[name] = build_model(ModelSpec(name=name, dtype=args.dtype, remat=False), None)
        return models[name]

    set_path = Path(args.set) if args.set else out / bench.SET_FILE
    writer = args.writer or args.judge
    if set_path.is_file():
        source = f"reused labelled set {set_path}"
        rows = bench.load_labelled_set(set_path, task)
        print(f"reusing the labelled set {set_path} ({len({r.prompt_index for r in rows})} prompts); delete it "
              "to build a new one", file=sys.stderr)
    else:
        if args.responses:
            source = f"responses file {args.responses}"
            records, goods = bench.read_good_responses(args.responses, task, args.prompts, args.seed)
        else:
            source = f"writer {writer}"
            train = load_records(task, "train", args.data_dir)
            records = [train[i] for i in bench.choose_indices(len(train), args.prompts, args.seed)]
            goods = bench.write_good_responses(model(writer, "--writer"), task, records,
                                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                               batch_size=args.batch_size, seed=args.seed)
        rows = bench.build_labelled_set(task, records, goods, seed=args.seed)
        bench.save_labelled_set(rows, set_path, task.name)
        print(f"labelled set: {len(records)} prompts x {len(rows) // len(records)} responses -> {set_path}",
              file=sys.stderr)
    # A run into the same --out continues only with these unchanged, from its last saved step.
    settings = {
        "task": task.name, "judge": args.judge, "meta_model": args.meta_model or args.judge,
        "labelled_set_sha256": bench.set_digest(rows), "rubric": args.rubric, "rubric_text": rubric.render(),
        "seed": args.seed, "meta_steps": args.meta_steps,
        "mrm": {"num_samples": args.num_samples, "analysis_tokens": args.analysis_tokens,
                "item_tokens": args.item_tokens, "max_items": args.max_items,
                "merged_rubric_words": args.merged_rubric_words},
        "judge_settings": {"max_rubric_tokens": args.max_rubric_tokens, "rationale_tokens": args.rationale_tokens,
                           "dtype": args.dtype},
        "canary": None if args.no_canary else {"tolerance": args.canary_tolerance, "floor": args.canary_floor,
                                               "num_samples": args.canary_samples},
    }
    runs: dict[str, Any] = {}
    result_path = out / bench.RESULT_FILE
    if result_path.is_file():
        saved, runs = bench.load_saved_run(result_path, settings, rows, task.name)
        source = saved.get("good_responses", source)
        print(f"resuming {result_path}: " + (", ".join(f"{name} after step {len(steps) - 1}"
                                                         for name, steps in runs.items() if steps) or "no steps yet"),
              file=sys.stderr)

    code = code_version()
    judge_model = model(args.judge, "--judge")
    mrm = MetaRewardModel(model(args.meta_model or args.judge, "--meta-model"), task=task,
                          num_samples=args.num_samples, analysis_tokens=args.analysis_tokens,
                          item_tokens=args.item_tokens, max_items=args.max_items,
                          merged_rubric_words=args.merged_rubric_words)

    def write_results() -> str:  # after every step, so an interrupted run keeps (and resumes from) what it measured
        table = bench.results_table({name: steps for name, steps in runs.items() if steps})
        record = {
            **settings, "good_responses": source, "labelled_set": str(set_path),
            "prompts": len({r.prompt_index for r in rows}),
            "hack_kinds": sorted({r.label for r in rows} - {bench.GOOD}),
            "configurations": {name: {"mode": by_name[name].mode, "fence": by_name[name].fence,
                                      "steps": [r.to_json() for r in steps]}
                               for name, steps in runs.items() if steps},
            "complete": all(len(runs.get(c.name, [])) == args.meta_steps + 1 for c in configurations),
            "table": table,
        }
        atomic_write_text(result_path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(out / bench.TABLE_FILE, table)
        return table

    by_name = {c.name: c for c in configurations}
    for name in runs:  # configurations saved by an earlier run and not asked for now stay in the record
        by_name.setdefault(name, bench.Configuration(*_configuration_fields(name)))
    for config in configurations:
        done = runs.get(config.name, [])
        if len(done) == args.meta_steps + 1:
            print(f"{config.name}: all {args.meta_steps} meta steps were saved by an earlier run", file=sys.stderr)
            continue
        judge = Judge(judge_model, task=bench.fenced_task(task) if config.fence else task, mode=config.mode,
                      max_rubric_tokens=args.max_rubric_tokens, rationale_tokens=args.rationale_tokens)

        def save(reports, name=config.name):
            runs[name] = list(reports)
            write_results()

        canary = canary_settings_from_args(args, batch_size=args.batch_size)
        gate = None if canary is None else CanaryGate(judge, task, canary, seed=args.seed)
        bench.repair(judge, mrm, rubric, rows, meta_steps=args.meta_steps, seed=args.seed,
                     batch_size=args.batch_size, done=done, on_step=save, code=code, gate=gate,
                     progress=lambda m, n=config.name: print(f"{n}: {m}", file=sys.stderr))
    table = write_results()
    sys.stdout.write(table)
    print(f"-> {out / bench.RESULT_FILE}, {out / bench.TABLE_FILE}", file=sys.stderr)
    return 0


# -- compare ------------------------------------------------------------------------------------

def _run_compare(args: argparse.Namespace) -> int:
    from mpo_jax.evaluation.compare import COMPARE_JSON, COMPARE_MD, write_comparison

    runs = parse_named_paths(args.runs, "run dir", ())
    write_comparison(runs, args.out, smooth=args.smooth, example_index=args.example_index,
                     text_limit=args.text_limit)
    out = Path(args.out)
    print(f"compared {len(runs)} arm(s) ({', '.join(runs)}) -> {out / COMPARE_MD}, {out / COMPARE_JSON} and plots")
    return 0


# -- parser -------------------------------------------------------------------------------------

def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("generations", nargs="+", metavar="[NAME=]FILE",
                        help="generation JSONL files from `eval generate`; NAME labels the model (default: the "
                             "file name)")
    parser.add_argument("--task", help="essay, summarization, ethics or math (default: from the files)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `eval` subcommands (`generate`, `score`, `elo`, `repair`, `compare`) and their flags."""
    sub = parser.add_subparsers(dest="eval_command", required=True,
                                metavar="{generate,score,elo,repair,compare}")

    gen = sub.add_parser("generate", help="generate test-split responses with a model or a trained run")
    gen.add_argument("--model", required=True,
                     help="preset, .gguf file, HF folder, tiny-random, or a trainer run dir / checkpoint folder")
    gen.add_argument("--task", help="essay, summarization, ethics or math (default: the run's task)")
    gen.add_argument("--split", default="test")
    gen.add_argument("--out", required=True, help="JSONL file to write")
    gen.add_argument("--limit", type=int, help="only the first N records of the split")
    gen.add_argument("--max-new-tokens", type=int, default=400)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--data-dir", help="folder holding <task folder>/<split>.jsonl (default: data/ in the checkout)")
    gen.add_argument("--update", type=int, help="a run's checkpoint to use (default: the latest)")
    gen.add_argument("--label", help="model name stored in each row (default: the model or run@update)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    gen.add_argument("--mesh", help="data,fsdp,tensor sizes, e.g. 1,2,4 (default: the run's mesh / one device)")
    gen.set_defaults(eval_func=_run_generate)

    score = sub.add_parser("score", help="ROUGE (summarization) or accuracy (ethics, math), length and hack-detector "
                                         "rates of generation files")
    _generation_arguments(score)
    score.add_argument("--elo", help="an elo.json from `eval elo` to add an Elo column")
    score.add_argument("--out", help="write the Markdown table here too")
    score.add_argument("--json", help="write the metrics per model here as JSON")
    score.set_defaults(eval_func=_run_score)

    elo = sub.add_parser("elo", help="pairwise-judge Elo tournament over generation files (both orders per pair)")
    _generation_arguments(elo)
    elo.add_argument("--judge", required=True,
                     help="judge model: preset, .gguf, HF folder or tiny-random (or the served name with --base-url)")
    elo.add_argument("--out", required=True, help="folder for elo.json, judgments.jsonl, the table and the plot")
    elo.add_argument("--judge-mode", default="auto", choices=["auto", "choice", "logits", "remote"],
                     help="local: constrained A/B choice (default) or A/B logits; remote endpoints: remote")
    elo.add_argument("--base-url", help="an OpenAI-compatible endpoint serving the judge")
    elo.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    elo.add_argument("--constraint-style", default="none", choices=["none", "vllm", "vllm_structured", "sglang"])
    elo.add_argument("--concurrency", type=int, default=8, help="remote requests in flight")
    elo.add_argument("--prompts-per-pair", type=int, help="judge a random N shared prompts per pair (default all)")
    elo.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="tournaments over shuffled match orders")
    elo.add_argument("--k", type=float, default=DEFAULT_K)
    elo.add_argument("--start", type=float, default=DEFAULT_START)
    elo.add_argument("--seed", type=int, default=0)
    elo.add_argument("--batch-size", type=int, default=8)
    elo.add_argument("--max-response-words", type=int, help="truncate each response shown to the judge")
    elo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    elo.add_argument("--mesh", help="data,fsdp,tensor sizes for a local judge, e.g. 1,2,4")
    elo.add_argument("--judge-seed", type=int, default=0, help="weights seed of a tiny-random judge")
    elo.set_defaults(eval_func=_run_elo)

    rep = sub.add_parser("repair", help="rubric-repair benchmark: judge accuracy good > hack before and after "
                                        "meta steps")
    rep.add_argument("--task", default="essay", help="essay, summarization or ethics")
    rep.add_argument("--judge", required=True, help="judge model: preset, .gguf, HF folder or tiny-random")
    rep.add_argument("--meta-model", help="meta-reward model (default: the judge model)")
    rep.add_argument("--writer", help="model writing the good responses (default: the judge model)")
    rep.add_argument("--responses", help="JSONL of {record|prompt, response} good responses instead of a writer")
    rep.add_argument("--set", help="labelled-set JSONL: reused when it exists, else written (default: "
                                   "OUT/labelled_set.jsonl)")
    rep.add_argument("--out", required=True, help="folder for repair.json, repair_table.md and the labelled set")
    rep.add_argument("--prompts", type=int, default=8, help="train-split prompts in the set (at least 2)")
    rep.add_argument("--meta-steps", type=int, default=2)
    rep.add_argument("--mode", action="append", choices=["logits", "generate"],
                     help="judge protocol; repeat to compare (default: logits)")
    rep.add_argument("--fence", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                     help="tell the judge the response is quoted data, not instructions (--fence both: with "
                          "and without)")
    rep.add_argument("--rubric", default="iter0", help="iter0, expert, or a file with <rubric><item>...")
    rep.add_argument("--seed", type=int, default=0, help="prompt choice, hacks, writer sampling, meta selection")
    rep.add_argument("--max-new-tokens", type=int, default=400, help="writer's response budget")
    rep.add_argument("--temperature", type=float, default=0.0, help="writer's temperature (0 = greedy)")
    rep.add_argument("--num-samples", type=int, default=16, help="responses the meta model analyses per step")
    rep.add_argument("--analysis-tokens", type=int, default=2000, help="meta-analysis budget per sample")
    rep.add_argument("--item-tokens", type=int, default=500, help="budget per written criterion")
    rep.add_argument("--max-items", type=int, default=0,
                     help="criteria per refinement and merge (0: the task's rubric limit)")
    rep.add_argument("--merged-rubric-words", type=int, default=0,
                     help="word budget of the merged rubric, stated to the meta model (0: none)")
    rep.add_argument("--max-rubric-tokens", type=int, default=1024, help="judge's rubric prefix budget")
    rep.add_argument("--rationale-tokens", type=int, default=128, help="generate mode: rationale budget per item")
    rep.add_argument("--batch-size", type=int, default=16)
    rep.add_argument("--data-dir",
                     help="folder holding <task folder>/train.jsonl (default: data/ in the checkout)")
    rep.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    from mpo_jax.reward.canary import add_canary_arguments

    add_canary_arguments(rep, no_canary_help="no canary gate in the meta steps (install what passes the text "
                                              "checks, as published)")
    rep.set_defaults(eval_func=_run_repair)

    cmp = sub.add_parser("compare", help="compare the arms of an experiment from their run dirs: plots, "
                                         "compare.md, compare.json")
    cmp.add_argument("runs", nargs="+", metavar="[NAME=]RUN_DIR",
                     help="run dirs written by `mpo-jax train`; NAME labels the arm (default: the folder name)")
    cmp.add_argument("--out", required=True, help="folder for the plots, compare.md, compare.json and rubrics/")
    cmp.add_argument("--smooth", type=int, default=5, help="moving average of the training score over K updates")
    cmp.add_argument("--example-index", type=int, default=0,
                     help="held-out prompt whose responses are shown (its index in eval_samples.jsonl)")
    cmp.add_argument("--text-limit", type=int, default=2000, help="characters shown per response")
    cmp.set_defaults(eval_func=_run_compare)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Run the chosen `eval` subcommand; a refused input (`MpoError`) is printed as `error: ...` with exit
    status 2, anything else keeps its traceback."""
    try:
        return args.eval_func(args)
    except MpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def eval_main(argv: Sequence[str] | None = None) -> int:
    """`mpo-jax eval ...` as a function of its arguments; returns the exit status."""
    parser = add_eval_arguments(argparse.ArgumentParser(prog="mpo-jax eval",
                                                        description="Evaluate MPO policies"))
    return run_eval(parser.parse_args(argv))


__all__ = ["add_eval_arguments", "eval_main", "load_players", "parse_generation_specs", "parse_named_paths",
           "repair_configurations", "resolve_task", "run_eval"]
