"""The engine's KV cache: a paged pool of compressed entries plus one fixed-size state slot per sequence.

V4's cache has two tiers (``layout.py`` counts their bytes; this module allocates exactly those tensors):

* **Paged tier** - what grows with the context. Every CSA layer adds one 4:1 attention entry and one
  indexer key per 4 tokens, every HCA layer one 128:1 entry per 128 tokens. A *block* holds these rows
  for ``block_tokens`` consecutive tokens of one sequence in every compressed layer, so a sequence grows
  by whole blocks through its block table, and blocks are reference-counted so that sequences can share
  the part of the context they have in common (``fork``).
* **State slots** - what does not grow: per layer the ring of the last ``window_size`` KV rows (position
  p lives in row p mod window) and per compressor its *frontier*. ``max_sequences`` slots are allocated
  once, so admitting a sequence never allocates memory.

Why the frontier is the smallest exact state: an entry is a per-channel softmax, in fp32, over the scores
of its whole pooling window (4 or 128 tokens; for ratio 4 also the previous window's 4 tokens, whose first
halves the next entry pools), applied to those tokens' fp32 projections. The hidden states behind them are
gone once the layer has run, and a running online-softmax summary, though smaller, rounds differently
from the one-shot softmax. So continuing a sequence (decode, or the next chunk of a chunked prefill) and
still producing, bit for bit, the entries of a one-shot prefill needs the pending tokens' fp32 projections
and scores as computed: at most ``coff·r`` rows per compressor, whatever the context length.

Rows are stored compactly: with quantisation simulation on, the values the model computes with are
already on FP8/FP4 grids with power-of-two scales, so the codes plus E8M0 scales are a lossless encoding
(``pack_fp8_entries``/``pack_fp4_entries``); rows are decoded on read, and only the rows a read asks for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from dsv4.cache import layout
from dsv4.cache.view import DecodeStep, completing, extend_rows
from dsv4.config import FP4_BLOCK, KV_FP8_BLOCK, LayerKind, LayerSpec, ModelConfig
from dsv4.device import device_scope
from dsv4.numerics.formats import FP4_VALUES, e8m0_to_float, pack_fp4_entries, pack_fp8_entries, unpack_fp8_entries
from dsv4.numerics.index_scores import KeyRows
from dsv4.numerics.modes import get_numerics

# Frontier.role in layout -> the compressor's name in the cache protocol
_NAMES = {"attention": "kv", "indexer": "index"}


class PoolExhausted(RuntimeError):
    """Not enough free blocks or state slots; the pool was left unchanged."""


@dataclass(frozen=True)
class SlotRef:
    """A sequence named by its state slot: how a recorded operation refers to it in another process."""

    slot: int


@dataclass(frozen=True)
class PoolOp:
    """One allocation change (``new_sequence``, ``reserve``, ``fork``, ``import_sequence``, ``free``) as a
    replica replays it: the method, its arguments (sequences as ``SlotRef``), and the slot and block table
    it left, which the replica checks its own result against."""

    method: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    slot: int
    blocks: tuple[int, ...]


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _recorded(method: _Method) -> _Method:
    """Append the call to ``pool.journal`` (when the pool keeps one) once it has succeeded. Calls made
    inside another recorded call (``fork``'s ``new_sequence``) are part of it and not recorded apart."""

    @functools.wraps(method)
    def wrapper(pool: KVPool, *args: Any, **kwargs: Any) -> Any:
        pool._depth += 1
        try:
            result = method(pool, *args, **kwargs)
        finally:
            pool._depth -= 1
        if pool.journal is not None and pool._depth == 0:
            seq = result if isinstance(result, PagedSequence) else args[0]
            refs = tuple(SlotRef(a.slot) if isinstance(a, PagedSequence) else a for a in args)
            pool.journal.append(PoolOp(method.__name__, refs, tuple(kwargs.items()), seq.slot, tuple(seq.blocks)))
        return result

    return wrapper  # type: ignore[return-value]


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a one-byte tensor: indexing and scatter kernels are missing for the FP4/FP8/E8M0
    dtypes, and moving bytes is all the pool does with them."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _fp4_byte_table() -> torch.Tensor:
    """Packed byte -> (value of its low nibble, value of its high nibble), fp32 [256, 2].

    The indexer reads every key of the context at every step, so the pool decodes keys with one table
    lookup per byte: several times faster than ``unpack_fp4_entries``'s per-nibble decode, and the same
    values (both scale the exact e2m1 values in fp32, then round once to the compute dtype).
    """
    signed = torch.tensor([*FP4_VALUES, *(-v for v in FP4_VALUES)])  # code 8 is -0
    return torch.stack([signed.repeat(16), signed.repeat_interleave(16)], dim=-1)


class _Rows:
    """Rows of one ``RowFormat``: one 2-D tensor per segment, plus the codec between the compute dtype
    and the stored form (chosen by the format's segments, so the layout stays the single authority)."""

    def __init__(self, fmt: layout.RowFormat, n_rows: int, dtype: torch.dtype):
        self.dtype = dtype
        self.tensors = [torch.empty(n_rows, seg.numel, dtype=seg.torch_dtype) for seg in fmt.segments]
        names = tuple(seg.name for seg in fmt.segments)
        if names == ("nope", "nope_scale", "rope"):
            nope, scales = fmt.segments[0].values, fmt.segments[1].values
            if nope != scales * KV_FP8_BLOCK:
                raise ValueError(f"{fmt.name}: {nope} FP8 dims need blocks of {KV_FP8_BLOCK}, not {scales}")
            self.codec, self.nope = "fp8", nope
        elif names == ("key", "key_scale"):
            if fmt.segments[0].values != fmt.segments[1].values * FP4_BLOCK:
                raise ValueError(f"{fmt.name}: FP4 scales do not cover blocks of {FP4_BLOCK}")
            self.codec, self.fp4_table = "fp4", _fp4_byte_table()
        elif len(names) == 1:
            self.codec = "plain"
        else:
            raise ValueError(f"{fmt.name}: no codec for segments {names}")
        self.row_nbytes = sum(t.element_size() * t.shape[1] for t in self.tensors)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stored parts, each already in its segment's dtype (the FP4 codes as their raw bytes)."""
        if self.codec == "fp8":
            q, s, rope = pack_fp8_entries(x, self.nope, KV_FP8_BLOCK)
            return [q, s, rope.to(self.tensors[2].dtype)]
        if self.codec == "fp4":
            return list(pack_fp4_entries(x, FP4_BLOCK))
        return [x.to(self.tensors[0].dtype)]

    def _decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.codec == "fp8":
            q, s, rope = parts
            return unpack_fp8_entries(q, s, rope, self.dtype)
        if self.codec == "fp4":
            codes, scales = parts
            values = F.embedding(codes.view(torch.uint8).int(), self.fp4_table)
            values = values.view(len(codes), scales.shape[1], FP4_BLOCK) * e8m0_to_float(scales).unsqueeze(-1)
            return values.view(len(codes), scales.shape[1] * FP4_BLOCK).to(self.dtype)
        return parts[0]

    def write(self, index: torch.Tensor, x: torch.Tensor) -> None:
        for t, part in zip(self.tensors, self._encode(x), strict=True):
            _raw(t)[index] = _raw(part)

    def read(self, index: torch.Tensor) -> torch.Tensor:
        return self._decode([_raw(t)[index].view(t.dtype) for t in self.tensors])

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        for t in self.tensors:
            _raw(t)[dst] = _raw(t)[src]


class _LayerStore:
    """Everything the pool holds for one main layer, for all blocks and all slots."""

    def __init__(
        self,
        config: ModelConfig,
        spec: LayerSpec,
        mode: str,
        dtype: torch.dtype,
        num_blocks: int,
        block_tokens: int,
        max_sequences: int,
    ):
        self.spec = spec
        self.window = config.window_size
        self.head_dim = config.head_dim
        self.ring = _Rows(layout.window_row_format(config, mode), max_sequences * self.window, dtype)
        self.per_block = layout.entries_per_block(spec, block_tokens)
        self.entries: dict[str, _Rows] = {}
        if spec.kind is not LayerKind.WINDOW:
            self.entries["kv"] = _Rows(layout.entry_format(config, mode), num_blocks * self.per_block, dtype)
        if spec.kind is LayerKind.CSA:
            keys = layout.indexer_key_format(config, mode)
            self.entries["index"] = _Rows(keys, num_blocks * self.per_block, dtype)
        self.frontiers = {
            _NAMES[f.role]: (
                torch.empty(max_sequences, *f.shape, dtype=layout.FRONTIER_DTYPE),
                torch.empty(max_sequences, *f.shape, dtype=layout.FRONTIER_DTYPE),
            )
            for f in layout.frontiers(config, spec)
        }

    def paged_tensors(self) -> list[torch.Tensor]:
        return [t for rows in self.entries.values() for t in rows.tensors]

    def slot_tensors(self) -> list[torch.Tensor]:
        return [*self.ring.tensors, *(t for pair in self.frontiers.values() for t in pair)]


class PagedLayerCache:
    """One sequence's view of one layer (implements ``view.LayerCache``)."""

    def __init__(self, seq: PagedSequence, store: _LayerStore):
        self.seq, self.store = seq, store
        self.end = 0  # positions [0, end) have been written to the window
        self.pending = dict.fromkeys(store.frontiers, 0)  # frontier rows per compressor
        self.counts = dict.fromkeys(store.entries, 0)  # entries per compressor

    def _ring_rows(self, positions: torch.Tensor) -> torch.Tensor:
        return self.seq.slot * self.store.window + positions % self.store.window

    def window(self, pos0: int) -> torch.Tensor:
        if pos0 != self.end:
            raise ValueError(f"cache holds positions up to {self.end}, asked to continue at {pos0}")
        n = min(pos0, self.store.window - 1)
        if n == 0:
            return torch.empty(0, self.store.head_dim, dtype=self.store.ring.dtype)
        return self.store.ring.read(self._ring_rows(torch.arange(pos0 - n, pos0)))

    def _check_reserved(self, end: int) -> None:
        capacity = len(self.seq.blocks) * self.seq.pool.block_tokens
        assert end <= capacity, (
            f"layer {self.store.spec.index}: writing positions up to {end} but only {capacity} tokens are "
            f"reserved; call KVPool.reserve before the forward"
        )

    def write_window(self, kv: torch.Tensor, pos0: int) -> None:
        assert pos0 == self.end, f"layer {self.store.spec.index}: write at {pos0}, cache ends at {self.end}"
        end = pos0 + len(kv)
        self._check_reserved(end)
        rows = kv[-self.store.window :]
        self.store.ring.write(self._ring_rows(torch.arange(end - len(rows), end)), rows)
        self.end = end

    def frontier(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Views into the slot, valid until the next ``extend_frontier``."""
        kv, score = self.store.frontiers[name]
        n, slot = self.pending[name], self.seq.slot
        return kv[slot, :n], score[slot, :n]

    def extend_frontier(
        self, name: str, kv: torch.Tensor, score: torch.Tensor, pos0: int, ratio: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        assert ratio == self.store.spec.compress_ratio, f"{name!r} pools every {self.store.spec.compress_ratio}"
        kv, score, start, drop = extend_rows(self.frontier(name), kv, score, pos0, ratio)
        kv_buf, score_buf = self.store.frontiers[name]
        n, slot = len(kv) - drop, self.seq.slot
        assert n <= kv_buf.shape[1], f"frontier {name!r}: {n} pending rows, room for {kv_buf.shape[1]}"
        # kv holds a copy of the old rows (the join), so writing over them is safe
        kv_buf[slot, :n], score_buf[slot, :n] = kv[drop:], score[drop:]
        self.pending[name] = n
        return kv, score, start

    def _physical(self, rows: torch.Tensor) -> torch.Tensor:
        per_block = self.store.per_block
        return self.seq.table[rows // per_block] * per_block + rows % per_block

    def append_entries(self, name: str, entries: torch.Tensor) -> None:
        first = self.counts[name]
        last = first + len(entries)
        per_block = self.store.per_block
        blocks = self.seq.blocks
        assert (last - 1) // per_block < len(blocks), (
            f"layer {self.store.spec.index}: entry {last - 1} of {name!r} lies in block "
            f"{(last - 1) // per_block} but only {len(blocks)} blocks are reserved"
        )
        refcount = self.seq.pool.refcount
        touched = range(first // per_block, (last - 1) // per_block + 1)
        shared = [b for b in touched if refcount(blocks[b]) > 1]
        assert not shared, f"layer {self.store.spec.index}: appending into shared block(s) {shared}"
        self.store.entries[name].write(self._physical(torch.arange(first, last)), entries)
        self.counts[name] = last

    def num_entries(self, name: str) -> int:
        return self.counts[name]

    def entries(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Decodes only the rows asked for (all of them for the indexer, a top-k union for CSA attention)."""
        count = self.counts[name]
        if rows is None:
            rows = torch.arange(count)
        elif len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < count:
            raise IndexError(f"layer {self.store.spec.index}: {name!r} has {count} entries, asked for {rows}")
        return self.store.entries[name].read(self._physical(rows))

    def key_rows(self, name: str) -> KeyRows:
        """The stored rows through the block table: plain values, or FP4 codes with their scales (the indexer
        kernel decodes them as it reads); other codecs as a decoded copy."""
        rows, per_block, count = self.store.entries[name], self.store.per_block, self.counts[name]
        if rows.codec == "plain":
            return KeyRows(rows.tensors[0], self.seq.table, per_block, count)
        if rows.codec == "fp4":
            codes, scales = (_raw(t) for t in rows.tensors)
            return KeyRows(codes, self.seq.table, per_block, count, scales)
        return KeyRows.of(self.entries(name))

    def decode_group(self, caches: list[PagedLayerCache], step: DecodeStep) -> PagedDecodeGroup:
        return PagedDecodeGroup(caches, step)


class PagedDecodeGroup:
    """One layer's caches of several pool sequences that each add one token (implements
    ``view.DecodeGroup``): every read is one gather through the members' slots and block tables."""

    def __init__(self, caches: list[PagedLayerCache], step: DecodeStep):
        self.caches, self.step, self.positions = caches, step, step.positions_t
        self.store = caches[0].store
        assert all(c.store is self.store for c in caches), "a decode group spans one layer of one pool"
        self.slots, self.tables = step.derived("paged", lambda: self._index(caches))

    @staticmethod
    def _index(caches: list[PagedLayerCache]) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' state slots and padded block tables: the same for every layer of the step."""
        slots = torch.tensor([c.seq.slot for c in caches])
        return slots, torch.nn.utils.rnn.pad_sequence([c.seq.table for c in caches], batch_first=True)

    def advance_window(self, kv: torch.Tensor) -> torch.Tensor:
        w = self.store.window
        for cache, p in zip(self.caches, self.step.positions, strict=True):
            if p != cache.end:
                raise ValueError(f"cache holds positions up to {cache.end}, asked to continue at {p}")
        for cache in self.caches:
            cache._check_reserved(cache.end + 1)
        # Written first, then every window read in one gather: the stored form of a row is lossless for the
        # values the model computes with, so the new row reads back as ``kv`` itself.
        self.store.ring.write(self.slots * w + self.positions % w, kv)
        for cache in self.caches:
            cache.end += 1
        window = self.positions.unsqueeze(1) - torch.arange(w - 1, -1, -1)  # positions p-w+1 .. p
        rows = self.slots.unsqueeze(1) * w + window % w
        return self.store.ring.read(rows.flatten()).view(len(kv), w, -1).to(kv.dtype)

    def push_frontier(
        self, name: str, kv: torch.Tensor, score: torch.Tensor, ratio: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert ratio == self.store.spec.compress_ratio, f"{name!r} pools every {self.store.spec.compress_ratio}"
        kv_buf, score_buf = self.store.frontiers[name]
        pending = torch.tensor([c.pending[name] for c in self.caches])
        assert int(pending.max()) < kv_buf.shape[1], f"frontier {name!r} is full"
        kv_buf[self.slots, pending] = kv
        score_buf[self.slots, pending] = score
        for cache in self.caches:
            cache.pending[name] += 1
        done = self.step.derived(f"complete/{ratio}", lambda: completing(self.step.positions, ratio))
        if not len(done):
            return done, kv[:0, None], score[:0, None]
        # The completed windows' rows (with overlap, the previous window's too) ...
        tail = kv_buf.shape[1]
        slots, pending = self.slots[done].unsqueeze(1), pending[done].unsqueeze(1) + 1
        rows = (pending - tail + torch.arange(tail)).clamp(min=0)
        kv_tail, score_tail = kv_buf[slots, rows], score_buf[slots, rows]
        # ... then what the next entry still needs (the overlap's window) moves to the front.
        keep = tail - ratio
        kept = (pending - keep + torch.arange(keep)).clamp(min=0)
        for buf in (kv_buf, score_buf):
            buf[slots, torch.arange(keep)] = buf[slots, kept]  # the gather copies before the scatter
        for i in done.tolist():
            self.caches[i].pending[name] = keep
        return done, kv_tail, score_tail

    def append_entries(self, name: str, members: torch.Tensor, entries: torch.Tensor) -> None:
        caches = [self.caches[i] for i in members.tolist()]
        rows = torch.tensor([c.counts[name] for c in caches])
        per_block = self.store.per_block
        blocks = self.tables[members, rows // per_block]
        for cache, block in zip(caches, (rows // per_block).tolist(), strict=True):
            assert block < len(cache.seq.blocks), f"layer {self.store.spec.index}: entry past reserved blocks"
            assert cache.seq.pool.refcount(cache.seq.blocks[block]) == 1, "appending into a shared block"
            cache.counts[name] += 1
        self.store.entries[name].write(blocks * per_block + rows % per_block, entries)

    def num_entries(self, name: str) -> torch.Tensor:
        return torch.tensor([c.counts[name] for c in self.caches])

    def entries(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.clamp(min=0)  # padding and -1 read some real row; callers mask them
        per_block = self.store.per_block
        blocks = self.tables.gather(1, (rows // per_block).clamp(max=self.tables.shape[1] - 1))
        physical = blocks * per_block + rows % per_block
        return self.store.entries[name].read(physical.flatten()).view(*rows.shape, -1)


class PagedSequence:
    """One sequence in the pool: its state slot, its block table and its per-layer views
    (implements ``view.SequenceCache``)."""

    def __init__(self, pool: KVPool, slot: int):
        self.pool, self.slot = pool, slot
        self.blocks: list[int] = []
        self.table = torch.empty(0, dtype=torch.int64)  # ``blocks`` as a tensor, for gathers
        self.layers = [PagedLayerCache(self, store) for store in pool.stores]
        self.freed = False

    @property
    def num_tokens(self) -> int:
        """Tokens written to every layer (a forward in progress has updated only some)."""
        return min(layer.end for layer in self.layers)

    def layer(self, index: int) -> PagedLayerCache:
        if self.freed:
            raise ValueError("this sequence was freed")
        if not 0 <= index < len(self.layers):
            raise IndexError(
                f"layer {index}: the pool caches the {len(self.layers)} main layers only "
                f"(the engine does not run the MTP block)"
            )
        return self.layers[index]

    def _set_blocks(self, blocks: list[int]) -> None:
        self.blocks = blocks
        self.table = torch.tensor(blocks, dtype=torch.int64)


class KVPool:
    """Paged storage for ``num_blocks`` blocks of ``block_tokens`` tokens and ``max_sequences`` state slots,
    all allocated at construction.

    Blocks are reference-counted: a block with more than one owner is full (every token of its range was
    seen, so every entry in it is final) and is never written again; ``fork`` copies a partial last block
    instead of sharing it. A prefix cache can therefore keep a ``fork`` taken at a block boundary: it
    shares every block and owns only a state slot (the window ring and frontiers, which cannot be rebuilt
    from the blocks).

    Allocation is deterministic, so a replica of the pool in another process (a tensor-parallel rank: V4's
    one KV head is cached whole on every rank) stays identical by replaying the operations this pool
    records in ``journal`` (``replay``) and running the same forwards.
    """

    def __init__(
        self,
        config: ModelConfig,
        numerics: str,
        num_blocks: int,
        block_tokens: int = layout.DEFAULT_BLOCK_TOKENS,
        max_sequences: int = 64,
        device: str | torch.device = "cpu",
    ):
        self.config, self.mode = config, get_numerics(numerics).name
        self.device = torch.device(device)
        self.block_tokens = layout.check_block_tokens(block_tokens)
        if num_blocks < 0 or max_sequences <= 0:
            raise ValueError(f"need num_blocks >= 0 and max_sequences > 0, got {num_blocks}, {max_sequences}")
        self.num_blocks, self.max_sequences = num_blocks, max_sequences
        dtype = get_numerics(numerics).dtype
        with device_scope(self.device):
            self.stores = [
                _LayerStore(config, spec, self.mode, dtype, num_blocks, block_tokens, max_sequences)
                for spec in config.layers
            ]
        self._refcounts = [0] * num_blocks
        self._sequences: dict[int, PagedSequence] = {}  # live sequences by slot, for replay
        self.journal: list[PoolOp] | None = None  # set to a list to record allocation changes
        self._depth = 0
        self._free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first
        self._free_slots = list(range(max_sequences - 1, -1, -1))
        paged = sum(t.nbytes for s in self.stores for t in s.paged_tensors())
        self._block_nbytes = paged // num_blocks if num_blocks else 0
        self._slot_nbytes = sum(t.nbytes for s in self.stores for t in s.slot_tensors()) // max_sequences

    # ------------------------------------------------------------------ sequences
    @_recorded
    def new_sequence(self) -> PagedSequence:
        if not self._free_slots:
            raise PoolExhausted(f"all {self.max_sequences} state slots are in use")
        seq = PagedSequence(self, self._free_slots.pop())
        self._sequences[seq.slot] = seq
        return seq

    def sequence(self, slot: int) -> PagedSequence:
        """The live sequence in ``slot`` (how a replica finds the sequences a plan names)."""
        return self._sequences[slot]

    def replay(self, op: PoolOp) -> PagedSequence:
        """Apply an operation another pool of the same layout recorded; raise if the result differs."""
        args = [self._sequences[a.slot] if isinstance(a, SlotRef) else a for a in op.args]
        result = getattr(self, op.method)(*args, **dict(op.kwargs))
        seq = result if isinstance(result, PagedSequence) else args[0]
        if seq.slot != op.slot or tuple(seq.blocks) != op.blocks:
            raise RuntimeError(
                f"pool replica diverged on {op.method}: slot {seq.slot} blocks {seq.blocks}, "
                f"recorded slot {op.slot} blocks {list(op.blocks)}"
            )
        return seq

    def _check(self, seq: PagedSequence) -> None:
        if seq.freed or seq.pool is not self:
            raise ValueError("sequence already freed or not from this pool")

    def blocks_needed(self, seq: PagedSequence, n_new_tokens: int) -> int:
        """Blocks to add so that ``seq`` can take ``n_new_tokens`` more tokens than it holds now."""
        self._check(seq)
        return max(0, layout.blocks_for(seq.num_tokens + n_new_tokens, self.block_tokens) - len(seq.blocks))

    def can_grow(self, seq: PagedSequence, n_new_tokens: int) -> bool:
        return self.blocks_needed(seq, n_new_tokens) <= len(self._free_blocks)

    @_recorded
    def reserve(self, seq: PagedSequence, n_new_tokens: int) -> None:
        """Take the blocks a forward of ``n_new_tokens`` tokens will write into (none if already reserved:
        reserving is relative to the tokens the sequence holds, not cumulative)."""
        need = self.blocks_needed(seq, n_new_tokens)
        if need > len(self._free_blocks):
            raise PoolExhausted(f"{need} blocks needed, {len(self._free_blocks)} free")
        taken = [self._free_blocks.pop() for _ in range(need)]
        for b in taken:
            self._refcounts[b] = 1
        if taken:
            seq._set_blocks(seq.blocks + taken)

    @_recorded
    def fork(self, src: PagedSequence, share_blocks: bool = True) -> PagedSequence:
        """A new sequence continuing from exactly where ``src`` is: its full blocks are shared, a partial
        last block is copied, and the state slot is copied. With ``share_blocks=False`` every block is
        copied: the fork then holds what an independent sequence with the same tokens would (the engine
        benchmark's concurrent sequences, which must not share memory). Raises ``PoolExhausted`` (changing
        nothing) if no slot, or not enough blocks for the copies, are free."""
        self._check(src)
        full, partial = divmod(src.num_tokens, self.block_tokens)
        shared = full if share_blocks else 0
        to_copy = src.blocks[shared : full + (partial > 0)]
        if not self._free_slots or len(to_copy) > len(self._free_blocks):
            raise PoolExhausted(f"fork needs a free state slot and {len(to_copy)} free block(s)")
        dst = self.new_sequence()
        blocks = src.blocks[:shared]
        for b in blocks:
            self._refcounts[b] += 1
        for old in to_copy:
            copy = self._free_blocks.pop()
            self._refcounts[copy] = 1
            for store in self.stores:
                for rows in store.entries.values():
                    span = torch.arange(store.per_block)
                    rows.copy_rows(copy * store.per_block + span, old * store.per_block + span)
            blocks = blocks + [copy]
        dst._set_blocks(blocks)
        for store, s, d in zip(self.stores, src.layers, dst.layers, strict=True):
            w = store.window
            store.ring.copy_rows(
                torch.arange(dst.slot * w, (dst.slot + 1) * w), torch.arange(src.slot * w, (src.slot + 1) * w)
            )
            for pair in store.frontiers.values():
                for buf in pair:
                    buf[dst.slot] = buf[src.slot]
            d.end, d.pending, d.counts = s.end, dict(s.pending), dict(s.counts)
        return dst

    # ------------------------------------------------------------------ persistence (the session disk tier)
    def export_block(self, block: int) -> dict[str, torch.Tensor]:
        """The stored rows of one block, every compressed layer's segments, as copies in their stored dtypes."""
        out = {}
        for store in self.stores:
            first = block * store.per_block
            for name, rows in store.entries.items():
                for i, t in enumerate(rows.tensors):
                    out[f"layer{store.spec.index}.{name}.{i}"] = t[first : first + store.per_block].clone()
        return out

    def export_state(self, seq: PagedSequence) -> dict[str, torch.Tensor]:
        """What ``seq`` holds beyond its full blocks: its state slot (window ring, the live frontier rows), its
        positions and counts, and the rows of a partial last block. With the full blocks' exports, enough to
        rebuild the sequence bit for bit in another pool of the same layout (``import_sequence``)."""
        self._check(seq)
        full, partial = divmod(seq.num_tokens, self.block_tokens)
        out: dict[str, torch.Tensor] = {}
        for store, layer in zip(self.stores, seq.layers, strict=True):
            prefix = f"layer{store.spec.index}"
            w = store.window
            for i, t in enumerate(store.ring.tensors):
                out[f"{prefix}.ring.{i}"] = t[seq.slot * w : (seq.slot + 1) * w].clone()
            for name, (kv, score) in store.frontiers.items():
                n = layer.pending[name]
                out[f"{prefix}.frontier.{name}.kv"] = kv[seq.slot, :n].clone()
                out[f"{prefix}.frontier.{name}.score"] = score[seq.slot, :n].clone()
            counts = [layer.end, *(layer.pending[k] for k in sorted(layer.pending))]
            counts += [layer.counts[k] for k in sorted(layer.counts)]
            out[f"{prefix}.counts"] = torch.tensor(counts, dtype=torch.int64)
        if partial:
            for key, t in self.export_block(seq.blocks[full]).items():
                out[f"partial.{key}"] = t
        return out

    @_recorded
    def import_sequence(
        self, num_tokens: int, blocks: list[dict[str, torch.Tensor]], state: dict[str, torch.Tensor]
    ) -> PagedSequence:
        """A new sequence holding what ``export_block``/``export_state`` wrote for a sequence of ``num_tokens``
        tokens. Raises ``PoolExhausted`` (changing nothing) without a free slot and enough free blocks, and
        ``ValueError`` (changing nothing) when the tensors do not fit this pool's layout."""
        full, partial = divmod(num_tokens, self.block_tokens)
        if len(blocks) != full:
            raise ValueError(f"{num_tokens} tokens need {full} full blocks, got {len(blocks)}")
        parts = [*blocks, {k.removeprefix("partial."): v for k, v in state.items() if k.startswith("partial.")}]
        need = full + (partial > 0)
        self._check_rows(parts[: need if partial else full])
        if not self._free_slots or need > len(self._free_blocks):
            raise PoolExhausted(f"importing a sequence needs a free state slot and {need} free block(s)")
        seq = self.new_sequence()
        try:
            self.reserve(seq, num_tokens)
            for block, part in zip(seq.blocks, parts[: len(seq.blocks)], strict=True):
                self._write_block(block, part)
            for store, layer in zip(self.stores, seq.layers, strict=True):
                prefix = f"layer{store.spec.index}"
                w = store.window
                for i, t in enumerate(store.ring.tensors):
                    _raw(t)[seq.slot * w : (seq.slot + 1) * w] = _raw(state[f"{prefix}.ring.{i}"])
                counts = state[f"{prefix}.counts"].tolist()
                layer.end = counts[0]
                names = sorted(layer.pending)
                layer.pending = dict(zip(names, counts[1 : 1 + len(names)], strict=True))
                layer.counts = dict(zip(sorted(layer.counts), counts[1 + len(names) :], strict=True))
                for name, (kv, score) in store.frontiers.items():
                    n = layer.pending[name]
                    kv[seq.slot, :n] = state[f"{prefix}.frontier.{name}.kv"]
                    score[seq.slot, :n] = state[f"{prefix}.frontier.{name}.score"]
            if seq.num_tokens != num_tokens:
                raise ValueError(f"the state holds {seq.num_tokens} tokens, not {num_tokens}")
        except (KeyError, RuntimeError, ValueError) as error:
            self.free(seq)
            raise ValueError(f"the stored sequence does not fit this pool: {error}") from None
        return seq

    def _check_rows(self, parts: list[dict[str, torch.Tensor]]) -> None:
        for part in parts:
            for store in self.stores:
                for name, rows in store.entries.items():
                    for i, t in enumerate(rows.tensors):
                        got = part.get(f"layer{store.spec.index}.{name}.{i}")
                        if got is None or got.shape != (store.per_block, t.shape[1]) or got.dtype != t.dtype:
                            raise ValueError(f"layer {store.spec.index} {name!r}: stored rows do not match the pool")

    def _write_block(self, block: int, rows_by_name: dict[str, torch.Tensor]) -> None:
        for store in self.stores:
            span = block * store.per_block + torch.arange(store.per_block)
            for name, rows in store.entries.items():
                for i, t in enumerate(rows.tensors):
                    _raw(t)[span] = _raw(rows_by_name[f"layer{store.spec.index}.{name}.{i}"])

    @_recorded
    def free(self, seq: PagedSequence) -> None:
        """Release ``seq``'s slot and its references to its blocks, at once."""
        self._check(seq)
        for b in seq.blocks:
            self._refcounts[b] -= 1
            if self._refcounts[b] == 0:
                self._free_blocks.append(b)
        self._free_slots.append(seq.slot)
        del self._sequences[seq.slot]
        seq._set_blocks([])
        seq.freed = True

    def refcount(self, block: int) -> int:
        return self._refcounts[block]

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def block_nbytes(self) -> int:
        return self._block_nbytes

    @property
    def slot_nbytes(self) -> int:
        return self._slot_nbytes

    @property
    def used_bytes(self) -> int:
        used_blocks = self.num_blocks - len(self._free_blocks)
        used_slots = self.max_sequences - len(self._free_slots)
        return used_blocks * self._block_nbytes + used_slots * self._slot_nbytes

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self._block_nbytes + self.max_sequences * self._slot_nbytes

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes

    def allocated_bytes(self) -> int:
        """The real tensors' sizes, summed (what ``layout`` predicts, checked by the tests)."""
        return sum(t.nbytes for s in self.stores for t in (*s.paged_tensors(), *s.slot_tensors()))

    def bytes_per_token(self) -> layout.TokenBytes:
        """Per-token growth by layer kind, from the stored rows' sizes."""
        csa = keys = hca = Fraction(0)
        for store in self.stores:
            r = store.spec.compress_ratio
            if store.spec.kind is LayerKind.CSA:
                csa += Fraction(store.entries["kv"].row_nbytes, r)
                keys += Fraction(store.entries["index"].row_nbytes, r)
            elif store.spec.kind is LayerKind.HCA:
                hca += Fraction(store.entries["kv"].row_nbytes, r)
        return layout.TokenBytes(csa_entries=csa, indexer_keys=keys, hca_entries=hca)
