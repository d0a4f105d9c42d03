"""V4 attention: low-rank queries over one shared KV head, a sliding window, and (by layer kind) either
nothing more, the lightning indexer's top-k of 4:1 entries (CSA), or every 128:1 entry (HCA).

Every query attends through a list of indices into a small per-call KV tensor (its window rows plus the
compressed entries it may see); there is no dense mask over the context. Each softmax has a learned per-head
sink in its denominator. The output is rotated back by the query position (values carry the RoPE of their
keys) and projected through grouped low-rank matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv4.cache.view import LayerCache, SequenceCache
from dsv4.config import KV_FP8_BLOCK, LayerKind, LayerSpec, ModelConfig
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer
from dsv4.model.linear import ColumnParallelLinear, Linear, RowParallelLinear
from dsv4.model.norm import RMSNorm, head_rms_normalize
from dsv4.model.numerics import Numerics
from dsv4.model.parallel import SINGLE, ParallelContext
from dsv4.model.quant import fp8_simulate
from dsv4.model.rope import Rotary
from dsv4.model.sparse_attention import sparse_attention


@dataclass
class Span:
    """One sequence's slice of a flattened batch: tokens [start, start+length) at positions pos0.."""

    start: int
    length: int
    pos0: int
    cache: SequenceCache

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.length)


def window_indices(pos0: int, s: int, window: int, n_before: int) -> torch.Tensor:
    """Per query, the rows of its window in a KV tensor that starts at position pos0 - n_before.

    Valid rows come oldest first, then -1 padding. The width is the reference's (the whole window, or the
    prompt length for a short first prefill), which fixes where compressed indices start in each list and so
    the blocking of the attention's online softmax.
    """
    width = window if pos0 > 0 else min(s, window)
    pos = torch.arange(pos0, pos0 + s)
    first = (pos - window + 1).clamp(min=0)
    rows = (first - (pos0 - n_before)).unsqueeze(1) + torch.arange(width)
    count = torch.minimum(pos + 1, torch.tensor(window)).unsqueeze(1)
    return torch.where(torch.arange(width) < count, rows, -1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec, numerics: Numerics, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.spec, self.numerics = spec, numerics
        self.layer_index = spec.index
        self.n_heads = parallel.shard(config.n_heads, "num_attention_heads")
        self.head_dim, self.nope = config.head_dim, config.nope_head_dim
        self.n_groups = parallel.shard(config.o_groups, "o_groups")
        self.o_lora_rank = config.o_lora_rank
        self.window = config.window_size
        self.eps = config.norm_eps
        self.softmax_scale = self.head_dim**-0.5
        fmt = config.weight_dtype

        self.attn_sink = nn.Parameter(torch.empty(self.n_heads, dtype=torch.float32), requires_grad=False)
        self.wq_a = Linear(config.dim, config.q_lora_rank, fmt, numerics)
        self.q_norm = RMSNorm(config.q_lora_rank, config.norm_eps)
        self.wq_b = ColumnParallelLinear(config.q_lora_rank, config.n_heads * self.head_dim, fmt, numerics, parallel)
        self.wkv = Linear(config.dim, self.head_dim, fmt, numerics)
        self.kv_norm = RMSNorm(self.head_dim, config.norm_eps)
        group_in = config.n_heads * self.head_dim // config.o_groups
        self.wo_a = ColumnParallelLinear(group_in, config.o_groups * config.o_lora_rank, fmt, numerics, parallel)
        self.wo_b = RowParallelLinear(config.o_groups * config.o_lora_rank, config.dim, fmt, numerics, parallel)
        self.rotary = Rotary(config, spec)
        if spec.compress_ratio:
            self.compressor = Compressor(config, spec.compress_ratio, self.head_dim, False, numerics, self.rotary)
        if spec.kind == LayerKind.CSA:
            self.indexer = Indexer(config, numerics, self.rotary, parallel)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, spans: list[Span]) -> torch.Tensor:
        """x [T, d] (normed, collapsed) of all spans -> [T, d]."""
        cis = self.rotary.at(positions)
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = self.rotary.rotate(head_rms_normalize(q, self.eps), cis)
        kv = self.rotary.rotate(self.kv_norm(self.wkv(x)), cis)
        if self.numerics.simulate:  # FP8 for the non-RoPE dims; the RoPE dims keep their precision
            kv = torch.cat([fp8_simulate(kv[:, : self.nope], KV_FP8_BLOCK), kv[:, self.nope :]], dim=-1)

        o = torch.empty_like(q)
        for span in spans:
            rows = span.rows
            cache = span.cache.layer(self.layer_index)
            o[rows] = self._attend(x[rows], qr[rows], q[rows], kv[rows], cis[rows], span.pos0, cache)

        o = self.rotary.rotate(o, cis, inverse=True)
        o = o.view(len(x), self.n_groups, -1)
        wo_a = self.wo_a.dense(x.dtype).view(self.n_groups, self.o_lora_rank, -1)
        o = torch.einsum("bsgd,grd->bsgr", o[None], wo_a)[0]
        return self.wo_b(o.flatten(1))

    def _attend(
        self,
        x: torch.Tensor,
        qr: torch.Tensor,
        q: torch.Tensor,
        kv: torch.Tensor,
        cis: torch.Tensor,
        pos0: int,
        cache: LayerCache,
    ) -> torch.Tensor:
        """One sequence's chunk of s tokens at positions [pos0, pos0 + s)."""
        s = len(x)
        before = cache.window(pos0)
        keys = torch.cat([before.to(kv.dtype), kv]) if len(before) else kv
        indices = window_indices(pos0, s, self.window, len(before))
        cache.write_window(kv, pos0)

        ratio = self.spec.compress_ratio
        if ratio:
            if self.spec.kind == LayerKind.CSA:
                chosen = self.indexer(x, qr, pos0, cis, cache)
                self.compressor(x, pos0, cache, "kv")
                valid = chosen >= 0
                needed, local = torch.unique(chosen[valid], return_inverse=True)
                compressed = torch.full_like(chosen, -1)
                compressed[valid] = local + len(keys)
                entries = cache.entries("kv", needed) if len(needed) else keys[:0]
            else:
                self.compressor(x, pos0, cache, "kv")
                n = cache.num_entries("kv")
                usable = (torch.arange(pos0, pos0 + s) + 1) // ratio
                j = torch.arange(n)
                compressed = torch.where(j < usable[:, None], j + len(keys), -1)
                entries = cache.entries("kv") if n else keys[:0]
            keys = torch.cat([keys, entries.to(kv.dtype)])
            indices = torch.cat([indices, compressed], dim=1)
        return sparse_attention(q, keys, indices, self.attn_sink, self.softmax_scale)
