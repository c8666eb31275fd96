"""Synthetic long-range items (passkey, key/value, code needle) shared by training and evaluation.

An item is one token sequence: ``filler[:lead] + fact + filler[distance tokens] + question + answer``. The
pieces are tokenized separately and concatenated, so the answer's token positions are known exactly (losses
and accuracy are measured on that span) and ``distance`` is exactly the number of tokens between the end of
the fact and the start of the question. Filler is real corpus text (a token stream of the corpus' own
documents).

Training and evaluation never share items: evaluation takes its filler from the validation split (held-out
documents) and its keys from a disjoint key space: every key belongs to exactly one domain by a salted hash
(:func:`key_domain`), and a key is drawn for a domain by rejection. Generation is seeded and deterministic.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

KINDS = ("passkey", "kv", "code")
DOMAINS = ("train", "eval")
_DOMAIN_SALT = b"titans-distil/long-range-domain/v1\0"
_KV_PAIRS = 4  # key/value lines per kv item; one of them is asked


@dataclass(frozen=True)
class Item:
    """One long-range item: token ids and the spans inside them (half-open ``[start, end)`` positions)."""

    kind: str
    ids: list[int]
    fact: tuple[int, int]
    question: tuple[int, int]
    answer: tuple[int, int]
    key: str

    @property
    def distance(self) -> int:
        """Tokens between the end of the fact and the start of the question."""
        return self.question[0] - self.fact[1]


def key_domain(key: str) -> str:
    """The domain ("train" or "eval") a key belongs to: a salted hash bit, so the two key spaces are
    disjoint."""
    return DOMAINS[hashlib.blake2b(_DOMAIN_SALT + key.encode(), digest_size=1).digest()[0] & 1]


def _draw(rng: np.random.Generator, domain: str, make) -> str:
    while True:
        key = make(rng)
        if key_domain(key) == domain:
            return key


def _digits(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10_000, 100_000)))


def _word(rng: np.random.Generator) -> str:
    letters = string.ascii_lowercase
    return "".join(letters[i] for i in rng.integers(0, 26, 5)) + "-" + str(int(rng.integers(10, 100)))


def _token(rng: np.random.Generator) -> str:
    chars = string.ascii_lowercase + string.digits
    return "".join(chars[i] for i in rng.integers(0, len(chars), 8))


def _texts(kind: str, rng: np.random.Generator, domain: str) -> tuple[str, str, str, str]:
    """(fact, question, answer, key) texts of one item of ``kind``; the key decides the item's domain."""
    if kind == "passkey":
        key = _draw(rng, domain, _digits)
        return (
            f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
            "\nWhat is the pass key? The pass key is",
            f" {key}",
            key,
        )
    if kind == "kv":
        keys = []
        while len(keys) < _KV_PAIRS:
            key = _draw(rng, domain, _word)
            if key not in keys:
                keys.append(key)
        values = [_digits(rng) for _ in keys]
        asked = int(rng.integers(0, _KV_PAIRS))
        lines = "".join(f"{k} -> {v}\n" for k, v in zip(keys, values))
        return f"\n{lines}", f"\n{keys[asked]} ->", f" {values[asked]}", keys[asked]
    if kind == "code":
        name = f"SECRET_TOKEN_{int(rng.integers(0, 100))}"
        value = _draw(rng, domain, _token)
        return f'\n{name} = "{value}"\n', f'\nassert {name} == "', value, value
    raise UserError(f"unknown long-range kind {kind!r}; use one of {', '.join(KINDS)}")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_item(
    kind: str,
    tokenizer,
    filler: torch.Tensor,
    distance: int,
    rng: np.random.Generator,
    domain: str,
    lead: int = 0,
) -> Item:
    """One item whose fact follows ``lead`` filler tokens and whose question starts ``distance`` tokens after
    the fact; filler is a contiguous run of ``filler`` (a 1-D token stream) from a random offset."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    fact, question, answer, key = (
        _encode(tokenizer, t) if i < 3 else t for i, t in enumerate(_texts(kind, rng, domain))
    )
    need = lead + distance
    if need > len(filler):
        raise UserError(
            f"the filler text has {len(filler)} tokens, fewer than the {need} an item at distance "
            f"{distance} needs; use a larger --data or smaller distances"
        )
    start = int(rng.integers(0, len(filler) - need + 1))
    run = filler[start : start + need].tolist()
    ids = run[:lead] + fact + run[lead:] + question + answer
    fact_end = lead + len(fact)
    q_start = fact_end + distance
    a_start = q_start + len(question)
    return Item(kind, ids, (lead, fact_end), (q_start, a_start), (a_start, a_start + len(answer)), key)


def item_rng(seed: int, domain: str, *stream: int) -> np.random.Generator:
    """The generator of one stream of items: seeded by (seed, domain, stream...), so domains never collide."""
    return np.random.default_rng([int(seed) % (1 << 63), DOMAINS.index(domain), *stream])


def make_items(
    kind: str, tokenizer, filler: torch.Tensor, distance: int, n: int, seed: int, domain: str = "eval"
) -> list[Item]:
    """``n`` items of ``kind`` at ``distance`` (deterministic in all arguments)."""
    rng = item_rng(seed, domain, KINDS.index(kind), distance)
    return [make_item(kind, tokenizer, filler, distance, rng, domain) for _ in range(n)]
