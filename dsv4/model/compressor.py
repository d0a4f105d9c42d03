"""KV compression: softmax-gated pooling of every ``ratio`` tokens into one entry (paper §2.3).

Ratio 128 (HCA) pools disjoint windows. Ratio 4 (CSA, and the lightning indexer's keys) pools overlapping
windows: each token projects to two halves, and entry j pools the second halves of tokens 4j..4j+3 with the
first halves of tokens 4j-4..4j-1 (eight slots, per-channel softmax). The pooling runs in fp32 with a learned
positional bias ``ape``; the entry is then RMS-normalised, rotated at the position of its window's first
token, and quantisation-simulated (FP8 for attention entries; Hadamard + FP4 for indexer keys).

The tokens of a window that is not complete yet - and, with overlap, the whole previous window - are kept
in fp32 in the cache's *frontier*, so that a sequence can be continued with any number of tokens and still
produce exactly the entries a one-shot prefill would.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.cache.view import DecodeGroup, LayerCache
from dsv4.config import KV_FP8_BLOCK, ModelConfig, overlapping
from dsv4.model.linear import Linear
from dsv4.model.norm import RMSNorm
from dsv4.model.rope import Rotary
from dsv4.numerics.formats import fp4_simulate, fp8_simulate, hadamard
from dsv4.numerics.modes import Numerics


class Compressor(nn.Module):
    def __init__(
        self, config: ModelConfig, ratio: int, head_dim: int, rotate: bool, numerics: Numerics, rotary: Rotary
    ):
        super().__init__()
        self.ratio, self.head_dim, self.rotate, self.numerics, self.rotary = ratio, head_dim, rotate, numerics, rotary
        self.overlap = overlapping(ratio)
        coff = 2 if self.overlap else 1
        self.wkv = Linear(config.dim, coff * head_dim, "bf16", numerics)
        self.wgate = Linear(config.dim, coff * head_dim, "bf16", numerics)
        self.ape = nn.Parameter(torch.empty(ratio, coff * head_dim, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(head_dim, config.norm_eps)
        self.nope = head_dim - config.rope_head_dim

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (kv, gate logits) of every token, computed for a whole batch at once (ape not added yet)."""
        xf = x.float()
        return self.wkv.fp32(xf), self.wgate.fp32(xf)

    def forward(self, x: torch.Tensor, pos0: int, cache: LayerCache, name: str) -> torch.Tensor | None:
        """Feed the tokens at positions [pos0, pos0 + len(x)); append and return the entries they complete."""
        return self.pool(*self.project(x), pos0, cache, name)

    def pool(
        self, kv: torch.Tensor, score: torch.Tensor, pos0: int, cache: LayerCache, name: str
    ) -> torch.Tensor | None:
        """One sequence's projected tokens at positions [pos0, pos0 + len(kv)): extend the frontier, pool the
        windows they complete, and append those entries to the cache (returned too)."""
        r, c = self.ratio, self.head_dim
        end = pos0 + len(kv)
        score = score + self.ape[torch.arange(pos0, end) % r]
        kv, score, start = cache.extend_frontier(name, kv, score, pos0, r)  # start: the position of kv[0]
        first, last = pos0 // r, end // r  # entries [first, last) complete in this call
        if last == first:
            return None

        if self.overlap:
            if first == 0:  # entry 0 has no previous window: its slots weigh nothing
                kv = torch.cat([kv.new_zeros(r, 2 * c), kv])
                score = torch.cat([score.new_full((r, 2 * c), float("-inf")), score])
                start -= r
            lo, hi = r * (first - 1) - start, r * last - start
            windows_kv, windows_score = kv[lo:hi].unflatten(0, (-1, r)), score[lo:hi].unflatten(0, (-1, r))
            kv, score = self._slots(windows_kv[:-1], windows_kv[1:]), self._slots(windows_score[:-1], windows_score[1:])
        else:
            lo, hi = r * first - start, r * last - start
            kv, score = kv[lo:hi].unflatten(0, (-1, r)), score[lo:hi].unflatten(0, (-1, r))
        entries = self._finish(self._pooled(kv, score), torch.arange(first, last) * r)
        cache.append_entries(name, entries)
        return entries

    def pool_group(self, kv: torch.Tensor, score: torch.Tensor, group: DecodeGroup, name: str) -> None:
        """``pool`` for one token of each member of a decode group (kv, score [S, coff·c]): every frontier
        grows by a row, and the members whose token completes a window get their entry."""
        r = self.ratio
        positions = group.positions
        done, kv, score = group.push_frontier(name, kv, score + self.ape[positions % r], r)
        if not len(done):
            return
        starts = positions[done] + 1 - r
        if self.overlap:
            first = starts == 0  # entry 0 has no previous window: its slots weigh nothing
            kv[first, :r], score[first, :r] = 0.0, float("-inf")
            kv, score = self._slots(kv[:, :r], kv[:, r:]), self._slots(score[:, :r], score[:, r:])
        group.append_entries(name, done, self._finish(self._pooled(kv, score), starts))

    def _slots(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Ratio-4 pooling slots [n, 2r, c] from windows [n, r, 2c]: slots 0..r-1 the first halves of the
        previous window's tokens, r..2r-1 the second halves of the current window's."""
        c = self.head_dim
        return torch.cat([previous[..., :c], current[..., c:]], dim=-2)

    @staticmethod
    def _pooled(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Windows [n, slots, c] -> the softmax-gated sums [n, c] (fp32)."""
        return (kv * score.softmax(dim=1)).sum(dim=1)

    def _finish(self, pooled: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Pooled windows -> entries: normalised, rotated at each window's first position, quantisation-simulated."""
        entries = self.norm(pooled.to(self.numerics.dtype))
        entries = self.rotary.rotate(entries, self.rotary.at(starts))
        if self.rotate:
            entries = hadamard(entries)
            if self.numerics.simulate:
                entries = fp4_simulate(entries)
        elif self.numerics.simulate:
            entries = torch.cat([fp8_simulate(entries[:, : self.nope], KV_FP8_BLOCK), entries[:, self.nope :]], -1)
        return entries
