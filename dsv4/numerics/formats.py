"""FP8 (e4m3) / FP4 (e2m1) / e8m0 formats and the official kernels' quantisation, emulated bit-exactly.

The released model was trained and served with the TileLang kernels' quantisation (spec §9), so the
``*_sim`` numerics modes must reproduce their roundings exactly: a single flipped rounding cascades through
later layers and MoE routing. Every function here therefore mirrors the kernel arithmetic step by step
(fp32 amax, multiply by the rounded reciprocal, exponent-bit ceil(log2), round-to-nearest-even casts) rather
than an algebraically equivalent shortcut. All scales are powers of two, which is what makes the
dequantise-then-matmul CPU path (``quantized_linear``) equal to the per-block kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

FP8_MAX = 448.0
FP4_MAX = 6.0
# act_quant floors amax so that an all-zero block still gets a finite scale (2^-22 for FP8).
FP8_AMAX_FLOOR = 1e-4
# fp4_act_quant's floor: the smallest amax whose scale is still a normal fp32 number (2^-126).
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
# e2m1 magnitudes indexed by the low three bits of a nibble (bit 3 is the sign).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_WEIGHT_BLOCK = 128
FP4_WEIGHT_BLOCK = 32

_MANTISSA_MASK = (1 << 23) - 1


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """Decode e8m0 scales (``float8_e8m0fnu`` or their raw ``uint8`` bytes) to fp32 2^(b-127)."""
    if s.dtype == torch.uint8:
        s = s.view(torch.float8_e8m0fnu)
    if s.dtype != torch.float8_e8m0fnu:
        raise TypeError(f"expected float8_e8m0fnu or uint8 scales, got {s.dtype}")
    return s.float()


def float_to_e8m0(s: torch.Tensor) -> torch.Tensor:
    """Encode fp32 powers of two as e8m0; exact because e8m0 holds every power of two in 2^-127..2^127."""
    return s.float().to(torch.float8_e8m0fnu)


def pow2_scale(amax: torch.Tensor, max_value: float) -> torch.Tensor:
    """The kernels' ue8m0 scale 2^ceil(log2(amax / max_value)), computed the way the kernels do.

    The kernel multiplies by the fp32-rounded reciprocal (not a division) and reads ceil(log2 v) off v's
    fp32 bits: exponent, plus one if the mantissa is non-zero. The multiply matters when amax / max_value
    lands on a power of two, where the rounded reciprocal can push v just above or below it.
    """
    inv = torch.tensor(1.0 / max_value, dtype=torch.float32)
    v = amax.float() * inv
    bits = v.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & _MANTISSA_MASK) != 0).to(torch.int32)
    return ((exponent + 127) << 23).view(torch.float32)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """View the last dim as [n_blocks, block]; the kernels require it to divide evenly."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the block size {block}")
    return x.reshape(*x.shape[:-1], n // block, block)


def _expand_scales(s: torch.Tensor, block: int) -> torch.Tensor:
    """Broadcast per-block scales [..., n_blocks] back over the elements [..., n_blocks * block]."""
    return s.repeat_interleave(block, dim=-1)


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 activation quantisation per contiguous block of the last dim (spec §9.2).

    Returns (q as float8_e4m3fn with x's shape, fp32 power-of-two scales [..., n_blocks]).
    """
    xb = _blocks(x.float(), block)
    amax = xb.abs().amax(dim=-1).clamp_min(FP8_AMAX_FLOOR)
    s = pow2_scale(amax, FP8_MAX)
    q = (xb / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), s


def fp8_simulate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x rounded through FP8 and back (the kernels' in-place variant), as a new tensor of x's dtype."""
    q, s = act_quant(x, block)
    return (_blocks(q.float(), block) * s.unsqueeze(-1)).reshape(x.shape).to(x.dtype)


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already clamped to ±6) to the e2m1 grid, ties to the even code.

    Within each binade the grid is uniform (step 0.5 below 2, 1 in [2, 4), 2 in [4, 6]), so RNE is
    ``round(|v| / step) * step`` with torch's half-to-even ``round``; the division by a power of two is exact.
    The sign is copied back so that negative values rounding to zero stay -0 as in the hardware cast.
    """
    a = v.abs()
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, v)


def fp4_act_quant(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 (e2m1) quantisation per block of the last dim: (fp32 values on the e2m1 grid, fp32 scales)."""
    xb = _blocks(x.float(), block)
    amax = xb.abs().amax(dim=-1).clamp_min(FP4_AMAX_FLOOR)
    s = pow2_scale(amax, FP4_MAX)
    q = _round_e2m1((xb / s.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX))
    return q.reshape(x.shape), s


def fp4_simulate(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x rounded through FP4 and back (the indexer's in-place simulation), as a new tensor of x's dtype."""
    q, s = fp4_act_quant(x, block)
    return (_blocks(q, block) * s.unsqueeze(-1)).reshape(x.shape).to(x.dtype)


def dequant_fp8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantise an e4m3 weight with 128x128 e8m0 block scales (the edge blocks may be partial)."""
    out_f, in_f = w.shape
    s = e8m0_to_float(scale)
    s = s.repeat_interleave(FP8_WEIGHT_BLOCK, 0)[:out_f].repeat_interleave(FP8_WEIGHT_BLOCK, 1)[:, :in_f]
    return w.float() * s


def _fitting_pow2_scale(amax: torch.Tensor, max_value: float, floor: float) -> torch.Tensor:
    """Smallest power of two s with amax <= max_value * s, exactly.

    ``pow2_scale`` can be one binade off at exact powers of two (rounded reciprocal); the products
    ``max_value * s`` are exact in fp32, so one correction step each way makes the result exact. The
    smallest fitting scale keeps values that are already on the grid exactly representable.
    """
    amax = amax.float().clamp_min(floor)
    s = pow2_scale(amax, max_value)
    s = torch.where(amax > max_value * s, s * 2, s)
    return torch.where(amax <= max_value * (s / 2), s / 2, s)


def quant_fp8_weight(w: torch.Tensor, block: int = FP8_WEIGHT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise an fp32 weight to e4m3 with [ceil(out/block), ceil(in/block)] e8m0 block scales.

    Used to build test checkpoints in the official format; dequant(quant(w)) is exact when w is already
    on the per-block e4m3 grid.
    """
    out_f, in_f = w.shape
    nr, nc = math.ceil(out_f / block), math.ceil(in_f / block)
    padded = F.pad(w.float(), (0, nc * block - in_f, 0, nr * block - out_f))
    tiles = padded.reshape(nr, block, nc, block)
    amax = tiles.abs().amax(dim=(1, 3))
    s = _fitting_pow2_scale(amax, FP8_MAX, FP8_MAX * 2.0**-126)
    q = (tiles / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(nr * block, nc * block)[:out_f, :in_f].contiguous(), float_to_e8m0(s)


def _fp4_table(device: torch.device) -> torch.Tensor:
    """The 16 signed e2m1 values indexed by nibble (bit 3 = sign; code 8 is -0)."""
    mags = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def _decode_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n/2] -> e2m1 values [..., n]; the low nibble is the even element (spec §9.1)."""
    b = packed.view(torch.uint8).long()
    codes = torch.stack([b & 0xF, b >> 4], dim=-1)
    return _fp4_table(packed.device)[codes].reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _encode_nibbles(q: torch.Tensor) -> torch.Tensor:
    """e2m1 grid values [..., n] (fp32, signed zeros preserved) -> uint8 bytes [..., n/2]."""
    mag = q.abs()
    # Index into FP4_VALUES: the grid is 0.5-spaced below 2, then 2, 3, 4, 6.
    idx = torch.where(mag <= 2.0, mag * 2, torch.where(mag <= 4.0, mag + 2, 7.0)).to(torch.uint8)
    codes = idx | (torch.signbit(q).to(torch.uint8) << 3)
    pairs = codes.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def dequant_fp4_weight(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantise an int8-packed e2m1 weight [out, in/2] with per-row, per-32-column e8m0 scales."""
    w = _decode_nibbles(packed)
    return w * _expand_scales(e8m0_to_float(scale), FP4_WEIGHT_BLOCK)


def quant_fp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise an fp32 weight [out, in] to int8-packed e2m1 [out, in/2] with e8m0 scales [out, in/32].

    Used to build test checkpoints; dequant(quant(w)) is exact when w is already on the per-block grid.
    """
    wb = _blocks(w.float(), FP4_WEIGHT_BLOCK)
    s = _fitting_pow2_scale(wb.abs().amax(dim=-1), FP4_MAX, FP4_AMAX_FLOOR)
    q = _round_e2m1((wb / s.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX)).reshape(w.shape)
    return _encode_nibbles(q).view(torch.int8), float_to_e8m0(s)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n * n^-0.5 over the last dim (Sylvester natural order), in fp32, cast back to x's dtype.

    A fast Walsh-Hadamard butterfly: log2(n) stages of pairwise sums and differences, as the library
    kernel does, with the normalisation applied once at the end in fp32.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.reshape(-1, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack([a + b, a - b], dim=2).reshape(-1, n)
        h *= 2
    scale = torch.tensor(n**-0.5, dtype=torch.float32)
    return (y * scale).reshape(x.shape).to(x.dtype)


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    simulate: bool,
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,
) -> torch.Tensor:
    """An FP8/FP4-weight Linear on CPU: fp32 matmul against the dequantised fp32 weight (spec §9.3).

    With power-of-two scales, every activation-weight product is exact in fp32, so dequantise-then-matmul
    equals the kernels' per-K-block scaled partial sums up to fp32 summation order; with ``simulate`` the
    activation first goes through the kernels' FP8 block-128 rounding. ``linear`` is the matmul (the numerics'
    own, which batch-invariant numerics pad).
    """
    xs = fp8_simulate(x, 128).float() if simulate else x.float()
    return linear(xs, weight.float()).to(x.dtype)


def pack_fp8_entries(x: torch.Tensor, nope: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact KV storage: e4m3 bytes + e8m0 scales for the first ``nope`` dims, the RoPE dims as is.

    Quantises with the same block as the KV simulation, so unpacking yields exactly ``fp8_simulate``'s
    values (and re-packing already-simulated values is lossless).
    """
    q, s = act_quant(x[..., :nope], block)
    return q, float_to_e8m0(s), x[..., nope:]


def unpack_fp8_entries(q: torch.Tensor, s: torch.Tensor, rope: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``pack_fp8_entries``: the fp8-simulated non-RoPE dims followed by the RoPE dims."""
    block = q.shape[-1] // s.shape[-1]
    nope = (_blocks(q.float(), block) * e8m0_to_float(s).unsqueeze(-1)).reshape(q.shape).to(dtype)
    return torch.cat([nope, rope.to(dtype)], dim=-1)


def pack_fp4_entries(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact FP4 storage: nibble-packed e2m1 codes (uint8 [..., n/2]) and e8m0 scales [..., n/block]."""
    q, s = fp4_act_quant(x, block)
    return _encode_nibbles(q), float_to_e8m0(s)


def unpack_fp4_entries(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``pack_fp4_entries``: exactly ``fp4_simulate``'s values in ``dtype``."""
    q = _decode_nibbles(packed)
    block = q.shape[-1] // scales.shape[-1]
    return (_blocks(q, block) * e8m0_to_float(scales).unsqueeze(-1)).reshape(q.shape).to(dtype)
