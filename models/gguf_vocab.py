"""A GGUF file's tokenizer as a Hugging Face `tokenizers.Tokenizer`, rebuilt from its metadata.

GGUF files carry no tokenizer.json: the vocabulary, merges (or SentencePiece scores), token types
and pre-tokenizer name are metadata keys (`tokenizer.ggml.*`). We rebuild an equivalent
`tokenizers.Tokenizer` from them ourselves, because transformers' GGUF tokenizer path imports
torch. `gguf_vocabulary` also reads the special ids, the BOS default and the chat template, with
llama.cpp's defaults where a key is missing; `mpo_jax.engine.tokenizer.Tokenizer.from_gguf` wraps
the result.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mpo_jax.errors import FileFormatError

__all__ = ["GgufVocabulary", "gguf_vocabulary"]

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6


@dataclass(frozen=True)
class GgufVocabulary:
    """What a GGUF file says about its tokenizer; ids are as stored (the tokenizer checks their range)."""

    tokenizer: Any  # tokenizers.Tokenizer, added tokens included
    vocab_size: int  # entries of tokenizer.ggml.tokens
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    extra_eos_ids: tuple[int, ...]  # end-of-turn / end-of-message ids
    chat_template: str | None
    add_bos: bool


def gguf_vocabulary(meta: Mapping[str, Any], source: str = "<gguf metadata>") -> GgufVocabulary:
    """The tokenizer described by GGUF metadata (`read_gguf_metadata`); `source` names it in errors."""
    if "tokenizer.ggml.tokens" not in meta:
        raise FileFormatError(f"{source}: GGUF metadata has no tokenizer (no 'tokenizer.ggml.tokens' key)")
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        style = _pre_tokenizer_style(meta.get("tokenizer.ggml.pre"), source)
        hf_tokenizer = _gguf_byte_level_bpe(meta, style)
        default_bos, default_eos, default_add_bos = None, None, style.add_bos
    elif model == "llama":
        hf_tokenizer = _gguf_sentencepiece_bpe(meta)
        default_bos, default_eos, default_add_bos = 1, 2, True  # llama.cpp's defaults for this model
    else:
        raise FileFormatError(
            f"{source}: GGUF tokenizer model {model!r} is not supported; supported: 'gpt2' "
            "(byte-level BPE: GPT-2, SmolLM, Qwen2, Llama 3) and 'llama' (SentencePiece BPE: Llama 2)")
    _add_gguf_added_tokens(hf_tokenizer, meta)
    turn_end_keys = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    return GgufVocabulary(
        tokenizer=hf_tokenizer,
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        bos_id=meta.get("tokenizer.ggml.bos_token_id", default_bos),
        eos_id=meta.get("tokenizer.ggml.eos_token_id", default_eos),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        extra_eos_ids=tuple(meta[k] for k in turn_end_keys if k in meta),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
    )


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _PreTokenizerStyle:
    """How a byte-level BPE vocabulary splits text before merging (llama.cpp's `tokenizer.ggml.pre`)."""

    split: str = _GPT2_SPLIT
    individual_digits: bool = False  # every digit is its own token (StarCoder, SmolLM)
    ignore_merges: bool = False      # a word already in the vocabulary is one token (Llama 3)
    nfc: bool = False                # the original tokenizer.json NFC-normalizes (Qwen2)
    add_bos: bool = False            # llama.cpp's default when the file has no add_bos_token


_GPT2_STYLE = _PreTokenizerStyle()
_DIGITS_STYLE = _PreTokenizerStyle(individual_digits=True)
_LLAMA3_STYLE = _PreTokenizerStyle(split=_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)
_QWEN2_STYLE = _PreTokenizerStyle(split=_QWEN2_SPLIT, nfc=True)
_PRE_TOKENIZER_STYLES = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe"), _GPT2_STYLE),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"),
                    _DIGITS_STYLE),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3_STYLE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizerStyle(split=_LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_STYLE),
    "stablelm2": _PreTokenizerStyle(split=_QWEN2_SPLIT),
}


def _pre_tokenizer_style(pre: str | None, source: str) -> _PreTokenizerStyle:
    style = _PRE_TOKENIZER_STYLES.get(pre or "default")
    if style is None:
        warnings.warn(
            f"{source}: unknown GGUF pre-tokenizer {pre!r}; splitting text like GPT-2, which may tokenize "
            f"some text differently from the original model (known: {sorted(_PRE_TOKENIZER_STYLES)})",
            stacklevel=4)
        style = _GPT2_STYLE
    return style


def _gguf_byte_level_bpe(meta: Mapping[str, Any], style: _PreTokenizerStyle) -> Any:
    """GPT-2-style byte-level BPE; the vocabulary and merges are stored in byte-level spelling."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if "tokenizer.ggml.merges" not in meta:
        raise FileFormatError("GGUF byte-level BPE tokenizer has no 'tokenizer.ggml.merges'")
    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=style.ignore_merges))
    if style.nfc:
        tokenizer.normalizer = normalizers.NFC()
    if style.split == _GPT2_SPLIT:  # ByteLevel's own regex is GPT-2's
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(style.split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if style.individual_digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _gguf_sentencepiece_bpe(meta: Mapping[str, Any]) -> Any:
    """SentencePiece-style BPE (llama.cpp 'llama'): '▁' for spaces, byte fallback, score-ranked merges.

    llama.cpp prefixes a space to the text and to each piece after a special token, as the original
    Llama 2 tokenizer.json does with a normalizer (which runs on each piece between added tokens).
    Metaspace would not do: it adds no '▁' to text that already starts with a space.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, meta.get("tokenizer.ggml.scores"), _token_types(meta))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[unk_id] if 0 <= unk_id < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    prefix_space = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("\u2581")] if prefix_space else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _token_types(meta: Mapping[str, Any]) -> list[int]:
    return list(meta.get("tokenizer.ggml.token_type") or [1] * len(meta["tokenizer.ggml.tokens"]))


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float] | None,
                        types: Sequence[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose union scores best, so rank every split of
    every normal token by that token's score (GGUF files of SentencePiece models list no merges)."""
    if scores is None:
        raise FileFormatError("GGUF SentencePiece tokenizer has neither 'tokenizer.ggml.merges' nor scores")
    mergeable = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
                 if kind not in (_UNKNOWN, _CONTROL, _BYTE)}
    ranked = []
    for token, token_id in mergeable.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[token_id], token_id, mergeable[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_gguf_added_tokens(tokenizer: Any, meta: Mapping[str, Any]) -> None:
    """Make control tokens (special) and user-defined tokens (not special) match whole in text.

    GGUF stores them in raw text, so they already have their vocabulary ids; this only tells the
    tokenizer to match them before splitting, as llama.cpp does.
    """
    from tokenizers import AddedToken

    pairs = list(zip(meta["tokenizer.ggml.tokens"], _token_types(meta), strict=True))
    special = [AddedToken(t, special=True, normalized=False) for t, k in pairs if k in (_UNKNOWN, _CONTROL)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in pairs if k == _USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)
