"""One tokenizer interface over Hugging Face `tokenizers` dirs, GGUF metadata and SentencePiece models.

The rest of the library (sampling, constraints, training) only needs ids in, text out, the special
ids and a chat template, so every source is reduced to one small backend interface (`_Backend`).
GGUF files carry no `tokenizer.json`: `mpo_jax.models.gguf_vocab` rebuilds an equivalent
`tokenizers.Tokenizer` from their metadata, next to the rest of the GGUF code.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mpo_jax.errors import FileFormatError, InvalidValueError, MissingFileError
from mpo_jax.models.gguf_metadata import read_gguf_metadata
from mpo_jax.models.gguf_vocab import gguf_vocabulary

SUPPORTED_FORMATS = (
    "a directory with tokenizer.json (Hugging Face tokenizers) or tokenizer.model (SentencePiece), "
    "a .gguf file, or a SentencePiece .model file"
)

# Tokens that end a turn in common chat formats; llama.cpp treats the same names as end-of-generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
    "<end_of_turn>", "<eos>", "</s>",
)

class _Backend(Protocol):
    """What `Tokenizer` needs from a tokenizer implementation (no special tokens added here)."""

    vocab_size: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode_batch(self, seqs: Sequence[Sequence[int]], skip_special_tokens: bool) -> list[str]: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, token_id: int) -> str | None: ...

    def is_reserved(self, token_id: int) -> bool:
        """Whether the token is matched whole in text (special, added, control), not a text piece."""
        ...

    def own_special_ids(self) -> dict[str, int | None]:
        """BOS/EOS/PAD ids the model file itself names ('bos', 'eos', 'pad'); configs may override."""
        ...


class _HFBackend:
    """A `tokenizers.Tokenizer`; encodes without its post-processor so BOS is ours to add."""

    def __init__(self, tokenizer: Any, min_vocab_size: int = 0):
        self.tokenizer = tokenizer
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(max(ids, default=-1) + 1, min_vocab_size)
        self.added_ids = frozenset(tokenizer.get_added_tokens_decoder())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode_batch(self, seqs: Sequence[Sequence[int]], skip_special_tokens: bool) -> list[str]:
        return self.tokenizer.decode_batch([list(s) for s in seqs], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def is_reserved(self, token_id: int) -> bool:
        return token_id in self.added_ids

    def own_special_ids(self) -> dict[str, int | None]:
        return {}  # tokenizer.json leaves them to tokenizer_config.json


class _SentencePieceBackend:
    """A `sentencepiece` model. SentencePiece never parses `<s>`-like text into control ids, so we
    split those out ourselves (as transformers' slow tokenizers do) for chat templates to work."""

    def __init__(self, processor: Any):
        self.sp = processor
        self.vocab_size = processor.get_piece_size()
        self.special = frozenset(
            i for i in range(self.vocab_size) if processor.is_control(i) or processor.is_unknown(i))
        pieces = sorted((processor.id_to_piece(i) for i in self.special), key=len, reverse=True)
        self.special_re = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def _encode(self, text: str) -> list[int]:
        if self.special_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, chunk in enumerate(self.special_re.split(text)):
            if k % 2:
                ids.append(self.sp.piece_to_id(chunk))
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def _decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]  # like `tokenizers`, ignore unknown ids
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special])
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special:
                parts += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(parts) + self.sp.decode(run)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def decode_batch(self, seqs: Sequence[Sequence[int]], skip_special_tokens: bool) -> list[str]:
        return [self._decode(s, skip_special_tokens) for s in seqs]

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        # piece_to_id answers the unknown id for any piece it does not know
        return None if self.sp.is_unknown(token_id) and self.sp.id_to_piece(token_id) != token else token_id

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def is_reserved(self, token_id: int) -> bool:
        # user-defined pieces (Gemma's <end_of_turn>) are not exposed as such; SentencePiece matches
        # them whole wherever their text appears, which is what we test
        piece = self.sp.id_to_piece(token_id)
        return token_id in self.special or self.sp.encode(piece, out_type=str)[-1:] == [piece]

    def own_special_ids(self) -> dict[str, int | None]:
        ids = {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id()}
        return {name: i if i >= 0 else None for name, i in ids.items()}  # -1 means the model has none


