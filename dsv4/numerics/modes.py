"""Numerics modes, chosen at load time and named as in the reference vectors' manifest.

* ``bf16_official`` - the official dtype policy: bf16 activations, fp32 where the official code computes in
  fp32 (norms, compressors, router, mHC, MoE accumulation, head), with the FP8/FP4 quantisation simulation.
  The default for official checkpoints: it is what the released model was trained (QAT) and served with.
* ``fp32_sim`` - fp32 activations with the same quantisation simulation.
* ``fp32_nosim`` - fp32 everywhere, weights dequantised, no simulation: what transformers' DeepseekV4 computes.

Any mode can also be *batch-invariant*: each token row is then computed exactly as it would be in any other
batch, so a sequence's logits do not depend on what it is batched with (see ``Numerics.linear``). The price
is padded small GEMMs, and a decode step no longer rounds as the reference's one-row GEMMs do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# CPU BLAS (MKL) picks its sgemm kernel, and so each row's summation order, by the number of rows below a
# threshold: 4 with one thread, 12 with two on the development machine (every row count from there up to
# 4096 rounds alike, for all the model's shapes). Batch-invariant numerics pad up to this many rows, and
# ``check_batch_invariance`` verifies the threshold on the machine at hand.
INVARIANT_ROWS = 16
# Elementwise ops whose vectorised body and scalar tail round differently on CPU (sigmoid, softplus, silu,
# bf16 rsqrt; exp and fp32 sqrt/rsqrt agree) give an element different bits depending on where the tensor
# ends. Batch-invariant numerics run them on whole multiples of this many elements.
INVARIANT_ELEMENTS = 64


@dataclass(frozen=True)
class Numerics:
    name: str
    dtype: torch.dtype  # activation dtype between ops
    simulate: bool  # FP8 activation quantisation before FP8/FP4 GEMMs, FP8 KV rounding, FP4 indexer rounding
    batch_invariant: bool = False  # every row computed alike whatever the batch (padded GEMMs, whole blocks)

    def pad_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, ...] with zero rows appended up to ``INVARIANT_ROWS`` when batch-invariant; the caller keeps
        the first M rows of what it computes from it."""
        if not self.batch_invariant or len(x) >= INVARIANT_ROWS:
            return x
        return torch.cat([x, x.new_zeros(INVARIANT_ROWS - len(x), *x.shape[1:])])

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [M, K] · weightᵀ, each row rounded independently of M when batch-invariant.

        bf16 GEMMs then run as the fp32 GEMM of their exact upcasts, rounded once to bf16 (what a bf16 GEMM
        with fp32 accumulation computes, in another order): on CPUs with AMX, oneDNN's bf16 kernels tile the
        rows by counts up to several hundred, so no padding makes them invariant."""
        if not self.batch_invariant:
            return F.linear(x, weight)
        if x.dtype == torch.bfloat16:
            return F.linear(self.pad_rows(x).float(), weight.float())[: len(x)].to(torch.bfloat16)
        return F.linear(self.pad_rows(x), weight)[: len(x)]

    def pointwise(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn(x) for an elementwise ``fn``, each element rounded independently of x's size when batch-invariant."""
        pad = -x.numel() % INVARIANT_ELEMENTS
        if not self.batch_invariant or pad == 0:
            return fn(x)
        flat = x.reshape(-1)
        return fn(torch.cat([flat, flat.new_zeros(pad)]))[: len(flat)].view(x.shape)


MODES: dict[str, Numerics] = {
    "bf16_official": Numerics("bf16_official", torch.bfloat16, True),
    "fp32_sim": Numerics("fp32_sim", torch.float32, True),
    "fp32_nosim": Numerics("fp32_nosim", torch.float32, False),
}
DEFAULT_MODE = "bf16_official"
PLAIN = MODES["fp32_nosim"]  # for the functions that take numerics only to be batch-invariant


def check_batch_invariance(shapes: Iterable[tuple[int, int]], max_out: int = 1024) -> None:
    """Raise ValueError (a setting this machine cannot honour; the CLI reports it as such) unless its GEMMs
    round each row alike for every row count from ``INVARIANT_ROWS`` up, at the current thread count, for
    the given (in, out) ``shapes`` (out capped at ``max_out`` to keep the probe cheap for real checkpoints),
    in fp32 (batch-invariant bf16 GEMMs run in fp32: ``Numerics.linear``)."""
    g = torch.Generator().manual_seed(0)
    for k, n in sorted(set(shapes)):
        for dtype in (torch.float32,):
            w = torch.randn(min(n, max_out), k, generator=g).to(dtype)
            x = torch.randn(64, k, generator=g).to(dtype)
            full = F.linear(x, w)
            for m in (INVARIANT_ROWS, INVARIANT_ROWS + 3, 33):
                if not torch.equal(F.linear(x[:m], w), full[:m]):
                    raise ValueError(
                        f"batch invariance does not hold on this machine: a {k}x{n} {dtype} GEMM rounds a row "
                        f"differently with {m} rows than with 64 at {torch.get_num_threads()} threads; "
                        f"try fewer threads (torch.set_num_threads)"
                    )


def get_numerics(name: str | Numerics) -> Numerics:
    if isinstance(name, Numerics):
        return name
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown numerics mode {name!r}; choose one of {', '.join(MODES)}") from None
