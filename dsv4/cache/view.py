"""What the attention math needs from a cache: one sequence's view of one layer.

The model never allocates or frees cache memory; it reads and appends through this protocol. The
per-sequence contiguous cache (``contiguous.py``) and the engine's paged pool both implement it, so the
same math serves a single prompt, a continuation, a chunked prefill or a batch of sequences.

Two kinds of state per layer, matching V4's two-tier cache:
* the sliding window: the last ``window_size`` KV rows (a ring in the engine);
* per compressor (``"kv"``: the attention's compressed entries, ``"index"``: the lightning indexer's keys):
  the *frontier* - the fp32 projections of the tokens a not-yet-complete entry still needs - and the
  list of completed entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dsv4.cache.layout import frontier_start
from dsv4.config import overlapping
from dsv4.numerics.index_scores import KeyRows


class LayerCache(Protocol):
    def window(self, pos0: int) -> torch.Tensor:
        """KV rows [n, head_dim] of positions [pos0 - n, pos0) with n = min(pos0, window_size - 1)."""
        ...

    def write_window(self, kv: torch.Tensor, pos0: int) -> None:
        """Record the rows of positions [pos0, pos0 + len(kv)) (only the last window_size matter)."""
        ...

    def frontier(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv, score) fp32 rows [n, coff·c'] of the pending tokens of compressor ``name``; n may be 0."""
        ...

    def extend_frontier(
        self, name: str, kv: torch.Tensor, score: torch.Tensor, pos0: int, ratio: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Add the projections (kv, score [n, coff·c']) of positions [pos0, pos0 + n) to the frontier of the
        ratio-``ratio`` compressor ``name``; return its rows from its first kept position through pos0 + n - 1,
        with that position. The cache then keeps only what a later entry needs (``layout.frontier_start``):
        what a compressor retains is the cache's business, pooling the windows is the compressor's."""
        ...

    def append_entries(self, name: str, entries: torch.Tensor) -> None:
        """Append completed entries [n, c'] (already normalised, rotated and quantisation-simulated)."""
        ...

    def num_entries(self, name: str) -> int: ...

    def entries(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """All entries [n, c'], or only those numbered ``rows`` (a 1-D index tensor), in the compute dtype."""
        ...

    def key_rows(self, name: str) -> KeyRows:
        """Where the entries lie, for a kernel that reads them in place: the storage itself where its layout
        allows (the indexer scans every key at every step; copying them first would double its memory
        traffic), else a decoded copy."""
        ...

    def decode_group(self, caches: list[LayerCache], step: DecodeStep) -> DecodeGroup:
        """``caches`` (one layer's of ``step.sequences``, this one among them) as one ``DecodeGroup``."""
        ...


@dataclass
class DecodeStep:
    """The sequences that each add one token in a forward, described once for all of its layers."""

    sequences: list[SequenceCache]
    positions: list[int]  # each member's new token's position: host ints, for checks and bookkeeping
    positions_t: torch.Tensor  # the same on the step's device, for index arithmetic
    _derived: dict[str, Any] = field(default_factory=dict)

    def derived(self, key: str, build: Callable[[], Any]) -> Any:
        """What a cache derives from the members for every layer (the pool: slots, block tables), built by
        the first layer that asks."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]


class DecodeGroup(Protocol):
    """One layer's caches of S sequences that each add one token at their own position (a decode step).

    Reads and writes all members at once, so that a decode step of many sequences costs a few gathers per
    layer rather than a few dozen small operations per sequence. What a read returns for a -1 entry number
    or a window position before 0 is arbitrary; callers mask it.
    """

    caches: list[LayerCache]
    step: DecodeStep
    positions: torch.Tensor  # [S] the position of each member's new token (``step.positions_t``)

    def advance_window(self, kv: torch.Tensor) -> torch.Tensor:
        """Append each member's new row (kv [S, d]) to its window and return the windows [S, window_size, d]:
        rows of positions p - window_size + 1 .. p, the last being ``kv`` itself (arbitrary where < 0)."""
        ...

    def push_frontier(
        self, name: str, kv: torch.Tensor, score: torch.Tensor, ratio: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append each member's new row (kv, score [S, C]) to the frontier of its ratio-``ratio`` compressor
        ``name``. Returns the members whose row completes a window (indices into the group) and the rows of
        that window, [m, coff·ratio, C] each (with overlap the previous window's first; arbitrary where a
        frontier is shorter); their frontiers then keep only what a later entry needs."""
        ...

    def append_entries(self, name: str, members: torch.Tensor, entries: torch.Tensor) -> None:
        """Append one entry (a row of ``entries`` [m, c']) to each of ``members``."""
        ...

    def entries(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """The entries numbered ``rows`` [S, k] of each member -> [S, k, c'] (arbitrary where a row is -1)."""
        ...

    def num_entries(self, name: str) -> torch.Tensor:
        """[S] entries per member."""
        ...


def extend_rows(
    old: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor, score: torch.Tensor, pos0: int, ratio: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``extend_frontier`` on a frontier's rows ``old``: the joined (kv, score), the position of their first row,
    and how many leading rows the frontier drops."""
    end = pos0 + len(kv)
    if len(old[0]):
        kv, score = torch.cat([old[0], kv]), torch.cat([old[1], score])
    start = frontier_start(ratio, pos0)
    return kv, score, start, frontier_start(ratio, end) - start


def completing(positions: list[int], ratio: int) -> torch.Tensor:
    """The decode members whose token (at ``positions``, host ints: reading the device's would synchronise)
    completes a ratio-``ratio`` window."""
    return torch.tensor([i for i, p in enumerate(positions) if (p + 1) % ratio == 0], dtype=torch.long)


class LoopDecodeGroup:
    """A ``DecodeGroup`` over any ``LayerCache``s, one member at a time (for caches of one sequence each)."""

    def __init__(self, caches: list[LayerCache], step: DecodeStep, window_size: int):
        self.caches, self.step, self.positions, self.window_size = caches, step, step.positions_t, window_size

    def advance_window(self, kv: torch.Tensor) -> torch.Tensor:
        out = kv.new_zeros(len(kv), self.window_size, kv.shape[-1])
        for i, (cache, p) in enumerate(zip(self.caches, self.step.positions, strict=True)):
            before = cache.window(p)
            if len(before):
                out[i, -1 - len(before) : -1] = before
            out[i, -1] = kv[i]
            cache.write_window(kv[i : i + 1], p)
        return out

    def push_frontier(
        self, name: str, kv: torch.Tensor, score: torch.Tensor, ratio: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        done = completing(self.step.positions, ratio)
        tail = 2 * ratio if overlapping(ratio) else ratio
        kv_tail = kv.new_zeros(len(done), tail, kv.shape[-1])
        score_tail = torch.zeros_like(kv_tail)
        chosen = done.tolist()
        for i, (cache, p) in enumerate(zip(self.caches, self.step.positions, strict=True)):
            rows_kv, rows_score, _ = cache.extend_frontier(name, kv[i : i + 1], score[i : i + 1], p, ratio)
            if i in chosen:
                j, n = chosen.index(i), min(tail, len(rows_kv))
                kv_tail[j, tail - n :], score_tail[j, tail - n :] = rows_kv[-n:], rows_score[-n:]
        return done, kv_tail, score_tail

    def append_entries(self, name: str, members: torch.Tensor, entries: torch.Tensor) -> None:
        for i, entry in zip(members.tolist(), entries.split(1), strict=True):
            self.caches[i].append_entries(name, entry)

    def entries(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        counts = self.num_entries(name)
        out: torch.Tensor | None = None
        for i, (cache, member_rows) in enumerate(zip(self.caches, rows, strict=True)):
            valid = (member_rows >= 0) & (member_rows < counts[i])
            if valid.any():
                picked = cache.entries(name, member_rows[valid])
                if out is None:
                    out = picked.new_zeros(*rows.shape, picked.shape[-1])
                out[i, valid] = picked
        return out if out is not None else torch.zeros(*rows.shape, 0)

    def num_entries(self, name: str) -> torch.Tensor:
        return torch.tensor([cache.num_entries(name) for cache in self.caches])


class SequenceCache(Protocol):
    """One sequence's cache across all layers (main blocks first, then the MTP blocks)."""

    def layer(self, index: int) -> LayerCache: ...
