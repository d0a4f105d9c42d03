"""The simplest cache: one sequence, growing tensors per layer, values kept in the compute dtype.

Used by the model's own tests and the reference-vector checks; the engine's paged pool stores the same
values in their compact form. Appending is amortised by doubling so that a token-by-token decode over a
long context does not copy the whole history at every step.
"""

from __future__ import annotations

import torch

from dsv4.cache.view import DecodeStep, LayerCache, LoopDecodeGroup, extend_rows
from dsv4.numerics.index_scores import KeyRows


class _Growing:
    """A row-appendable tensor with doubling capacity."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.size = 0

    def append(self, rows: torch.Tensor) -> None:
        if self.data is None:
            self.data = torch.empty((max(16, len(rows)), *rows.shape[1:]), dtype=rows.dtype)
        needed = self.size + len(rows)
        if needed > len(self.data):
            grown = torch.empty((max(needed, 2 * len(self.data)), *rows.shape[1:]), dtype=rows.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : needed] = rows
        self.size = needed

    def view(self) -> torch.Tensor:
        assert self.data is not None
        return self.data[: self.size]


class ContiguousLayerCache:
    def __init__(self, window_size: int, dtype: torch.dtype):
        self.window_size, self.dtype = window_size, dtype
        self._window: torch.Tensor | None = None  # rows of positions [_window_end - len, _window_end)
        self._window_end = 0
        self._frontiers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._entries: dict[str, _Growing] = {}

    def window(self, pos0: int) -> torch.Tensor:
        if pos0 != self._window_end:
            raise ValueError(f"cache holds positions up to {self._window_end}, asked to continue at {pos0}")
        if self._window is None:
            return torch.empty(0, 0, dtype=self.dtype)
        return self._window[len(self._window) - min(pos0, self.window_size - 1) :]

    def write_window(self, kv: torch.Tensor, pos0: int) -> None:
        rows = kv if self._window is None else torch.cat([self._window, kv])
        self._window = rows[-self.window_size :].clone()
        self._window_end = pos0 + len(kv)

    def frontier(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.empty(0, 0)
        return self._frontiers.get(name, (empty, empty))

    def extend_frontier(
        self, name: str, kv: torch.Tensor, score: torch.Tensor, pos0: int, ratio: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        kv, score, start, drop = extend_rows(self.frontier(name), kv, score, pos0, ratio)
        self._frontiers[name] = (kv[drop:].clone(), score[drop:].clone())
        return kv, score, start

    def append_entries(self, name: str, entries: torch.Tensor) -> None:
        self._entries.setdefault(name, _Growing()).append(entries)

    def num_entries(self, name: str) -> int:
        store = self._entries.get(name)
        return store.size if store else 0

    def entries(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        store = self._entries[name].view()
        return store if rows is None else store[rows]

    def key_rows(self, name: str) -> KeyRows:
        return KeyRows.of(self.entries(name) if name in self._entries else torch.empty(0, 0))

    def decode_group(self, caches: list[LayerCache], step: DecodeStep) -> LoopDecodeGroup:
        return LoopDecodeGroup(caches, step, self.window_size)


class ContiguousCache:
    """All layers of one sequence; ``length`` is the number of tokens it holds."""

    def __init__(self, n_layers: int, window_size: int, dtype: torch.dtype):
        self.layers = [ContiguousLayerCache(window_size, dtype) for _ in range(n_layers)]

    def layer(self, index: int) -> ContiguousLayerCache:
        return self.layers[index]
