"""GEMMs that run directly on checkpoint-format weights, in the official kernels' accumulation order.

The official ``fp8_gemm`` / ``fp4_gemm`` (spec §9.3) form one fp32 partial sum per K-block (128 columns for
FP8 weights, 32 for FP4 weights), scale it by activation scale x weight scale (both powers of two, so the
scaling is exact) and add it to an fp32 accumulator block by block in increasing k. One fp32 GEMM over the
dequantised weight rounds differently, and an ulp there can flip a bf16 output (issue #15); within a block the
reference's order is its tensor cores' own, so there every implementation picks one. Computing on the compact
weights keeps a real checkpoint's memory at its own size (issue #11): no dense fp32 copy of a weight is kept,
only a bounded scratch of decoded tiles.

All three functions take fp32 activations ``x`` [M, K] and return fp32 [M, N]; rounding to the activation
dtype is the caller's. On CPU they run a C++ kernel (``csrc/lowbit_gemm.cpp``, AVX-512 with a portable
fallback) compiled with torch's extension builder on first use and cached; each output element is then one
fixed sequence of fp32 operations whatever M is, so a row does not depend on its batch (a decode row equals
its prefill row bit for bit). Where the kernel cannot be built (no compiler) the CPU falls back, with one
warning, to the torch path that other devices use: the same per-block order, but each block's sum is a BLAS
product whose rounding may depend on M.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from dsv4.numerics.formats import FP4_VALUES, FP4_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK, e8m0_to_float
from dsv4.numerics.kernels import ISA, kernel_library

# Activations are quantised in blocks of 128 along K whatever the weight format (spec §9.2).
ACT_BLOCK = 128
# Upper bound on the fp32 scratch one torch-path tile may use (dequantised weight rows plus per-block
# partial products), so that memory does not grow with the weight.
SCRATCH_BYTES = 32 << 20

_FMT = {"fp8": 0, "fp4": 1, "bf16": 2}


def _run_kernel(
    lib: ctypes.CDLL,
    fmt: str,
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    n: int,
    isa: str | None = None,
) -> torch.Tensor:
    """Call the compiled kernel on contiguous CPU tensors (ctypes releases the GIL for the call).

    ``isa`` forces 'portable' (tests compare it with AVX-512); by default the kernel runs AVX-512 where the
    CPU has it."""
    x = x.contiguous()
    xs = x_scale.contiguous() if x_scale is not None else None
    w = weight.contiguous()
    ws = scale.contiguous() if scale is not None else None
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    if m and n and k:
        lib.dsv4_gemm(
            _FMT[fmt],
            ISA[isa or "avx512"],
            x.data_ptr(),
            xs.data_ptr() if xs is not None else None,
            w.data_ptr(),
            ws.data_ptr() if ws is not None else None,
            y.data_ptr(),
            m,
            n,
            k,
        )
    elif n:
        y.zero_()
    return y


def _fp4_table(device: torch.device) -> torch.Tensor:
    """The 16 signed e2m1 values indexed by nibble (bit 3 = sign)."""
    mags = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def _check(x: torch.Tensor, x_scale: torch.Tensor | None, k: int) -> None:
    """Shapes and dtypes the kernels rely on; a mismatch here would otherwise read out of bounds."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"x must be fp32 [M, K], got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]}, the weight K={k}")
    if x_scale is not None:
        want = (x.shape[0], -(-k // ACT_BLOCK))
        if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != want:
            raise ValueError(f"x_scale must be fp32 {want}, got {x_scale.dtype} {tuple(x_scale.shape)}")


def _check_scale(scale: torch.Tensor, want: tuple[int, int]) -> None:
    """e8m0 scales (or their raw bytes) of the expected shape: the kernel reads them as bytes."""
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8) or tuple(scale.shape) != want:
        raise ValueError(f"scale must be float8_e8m0fnu {want}, got {scale.dtype} {tuple(scale.shape)}")


def _row_tile(n: int, k: int, m: int, n_blocks: int, align: int) -> int:
    """Weight rows per torch-path tile: a multiple of ``align`` (the weight-scale row block) whose
    dequantised rows and [n_blocks, M, rows] partial sums fit in ``SCRATCH_BYTES``."""
    per_row = 4 * (k + n_blocks * max(m, 1))
    rows = max(align, SCRATCH_BYTES // per_row // align * align)
    return min(rows, -(-n // align) * align)


def _blockwise(
    x: torch.Tensor, block_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block: int
) -> torch.Tensor:
    """Σ_kb (block_scale[:, kb] * w_scale[:, kb]) * (x_kb · w_kbᵀ), accumulated in increasing kb.

    x [M, K], w [Nt, K] unscaled fp32 values, block_scale [M, KB] and w_scale [Nt, KB] with KB = ceil(K/block);
    a partial last block is padded with zeros, which leave an fp32 sum unchanged. The scale product is formed
    first, as the kernel does (Scale_C = s_a * s_b), then multiplies the partial sum.
    """
    m, k = x.shape
    nb = block_scale.shape[1]
    pad = nb * block - k
    xb = F.pad(x, (0, pad)).view(m, nb, block).transpose(0, 1)  # [KB, M, block]
    wb = F.pad(w, (0, pad)).view(len(w), nb, block).permute(1, 2, 0)  # [KB, block, Nt]
    partial = torch.bmm(xb, wb)  # [KB, M, Nt], each an fp32 sum over one block
    partial *= block_scale.t().unsqueeze(2) * w_scale.t().unsqueeze(1)
    acc = torch.zeros(m, len(w), dtype=torch.float32, device=x.device)
    for kb in range(nb):
        acc += partial[kb]
    return acc


def _act_scale(x: torch.Tensor, x_scale: torch.Tensor | None, k: int) -> torch.Tensor:
    if x_scale is not None:
        return x_scale
    return torch.ones(x.shape[0], -(-k // ACT_BLOCK), dtype=torch.float32, device=x.device)


def _fp8_linear_torch(
    x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The per-128-block order in torch ops, over row tiles of the weight (any device)."""
    n, k = weight.shape
    sx = _act_scale(x, x_scale, k)
    sw = e8m0_to_float(scale)
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    tile = _row_tile(n, k, x.shape[0], sx.shape[1], FP8_WEIGHT_BLOCK)
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        rows_scale = sw[n0 // FP8_WEIGHT_BLOCK : -(-n1 // FP8_WEIGHT_BLOCK)].repeat_interleave(FP8_WEIGHT_BLOCK, 0)
        out[:, n0:n1] = _blockwise(x, sx, weight[n0:n1].float(), rows_scale[: n1 - n0], FP8_WEIGHT_BLOCK)
    return out


def _fp4_linear_torch(
    x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The per-32-block order in torch ops, over row tiles of the weight (any device)."""
    n, k = weight.shape[0], weight.shape[1] * 2
    # Each 32-block takes the scale of the 128-block of activations it lies in.
    sx = _act_scale(x, x_scale, k).repeat_interleave(ACT_BLOCK // FP4_WEIGHT_BLOCK, 1)[:, : k // FP4_WEIGHT_BLOCK]
    sw = e8m0_to_float(scale)
    table = _fp4_table(weight.device)
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    tile = _row_tile(n, k, x.shape[0], sx.shape[1], 1)
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        b = weight[n0:n1].view(torch.uint8).long()
        w = table[torch.stack([b & 0xF, b >> 4], dim=-1)].view(n1 - n0, k)
        out[:, n0:n1] = _blockwise(x, sx, w, sw[n0:n1], FP4_WEIGHT_BLOCK)
    return out


def _bf16_linear_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 matmul of the upcast bf16 weight, one bounded row tile at a time."""
    n, k = weight.shape
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    tile = max(1, min(n, SCRATCH_BYTES // (4 * k)))
    for n0 in range(0, n, tile):
        out[:, n0 : n0 + tile] = F.linear(x, weight[n0 : n0 + tile].float())
    return out


def row_invariant(device: torch.device) -> bool:
    """Whether GEMMs on ``device`` compute each row alike whatever the row count: the compiled kernel's do;
    the torch path's BLAS calls do not (batch-invariant numerics pad their rows)."""
    return device.type == "cpu" and kernel_library() is not None


def fp8_linear(
    x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """y = x·Wᵀ for an e4m3 weight [N, K] with e8m0 128x128 block scales [ceil(N/128), ceil(K/128)].

    ``x`` fp32 [M, K] holds the FP8-quantised activation values with per-128-block scales ``x_scale``
    [M, ceil(K/128)] (simulated modes), or raw activations with ``x_scale=None`` (scale 1). Returns fp32
    [M, N]: per-128-block partial sums, scaled and accumulated in increasing k (spec §9.3).
    """
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"weight must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    _check(x, x_scale, k)
    _check_scale(scale, (-(-n // FP8_WEIGHT_BLOCK), -(-k // FP8_WEIGHT_BLOCK)))
    lib = kernel_library() if x.device.type == "cpu" else None
    if lib is not None:
        return _run_kernel(lib, "fp8", x, x_scale, weight, scale, n)
    return _fp8_linear_torch(x, x_scale, weight, scale)


def fp4_linear(
    x: torch.Tensor, x_scale: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """y = x·Wᵀ for an e2m1 weight packed two per byte (int8 [N, K/2], low nibble = even column) with e8m0
    scales [N, K/32].

    ``x``/``x_scale`` as in ``fp8_linear`` (activation scales per 128 columns). Returns fp32 [M, N]:
    per-32-block partial sums, each scaled by its activation and weight scales, accumulated in increasing k.
    """
    if weight.dtype not in (torch.int8, torch.uint8) or weight.dim() != 2:
        raise ValueError(f"weight must be int8 [N, K/2], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape[0], weight.shape[1] * 2
    if k % FP4_WEIGHT_BLOCK:
        raise ValueError(f"FP4 weight K={k} is not a multiple of {FP4_WEIGHT_BLOCK}")
    _check(x, x_scale, k)
    _check_scale(scale, (n, k // FP4_WEIGHT_BLOCK))
    lib = kernel_library() if x.device.type == "cpu" else None
    if lib is not None:
        return _run_kernel(lib, "fp4", x, x_scale, weight, scale, n)
    return _fp4_linear_torch(x, x_scale, weight, scale)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x·Wᵀ for a bf16 weight [N, K] as the official code computes it: fp32 products of the exactly
    upcast weight, fp32 accumulation (head, compressor projections, gate)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise ValueError(f"weight must be bfloat16 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    _check(x, None, weight.shape[1])
    lib = kernel_library() if x.device.type == "cpu" else None
    if lib is not None:
        return _run_kernel(lib, "bf16", x, None, weight, None, weight.shape[0])
    return _bf16_linear_torch(x, weight)
