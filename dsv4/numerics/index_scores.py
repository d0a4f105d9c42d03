"""The lightning indexer's score matrix, read straight from where each sequence's keys lie.

I[t, e] = Σ_h w[t, h] · ReLU(q_{t,h} · k_e) (spec §5 step 7) for the usable entries e of query t, -inf for the
rest. This is the one dense [queries x entries] product V4 needs, and at long context the largest part of a
decode step: every step scans every key of every sequence. On CPU a compiled kernel
(``csrc/index_scores.cpp``) reads each sequence's keys once, in place in the paged pool, keeps each head's
products in registers and skips a prefill's future entries; each score is one fixed sequence of operations,
so a query's scores do not depend on its batch. Elsewhere (other devices, no compiler) the same formula runs
as torch ops over a gathered copy of the keys, rounding like the official bf16 einsum on that device.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from dsv4.config import FP4_BLOCK
from dsv4.numerics.formats import unpack_fp4_entries
from dsv4.numerics.kernels import ISA, kernel_library
from dsv4.numerics.modes import Numerics

# The kernel's key formats by stored dtype (uint8: FP4 codes with scales).
_KEY_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.uint8: 2}


@dataclass(frozen=True)
class KeyRows:
    """Where one sequence's keys lie: key e is row ``blocks[e // per_block] * per_block + e % per_block`` of
    ``rows``, for e < ``count``: the pool's storage itself (no copy), or a copy laid out as one block. Rows
    are fp32 or bf16 values, or FP4 codes (uint8 [R, c/2], low nibble first) with their e8m0 scales
    (``scales``, uint8 [R, c/32]), as the simulated modes store the keys."""

    rows: torch.Tensor  # [R, c] fp32 or bf16, or [R, c/2] uint8 FP4 codes; contiguous
    blocks: torch.Tensor  # [B] int64
    per_block: int
    count: int
    scales: torch.Tensor | None = None  # [R, c/32] uint8 e8m0, FP4 codes only

    @staticmethod
    def of(keys: torch.Tensor) -> KeyRows:
        """Keys already laid out one after the other ([count, c])."""
        keys = keys.contiguous()
        return KeyRows(keys, torch.zeros(1, dtype=torch.int64, device=keys.device), max(len(keys), 1), len(keys))

    @property
    def dim(self) -> int:
        return self.rows.shape[1] * (2 if self.scales is not None else 1)

    def gather(self, dtype: torch.dtype) -> torch.Tensor:
        """The keys as one [count, c] tensor of values in ``dtype`` (a copy)."""
        e = torch.arange(self.count, device=self.rows.device)
        slots = self.blocks[e // self.per_block] * self.per_block + e % self.per_block
        if self.scales is not None:
            return unpack_fp4_entries(self.rows[slots], self.scales[slots], dtype)
        return self.rows[slots].to(dtype)


def index_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: list[KeyRows],
    queries: list[int],
    usable: torch.Tensor,
    width: int,
    numerics: Numerics,
    isa: str | None = None,
) -> torch.Tensor:
    """Scores [Q, width] in q's dtype of queries q [Q, H, c] with head weights [Q, H]: the first ``queries[i]``
    queries score ``keys[0]``, the next ``queries[1]`` ``keys[1]``, and so on. Entries [0, usable[t]) of query
    t are scored (usable[t] at most that sequence's count), the rest of the row is -inf. bf16 queries round
    as the official bf16 einsum, ReLU, multiply and sum do: each head's product and each weighted term to
    bf16, the sum over heads in fp32 then to bf16. ``isa`` forces the kernel's 'portable' path or the torch
    ops ('torch'), for tests.

    The torch ops (other devices, no compiler) compute the official formula over a gathered copy of each
    sequence's keys; the bf16 einsum then rounds as the device's BLAS does."""
    if len(queries) != len(keys) or sum(queries) != len(q):
        raise ValueError(f"{len(q)} queries, split {queries} over {len(keys)} key sets")
    lib = kernel_library() if q.device.type == "cpu" and isa != "torch" else None
    formats = {_KEY_FORMATS.get(k.rows.dtype) for k in keys if k.count}
    fits = len(formats) <= 1 and None not in formats and (2 not in formats or q.shape[-1] % FP4_BLOCK == 0)
    if lib is not None and fits:
        return _kernel(lib, next(iter(formats), 0), q, weights, keys, queries, usable, width, isa)
    out = torch.full((len(q), width), float("-inf"), dtype=q.dtype, device=q.device)
    lo = 0
    for k, n_q in zip(keys, queries, strict=True):
        hi, n = lo + n_q, min(k.count, width)
        if n_q and n:
            # Batch-invariant numerics pad a short key list: CPU GEMMs round by their column count below 12.
            rows = numerics.pad_rows(k.gather(q.dtype)[:n])
            per_head = torch.einsum("shd,td->sht", q[lo:hi], rows)[..., :n]
            out[lo:hi, :n] = per_head.relu_().mul_(weights[lo:hi].unsqueeze(-1)).sum(dim=1)
        lo = hi
    future = torch.arange(width, device=q.device) >= usable.unsqueeze(1)
    return out.masked_fill_(future, float("-inf"))


def _kernel(
    lib: ctypes.CDLL,
    key_format: int,
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: list[KeyRows],
    queries: list[int],
    usable: torch.Tensor,
    width: int,
    isa: str | None,
) -> torch.Tensor:
    n_q, n_heads, dim = q.shape
    out = torch.empty(n_q, width, dtype=torch.float32)
    if n_q == 0 or width == 0:
        return out.to(q.dtype)
    qf, wf = q.float().contiguous(), weights.float().contiguous()
    member = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor(queries))
    usable = usable.to(torch.int64).contiguous()
    for k in (k for k in keys if k.count):
        if k.rows.dim() != 2 or k.dim != dim or (k.scales is not None and k.scales.shape[1] * FP4_BLOCK != dim):
            raise ValueError(f"keys of dimension {dim} expected, got rows {tuple(k.rows.shape)}")
    rows = [k.rows.contiguous() if k.count else None for k in keys]  # held until the call returns
    scales = [k.scales.contiguous() if k.count and k.scales is not None else None for k in keys]
    base = torch.tensor([r.data_ptr() if r is not None else 0 for r in rows], dtype=torch.int64)
    scale_base = torch.tensor([s.data_ptr() if s is not None else 0 for s in scales], dtype=torch.int64)
    tables = torch.nn.utils.rnn.pad_sequence([k.blocks.to(torch.int64) for k in keys], batch_first=True)
    per_block = torch.tensor([k.per_block for k in keys], dtype=torch.int64)
    count = torch.tensor([k.count for k in keys], dtype=torch.int64)
    # The kernel reads raw memory, so it first checks that each member's table keeps its keys in its rows.
    stored = [min(len(k.rows), len(k.scales) if k.scales is not None else len(k.rows)) for k in keys]
    stored_rows = torch.tensor(stored, dtype=torch.int64)
    status = lib.dsv4_index_scores(
        ISA[isa or "avx512"],
        key_format,
        int(q.dtype == torch.bfloat16),
        qf.data_ptr(),
        wf.data_ptr(),
        member.data_ptr(),
        usable.data_ptr(),
        base.data_ptr(),
        scale_base.data_ptr(),
        tables.data_ptr(),
        per_block.data_ptr(),
        count.data_ptr(),
        stored_rows.data_ptr(),
        n_q,
        n_heads,
        dim,
        len(keys),
        tables.shape[1],
        width,
        out.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"keys {[k.count for k in keys]} in their block tables do not fit {stored} stored rows")
    return out.to(q.dtype)
