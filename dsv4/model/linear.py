"""Linear layers whose state is the checkpoint's own format: FP8 e4m3 + 128x128 e8m0 block scales, FP4 e2m1
packed two per byte + 1x32 e8m0 scales (routed experts), or plain bf16.

The weights are never expanded: FP8/FP4 GEMMs run on the compact tensors (``dsv4.numerics.gemm``, the
official kernels' per-K-block order), so a real checkpoint takes its own bytes in memory. The official
activation quantisation is simulated before them.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.config import FP4_BLOCK, QUANT_BLOCK
from dsv4.model.parallel import SINGLE, WHOLE, ParallelContext, Shard
from dsv4.numerics import gemm
from dsv4.numerics.formats import act_quant
from dsv4.numerics.modes import Numerics


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Linear(nn.Module):
    """y = x·Wᵀ with W stored as in the checkpoint (``fmt``: 'fp8', 'fp4', 'bf16' or 'fp32').

    ``shard`` (from ``tensor_shard``) is the part of the checkpoint's weight this rank holds: a slice of the
    rows (output features: column-parallel, e.g. a rank's heads) or of the columns (input features:
    row-parallel; each rank's output is a partial sum, rounded to the activation dtype and then summed
    across ranks in fp32, the official code's order).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: str,
        numerics: Numerics,
        shard: Shard = WHOLE,
        parallel: ParallelContext = SINGLE,
    ):
        super().__init__()
        if shard.dim == 0:
            out_features = shard.length
        elif shard.dim == 1:
            in_features = shard.length
        self.in_features, self.out_features, self.fmt, self.numerics = in_features, out_features, fmt, numerics
        self.parallel = parallel
        self.partial = shard.dim == 1
        if fmt == "fp8":
            self.weight = _frozen(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
            scale_shape = (-(-out_features // QUANT_BLOCK), -(-in_features // QUANT_BLOCK))
            self.scale = _frozen(torch.empty(scale_shape, dtype=torch.float8_e8m0fnu))
        elif fmt == "fp4":
            self.weight = _frozen(torch.empty(out_features, in_features // 2, dtype=torch.int8))
            self.scale = _frozen(torch.empty(out_features, in_features // FP4_BLOCK, dtype=torch.float8_e8m0fnu))
        elif fmt in ("bf16", "fp32"):
            dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
            self.weight = _frozen(torch.empty(out_features, in_features, dtype=dtype))
        else:
            raise ValueError(f"unknown weight format {fmt!r}")

    @property
    def quantized(self) -> bool:
        return self.fmt in ("fp8", "fp4")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward(x)
        return self.parallel.all_reduce(y) if self.partial else y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # [..., K]: the GEMMs take rows
            return self._forward(x.reshape(-1, x.shape[-1])).unflatten(0, x.shape[:-1])
        if self.quantized:
            # FP8/FP4 GEMM: activations quantised to FP8 in blocks of 128 (simulated), fp32 accumulation,
            # output in the activation dtype.
            if self.numerics.simulate:
                q, s = act_quant(x, QUANT_BLOCK)
                return self.fp32(q.float(), s).to(x.dtype)
            return self.fp32(x.float()).to(x.dtype)
        if x.dtype == torch.float32:
            return self.fp32(x)
        # bf16 weights on bf16 activations: a plain bf16 matmul (fp32 accumulation), as served.
        return self.numerics.linear(x, self.weight)

    def fp32(self, x: torch.Tensor, x_scale: torch.Tensor | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """fp32 x [M, K] (FP8 values with their per-128 scales, or raw with ``x_scale=None``) through the
        weight's ``rows`` (default all; FP8 row slices must start on a 128-row block) -> fp32 [M, rows].

        What the official code computes in fp32 (head, compressors, grouped output projection) and the FP8/FP4
        GEMMs' accumulation, on the compact weight. Batch-invariant numerics pad the rows where the GEMM is
        not row-invariant by itself."""
        m = len(x)
        if self.numerics.batch_invariant and not gemm.row_invariant(x.device):
            x = self.numerics.pad_rows(x)
            x_scale = None if x_scale is None else torch.cat([x_scale, x_scale.new_ones(len(x) - m, x_scale.shape[1])])
        return self._fp32(x, x_scale, rows)[:m]

    def _fp32(self, x: torch.Tensor, x_scale: torch.Tensor | None, rows: slice) -> torch.Tensor:
        weight = self.weight[rows]
        if self.fmt == "fp8":
            start = rows.start or 0
            if start % QUANT_BLOCK:
                raise ValueError(f"FP8 weight rows must start on a {QUANT_BLOCK}-row block, got {start}")
            blocks = slice(start // QUANT_BLOCK, start // QUANT_BLOCK + -(-len(weight) // QUANT_BLOCK))
            return gemm.fp8_linear(x, x_scale, weight, self.scale[blocks])
        if self.fmt == "fp4":
            return gemm.fp4_linear(x, x_scale, weight, self.scale[rows])
        if self.fmt == "bf16":
            return gemm.bf16_linear(x, weight)
        return self.numerics.linear(x, weight)
