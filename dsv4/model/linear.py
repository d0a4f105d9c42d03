"""Linear layers whose state is the checkpoint's own format: FP8 e4m3 + 128x128 e8m0 block scales, FP4 e2m1
packed two per byte + 1x32 e8m0 scales (routed experts), or plain bf16.

On CPU the weights are dequantised exactly once (FP8/FP4 values times power-of-two scales are exact in fp32)
and the official activation quantisation is simulated before the matmul; the reference measured that this
equals its per-block FP8 kernels bit for bit in bf16 and to 4e-6 in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.config import FP4_BLOCK, QUANT_BLOCK
from dsv4.model.parallel import SINGLE, ParallelContext
from dsv4.numerics.formats import dequant_fp4_weight, dequant_fp8_weight, quantized_linear
from dsv4.numerics.modes import Numerics


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Linear(nn.Module):
    """y = x·Wᵀ with W stored as in the checkpoint (``fmt``: 'fp8', 'fp4', 'bf16' or 'fp32')."""

    def __init__(self, in_features: int, out_features: int, fmt: str, numerics: Numerics):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.numerics = in_features, out_features, fmt, numerics
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
        self._dense: dict[torch.dtype, torch.Tensor] = {}

    @property
    def quantized(self) -> bool:
        return self.fmt in ("fp8", "fp4")

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense [out, in] tensor of ``dtype`` (exact for fp32; cached until reload)."""
        if dtype not in self._dense:
            if self.fmt == "fp8":
                w = dequant_fp8_weight(self.weight, self.scale)
            elif self.fmt == "fp4":
                w = dequant_fp4_weight(self.weight, self.scale)
            else:
                w = self.weight
            self._dense[dtype] = w.to(dtype).contiguous()
        return self._dense[dtype]

    def drop_cache(self) -> None:
        self._dense.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            # FP8/FP4 GEMM: activations quantised to FP8 in blocks of 128 (simulated), fp32 accumulation,
            # output in the activation dtype.
            return quantized_linear(x, self.dense(), self.numerics.simulate, self.numerics.linear)
        # bf16 weights run as a plain matmul in the activation dtype (bf16 when serving, fp32 otherwise).
        return self.numerics.linear(x, self.dense(x.dtype))


class ColumnParallelLinear(Linear):
    """Output features split across ranks (query heads, indexer heads, output groups)."""

    def __init__(
        self, in_features: int, out_features: int, fmt: str, numerics: Numerics, parallel: ParallelContext = SINGLE
    ):
        super().__init__(in_features, parallel.shard(out_features, "output features"), fmt, numerics)


class RowParallelLinear(Linear):
    """Input features split across ranks; partial outputs are summed in fp32."""

    def __init__(
        self, in_features: int, out_features: int, fmt: str, numerics: Numerics, parallel: ParallelContext = SINGLE
    ):
        super().__init__(parallel.shard(in_features, "input features"), out_features, fmt, numerics)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(super().forward(x))
