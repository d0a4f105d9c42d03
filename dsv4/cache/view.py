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

    def set_frontier(self, name: str, kv: torch.Tensor, score: torch.Tensor) -> None: ...

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
        self, name: str, kv: torch.Tensor, score: torch.Tensor, tail: int, members: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each member's new row (kv, score [S, C]) to its frontier; return the last ``tail`` rows of
        the frontiers of ``members`` (indices into the group), [m, tail, C] each (arbitrary where a frontier
        is shorter). Only the members that complete a window read their tail."""
        ...

    def trim_frontier(self, name: str, members: torch.Tensor, keep: int) -> None:
        """Keep only the last ``keep`` rows of the frontiers of ``members`` (indices into the group)."""
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
        self, name: str, kv: torch.Tensor, score: torch.Tensor, tail: int, members: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = members.tolist()
        kv_tail = kv.new_zeros(len(chosen), tail, kv.shape[-1])
        score_tail = torch.zeros_like(kv_tail)
        for i, cache in enumerate(self.caches):
            old_kv, old_score = cache.frontier(name)
            new_kv = torch.cat([old_kv, kv[i : i + 1]]) if len(old_kv) else kv[i : i + 1]
            new_score = torch.cat([old_score, score[i : i + 1]]) if len(old_score) else score[i : i + 1]
            cache.set_frontier(name, new_kv, new_score)
            if i in chosen:
                j = chosen.index(i)
                kv_tail[j, tail - min(tail, len(new_kv)) :] = new_kv[-tail:]
                score_tail[j, tail - min(tail, len(new_score)) :] = new_score[-tail:]
        return kv_tail, score_tail

    def trim_frontier(self, name: str, members: torch.Tensor, keep: int) -> None:
        for i in members.tolist():
            kv, score = self.caches[i].frontier(name)
            kept = slice(max(0, len(kv) - keep), len(kv))
            self.caches[i].set_frontier(name, kv[kept], score[kept])

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
