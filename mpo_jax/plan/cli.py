"""`mpo-jax plan --config CONFIG --topology TYPE [--slices N] [--json FILE]`: exit 0 when the run fits, 1 when not."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL_CONFIGS = "configs/model_configs"  # as mpo_jax.plan.models.DEFAULT_MODEL_CONFIGS


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a training config file (e.g. configs/paper.py:essay_mpo)")
    parser.add_argument("--topology", required=True,
                        help="Cloud TPU accelerator type: v4-32, v5e-16 (v5litepod-16), v5p-64, v6e-8, ...")
    parser.add_argument("--slices", type=int, default=1, help="multislice: this many slices of TYPE (default 1)")
    parser.add_argument("--json", help="write the plan as JSON to this file")
    parser.add_argument("--judge-modes", default="",
                        help="judge modes to compile, comma-separated (default: the configured one; "
                             "'logits,generate' for both)")
    parser.add_argument("--model-configs", default=DEFAULT_MODEL_CONFIGS,
                        help="folder of <model name>/config.json for model paths that do not exist here "
                             "(default configs/model_configs)")
    parser.add_argument("--only", action="append", default=[],
                        help="compile only programs whose name starts with this (repeatable), e.g. ppo_update")


def run_plan_command(args: argparse.Namespace) -> int:
    from mpo_jax.train.config import load_config

    config = load_config(args.config, args.overrides)
    from mpo_jax.plan.plan import run_plan
    from mpo_jax.plan.report import render, to_json
    from mpo_jax.plan.topology import parse_topology

    topology = parse_topology(args.topology, args.slices)
    modes = tuple(m.strip() for m in args.judge_modes.split(",") if m.strip())
    model_configs = Path(args.model_configs) if args.model_configs else None
    result = run_plan(config, topology, config_name=args.config, judge_modes=modes, model_configs=model_configs,
                      only=tuple(args.only), progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(result), indent=1) + "\n", encoding="utf-8")
    return 0 if result.fits else 1
