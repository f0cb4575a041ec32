"""A tiny random model over a tiny tokenizer: the whole MPO loop in seconds, for smoke tests.

The tokenizer is a byte-level BPE trained here on a few fixed sentences (ChatML special tokens,
one token per digit so that judge scores are single tokens); training is deterministic, so every
process and every run gets the same vocabulary. The weights are random (`seed`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mpo_jax.engine.tokenizer import Tokenizer
from mpo_jax.models.config import ModelConfig

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. write an essay about the prompt below. "
    "a good essay has a clear thesis, organised ideas, vivid details and correct grammar. "
    "score the response from 0 to 5 using the rubric item. the rubric lists the criteria. "
    "summarize the bill. was the author wrong? answer with a verdict. solve the problem and "
    "put the final answer in a box. 0 1 2 3 4 5 6 7 8 9 yes no good bad ok\n"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer(vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tiny BPE tokenizer with `vocab_size` entries (built once per cache folder)."""
    root = Path(cache_dir or Path(os.environ.get("MPO_JAX_CACHE", Path.home() / ".cache" / "mpo_jax")))
    path = root / f"tiny_tokenizer_{vocab_size}"
    if not (path / "tokenizer.json").is_file():
        write_tiny_tokenizer(path, vocab_size)
    return Tokenizer.from_dir(path)


def write_tiny_tokenizer(path: str | os.PathLike, vocab_size: int) -> Path:
    """Train the tiny tokenizer and write its files to the folder `path` (returned)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    path = Path(path)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f"tokenizer.json.{os.getpid()}.tmp"
    tok.save(str(tmp))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE}))
    tmp.replace(path / "tokenizer.json")  # last, so a half-written folder is rebuilt
    return path


def tiny_model_config(tokenizer: Tokenizer, *, hidden_size: int, num_layers: int, **overrides) -> ModelConfig:
    """A small Llama-style config sized to the tokenizer (4 heads, 2 KV heads)."""
    vocab = -(-len(tokenizer.token_strings()) // 8) * 8
    base = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_layers=num_layers,
                num_heads=4, num_kv_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
                eos_token_id=tokenizer.eos_id)
    base.update(overrides)
    return ModelConfig(**base)
