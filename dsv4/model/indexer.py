"""The lightning indexer: picks, for each query of a CSA layer, the top-k compressed entries to attend to.

Scores are I[t, e] = Σ_h w[t, h] · ReLU(q_{t,h} · k_e) over index heads, with queries and keys Hadamard-rotated
and FP4-simulated, and the scores kept in the activation dtype (bf16 when serving, as the paper chose for a
fast top-k). Entry e is usable by the query at position p only once its window is complete: e < (p+1)/4.
The [queries x entries] score matrix is the one dense matrix V4 needs; it is built in query chunks so that a
long prefill never holds it whole.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.cache.view import DecodeGroup, LayerCache
from dsv4.config import ModelConfig
from dsv4.model.compressor import Compressor
from dsv4.model.linear import Linear
from dsv4.model.parallel import SINGLE, ParallelContext, Shard, shard_of
from dsv4.model.rope import Rotary
from dsv4.numerics.formats import fp4_simulate, hadamard
from dsv4.numerics.modes import Numerics

# Query chunk x heads x entries per chunk of the score matrix (32 MB in fp32): the per-head scores are made,
# rectified, weighted and summed over the heads while they are still in the last-level cache (a 128 MB chunk
# prefilled 32K tokens 5-10% slower, measured on the benchmark's small config).
SCORE_CHUNK_ELEMENTS = 1 << 23


class Indexer(nn.Module):
    """Under tensor parallelism a rank holds its index heads (``wq_b``, ``weights_proj``); their partial
    scores are summed across ranks before the top-k, so every rank picks the same entries. The key
    compressor and the keys are replicated."""

    def __init__(self, config: ModelConfig, numerics: Numerics, rotary: Rotary, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.topk, self.ratio = config.index_topk, 4
        self.numerics, self.rotary, self.parallel = numerics, rotary, parallel

        def part(name: str) -> Shard:
            return shard_of(f"attn.indexer.{name}", config, parallel)

        heads_out = self.n_heads * self.head_dim
        self.wq_b = Linear(config.q_lora_rank, heads_out, config.weight_dtype, numerics, part("wq_b.weight"))
        self.weights_proj = Linear(config.dim, self.n_heads, "bf16", numerics, part("weights_proj.weight"))
        self.compressor = Compressor(config, 4, self.head_dim, True, numerics, rotary)
        # The scale of the whole score (all heads), whatever share of the heads this rank sums.
        self.weight_scale = self.head_dim**-0.5 * self.n_heads**-0.5

    def project(self, x: torch.Tensor, qr: torch.Tensor, cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token of a whole batch: rotated (and FP4-simulated) index queries [T, H, c], head weights [T, H]."""
        q = self.wq_b(qr).unflatten(-1, (-1, self.head_dim))
        q = hadamard(self.rotary.rotate(q, cis))
        if self.numerics.simulate:
            q = fp4_simulate(q)
        return q, self.weights_proj(x) * self.weight_scale

    def select(self, q: torch.Tensor, weights: torch.Tensor, pos0: int, cache: LayerCache) -> torch.Tensor:
        """One sequence's queries at positions [pos0, pos0 + s), once its index keys are appended: the entry
        numbers [s, min(topk, entries)] each query attends to (torch.topk order), -1 where unusable."""
        n_entries = cache.num_entries("index")
        s = len(q)
        if n_entries == 0:
            return torch.empty(s, 0, dtype=torch.int64)
        pieces = self._pieces(cache)
        usable = (torch.arange(pos0, pos0 + s) + 1) // self.ratio  # entries [0, usable) are complete
        k = min(self.topk, n_entries)
        chunk = max(1, SCORE_CHUNK_ELEMENTS // (q.shape[1] * n_entries))
        picked = []
        for lo in range(0, s, chunk):
            hi = min(s, lo + chunk)
            scores = self.parallel.all_reduce(self._scores(q[lo:hi], weights[lo:hi], pieces, n_entries))
            picked.append(self._top(scores, usable[lo:hi], k))
        return torch.cat(picked)

    def select_group(self, q: torch.Tensor, weights: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        """``select`` for one query of each member of a decode group (q [S, H, c]) -> [S, k] (-1 padded).

        Each member's keys are scanned by the products ``select`` computes for that query alone (a member's
        scores do not depend on the group); the scores then go through one all-reduce and one top-k for the
        whole group, padded past each member's entries with -inf."""
        counts = [cache.num_entries("index") for cache in group.caches]
        n_max = max(counts)
        if n_max == 0:
            return torch.empty(len(q), 0, dtype=torch.int64)
        scores: torch.Tensor | None = None
        for i, (cache, n) in enumerate(zip(group.caches, counts, strict=True)):
            if n:
                mine = self._scores(q[i : i + 1], weights[i : i + 1], self._pieces(cache), n)[0]
                if scores is None:
                    scores = mine.new_zeros(len(q), n_max)
                scores[i, :n] = mine
        assert scores is not None
        usable = (group.positions + 1) // self.ratio  # usable <= entries: the padding is always masked
        return self._top(self.parallel.all_reduce(scores), usable, min(self.topk, n_max))

    def _pieces(self, cache: LayerCache) -> list[torch.Tensor]:
        # Batch-invariant numerics pad a short key list: CPU GEMMs round by their column count below 12.
        return [self.numerics.pad_rows(piece) for piece in cache.entry_pieces("index")]

    def _scores(self, q: torch.Tensor, weights: torch.Tensor, pieces: list[torch.Tensor], n: int) -> torch.Tensor:
        """Queries q [m, H, c] against the keys in ``pieces`` -> this rank's index scores [m, n] of the first
        n keys: per head q·k, rectified, weighted by the query's head weights [m, H] and summed over heads."""
        scores = [
            torch.einsum("bshd,btd->bsht", q[None], piece[None])[0].relu_().mul_(weights.unsqueeze(-1)).sum(dim=1)
            for piece in pieces
        ]
        return (scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1))[:, :n]

    @staticmethod
    def _top(scores: torch.Tensor, usable: torch.Tensor, k: int) -> torch.Tensor:
        """The k best entries per query among its usable ones [0, usable) (torch.topk order; -1 past usable)."""
        future = torch.arange(scores.shape[-1]) >= usable[:, None]
        top = scores.masked_fill(future, float("-inf")).topk(k, dim=-1)[1]
        return torch.where(top >= usable[:, None], -1, top)
