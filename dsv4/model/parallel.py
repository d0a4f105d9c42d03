"""Tensor/expert-parallel placement: which slice of each checkpoint tensor a rank owns, and the collectives.

The layout is the official code's (convert.py, spec §9.5): the vocabulary of ``embed`` and ``head``, the query
heads (``wq_b``, ``attn_sink``), the output groups (``wo_a`` rows, ``wo_b`` columns) and the indexer heads
(``indexer.wq_b``, ``indexer.weights_proj``) are split evenly in contiguous slices; routed experts are owned
in contiguous ranges; everything else (the low-rank ``wq_a``, the one shared KV head, norms, compressors,
router, shared expert, mHC, MTP's own projections) is replicated. :func:`tensor_shard` is the only place that
says so: the layers size themselves by it and the loader reads by it.

Every rank runs the same forward on the same tokens; the layers meet in the collectives below, on the
default ``torch.distributed`` process group (gloo on CPU, NCCL on GPUs), which the caller initialises. With
one rank nothing touches ``torch.distributed``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsv4.config import QUANT_BLOCK, ModelConfig


@dataclass(frozen=True)
class Shard:
    """The part of a checkpoint tensor one rank holds: ``[start, start + length)`` of dimension ``dim`` (whose
    size in the whole tensor is ``full``), or the whole tensor when ``dim`` is None."""

    dim: int | None = None
    start: int = 0
    length: int = 0
    full: int = 0

    def shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The rank's shape of a tensor whose whole shape is ``full_shape``."""
        if self.dim is None:
            return tuple(full_shape)
        return (*full_shape[: self.dim], self.length, *full_shape[self.dim + 1 :])

    def span(self, full: int) -> range:
        """The indices of the split dimension (of size ``full``) this rank holds."""
        return range(full) if self.dim is None else range(self.start, self.start + self.length)

    def index(self) -> tuple[slice, ...]:
        """What to index the whole tensor (or a safetensors slice) with to get the rank's part."""
        if self.dim is None:
            return ()
        return (*(slice(None),) * self.dim, slice(self.start, self.start + self.length))


WHOLE = Shard()


@dataclass(frozen=True)
class ParallelContext:
    """This process's place among ``world_size`` ranks; ``rank`` 0 of 1 is a plain single-process model."""

    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")

    def owned_experts(self, n_experts: int) -> range:
        """The contiguous range of routed experts this rank holds and runs. The ranges differ by at most one
        expert (10 on 4 ranks: 3, 3, 2, 2), so an expert count the world size does not divide still splits."""
        base, extra = divmod(n_experts, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum every rank's partial ``x`` in fp32 and return it in ``x``'s dtype: row-parallel outputs (already
        rounded per rank to the activation dtype, as the official code does), routed-expert sums, indexer
        scores, embedding rows. ``x`` is the caller's to give away: an fp32 ``x`` is reduced in place."""
        if self.world_size == 1:
            return x
        y = x.float()
        dist.all_reduce(y)
        return y.to(x.dtype)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` [..., n] concatenated in rank order along the last dimension (the vocabulary
        slices of the logits), on every rank."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()


@dataclass(frozen=True)
class _Split:
    """A tensor split along ``dim`` into ``config.<units>`` equal units of ``width`` rows or columns each
    (``width`` None: 1), whole units per rank. ``quantized``: an FP8 weight when ``config.weight_dtype`` is
    fp8, whose 128x128 block scales must split along with it."""

    dim: int
    units: str
    width: str | None = None
    quantized: bool = False


# What convert.py splits, by name inside the model or a block (``layers.{i}.`` / ``mtp.{i}.`` removed, and a
# Linear's ``.weight`` / ``.scale`` suffix). Everything not named here, and not a routed expert, is replicated.
_SPLITS: dict[str, _Split] = {
    "embed": _Split(0, "vocab_size"),
    "head": _Split(0, "vocab_size"),
    "attn.attn_sink": _Split(0, "n_heads"),
    "attn.wq_b": _Split(0, "n_heads", "head_dim", quantized=True),
    "attn.wo_a": _Split(0, "o_groups", "o_lora_rank", quantized=True),
    "attn.wo_b": _Split(1, "o_groups", "o_lora_rank", quantized=True),
    "attn.indexer.wq_b": _Split(0, "index_n_heads", "index_head_dim", quantized=True),
    "attn.indexer.weights_proj": _Split(0, "index_n_heads"),
}
_BLOCK_PREFIX = re.compile(r"(layers|mtp)\.\d+\.")
_EXPERT = re.compile(r"ffn\.experts\.(\d+)\.")


def tensor_shard(name: str, config: ModelConfig, parallel: ParallelContext) -> Shard | None:
    """What of checkpoint tensor ``name`` rank ``parallel.rank`` holds: a :class:`Shard` (``WHOLE`` when
    replicated), or None for a routed expert another rank owns.

    Raises ``ValueError`` naming the config field when a split cannot be made: a unit count (heads, output
    groups, vocabulary) the world size does not divide, or an FP8 weight whose per-rank rows or columns do
    not fill whole 128-wide scale blocks.
    """
    if parallel.world_size == 1:
        return WHOLE
    local = _BLOCK_PREFIX.sub("", name, count=1)
    expert = _EXPERT.match(local)
    if expert:  # another rank's expert is not held; a number past the last expert is left to the strict checks
        e, n_experts = int(expert.group(1)), config.n_routed_experts
        return None if e < n_experts and e not in parallel.owned_experts(n_experts) else WHOLE
    is_scale = local.endswith(".scale")
    split = _SPLITS.get(local.removesuffix(".weight").removesuffix(".scale"))
    if split is None:
        return WHOLE
    n = parallel.world_size
    units = getattr(config, split.units)
    if units % n:
        raise ValueError(
            f"{split.units} = {units} is not divisible by the tensor-parallel world size {n}: "
            f"{name} is split by it (as the official convert.py does)"
        )
    width = getattr(config, split.width) if split.width else 1
    length, full = units // n * width, units * width
    if split.quantized and config.weight_dtype == "fp8":
        if length % QUANT_BLOCK:
            what = "rows" if split.dim == 0 else "columns"
            raise ValueError(
                f"{name}: each of {n} ranks would hold {length} {what} of an FP8 weight, not whole "
                f"{QUANT_BLOCK}-wide scale blocks ({split.units} = {units}, {width} {what} each)"
            )
        if is_scale:
            length, full = length // QUANT_BLOCK, math.ceil(full / QUANT_BLOCK)
    return Shard(split.dim, parallel.rank * length, length, full)


def shard_of(name: str, config: ModelConfig, parallel: ParallelContext) -> Shard:
    """:func:`tensor_shard` of a tensor every rank holds some part of (anything but a routed expert): what a
    layer sizes its parameters by."""
    shard = tensor_shard(name, config, parallel)
    if shard is None:
        raise ValueError(f"{name} is a routed expert of another rank, not a tensor every rank holds")
    return shard
