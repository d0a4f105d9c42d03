"""How many bytes the KV cache holds: the one place that decides it, so that ``dsv4 costs`` and the engine's
paged pool (which allocates its tensors from these row formats) can never disagree.

The cache has two tiers. Per-token state grows with the context and lives in paged blocks: every CSA
layer (ratio 4) adds one compressed attention entry and one indexer key per 4 tokens, every HCA layer
(ratio 128) one compressed entry per 128 tokens. Per-sequence state is fixed: a ring of the last
``window_size`` KV rows in every layer, and the frontier of each compressor (the projections of tokens
whose pooling window is not yet complete).

Every function takes a *mode*: one of the numerics modes of :mod:`dsv4.numerics.modes` (what dsv4 really
stores when running in that mode), or one of two accounting assumptions used only to reproduce published
figures:

* ``paper`` - the V4 report's storage (architecture.md §13.1): an entry is the non-RoPE dims in FP8 plus
  the RoPE dims in BF16 with no scale bytes counted (576 B for head_dim 512); an indexer key is FP4 values
  plus one E8M0 scale per 32 (68 B for 128 dims).
* ``official_code`` - the official inference code, which keeps the simulated-quantised values in bf16
  tensors (1024 B per entry, 256 B per indexer key): about twice the paper's figure.

With quantisation simulation on, dsv4 stores the FP8/FP4 codes and their E8M0 scales rather than the
dequantised values: the simulation rounds to exactly those grids with power-of-two scales, so the codes
are a lossless encoding of the values the model computes with. The RoPE dims are never quantised, so they
are kept in the activation dtype (bf16, or fp32 in ``fp32_sim``). Without simulation nothing is on a grid
and every dim is kept in the fp32 compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from dsv4.config import FP4_BLOCK, KV_FP8_BLOCK, VALID_RATIOS, LayerKind, LayerSpec, ModelConfig, overlapping
from dsv4.numerics.modes import MODES, get_numerics

PAPER = "paper"
OFFICIAL_CODE = "official_code"
ACCOUNTING_MODES = (PAPER, OFFICIAL_CODE)
ALL_MODES = (*MODES, *ACCOUNTING_MODES)

DEFAULT_BLOCK_TOKENS = 256
# A block must hold whole entries of the coarsest compression, or an HCA entry would straddle two blocks.
BLOCK_TOKEN_MULTIPLE = max(VALID_RATIOS)

FRONTIER_DTYPE = torch.float32

# storage format name -> (torch dtype of the stored tensor, logical values per stored element)
FORMATS: dict[str, tuple[torch.dtype, int]] = {
    "fp4_e2m1": (torch.float4_e2m1fn_x2, 2),
    "fp8_e4m3": (torch.float8_e4m3fn, 1),
    "e8m0": (torch.float8_e8m0fnu, 1),
    "bf16": (torch.bfloat16, 1),
    "fp32": (torch.float32, 1),
}
_DTYPE_FORMAT = {torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Segment:
    """One homogeneous part of a cache row. The pool keeps each segment in its own tensor (structure of
    arrays) because packing mixed dtypes into one byte row would misalign the wider ones."""

    name: str
    values: int  # logical values per row (FP4 values, FP8 codes, scales...)
    fmt: str  # a key of FORMATS

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown storage format {self.fmt!r}; known: {', '.join(FORMATS)}")
        if self.values % FORMATS[self.fmt][1]:
            raise ValueError(f"segment {self.name!r}: {self.values} {self.fmt} values do not fill whole elements")

    @property
    def torch_dtype(self) -> torch.dtype:
        return FORMATS[self.fmt][0]

    @property
    def numel(self) -> int:
        """Elements per row of the stored tensor (FP4 packs two values per element)."""
        return self.values // FORMATS[self.fmt][1]

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


@dataclass(frozen=True)
class RowFormat:
    """The stored form of one cache row: a compressed entry, a window-ring row or an indexer key."""

    name: str
    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)


@dataclass(frozen=True)
class Frontier:
    """The pending-token state of one compressor: an fp32 projection buffer and an fp32 score buffer
    (Z + ape), each ``[coff·r, coff·c']``.

    Exactness needs all of it in fp32: the pooling softmax runs per channel over the whole (for ratio 4,
    overlapping 8-token) window in fp32, so the projections of tokens that arrived before the window closed
    must be kept as computed, and for ratio 4 the previous window's slots stay until the next entry is pooled.
    """

    layer: int
    role: str  # "attention" (c' = head_dim) or "indexer" (c' = index_head_dim)
    ratio: int
    overlap: bool  # ratio-4 windows overlap: each token carries two halves of features
    width: int  # c'

    @property
    def coff(self) -> int:
        return 2 if self.overlap else 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.coff * self.ratio, self.coff * self.width)

    @property
    def nbytes(self) -> int:
        """Both buffers (kv and score)."""
        return 2 * math.prod(self.shape) * FRONTIER_DTYPE.itemsize


@dataclass(frozen=True)
class TokenBytes:
    """Cache bytes that one more token of context costs, averaged over the compression ratio (exact)."""

    csa_entries: Fraction
    indexer_keys: Fraction
    hca_entries: Fraction

    @property
    def total(self) -> Fraction:
        return self.csa_entries + self.indexer_keys + self.hca_entries

    def as_dict(self) -> dict[str, Fraction]:
        return {
            "csa_entries": self.csa_entries,
            "indexer_keys": self.indexer_keys,
            "hca_entries": self.hca_entries,
        }


@dataclass(frozen=True)
class BlockBytes:
    """Bytes of one paged block: ``block_tokens`` tokens' worth of entries for every compressed layer."""

    block_tokens: int
    csa_entries: int
    indexer_keys: int
    hca_entries: int

    @property
    def total(self) -> int:
        return self.csa_entries + self.indexer_keys + self.hca_entries


@dataclass(frozen=True)
class SequenceState:
    """Fixed per-sequence bytes, whatever the context length."""

    window_rows: int  # window_size rows in every main layer
    window_ring: int  # bytes of those rows
    frontiers: int  # bytes of every compressor's kv + score buffers

    @property
    def total(self) -> int:
        return self.window_ring + self.frontiers


def check_mode(mode: str) -> str:
    if mode not in ALL_MODES:
        raise ValueError(f"unknown cache mode {mode!r}; choose one of {', '.join(ALL_MODES)}")
    return mode


def entry_format(config: ModelConfig, mode: str) -> RowFormat:
    """One compressed attention entry (CSA and HCA layers alike)."""
    check_mode(mode)
    nope, rope = config.nope_head_dim, config.rope_head_dim
    if mode == PAPER:
        segments = (Segment("nope", nope, "fp8_e4m3"), Segment("rope", rope, "bf16"))
    elif mode == OFFICIAL_CODE:
        segments = (Segment("kv", config.head_dim, "bf16"),)
    else:
        numerics = get_numerics(mode)
        if numerics.simulate:
            segments = (
                Segment("nope", nope, "fp8_e4m3"),
                Segment("nope_scale", nope // KV_FP8_BLOCK, "e8m0"),
                Segment("rope", rope, _DTYPE_FORMAT[numerics.dtype]),
            )
        else:
            segments = (Segment("kv", config.head_dim, "fp32"),)
    return RowFormat("entry", segments)


def window_row_format(config: ModelConfig, mode: str) -> RowFormat:
    """A window-ring row: the uncompressed KV goes through the same FP8 simulation as compressed entries."""
    return RowFormat("window", entry_format(config, mode).segments)


def indexer_key_format(config: ModelConfig, mode: str) -> RowFormat:
    """One CSA indexer key: all dims are FP4-simulated (after the Hadamard rotation), RoPE dims included."""
    check_mode(mode)
    dims = config.index_head_dim
    if mode == OFFICIAL_CODE:
        segments = (Segment("key", dims, "bf16"),)
    elif mode == PAPER or get_numerics(mode).simulate:
        segments = (Segment("key", dims, "fp4_e2m1"), Segment("key_scale", dims // FP4_BLOCK, "e8m0"))
    else:
        segments = (Segment("key", dims, "fp32"),)
    return RowFormat("indexer_key", segments)


def frontier_start(ratio: int, end: int) -> int:
    """The first position a ratio-``ratio`` compressor's frontier keeps once positions [0, end) are seen: the
    tokens of the window in progress and, for overlapping (ratio-4) windows, the whole previous window, whose
    first halves the next entry pools."""
    return max(end // ratio * ratio - (ratio if overlapping(ratio) else 0), 0)


def frontiers(config: ModelConfig, spec: LayerSpec) -> tuple[Frontier, ...]:
    """The compressors of one layer: none for window-only layers, the attention compressor for HCA, and the
    attention plus the indexer compressor for CSA."""
    if spec.kind is LayerKind.WINDOW:
        return ()
    out = [Frontier(spec.index, "attention", spec.compress_ratio, spec.overlap, config.head_dim)]
    if spec.kind is LayerKind.CSA:
        out.append(Frontier(spec.index, "indexer", spec.compress_ratio, spec.overlap, config.index_head_dim))
    return tuple(out)


def check_block_tokens(block_tokens: int) -> int:
    if block_tokens <= 0 or block_tokens % BLOCK_TOKEN_MULTIPLE:
        raise ValueError(f"block_tokens must be a positive multiple of {BLOCK_TOKEN_MULTIPLE}, got {block_tokens}")
    return block_tokens


def entries_per_block(spec: LayerSpec, block_tokens: int) -> int:
    """Compressed entries (and, for CSA, indexer keys) a layer keeps in one block."""
    check_block_tokens(block_tokens)
    return block_tokens // spec.compress_ratio if spec.compress_ratio else 0


def bytes_per_token(config: ModelConfig, mode: str) -> TokenBytes:
    """Per-token growth of the paged tier, summed over the main layers (the MTP block is window-only)."""
    entry = entry_format(config, mode).nbytes
    key = indexer_key_format(config, mode).nbytes
    csa, keys, hca = Fraction(0), Fraction(0), Fraction(0)
    for spec in config.layers:
        if spec.kind is LayerKind.CSA:
            csa += Fraction(entry, spec.compress_ratio)
            keys += Fraction(key, spec.compress_ratio)
        elif spec.kind is LayerKind.HCA:
            hca += Fraction(entry, spec.compress_ratio)
    return TokenBytes(csa_entries=csa, indexer_keys=keys, hca_entries=hca)


def block_bytes(config: ModelConfig, mode: str, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> BlockBytes:
    """Counted row by row, the way the pool allocates a block (one set of rows per compressed layer)."""
    entry = entry_format(config, mode).nbytes
    key = indexer_key_format(config, mode).nbytes
    csa = keys = hca = 0
    for spec in config.layers:
        rows = entries_per_block(spec, block_tokens)
        if spec.kind is LayerKind.CSA:
            csa += rows * entry
            keys += rows * key
        elif spec.kind is LayerKind.HCA:
            hca += rows * entry
    return BlockBytes(block_tokens=block_tokens, csa_entries=csa, indexer_keys=keys, hca_entries=hca)


def state_bytes_per_sequence(config: ModelConfig, mode: str) -> SequenceState:
    """Window rings of every main layer (window-only ones included) plus every compressor frontier. The MTP
    block's ring is not counted: the engine does not run the MTP block."""
    rows = config.window_size * config.n_layers
    return SequenceState(
        window_rows=rows,
        window_ring=rows * window_row_format(config, mode).nbytes,
        frontiers=sum(f.nbytes for spec in config.layers for f in frontiers(config, spec)),
    )


def blocks_for(context: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> int:
    """Blocks a sequence of ``context`` tokens holds: a block is taken when the first token of its range
    arrives, so that the entries its pending tokens will produce already have a home."""
    check_block_tokens(block_tokens)
    if context < 0:
        raise ValueError(f"context must be non-negative, got {context}")
    return -(-context // block_tokens)


def sequence_bytes(config: ModelConfig, mode: str, context: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> int:
    """Everything the engine allocates for one sequence of ``context`` tokens: fixed state plus its blocks."""
    return (
        state_bytes_per_sequence(config, mode).total
        + blocks_for(context, block_tokens) * block_bytes(config, mode, block_tokens).total
    )


# A long prompt is checkpointed every so many tokens that its checkpoints add at most 1/4 to the bytes of
# the blocks they let a request branch from (a branch then recomputes at most one interval).
CHECKPOINT_OVERHEAD = Fraction(1, 4)


def checkpoint_bytes(config: ModelConfig, mode: str, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> int:
    """What one prefix-cache checkpoint holds beyond the blocks it shares: a state slot, plus a copy of a
    partial last block when it does not end on a block boundary (counted here: the worst case)."""
    return state_bytes_per_sequence(config, mode).total + block_bytes(config, mode, block_tokens).total


def checkpoint_interval(config: ModelConfig, mode: str, step: int) -> int:
    """The default distance between checkpoints inside a long prompt: the smallest multiple of ``step`` (the
    chunk and block grid) at which a checkpoint's state costs at most ``CHECKPOINT_OVERHEAD`` of the
    context it covers."""
    per_token = bytes_per_token(config, mode).total
    state = state_bytes_per_sequence(config, mode).total
    tokens = math.ceil(state / (CHECKPOINT_OVERHEAD * per_token)) if per_token else step
    return max(step, -(-tokens // step) * step)
