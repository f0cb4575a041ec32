"""Batched multi-turn chat programs over a local model or a remote OpenAI-compatible endpoint.

The judge's generate mode and the meta-reward model are programs of the form "say this, read a
free reply / an integer / one of several words, say the next thing". A `ChatSession` runs such a
program for a batch of conversations: locally each turn prefills only its new tokens on top of
the KV cache (`LanguageModel.chat_continue`); remotely every turn resends the conversation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from mpo_jax.engine.language_model import Conversation, LanguageModel
from mpo_jax.engine.sampling import SamplingParams

Message = dict[str, str]


def _parse_int(text: str) -> int | None:
    """The first integer in a reply; model output is parsed, never evaluated."""
    digits = ""
    for ch in text.strip():
        if ch.isascii() and ch.isdigit():
            digits += ch
        elif digits:
            break
    return int(digits) if digits else None


class ChatSession(Protocol):
    """After each `say`, `hit_limit[i]` is True where reply i ran out of `max_tokens` (cut off)."""

    hit_limit: list[bool]

    def say(self, turns: Sequence[Sequence[Message]], *, max_tokens: int, stop: Sequence[str] = (),
            temperature: float = 0.0) -> list[str]: ...

    def say_integer(self, turns: Sequence[Sequence[Message]], *, max_digits: int = 2) -> list[int | None]: ...

    def say_choice(self, turns: Sequence[Sequence[Message]], options: Sequence[str]) -> list[str | None]: ...


@dataclasses.dataclass
class LocalChatSession:
    """Conversations on a local `LanguageModel`, continued from its KV cache turn by turn."""

    model: LanguageModel
    histories: list[list[Message]]
    conversation: Conversation | None = None
    hit_limit: list[bool] = dataclasses.field(default_factory=list)

    def _turn(self, turns, params: SamplingParams, constraint=None) -> list[str]:
        if len(turns) != len(self.histories):
            raise ValueError(f"got {len(turns)} turns for {len(self.histories)} conversations")
        if self.conversation is None:
            chats = [h + list(t) for h, t in zip(self.histories, turns, strict=True)]
            self.conversation = self.model.chat(chats, params, constraint)
        else:
            self.conversation = self.model.chat_continue(self.conversation, [list(t) for t in turns], params,
                                                         constraint)
        self.histories = self.conversation.messages
        # Set on every turn, so a turn sampled under a constraint reports its rows too.
        self.hit_limit = [not finished for finished in self.conversation.finished]
        return self.conversation.replies

    def say(self, turns, *, max_tokens, stop=(), temperature=0.0):
        return self._turn(turns, SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                                stop=tuple(stop)))

    def say_integer(self, turns, *, max_digits=2):
        replies = self._turn(turns, SamplingParams(max_new_tokens=max_digits + 1),
                             self.model.digits_constraint(max_digits))
        return [_parse_int(r) for r in replies]

    def say_choice(self, turns, options):
        replies = self._turn(turns, SamplingParams(max_new_tokens=16), self.model.choice_constraint(options))
        return [r if r in options else None for r in replies]


@dataclasses.dataclass
class RemoteChatSession:
    """Conversations on a `RemoteChatModel`: every turn resends the whole conversation."""

    client: Any
    histories: list[list[Message]]
    hit_limit: list[bool] = dataclasses.field(default_factory=list)

    def _extend(self, turns) -> list[list[Message]]:
        if len(turns) != len(self.histories):
            raise ValueError(f"got {len(turns)} turns for {len(self.histories)} conversations")
        return [h + list(t) for h, t in zip(self.histories, turns, strict=True)]

    def _record(self, conversations, replies) -> None:
        self.histories = [c + [{"role": "assistant", "content": r or ""}]
                          for c, r in zip(conversations, replies, strict=True)]

    def say(self, turns, *, max_tokens, stop=(), temperature=0.0):
        conversations = self._extend(turns)
        kwargs = {"max_tokens": max_tokens, "temperature": temperature, "stop": list(stop) or None}
        if hasattr(self.client, "chat_batch_ending"):
            ended = self.client.chat_batch_ending(conversations, **kwargs)
        else:  # a client that cannot tell: every reply counts as finished
            ended = [(reply, False) for reply in self.client.chat_batch(conversations, **kwargs)]
        replies = [_cut(text, stop) for text, _ in ended]
        # A stop string the server did not stop at still ends the reply where it is cut.
        self.hit_limit = [out and reply == text for reply, (text, out) in zip(replies, ended, strict=True)]
        self._record(conversations, replies)
        return replies

    def say_integer(self, turns, *, max_digits=2):
        conversations = self._extend(turns)
        values = self.client.chat_batch_integer(conversations, max_digits=max_digits)
        self._record(conversations, ["" if v is None else str(v) for v in values])
        return values

    def say_choice(self, turns, options):
        conversations = self._extend(turns)
        choices = self.client.chat_batch_choice(conversations, list(options))
        self._record(conversations, [c or "" for c in choices])
        return choices


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def open_session(model: Any, histories: Sequence[Sequence[Message]]) -> ChatSession:
    """A session over `model` (a `LanguageModel` or a remote client) starting from `histories`."""
    if isinstance(model, LanguageModel):
        return LocalChatSession(model, [list(h) for h in histories])
    if hasattr(model, "chat_batch"):
        return RemoteChatSession(model, [list(h) for h in histories])
    raise TypeError(f"cannot chat with a {type(model).__name__}: pass a LanguageModel or a RemoteChatModel")
