"""The random stream of the corpus: SplitMix64, written out so that a seed means the same bytes everywhere.

:mod:`random` and numpy promise stable raw bits but not stable derived draws (choice, shuffle, integers have
changed between versions); every draw here is defined on top of the 64-bit outputs, so a corpus regenerates
byte for byte on any machine and Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Rng:
    """SplitMix64: a 64-bit stream fixed by its seed, with the few draws the generators need."""

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int) -> None:
        self._state = seed & self._MASK

    def next64(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & self._MASK
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """Uniform in [0, n), without modulo bias."""
        if n <= 0:
            raise ValueError(f"below() needs a positive bound, got {n}")
        limit = (1 << 64) - (1 << 64) % n
        while (value := self.next64()) >= limit:
            pass
        return value % n

    def randint(self, low: int, high: int) -> int:
        """Uniform in [low, high], both ends included."""
        return low + self.below(high - low + 1)

    def fraction(self) -> float:
        """Uniform in [0, 1) with 53 bits: exact IEEE arithmetic, the same everywhere."""
        return (self.next64() >> 11) / (1 << 53)

    def chance(self, probability: float) -> bool:
        return self.fraction() < probability

    def choice(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def weighted(self, items: Sequence[T], weights: Sequence[int]) -> T:
        pick = self.below(sum(weights))
        for item, weight in zip(items, weights, strict=True):
            if pick < weight:
                return item
            pick -= weight
        raise AssertionError("unreachable")

    def shuffle(self, items: list[T]) -> None:
        for index in range(len(items) - 1, 0, -1):
            other = self.below(index + 1)
            items[index], items[other] = items[other], items[index]

    def fork(self) -> Rng:
        """An independent stream, so that drawing more from one part of a sample leaves the rest unchanged."""
        return Rng(self.next64())
