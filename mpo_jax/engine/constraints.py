"""Constrained decoding as a token-level automaton: allowed tokens and transitions per state.

A constraint is two tables indexed by [state, token]: `allowed` (may this token be sampled
now) and `next_state`. The decode loop keeps one state per row, masks the logits with
`allowed[state]` and moves to `next_state[state, token]`, all inside the compiled loop.
The judge needs "an integer" (digits only) and the meta model "one of these strings".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mpo_jax.errors import InvalidValueError

STATE_BUCKETS = (1, 4, 16, 64, 256, 1024)


@dataclasses.dataclass(frozen=True)
class TokenConstraint:
    allowed: np.ndarray  # [S, V] bool
    next_state: np.ndarray  # [S, V] int32
    description: str = ""

    def __post_init__(self) -> None:
        if self.allowed.shape != self.next_state.shape or self.allowed.ndim != 2:
            raise ValueError("allowed and next_state must both be [states, vocab]")
        if not self.allowed.any(axis=1).all():
            dead = np.flatnonzero(~self.allowed.any(axis=1)).tolist()
            raise ValueError(f"constraint {self.description!r} has states with no allowed token: {dead}")

    @property
    def num_states(self) -> int:
        return self.allowed.shape[0]

    def padded(self, num_states: int) -> tuple[np.ndarray, np.ndarray]:
        """Tables padded to a bucketed state count (padding states allow everything)."""
        extra = num_states - self.num_states
        allowed = np.concatenate([self.allowed, np.ones((extra, self.allowed.shape[1]), bool)])
        nxt = np.concatenate([self.next_state, np.zeros((extra, self.allowed.shape[1]), np.int32)])
        return allowed, nxt.astype(np.int32)


def bucket_states(n: int) -> int:
    for b in STATE_BUCKETS:
        if n <= b:
            return b
    raise InvalidValueError(f"constraint has {n} states; at most {STATE_BUCKETS[-1]} are supported")


def unconstrained(vocab_size: int) -> TokenConstraint:
    return TokenConstraint(np.ones((1, vocab_size), bool), np.zeros((1, vocab_size), np.int32),
                           "unconstrained")


def digits(token_strings: Sequence[str], end_ids: Sequence[int], max_digits: int = 3,
           vocab_size: int | None = None) -> TokenConstraint:
    """An unsigned integer of 1..max_digits digits, then an end token.

    State i = digits written so far. Tokens made only of ASCII digits advance by their length;
    an end token is allowed once at least one digit was written. `vocab_size` may exceed the
    tokenizer's (models often pad their embedding table); the extra ids are never allowed.
    """
    if max_digits < 1:
        raise InvalidValueError("max_digits must be >= 1")
    vocab = max(len(token_strings), vocab_size or 0)
    token_strings = list(token_strings) + [""] * (vocab - len(token_strings))
    lengths = np.array([len(s) if s and s.isascii() and s.isdigit() else 0 for s in token_strings])
    allowed = np.zeros((max_digits + 1, vocab), bool)
    nxt = np.zeros((max_digits + 1, vocab), np.int32)
    for state in range(max_digits + 1):
        fits = (lengths > 0) & (state + lengths <= max_digits)
        allowed[state] = fits
        nxt[state] = np.where(fits, state + lengths, state)
        if state > 0:
            allowed[state, list(end_ids)] = True
    if not allowed[0].any():
        raise InvalidValueError("the vocabulary has no digit tokens")
    return TokenConstraint(allowed, nxt, f"digits(max {max_digits})")


def choice(token_sequences: Sequence[Sequence[int]], end_ids: Sequence[int], vocab_size: int,
           labels: Sequence[str] = ()) -> TokenConstraint:
    """Exactly one of the given token sequences, then an end token (a trie over tokens)."""
    if not token_sequences or any(len(s) == 0 for s in token_sequences):
        raise InvalidValueError("choice needs at least one non-empty option")
    children: list[dict[int, int]] = [{}]
    terminal = [False]
    for seq in token_sequences:
        node = 0
        for tok in seq:
            if tok not in children[node]:
                children.append({})
                terminal.append(False)
                children[node][tok] = len(children) - 1
            node = children[node][tok]
        terminal[node] = True
    allowed = np.zeros((len(children), vocab_size), bool)
    nxt = np.zeros((len(children), vocab_size), np.int32)
    for node, kids in enumerate(children):
        for tok, child in kids.items():
            allowed[node, tok] = True
            nxt[node, tok] = child
        if terminal[node]:
            allowed[node, list(end_ids)] = True
            nxt[node, list(end_ids)] = node
    return TokenConstraint(allowed, nxt, f"choice({', '.join(labels) or len(token_sequences)})")
