"""RMSNorm with the official rounding: computed in fp32, rounded once to the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.numerics.modes import PLAIN, Numerics


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        # The checkpoint stores norm weights in bf16; the math multiplies in fp32 (see forward).
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


def head_rms_normalize(q: torch.Tensor, eps: float, numerics: Numerics = PLAIN) -> torch.Tensor:
    """Weightless per-head RMS normalisation of the queries, in q's own dtype.

    The reference squares, averages and multiplies in the activation dtype (bf16 when serving), not in fp32;
    bit parity needs the same (and in bf16, rsqrt's vectorised and scalar code round differently).
    """
    return q * numerics.pointwise(torch.rsqrt, q.square().mean(-1, keepdim=True) + eps)
