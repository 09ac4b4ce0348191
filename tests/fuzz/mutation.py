"""The randomness behind the fuzzers, with two sources: hypothesis (tests/fuzz, which shrinks a
failure to a small example) and a seeded `random.Random` (bench/fuzz.py, which needs millions
of inputs a second hypothesis could not produce). Generators and mutations are written once
against `Chooser`, so the long runs explore exactly the shapes the suite does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")

# Values that break length and count fields most often: empty, one, the sign bits, all ones.
INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFF)
INTERESTING_16 = (0x0000, 0x0001, 0x0002, 0x0004, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)

MAX_INSERT = 64


class Chooser(Protocol):
    def below(self, n: int) -> int:
        """An int in [0, n); n >= 1."""
        ...

    def raw(self, n: int) -> bytes:
        """n arbitrary bytes."""
        ...


class RandomChooser:
    """A `Chooser` over a seeded `random.Random`, for reproducible long runs."""

    __slots__ = ("rng",)

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def below(self, n: int) -> int:
        return self.rng.randrange(n)

    def raw(self, n: int) -> bytes:
        return self.rng.randbytes(n)


def pick(c: Chooser, options: Sequence[T]) -> T:
    return options[c.below(len(options))]


def chance(c: Chooser, percent: int) -> bool:
    return c.below(100) < percent


def between(c: Chooser, low: int, high: int) -> int:
    """An int in [low, high]."""
    return low + c.below(high - low + 1)


def bits(c: Chooser, n: int) -> int:
    return c.below(1 << n)


def mutate(c: Chooser, data: bytes, ops: int) -> bytes:
    """`data` after `ops` random edits: truncation, bit flips, byte and 16/32-bit field
    overwrites (bad lengths and counts), insertions, deletions, duplicated ranges, junk
    appended. Each edit grows the input by at most MAX_INSERT bytes, so a parser's output can
    be checked against the size of what it was given."""
    buf = bytearray(data)
    for _ in range(ops):
        n = len(buf)
        kind = c.below(10)
        if kind == 0:
            del buf[c.below(n + 1) :]
        elif kind == 1 and n:
            buf[c.below(n)] ^= 1 << c.below(8)
        elif kind == 2 and n:
            buf[c.below(n)] = pick(c, INTERESTING_8) if chance(c, 50) else c.below(256)
        elif kind == 3 and n >= 2:
            # A 16-bit field set to an extreme, or to the buffer's own size in bytes or words:
            # length fields that are off by a little are the ones parsers get wrong.
            at = c.below(n - 1)
            candidates = (*INTERESTING_16, n & 0xFFFF, (n // 4) & 0xFFFF, (n // 4 - 1) & 0xFFFF)
            buf[at : at + 2] = pick(c, candidates).to_bytes(2, "big")
        elif kind == 4 and n >= 4:
            at = c.below(n - 3)
            buf[at : at + 4] = (pick(c, (0, 0xFFFFFFFF, 0x80000000)) ^ bits(c, 8)).to_bytes(4)
        elif kind == 5:
            at = c.below(n + 1)
            buf[at:at] = c.raw(between(c, 1, 8))
        elif kind == 6 and n:
            at = c.below(n)
            del buf[at : at + between(c, 1, 16)]
        elif kind == 7 and n:
            at = c.below(n)
            chunk = bytes(buf[at : at + between(c, 1, MAX_INSERT)])
            to = c.below(n + 1)
            buf[to:to] = chunk
        elif kind == 8:
            buf += c.raw(between(c, 1, MAX_INSERT))
        elif n:
            # Swap two bytes: reorders fields without changing any value's size.
            i, j = c.below(n), c.below(n)
            buf[i], buf[j] = buf[j], buf[i]
    return bytes(buf)
