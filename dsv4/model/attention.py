"""V4 attention: low-rank queries over one shared KV head, a sliding window, and (by layer kind) either
nothing more, the lightning indexer's top-k of 4:1 entries (CSA), or every 128:1 entry (HCA).

Every query attends through a list of indices into a small per-call KV tensor (its window rows plus the
compressed entries it may see); there is no dense mask over the context. Each softmax has a learned per-head
sink in its denominator. The output is rotated back by the query position (values carry the RoPE of their
keys) and projected through grouped low-rank matrices.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dsv4.cache.view import LayerCache
from dsv4.config import KV_FP8_BLOCK, LayerKind, LayerSpec, ModelConfig
from dsv4.model.batch import StepBatch
from dsv4.model.compressor import Compressor
from dsv4.model.indexer import Indexer
from dsv4.model.linear import Linear
from dsv4.model.norm import RMSNorm, head_rms_normalize
from dsv4.model.parallel import SINGLE, ParallelContext, Shard, shard_of
from dsv4.model.rope import Rotary
from dsv4.model.sparse_attention import BLOCK, attend_gathered, keys_with_zero_row, sparse_attention_on_keys
from dsv4.numerics.formats import fp8_simulate
from dsv4.numerics.modes import Numerics


@functools.cache
def _full_window(window: int, device: torch.device) -> torch.Tensor:
    return torch.arange(window, device=device).unsqueeze(0)


def window_indices(pos0: int, s: int, window: int, n_before: int) -> torch.Tensor:
    """Per query, the rows of its window in a KV tensor that starts at position pos0 - n_before.

    Valid rows come oldest first, then -1 padding. The width is the reference's (the whole window, or the
    prompt length for a short first prefill), which fixes where compressed indices start in each list and so
    the blocking of the attention's online softmax.
    """
    if s == 1 and pos0 >= window - 1:  # a decode step with a full window: the same list every time
        return _full_window(window, torch.get_default_device())
    width = window if pos0 > 0 else min(s, window)
    pos = torch.arange(pos0, pos0 + s)
    first = (pos - window + 1).clamp(min=0)
    rows = (first - (pos0 - n_before)).unsqueeze(1) + torch.arange(width)
    count = torch.minimum(pos + 1, torch.tensor(window)).unsqueeze(1)
    return torch.where(torch.arange(width) < count, rows, -1)


def _assemble(
    n_rows: int, parts: list[tuple[torch.Tensor | slice, list[torch.Tensor], torch.Tensor]], whole_blocks: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One KV tensor from every part's keys (``keys_with_zero_row``), and every query row's index list
    into it (-1 padded).

    The attention rounds a list's last, partial block of ``BLOCK`` indices according to its width, so a
    list padded to a longer companion's width computes differently than alone. With ``whole_blocks`` every
    list is padded to whole blocks, and the blocks of -1 that a companion adds change nothing.
    """
    width = max(lists.shape[1] for _, _, lists in parts)
    if whole_blocks:
        width = -(-width // BLOCK) * BLOCK
    indices = torch.full((n_rows, width), -1, dtype=torch.int64)
    offset = 0
    for rows, keys, lists in parts:
        indices[rows, : lists.shape[1]] = torch.where(lists >= 0, lists + offset, -1)
        offset += sum(len(k) for k in keys)
    return keys_with_zero_row([k for _, keys, _ in parts for k in keys]), indices


def _layout_keys(
    parts: list[tuple[torch.Tensor, torch.Tensor | None]], whole_blocks: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-query key pieces [S, n_i, d] (with their -1 slots [S, n_i], or None for none) as ``attend_gathered``
    reads them - fp32 pieces that together cover the lists padded with zeros to whole blocks, every block
    inside one piece - and the -1 slots of the joined lists. The -1 slots are zeroed (what a cache read
    returns there is arbitrary). Leading fp32 pieces of whole blocks without -1 slots (full decode windows)
    are used as they are; the rest is copied once into one tensor. ``whole_blocks`` as in ``_assemble``."""
    first = parts[0][0]
    n, dim, device = first.shape[0], first.shape[-1], first.device
    width = sum(keys.shape[1] for keys, _ in parts)
    invalid = torch.zeros(n, -(-width // BLOCK) * BLOCK if whole_blocks else width, dtype=torch.bool, device=device)
    invalid[:, width:] = True
    pieces, start, i = [], 0, 0
    while i < len(parts) and parts[i][1] is None and parts[i][0].dtype == torch.float32:
        if parts[i][0].shape[1] % BLOCK:
            break
        pieces.append(parts[i][0])
        start += parts[i][0].shape[1]
        i += 1
    if i == len(parts):
        return pieces, invalid
    rest = width - start
    out = torch.empty(n, -(-rest // BLOCK) * BLOCK, dim, dtype=torch.float32, device=device)
    at = 0
    for keys, missing in parts[i:]:
        piece = out[:, at : at + keys.shape[1]]
        piece.copy_(keys)
        if missing is not None:
            piece.masked_fill_(missing.unsqueeze(-1), 0.0)
            invalid[:, start + at : start + at + keys.shape[1]] = missing
        at += keys.shape[1]
    out[:, rest:].zero_()
    return [*pieces, out], invalid


class Attention(nn.Module):
    """One layer's attention. Under tensor parallelism a rank holds its heads' slice of ``wq_b`` and the sinks,
    and the output groups those heads feed (``wo_a`` rows, ``wo_b`` columns, whose partial outputs are
    summed across ranks); the KV path, the compressors and the cache are the same on every rank."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, numerics: Numerics, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.spec, self.numerics = spec, numerics
        self.layer_index = spec.index
        self.head_dim, self.nope = config.head_dim, config.nope_head_dim
        self.o_lora_rank = config.o_lora_rank
        self.window = config.window_size
        self.eps = config.norm_eps
        self.softmax_scale = self.head_dim**-0.5
        fmt = config.weight_dtype

        def part(name: str) -> Shard:
            return shard_of(f"attn.{name}", config, parallel)

        self.attn_sink = nn.Parameter(
            torch.empty(part("attn_sink").shape((config.n_heads,)), dtype=torch.float32), requires_grad=False
        )
        self.wq_a = Linear(config.dim, config.q_lora_rank, fmt, numerics)
        self.q_norm = RMSNorm(config.q_lora_rank, config.norm_eps)
        self.wq_b = Linear(config.q_lora_rank, config.n_heads * self.head_dim, fmt, numerics, part("wq_b.weight"))
        self.wkv = Linear(config.dim, self.head_dim, fmt, numerics)
        self.kv_norm = RMSNorm(self.head_dim, config.norm_eps)
        group_in, groups_out = config.n_heads * self.head_dim // config.o_groups, config.o_groups * config.o_lora_rank
        self.wo_a = Linear(group_in, groups_out, fmt, numerics, part("wo_a.weight"))
        self.wo_b = Linear(groups_out, config.dim, fmt, numerics, part("wo_b.weight"), parallel)
        self.n_heads = self.wq_b.out_features // self.head_dim  # this rank's
        self.n_groups = self.wo_a.out_features // self.o_lora_rank
        self.rotary = Rotary(config, spec)
        if spec.compress_ratio:
            self.compressor = Compressor(config, spec.compress_ratio, self.head_dim, False, numerics, self.rotary)
        if spec.kind == LayerKind.CSA:
            self.indexer = Indexer(config, numerics, self.rotary, parallel)

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """x [T, d] (normed, collapsed) of all spans -> [T, d]."""
        cis = self.rotary.at(batch.positions)
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = self.rotary.rotate(head_rms_normalize(q, self.eps, self.numerics), cis)
        kv = self.rotary.rotate(self.kv_norm(self.wkv(x)), cis)
        if self.numerics.simulate:  # FP8 for the non-RoPE dims; the RoPE dims keep their precision
            kv = torch.cat([fp8_simulate(kv[:, : self.nope], KV_FP8_BLOCK), kv[:, self.nope :]], dim=-1)

        # Everything that is per token runs on the whole batch; only what reads or grows a sequence's cache
        # walks the spans. Each span contributes its keys to one KV tensor and its queries' index lists
        # (padded with -1) to one attention call.
        compressed = self.compressor.project(x) if self.spec.compress_ratio else None
        indexed = None
        if self.spec.kind == LayerKind.CSA:
            indexed = (*self.indexer.project(x, qr, cis), self.indexer.compressor.project(x))
        o = q.new_empty(q.shape)
        if batch.decodes:  # keys laid out per query straight from the cache reads
            keys, invalid = self._gather_decode(batch, kv, compressed, indexed)
            rows = batch.decode_rows
            o[rows] = attend_gathered(q[rows], keys, invalid, self.attn_sink, self.softmax_scale)
        if batch.prefills:
            parts, offset = [], 0
            for span in batch.prefills:
                cache = span.cache.layer(self.layer_index)
                local = slice(offset, offset + span.length)
                parts.append((local, *self._gather(span.rows, kv, compressed, indexed, span.pos0, cache)))
                offset += span.length
            keys, indices = _assemble(offset, parts, self.numerics.batch_invariant)
            rows = batch.prefill_rows
            q_rows = q if rows is None else q[rows]
            o_rows = sparse_attention_on_keys(q_rows, keys, indices, self.attn_sink, self.softmax_scale)
            if rows is None:
                o = o_rows
            else:
                o[rows] = o_rows

        o = self.rotary.rotate(o, cis, inverse=True)
        # Grouped low-rank output: group g's heads through wo_a's rows of group g, without activation
        # quantisation, accumulated in fp32 on the compact weight.
        o = o.view(len(x), self.n_groups, -1).float()
        r = self.o_lora_rank
        groups = [self.wo_a.fp32(o[:, g].contiguous(), rows=slice(g * r, (g + 1) * r)) for g in range(self.n_groups)]
        return self.wo_b(torch.cat(groups, dim=1).to(x.dtype))

    def _gather_decode(
        self,
        batch: StepBatch,
        kv: torch.Tensor,
        compressed: tuple[torch.Tensor, torch.Tensor] | None,
        indexed: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_gather`` for S sequences adding one token each, their cache reads done together, laid out as
        ``attend_gathered`` reads them: keys [S, slots, d] (each member's window rows, then its k entries),
        and which of them are -1 slots [S, window + k].

        Each query sees exactly the keys in the order ``_gather``'s lists name (window rows oldest first, then
        the entries in top-k order), so it attends as it would alone; the keys are copied once, from the
        cache reads into the layout, where a shared KV tensor and index lists would copy them twice more.
        """
        step, rows = batch.decode_step, batch.decode_rows
        assert step is not None
        caches = [span.cache.layer(self.layer_index) for span in batch.decodes]
        group = caches[0].decode_group(caches, step)
        window = group.advance_window(kv[rows])
        parts: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if batch.window_lists is None:  # every window full: the reads are already in list order
            parts.append((window, None))
        else:
            lists = batch.window_lists
            parts.append((window.flatten(0, 1)[lists.clamp(min=0)], lists < 0))

        ratio = self.spec.compress_ratio
        if ratio:
            if indexed is not None:
                q_index, weights, (index_kv, index_score) = indexed
                self.indexer.compressor.pool_group(index_kv[rows], index_score[rows], group, "index")
                chosen = self.indexer.select_group(q_index[rows], weights[rows], group)
            self.compressor.pool_group(compressed[0][rows], compressed[1][rows], group, "kv")
            if indexed is None:  # HCA: every complete entry
                j = torch.arange(max(cache.num_entries("kv") for cache in caches))  # host ints: no device sync
                chosen = torch.where(j < ((step.positions_t + 1) // ratio).unsqueeze(1), j, -1)
            if chosen.shape[1]:
                parts.append((group.entries("kv", chosen), chosen < 0))
        return _layout_keys(parts, self.numerics.batch_invariant)

    def _gather(
        self,
        rows: slice,
        kv: torch.Tensor,
        compressed: tuple[torch.Tensor, torch.Tensor] | None,
        indexed: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None,
        pos0: int,
        cache: LayerCache,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One sequence's chunk at positions [pos0, pos0 + s): update its cache and return the keys its
        queries may see (window rows, then compressed entries, as pieces) with each query's index list
        into them."""
        kv = kv[rows]
        s = len(kv)
        before = cache.window(pos0)
        keys = [before, kv] if len(before) else [kv]
        n_window = len(before) + s
        indices = window_indices(pos0, s, self.window, len(before))
        cache.write_window(kv, pos0)

        ratio = self.spec.compress_ratio
        if not ratio:
            return keys, indices
        if indexed is not None:  # CSA: the indexer's own compressor first, then its top-k over those keys
            q_index, weights, (index_kv, index_score) = indexed
            self.indexer.compressor.pool(index_kv[rows], index_score[rows], pos0, cache, "index")
            chosen = self.indexer.select(q_index[rows], weights[rows], pos0, cache)
        self.compressor.pool(compressed[0][rows], compressed[1][rows], pos0, cache, "kv")
        if indexed is not None:
            valid = chosen >= 0
            needed, local = torch.unique(chosen[valid], return_inverse=True)
            entry_indices = torch.full_like(chosen, -1)
            entry_indices[valid] = local + n_window
            entries = cache.entries("kv", needed) if len(needed) else kv[:0]
        else:  # HCA: every complete entry
            n = cache.num_entries("kv")
            usable = (torch.arange(pos0, pos0 + s) + 1) // ratio
            j = torch.arange(n)
            entry_indices = torch.where(j < usable[:, None], j + n_window, -1)
            entries = cache.entries("kv") if n else kv[:0]
        return [*keys, entries], torch.cat([indices, entry_indices], dim=1)
