"""A trained policy out of a run directory, as a Hugging Face checkpoint any HF tool can load.

    mpo-jax export runs/demo_cpu --format hf exported/          # the latest checkpoint
    mpo-jax export runs/demo_cpu/checkpoints/4 --format hf out/ # a given update

A checkpoint stores only what training changed (LoRA adapters or all weights, a value head,
optimizer state); the rest comes from the base model named in the run's `config.json`. So the
policy is rebuilt exactly as the trainer builds it and the checkpoint is restored onto it, both
through `train/run_dir.py` (which reads the checkpoints from the config's `checkpoint.directory`
when the run wrote them elsewhere, e.g. gs://, and skips a corrupt latest one); then each
LoRA adapter is folded into its base matrix (W + (alpha / rank) * A @ B, matrices stored
(in, out) as in `models/transformer.py`; an `lm_head` adapter on a tied model unties it), the
value head is dropped, and the weights are written with `export_hf_checkpoint` next to the
tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json with the chat
template and special tokens, generation_config.json with the end-of-turn ids). A GGUF-sourced
model has no tokenizer files of its own: they are written from the `Tokenizer` rebuilt from the
GGUF metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mpo_jax.errors import MpoError
from mpo_jax.train.run_dir import CHECKPOINTS_DIR, checkpoint_directory, load_run_config, locate_run, restore_policy

FORMATS = ("hf",)
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
PROVENANCE_FILE = "mpo_export.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Tokenizer files a previous export (or another tool) may have left; any of them would take
# precedence over, or mix with, what is written now.
_STALE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", TOKENIZER_CONFIG, "special_tokens_map.json",
                          "added_tokens.json", "chat_template.jinja", "chat_template.json", GENERATION_CONFIG)


class ExportError(MpoError, ValueError):
    """The run, checkpoint, format or output folder cannot be exported; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_policy` wrote and where it came from."""

    out_dir: Path
    run_dir: Path
    update: int
    format: str
    dtype: str
    lora_merged: tuple[str, ...]  # LoRA targets folded into their base matrices (empty: full fine-tuning)
    value_head_dropped: bool
    files: tuple[str, ...]


# -- the trained weights ---------------------------------------------------------------------------


def merged_policy_params(state: Any, model_config: Any) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Canonical host params of the trained policy with LoRA folded in and the value head removed."""
    from flax import nnx

    from mpo_jax.models.params import flat_from_state

    module = state.policy.merge(state.params["policy"])
    flat = {name: np.asarray(value) for name, value in flat_from_state(nnx.state(module)).items()}
    return merge_lora(flat, model_config)


def merge_lora(flat: Mapping[str, np.ndarray], model_config: Any) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Fold each adapter into its matrix, W + (alpha / rank) * A @ B, and drop adapters and value head.

    The sum is formed in float32 and cast back to the weight's dtype once. An `lm_head` adapter
    on a tied model is folded into a copy of the transposed embedding, which becomes a separate
    `lm_head`: the input embedding stays as trained, so the merged model is untied
    (`exported_model_config` says so in its config).
    """
    params = dict(flat)
    merged: list[str] = []
    if model_config.lora_rank:
        scale = model_config.lora_alpha / model_config.lora_rank
        for target in model_config.lora_targets:
            key = "lm_head" if target == "lm_head" else f"layers.{target}"
            a = params.pop(f"{key}_lora_a").astype(np.float32)  # [L, in, r] ([D, r] for lm_head)
            b = params.pop(f"{key}_lora_b").astype(np.float32)  # [L, r, out] ([r, V] for lm_head)
            # A tied model's output projection is the transposed embedding.
            base = params["embed"].T if key == "lm_head" and key not in params else params[key]
            params[key] = (base.astype(np.float32) + scale * np.matmul(a, b)).astype(base.dtype)
            merged.append(target)
    leftover = sorted(name for name in params if "_lora_" in name)
    if leftover:
        raise ExportError(f"adapters {leftover} are not among the config's lora_targets "
                          f"{tuple(model_config.lora_targets)}; the checkpoint and config.json disagree")
    params.pop("value_head.kernel", None)
    params.pop("value_head.bias", None)
    return params, tuple(merged)


def exported_model_config(model_config: Any, params: Mapping[str, np.ndarray]) -> Any:
    """The config of merged params: no adapters or value head, untied when `lm_head` was merged apart."""
    return model_config.replace(lora_rank=0, value_head=False, remat=False,
                                tie_word_embeddings=model_config.tie_word_embeddings and "lm_head" not in params)


# -- tokenizer files -------------------------------------------------------------------------------


def _hf_tokenizer_copy(backend: Any, bos_text: str | None, bos_id: int | None, add_bos: bool) -> Any:
    """A copy of a `tokenizers.Tokenizer`; prepends BOS in its post-processor when the model wants one."""
    import tokenizers
    from tokenizers import processors

    copy = tokenizers.Tokenizer.from_str(backend.tokenizer.to_str())
    if add_bos and bos_text is not None and copy.post_processor is None:
        copy.post_processor = processors.TemplateProcessing(
            single=f"{bos_text}:0 $A:0", pair=f"{bos_text}:0 $A:0 {bos_text}:1 $B:1",
            special_tokens=[(bos_text, bos_id)])
    return copy


def save_tokenizer(tokenizer: Any, out_dir: str | os.PathLike, *, model_max_length: int | None = None
                   ) -> tuple[str, ...]:
    """Write `tokenizer` (any `mpo_jax.engine.tokenizer.Tokenizer`) as Hugging Face tokenizer files;
    returns their names.

    Byte-level and SentencePiece-style BPE (HF directories, GGUF metadata) become tokenizer.json
    loaded by `PreTrainedTokenizerFast`; a SentencePiece model becomes tokenizer.model. The
    special tokens, BOS behaviour and chat template are the ones `tokenizer` uses.
    """
    from mpo_jax.engine.tokenizer import _HFBackend, _SentencePieceBackend

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _STALE_TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    backend = tokenizer._backend  # `Tokenizer` has no public accessor for its backend

    def text_of(token_id: int | None) -> str | None:
        return None if token_id is None else backend.id_to_token(token_id)

    bos_text = text_of(tokenizer.bos_id)
    files: list[str] = []
    config: dict[str, Any] = {}
    if isinstance(backend, _HFBackend):
        _hf_tokenizer_copy(backend, bos_text, tokenizer.bos_id, tokenizer.add_bos).save(str(out / "tokenizer.json"))
        files.append("tokenizer.json")
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif isinstance(backend, _SentencePieceBackend):
        (out / "tokenizer.model").write_bytes(backend.sp.serialized_model_proto())
        files.append("tokenizer.model")
    else:
        raise ExportError(f"cannot write a tokenizer backed by {type(backend).__name__}; supported: Hugging Face "
                          "`tokenizers` (tokenizer.json, GGUF) and SentencePiece models")
    config.update({
        "bos_token": bos_text, "eos_token": text_of(tokenizer.eos_id), "pad_token": text_of(tokenizer.pad_id),
        "add_bos_token": bool(tokenizer.add_bos), "add_eos_token": False,
        # our decoder returns the text as the tokens spell it, without transformers' space clean-up
        "clean_up_tokenization_spaces": False,
    })
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    _write_json(out / TOKENIZER_CONFIG, config)
    files.append(TOKENIZER_CONFIG)
    generation = {"bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id,
                  "eos_token_id": list(tokenizer.eos_ids) if len(tokenizer.eos_ids) != 1 else tokenizer.eos_ids[0]}
    _write_json(out / GENERATION_CONFIG, {k: v for k, v in generation.items() if v not in (None, [])})
    files.append(GENERATION_CONFIG)
    return tuple(files)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- the export ------------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, run_dir: Path, checkpoints: str | os.PathLike[str]) -> None:
    out, run = out_dir.resolve(), run_dir.resolve()
    protected = [run / CHECKPOINTS_DIR]
    if "://" not in os.fspath(checkpoints):
        protected.append(Path(checkpoints).expanduser().resolve())
    if out == run or any(out == folder or folder in out.parents for folder in protected):
        raise ExportError(f"output folder {out_dir} would overwrite the run's own files (config.json, "
                          "checkpoints); choose a folder outside the run directory or a new subfolder of it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output folder {out_dir} exists and is a file; choose a folder name")


def export_policy(checkpoint_or_run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, format: str = "hf",
                  update: int | None = None, dtype: str | None = None,
                  max_shard_bytes: int | None = None) -> ExportResult:
    """Export a run's trained policy (latest checkpoint, or `update`) to `out_dir`.

    `checkpoint_or_run_dir` is the run directory (the folder holding config.json), its
    checkpoints/ folder or `RUN_DIR/checkpoints/<update>`. Without an update the newest
    checkpoint that restores is exported. `dtype` defaults to the policy's own parameter dtype;
    `max_shard_bytes` splits the safetensors into shards.
    """
    from mpo_jax.models.hf_checkpoint import export_hf_checkpoint

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; supported: {', '.join(FORMATS)}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    location = locate_run(checkpoint_or_run_dir, update)
    out = Path(out_dir).expanduser()
    _check_out_dir(out, location.run_dir, checkpoint_directory(load_run_config(location.run_dir), location.run_dir))
    restored = restore_policy(location.run_dir, update=location.update, mesh=(1, 1, 1))
    policy, state, restored_update, host = restored.model, restored.state, restored.update, restored.host_state
    params, merged = merged_policy_params(state, policy.config)
    model_config = exported_model_config(policy.config, params)
    out_dtype = dtype or model_config.param_dtype
    export_hf_checkpoint(model_config, params, out, dtype=out_dtype, max_shard_bytes=max_shard_bytes)
    save_tokenizer(policy.tokenizer, out, model_max_length=model_config.max_position_embeddings)
    _write_json(out / PROVENANCE_FILE, _provenance(location.run_dir, restored_update, host, policy.config, merged))
    files = tuple(sorted(p.name for p in out.iterdir() if p.is_file()))
    return ExportResult(out_dir=out, run_dir=location.run_dir, update=restored_update, format=format, dtype=out_dtype,
                        lora_merged=merged, value_head_dropped=policy.config.value_head, files=files)


def _provenance(run_dir: Path, update: int, host: Mapping[str, Any], config: Any,
                merged: tuple[str, ...]) -> dict[str, Any]:
    """Where the exported weights came from (read by people, not by any loader)."""
    history = host.get("rubric_history") or {}
    accepted = [e for e in history.get("events", []) if e.get("accepted")]
    return {"source_run_dir": str(run_dir.resolve()), "update": update,
            "rubric_iteration": accepted[-1].get("iteration") if accepted else None,
            "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha, "merged_targets": list(merged)},
            "value_head_dropped": bool(config.value_head)}


# -- command line ----------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`mpo-jax export CHECKPOINT --format hf OUT_DIR`."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a run directory (its newest checkpoint that restores) or RUN_DIR/checkpoints/<update>")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the exported checkpoint")
    parser.add_argument("--format", default="hf", help="output format: hf (Hugging Face safetensors + tokenizer)")
    parser.add_argument("--update", type=int, help="the update to export when CHECKPOINT is a run directory")
    parser.add_argument("--dtype", help=f"weights dtype ({', '.join(EXPORT_DTYPES)}; default: the policy's own)")
    parser.add_argument("--max-shard-mb", type=float, help="split the weights into safetensors shards of this size")
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run the export for parsed arguments; prints what was written, or a refused input (`MpoError`) as
    `error: ...` with status 2."""
    shard = None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20)
    try:
        result = export_policy(args.checkpoint, args.out_dir, format=args.format, update=args.update,
                               dtype=args.dtype, max_shard_bytes=shard)
    except MpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lora = f"LoRA merged into {', '.join(result.lora_merged)}" if result.lora_merged else "full fine-tuned weights"
    print(f"exported update {result.update} of {result.run_dir} to {result.out_dir} ({result.format}, "
          f"{result.dtype}; {lora}{'; value head dropped' if result.value_head_dropped else ''})")
    print(f"files: {', '.join(result.files)}")
    return 0


__all__ = ["ExportError", "ExportResult", "add_export_arguments", "export_policy", "exported_model_config",
           "merge_lora", "merged_policy_params", "run_export", "save_tokenizer"]
