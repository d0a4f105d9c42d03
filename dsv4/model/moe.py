"""The MoE: sqrtsoftplus router (hash routing through ``tid2eid`` in the first layers), routed SwiGLU experts
with FP4 weights, one shared expert, all accumulated in fp32.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import LayerSpec, ModelConfig
from dsv4.model.linear import Linear
from dsv4.model.parallel import SINGLE, ParallelContext
from dsv4.numerics import gemm
from dsv4.numerics.modes import Numerics


class Gate(nn.Module):
    """Scores every expert in fp32; the bias (score-routed layers) only chooses, it never weights."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, numerics: Numerics):
        super().__init__()
        self.numerics = numerics
        self.topk, self.route_scale = config.n_activated_experts, config.route_scale
        self.weight = nn.Parameter(
            torch.empty(config.n_routed_experts, config.dim, dtype=torch.bfloat16), requires_grad=False
        )
        self.hash_routed = spec.hash_routed
        if self.hash_routed:
            self.tid2eid = nn.Parameter(
                torch.empty(config.vocab_size, self.topk, dtype=torch.int64), requires_grad=False
            )
        else:
            self.bias = nn.Parameter(torch.empty(config.n_routed_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, d] -> (routing weights [n, k] fp32, expert ids [n, k])."""
        xf = x.float() if gemm.row_invariant(x.device) else self.numerics.pad_rows(x.float())
        logits = gemm.bf16_linear(xf, self.weight)[: len(x)]
        scores = self.numerics.pointwise(F.softplus, logits).sqrt()
        if self.hash_routed:
            experts = self.tid2eid[token_ids]
        else:
            experts = (scores + self.bias).topk(self.topk, dim=-1)[1]
        weights = scores.gather(1, experts)
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.route_scale
        return weights, experts


class Expert(nn.Module):
    """SwiGLU with V4's clamp: up clamped to ±limit, gate capped at +limit; fp32 in the middle.

    The routing weight multiplies the hidden activation *before* the down projection, so it changes what
    the FP8 quantisation of w2's input sees; the reference does it this way and so do we.
    """

    def __init__(self, dim: int, inter_dim: int, fmt: str, numerics: Numerics, swiglu_limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fmt, numerics)
        self.w2 = Linear(inter_dim, dim, fmt, numerics)
        self.w3 = Linear(dim, inter_dim, fmt, numerics)
        self.swiglu_limit, self.numerics = swiglu_limit, numerics

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = self.w1(x).float(), self.w3(x).float()
        if self.swiglu_limit > 0:
            up = torch.clamp(up, min=-self.swiglu_limit, max=self.swiglu_limit)
            gate = torch.clamp(gate, max=self.swiglu_limit)
        hidden = self.numerics.pointwise(F.silu, gate) * up
        if weight is not None:
            hidden = weight * hidden
        return self.w2(hidden.to(x.dtype))


class MoE(nn.Module):
    """Router and shared expert replicated; under expert parallelism a rank holds and runs a contiguous range
    of the routed experts, and the ranks' fp32 sums are added together."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, numerics: Numerics, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.n_experts, self.parallel = config.n_routed_experts, parallel
        self.owned = parallel.owned_experts(config.n_routed_experts)
        self.gate = Gate(config, spec, numerics)
        limit = config.swiglu_limit
        self.experts = nn.ModuleList(
            Expert(config.dim, config.moe_inter_dim, config.expert_dtype, numerics, limit) if e in self.owned else None
            for e in range(config.n_routed_experts)
        )
        self.shared_experts = Expert(config.dim, config.moe_inter_dim, config.weight_dtype, numerics, limit)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x [n, d]; experts accumulate into fp32 in increasing expert order (the reference's order).

        The (token, expert) pairs are sorted by expert once (stably: tokens in order within an expert), so
        each expert runs on a slice, and one index_add_ adds every output: it adds in source order, which is
        increasing expert order for every token, as expert-by-expert accumulation does."""
        weights, experts = self.gate(x, token_ids)
        pairs = experts.flatten()
        order = torch.argsort(pairs, stable=True)
        counts = torch.bincount(pairs, minlength=self.n_experts).tolist()
        first = [0, *itertools.accumulate(counts)]
        owned = slice(first[self.owned.start], first[self.owned.stop])
        rows = order[owned] // experts.shape[1]
        inputs, scales = x[rows], weights.flatten()[order[owned], None]
        outputs = []
        for e in self.owned:
            lo, hi = first[e] - owned.start, first[e + 1] - owned.start
            if lo < hi:
                outputs.append(self.experts[e](inputs[lo:hi], scales[lo:hi]))
        y = torch.zeros_like(x, dtype=torch.float32)
        if outputs:
            y.index_add_(0, rows, torch.cat(outputs).float())
        y = self.parallel.all_reduce(y)
        y += self.shared_experts(x)
        return y.to(x.dtype)