class Tokenizer:
    """Text <-> ids, special ids and chat templates, whatever the tokenizer was stored as.

    Build one with `load`, `from_dir`, `from_gguf` or `from_sentencepiece`.
    """

    def __init__(self, backend: _Backend, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, extra_eos_ids: Iterable[int] = (),
                 chat_template: str | None = None, add_bos: bool = False, source: str = "<memory>"):
        self._backend = backend
        self.source = source
        self.vocab_size: int = backend.vocab_size
        self.bos_id = _valid_id(bos_id, self.vocab_size)
        self.eos_id = _valid_id(eos_id, self.vocab_size)
        pad = _valid_id(pad_id, self.vocab_size)
        self.pad_id: int = pad if pad is not None else self.eos_id if self.eos_id is not None else 0
        # only reserved tokens: '</s>' is ordinary text in Qwen2's vocabulary, for one
        turn_ends = (i for i in map(backend.token_to_id, END_OF_TURN_TOKENS)
                     if i is not None and backend.is_reserved(i))
        candidates = (self.eos_id, *extra_eos_ids, *turn_ends)
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(
            i for i in (_valid_id(c, self.vocab_size) for c in candidates) if i is not None))
        self.chat_template = chat_template
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self._token_strings: list[str] | None = None

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, pad_id={self.pad_id}, add_bos={self.add_bos})")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Pick the loader from what `path` is: a directory, a `.gguf` file or a `.model` file."""
        p = Path(path)
        if p.is_dir():
            return cls.from_dir(p)
        if not p.exists():
            raise MissingFileError(f"tokenizer path {str(p)!r} does not exist; expected {SUPPORTED_FORMATS}")
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            return cls.from_gguf(p)
        if suffix == ".model":
            return cls.from_sentencepiece(p)
        raise FileFormatError(f"cannot tell the tokenizer format of {str(p)!r}; supported: {SUPPORTED_FORMATS}")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face tokenizer directory: tokenizer.json (or tokenizer.model) plus its configs."""
        root = Path(path)
        backend, hf_tokenizer = _dir_backend(root)
        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        generation = _read_json(root / "generation_config.json")

        def special_id(name: str) -> int | None:
            text = _token_text(config.get(name)) or _token_text(special_map.get(name))
            return backend.token_to_id(text) if text else None

        own = backend.own_special_ids()
        gen_eos = _as_id_list(generation.get("eos_token_id"))
        eos_id = _first(special_id("eos_token"), *gen_eos[:1], own.get("eos"))
        bos_id = _first(special_id("bos_token"), generation.get("bos_token_id"), own.get("bos"))
        pad_id = _first(special_id("pad_token"), generation.get("pad_token_id"), own.get("pad"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds_bos(hf_tokenizer, bos_id) if hf_tokenizer else bos_id is not None
        return cls(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, extra_eos_ids=gen_eos,
                   chat_template=_dir_chat_template(root, config), add_bos=add_bos, source=str(root))

    @classmethod
    def from_gguf(cls, path_or_metadata: str | os.PathLike | Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file describes, from the file or from its metadata dict."""
        if isinstance(path_or_metadata, Mapping):
            meta, source = path_or_metadata, "<gguf metadata>"
        else:
            meta, source = read_gguf_metadata(path_or_metadata), os.fspath(path_or_metadata)
        vocab = gguf_vocabulary(meta, source)
        return cls(_HFBackend(vocab.tokenizer, min_vocab_size=vocab.vocab_size), bos_id=vocab.bos_id,
                   eos_id=vocab.eos_id, pad_id=vocab.pad_id, extra_eos_ids=vocab.extra_eos_ids,
                   chat_template=vocab.chat_template, add_bos=vocab.add_bos, source=source)

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike, chat_template: str | None = None) -> Tokenizer:
        """A SentencePiece `.model` file; such files carry no chat template, so one may be passed."""
        backend = _SentencePieceBackend(_load_sentencepiece(Path(path)))
        ids = backend.own_special_ids()
        return cls(backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                   chat_template=chat_template, add_bos=ids["bos"] is not None, source=os.fspath(path))

    # -- ids <-> text -------------------------------------------------------------------------
    def _bos_prefix(self, add_bos: bool | None) -> list[int]:
        if not (self.add_bos if add_bos is None else add_bos):
            return []
        if self.bos_id is None:
            raise InvalidValueError(f"add_bos=True but tokenizer {self.source!r} has no BOS token")
        return [self.bos_id]

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token text such as '<|im_end|>' becomes its single id."""
        return self.encode_many([text], add_bos=add_bos)[0]

    def encode_many(self, texts: Sequence[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for several texts at once (in parallel for `tokenizers` backends)."""
        if isinstance(texts, str):
            raise TypeError("encode_many takes a list of texts, not a single string")
        prefix = self._bos_prefix(add_bos)
        return [prefix + ids for ids in self._backend.encode_batch(texts)]

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D sequence of ids; ids outside the vocabulary are ignored."""
        return self._backend.decode_batch([_id_list(ids)], skip_special_tokens)[0]

    def batch_encode(self, texts: Sequence[str], *, pad_to: int | None = None, padding_side: str = "left",
                     add_bos: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Padded int32 ids [B, T] and a bool mask [B, T] (True on real tokens).

        T is `pad_to`, or the longest text's length. Left padding (the default) keeps every prompt's
        last token in the last column, which is what batched generation wants.
        """
        if padding_side not in ("left", "right"):
            raise InvalidValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        seqs = self.encode_many(texts, add_bos=add_bos)
        longest = max(map(len, seqs), default=0)
        width = longest if pad_to is None else pad_to
        for row, seq in enumerate(seqs):
            if len(seq) > width:
                raise InvalidValueError(
                    f"text {row} encodes to {len(seq)} tokens, more than pad_to={pad_to}; raise pad_to to at "
                    f"least {longest} (the longest text), or shorten that text")
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(seqs), width), dtype=bool)
        for row, seq in enumerate(seqs):
            start = width - len(seq) if padding_side == "left" else 0
            ids[row, start:start + len(seq)] = seq
            mask[row, start:start + len(seq)] = True
        return ids, mask

    def batch_decode(self, ids: np.ndarray, mask: np.ndarray | None = None, *,
                     skip_special_tokens: bool = True) -> list[str]:
        """Text of each row of a [B, T] id array, keeping only the positions where `mask` is True."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"batch_decode expects ids of shape [batch, time], got shape {ids.shape}")
        if mask is None:
            rows = [row.tolist() for row in ids]
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != ids.shape:
                raise ValueError(f"mask shape {mask.shape} does not match ids shape {ids.shape}")
            rows = [row[keep].tolist() for row, keep in zip(ids, mask, strict=True)]
        return self._backend.decode_batch(rows, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled as stored (e.g. 'Ġthe', '▁the', '<|im_end|>'), or None."""
        return self._backend.token_to_id(token)

    def token_strings(self) -> list[str]:
        """The text each id adds when it follows other text (' the', '7', '<|im_end|>'); for masks.

        Decoding an id alone would drop the leading space SentencePiece-style decoders strip from the
        start of a text, so each id is decoded after a fixed anchor and the anchor's text removed.
        """
        if self._token_strings is None:
            anchor = self.encode("a", add_bos=False)
            prefix = self.decode(anchor, skip_special_tokens=False)
            seqs = [anchor + [i] for i in range(self.vocab_size)]
            texts = self._backend.decode_batch(seqs, False)
            self._token_strings = [
                text[len(prefix):] if text.startswith(prefix) else self.decode([i], skip_special_tokens=False)
                for i, text in enumerate(texts)]
        return list(self._token_strings)

    # -- chat -----------------------------------------------------------------------------------
    def _special_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """Render a conversation with the tokenizer's Jinja chat template, as transformers does.

        Only the template is Jinja; message contents are passed as data and never evaluated.
        Extra keyword arguments (tools, documents, ...) are passed to the template.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise InvalidValueError(
                f"tokenizer {self.source!r} has no chat template; set `tokenizer.chat_template = '...'`, "
                "pass chat_template='...' to apply_chat_template, or use "
                "Tokenizer.from_sentencepiece(path, chat_template='...')")
        variables = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._special_text(self.bos_id) or "",
            "eos_token": self._special_text(self.eos_id) or "",
            "pad_token": self._special_text(self.pad_id) or "",
            **kwargs,
        }
        return _compile_template(template).render(**variables)


# -- helpers: ids and config files -------------------------------------------------------------
def _valid_id(token_id: Any, vocab_size: int) -> int | None:
    """An id as a plain int, or None when it is missing or outside the vocabulary."""
    if token_id is None or not 0 <= int(token_id) < vocab_size:
        return None
    return int(token_id)


def _first(*values: Any) -> Any:
    """The first value that is not None (configs name special tokens in several places)."""
    return next((v for v in values if v is not None), None)


def _id_list(ids: Iterable[int] | np.ndarray) -> list[int]:
    array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got shape {array.shape}; use batch_decode")
    return array.tolist()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{str(path)!r} is not valid JSON ({err}); re-download or re-export it") from None


def _token_text(value: Any) -> str | None:
    """Special tokens in configs are a string or a serialized AddedToken {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _as_id_list(value: Any) -> list[int]:
    """generation_config.json's eos_token_id is an int or a list of ints."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _post_processor_adds_bos(tokenizer: Any, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor prepends BOS (Llama 3 does; configs may not say)."""
    if bos_id is None:
        return False
    with_special = tokenizer.encode("a", add_special_tokens=True).ids
    without = tokenizer.encode("a", add_special_tokens=False).ids
    return with_special[:1] == [bos_id] and without[:1] != [bos_id]


def _dir_backend(root: Path) -> tuple[_Backend, Any]:
    """The directory's tokenizer.json (preferred) or tokenizer.model; the raw `tokenizers` one or None."""
    if not root.is_dir():
        raise MissingFileError(
            f"tokenizer directory {str(root)!r} does not exist; expected a directory with tokenizer.json")
    if (root / "tokenizer.json").is_file():
        import tokenizers

        hf_tokenizer = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        return _HFBackend(hf_tokenizer), hf_tokenizer
    if (root / "tokenizer.model").is_file():
        return _SentencePieceBackend(_load_sentencepiece(root / "tokenizer.model")), None
    raise MissingFileError(
        f"no tokenizer.json or tokenizer.model in {str(root)!r}; a Hugging Face tokenizer directory "
        "needs one of them (tokenizer_config.json alone is not enough)")


def _dir_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja wins, then tokenizer_config.json, then chat_template.json."""
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(root / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # older configs: [{"name": "default", "template": "..."}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _load_sentencepiece(path: Path) -> Any:
    import sentencepiece

    if not path.is_file():
        raise MissingFileError(f"SentencePiece model {str(path)!r} does not exist")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise FileFormatError(f"{str(path)!r} is not a readable SentencePiece model ({exc})") from exc


# -- helpers: chat templates -------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _jinja_environment() -> Any:
    """A sandboxed environment with the globals and filters Hub chat templates expect."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
    return _jinja_environment().from_string(template)
