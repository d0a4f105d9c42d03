"""mHC: manifold-constrained hyper-connections (hc residual streams mixed by Sinkhorn-normalised matrices).

Around each sub-layer (attention, MoE) ``hc_pre`` collapses the streams into the sub-layer's input and
``hc_post`` writes its output back while mixing the streams; ``hc_head`` collapses them before the head.
All mixing is fp32. Functions, not modules: the parameters live on the block under the checkpoint's names.
"""

from __future__ import annotations

import torch

from dsv4.numerics.modes import PLAIN, Numerics


def sinkhorn_split(
    mixes: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc: int,
    iters: int,
    eps: float,
    numerics: Numerics = PLAIN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the [..., (2+hc)·hc] mixing logits into pre [.., hc], post [.., hc] and comb [.., hc, hc].

    The order is the reference kernel's: one row softmax (+eps), one column normalisation, then
    (iters-1) x (row, column) normalisations, eps added to every sum; it ends column-normalised.
    """
    pre = numerics.pointwise(torch.sigmoid, mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * numerics.pointwise(torch.sigmoid, mixes[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    comb = (mixes[..., 2 * hc :] * scale[2] + base[2 * hc :]).unflatten(-1, (hc, hc))
    # exp(c - max) / sum written out: torch.softmax's fused kernel differs from the reference by an ulp
    comb = (comb - comb.amax(dim=-1, keepdim=True)).exp()
    return pre, post, _normalize(comb, iters, eps)


def _sinkhorn_iterations(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The normalisations of ``sinkhorn_split`` on exp'd logits [n, hc, hc]: only adds, sums of hc terms
    and divisions, each correctly rounded, so any order-preserving compilation gives the same bits."""
    comb = comb / comb.sum(dim=-1, keepdim=True) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


# Eager, the iterations are ~6·iters tiny ops per call, 20 calls per decode step - the largest share of a
# step's op count. Inductor fuses them into one loop. Compiled with static shapes only: its dynamic-shape
# code rounds differently (and its exp differs from eager's, so exp stays outside). Row counts up to
# COMPILED_ROWS (decode batches) are padded to a power of two so at most a handful of graphs exist; longer
# inputs (prefill) are few per step and stay eager. Rows are independent, so padding changes no bits.
COMPILED_ROWS = 16
_compiled_iterations = torch.compile(_sinkhorn_iterations, dynamic=False, fullgraph=True)
# Dynamo guards its graphs on the torch thread count, so a process that changes it (benchmarks/tp.py gives
# each rank count its share of the cores) needs the five graphs again per count; past the default limit of
# 8 a fullgraph compile fails outright. Room for a dozen thread counts.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


@torch.inference_mode()
def compile_decode_batches(hc: int, iters: int, eps: float) -> None:
    """Compile the loop now for every padded decode batch (1, 2, 4 ... ``COMPILED_ROWS`` rows), as the
    forward calls it (inference mode, fp32 on CPU), so that no request's first decode waits for it: seconds
    per batch size with a cold inductor cache."""
    rows = 1
    while rows <= COMPILED_ROWS:
        _normalize(torch.ones(rows, hc, hc), iters, eps)
        rows *= 2


def _normalize(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    n = comb.shape[0] if comb.dim() == 3 else 0
    # With Dynamo switched off (TORCH_COMPILE_DISABLE=1, a debugging habit) a fullgraph compile raises
    # instead of running eagerly; the eager loop gives the same bits.
    eager = torch._dynamo.config.disable or comb.device.type != "cpu"
    if comb.dim() != 3 or n == 0 or n > COMPILED_ROWS or eager:
        return _sinkhorn_iterations(comb, iters, eps)
    rows = 1 << (n - 1).bit_length()
    if rows != n:
        comb = torch.cat([comb, comb.new_ones(rows - n, *comb.shape[1:])])
    return _compiled_iterations(comb, iters, eps)[:n]


def _normalized_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float, numerics: Numerics) -> torch.Tensor:
    """x [n, hc, d] -> fp32 mixing logits; the RMS factor is applied after the projection, as the reference."""
    flat = x.flatten(-2).float()
    rsqrt = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return numerics.linear(flat, fn) * rsqrt


def hc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    iters: int,
    hc_eps: float,
    norm_eps: float,
    numerics: Numerics = PLAIN,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, hc, d] -> (collapsed sub-layer input [n, d] in x's dtype, post [n, hc], comb [n, hc, hc])."""
    mixes = _normalized_mixes(x, fn, norm_eps, numerics)
    pre, post, comb = sinkhorn_split(mixes, scale, base, x.shape[-2], iters, hc_eps, numerics)
    collapsed = torch.sum(pre.unsqueeze(-1) * x.float(), dim=-2)
    return collapsed.to(x.dtype), post, comb


def hc_post(out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New stream k = post_k·out + Σ_j comb[j, k]·residual_j, in fp32, rounded to out's dtype."""
    carried = torch.sum(comb.unsqueeze(-1) * residual.unsqueeze(-2), dim=-3)
    return (post.unsqueeze(-1) * out.unsqueeze(-2) + carried).to(out.dtype)


def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_eps: float,
    norm_eps: float,
    numerics: Numerics = PLAIN,
) -> torch.Tensor:
    """Collapse the streams before the final norm: sigmoid weights, no Sinkhorn, no post."""
    mixes = _normalized_mixes(x, fn, norm_eps, numerics)
    pre = numerics.pointwise(torch.sigmoid, mixes * scale + base) + hc_eps
    return torch.sum(pre.unsqueeze(-1) * x.float(), dim=-2).to(x.dtype)
