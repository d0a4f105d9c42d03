"""The lightning indexer: picks, for each query of a CSA layer, the top-k compressed entries to attend to.

Scores are I[t, e] = Σ_h w[t, h] · ReLU(q_{t,h} · k_e) over index heads, with queries and keys Hadamard-rotated
and FP4-simulated, and the scores kept in the activation dtype (bf16 when serving, as the paper chose for a
fast top-k). Entry e is usable by the query at position p only once its window is complete: e < (p+1)/4.
The [queries x entries] score matrix is the one dense matrix V4 needs. ``numerics.index_scores`` computes it
straight from where each sequence's keys lie in the cache, for a prefill chunk or for every member of a
decode group in one call, in query chunks so that a long prefill never holds it whole.
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
from dsv4.numerics.index_scores import index_scores
from dsv4.numerics.modes import Numerics

# Queries x entries per chunk of a prefill's score matrix (32 MB in fp32), so that a long prompt's [queries x
# entries] scores are never held whole.
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
        keys = [cache.key_rows("index")]
        usable = (torch.arange(pos0, pos0 + s) + 1) // self.ratio  # entries [0, usable) are complete
        k = min(self.topk, n_entries)
        chunk = max(1, SCORE_CHUNK_ELEMENTS // n_entries)
        picked = []
        for lo in range(0, s, chunk):
            hi = min(s, lo + chunk)
            scores = index_scores(q[lo:hi], weights[lo:hi], keys, [hi - lo], usable[lo:hi], n_entries, self.numerics)
            scores = self.parallel.all_reduce(scores)  # under TP: this rank's heads' partial sums, in their dtype
            picked.append(self._top(scores, usable[lo:hi], k))
        return torch.cat(picked)

    def select_group(self, q: torch.Tensor, weights: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        """``select`` for one query of each member of a decode group (q [S, H, c]) -> [S, k] (-1 padded):
        one scan of every member's keys where they lie, one all-reduce and one top-k. A member's scores are
        what its query alone would get."""
        counts = [cache.num_entries("index") for cache in group.caches]  # host ints: no device sync
        n_max = max(counts)
        if n_max == 0:
            return torch.empty(len(q), 0, dtype=torch.int64)
        keys = [cache.key_rows("index") for cache in group.caches]
        usable = (group.positions + 1) // self.ratio  # every stored entry, in decode
        scores = self.parallel.all_reduce(index_scores(q, weights, keys, [1] * len(q), usable, n_max, self.numerics))
        return self._top(scores, usable, min(self.topk, n_max))

    @staticmethod
    def _top(scores: torch.Tensor, usable: torch.Tensor, k: int) -> torch.Tensor:
        """The k best entries per query among its usable ones [0, usable) (torch.topk order; -1 past usable)."""
        future = torch.arange(scores.shape[-1]) >= usable[:, None]
        top = scores.masked_fill(future, float("-inf")).topk(k, dim=-1)[1]
        return torch.where(top >= usable[:, None], -1, top)
