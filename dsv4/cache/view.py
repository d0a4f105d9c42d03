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

from typing import Protocol

import torch


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


class SequenceCache(Protocol):
    """One sequence's cache across all layers (main blocks first, then the MTP blocks)."""

    def layer(self, index: int) -> LayerCache: ...
