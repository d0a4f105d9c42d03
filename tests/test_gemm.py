"""GEMMs on checkpoint-format weights (dsv4.numerics.gemm): exact against an emulation of their arithmetic,
close to float64 and to dequantise-then-matmul, row-invariant, and with a working torch fallback.

The kernel's contract (csrc/lowbit_gemm.cpp) is one fixed sequence of fp32 operations per output element: per
K-block a chain p = +0, p = fma(x[k], w[k], p) in increasing k, then acc = fma(p, s_x * s_w, acc) block by
block (bf16: one chain over all of K). ``emulate`` replays exactly that sequence in torch with an exact fp32
FMA (float64 product and sum, rounded to odd, then to fp32), so the kernel must match it bit for bit, in every
mode (simulated FP8 activations or raw fp32 ones, subnormals included). Against float64 and against the
dequantised fp32 matmul, which sum in other orders, the test allows the textbook bound for recursive fp32
summation, (terms + 2) * 2^-24 * sum |x w s|.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsv4.numerics import formats as Q
from dsv4.numerics import gemm, kernels

REFERENCE_KERNELS = Path(__file__).parent / "data" / "reference" / "kernels.safetensors"
BOUNDARY_KERNELS = Path(__file__).parents[2] / "shared" / "testvectors" / "decode_boundaries" / "kernels.safetensors"
U = 2.0**-24


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    """Build (or load) the kernel once; the tests below then exercise it, not the fallback."""
    if kernels.kernel_library() is None:
        pytest.fail("the GEMM kernel did not build on this machine")


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    diff = bits(a) != bits(b)
    assert not diff.any(), f"{int(diff.sum())} elements differ, max |diff| {(a - b).abs().max().item()}"


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """IEEE fp32 fused multiply-add, exactly: a*b is exact in float64, TwoSum gives the float64 sum's error,
    rounding to odd keeps it as a sticky bit, and 53 >= 24 + 2 bits make the final rounding correct."""
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)
    sb = s.view(torch.int64)
    odd = (err != 0) & (sb & 1 == 0)
    toward = torch.where((err > 0) == (s > 0), 1, -1)
    return torch.where(odd, sb + toward, sb).view(torch.float64).float()


def emulate(
    x: torch.Tensor, sx: torch.Tensor | None, w: torch.Tensor, sw: torch.Tensor | None, block: int
) -> torch.Tensor:
    """The kernel's arithmetic. x [M, K], w [N, K] unscaled fp32 values, sx [M, ceil(K/128)] or None,
    sw [N, ceil(K/block)] per output row (None: bf16, one chain over all of K)."""
    m, k = x.shape
    n = w.shape[0]
    acc = torch.zeros(m, n)
    for b0 in range(0, k, block):
        part = torch.zeros(m, n)
        for kk in range(b0, min(k, b0 + block)):
            part = fma32(x[:, kk : kk + 1].expand(m, n), w[:, kk].expand(m, n), part)
        if sw is None:
            return part
        s_x = sx[:, b0 // 128] if sx is not None else torch.ones(m)
        acc = fma32(part, s_x[:, None] * sw[:, b0 // block][None, :], acc)
    return acc


def float64_reference(x, sx, w, sw, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block sums in float64 and the bound's sum |x w s| (both [M, N])."""
    m, k = x.shape
    ref = torch.zeros(m, w.shape[0], dtype=torch.float64)
    mag = torch.zeros_like(ref)
    for b0 in range(0, k, block):
        xb, wb = x[:, b0 : b0 + block].double(), w[:, b0 : b0 + block].double()
        s = (sx[:, b0 // 128].double()[:, None] if sx is not None else 1.0) * (
            sw[:, b0 // block].double()[None, :] if sw is not None else 1.0
        )
        ref += (xb @ wb.T) * s
        mag += (xb.abs() @ wb.abs().T) * s
    return ref, mag


# --- operands ------------------------------------------------------------------------------------------------


def fp8_operands(n: int, k: int, g: torch.Generator, edge: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite e4m3 code (zeros, -0, subnormals, ±448) at random, and e8m0 block scales."""
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # no NaN
    scale = torch.randint(110, 135, (-(-n // 128), -(-k // 128)), generator=g, dtype=torch.int32).to(torch.uint8)
    if edge:
        scale.view(-1)[0] = 0  # 2^-127: a subnormal scale
        scale.view(-1)[-1] = 250
    return codes.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu)


def fp4_operands(n: int, k: int, g: torch.Generator, edge: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every e2m1 nibble (8 is -0) at random, and e8m0 scales per 32 columns."""
    packed = torch.randint(-128, 128, (n, k // 2), generator=g, dtype=torch.int32).to(torch.int8)
    scale = torch.randint(110, 140, (n, k // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    if edge:
        scale.view(-1)[0] = 0
        scale.view(-1)[-1] = 250
    return packed, scale.view(torch.float8_e8m0fnu)


def activations(m: int, k: int, simulate: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simulated: FP8 values and their per-128 scales (one all-zero block, so the 2^-22 floor appears).
    Raw: fp32 with zeros, -0, subnormals and a wide range of magnitudes."""
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-8, 8, (m, k), generator=g).float())
    x[:, :3] = torch.tensor([0.0, -0.0, 1e-40])
    if not simulate:
        return x, None
    x[0, : min(k, 128)] = 0.0
    padded = F.pad(x, (0, -k % 128))
    q, s = Q.act_quant(padded, 128)
    return q.float()[:, :k].contiguous(), s


def fp8_values(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled weight values [N, K] and the scale of each (row, K-block) [N, KB]."""
    n = weight.shape[0]
    return weight.float(), Q.e8m0_to_float(scale).repeat_interleave(128, 0)[:n]


def fp4_values(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ones = torch.full_like(scale.view(torch.uint8), 127).view(torch.float8_e8m0fnu)
    return Q.dequant_fp4_weight(packed, ones), Q.e8m0_to_float(scale)


# --- exactness -------------------------------------------------------------------------------------------------

FP8_SHAPES = [(1, 300, 200), (3, 129, 384), (17, 256, 130), (300, 40, 160), (2, 17, 64), (4, 70, 520), (16, 50, 256)]
FP4_SHAPES = [(1, 300, 256), (3, 129, 96), (17, 40, 160), (300, 24, 128), (4, 33, 64), (2, 70, 512), (9, 40, 224)]
ISAS = ["avx512", "portable"] if kernels.kernel_isa() == "avx512" else ["portable"]


@pytest.mark.parametrize("simulate", [True, False], ids=["sim", "raw"])
@pytest.mark.parametrize("m,n,k", FP8_SHAPES)
def test_fp8_matches_the_emulated_order_exactly(m: int, n: int, k: int, simulate: bool) -> None:
    g = torch.Generator().manual_seed(m * n + k)
    weight, scale = fp8_operands(n, k, g, edge=not simulate)
    x, sx = activations(m, k, simulate, g)
    expected = emulate(x, sx, *fp8_values(weight, scale), 128)
    for isa in ISAS:
        assert_bits_equal(gemm._run_kernel(kernels.kernel_library(), "fp8", x, sx, weight, scale, n, isa), expected)
    assert_bits_equal(gemm.fp8_linear(x, sx, weight, scale), expected)


@pytest.mark.parametrize("simulate", [True, False], ids=["sim", "raw"])
@pytest.mark.parametrize("m,n,k", FP4_SHAPES)
def test_fp4_matches_the_emulated_order_exactly(m: int, n: int, k: int, simulate: bool) -> None:
    g = torch.Generator().manual_seed(m * n + k + 1)
    packed, scale = fp4_operands(n, k, g, edge=not simulate)
    x, sx = activations(m, k, simulate, g)
    expected = emulate(x, sx, *fp4_values(packed, scale), 32)
    for isa in ISAS:
        assert_bits_equal(gemm._run_kernel(kernels.kernel_library(), "fp4", x, sx, packed, scale, n, isa), expected)
    assert_bits_equal(gemm.fp4_linear(x, sx, packed, scale), expected)


@pytest.mark.parametrize("m,n,k", [(1, 300, 256), (3, 129, 333), (17, 40, 200), (300, 20, 96), (5, 33, 31)])
def test_bf16_is_one_fp32_chain_per_output(m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(m + n + k)
    weight = (torch.randn(n, k, generator=g) * 3).bfloat16()
    weight[0, :2] = torch.tensor([0.0, -0.0])
    x, _ = activations(m, k, False, g)
    expected = emulate(x, None, weight.float(), None, k)
    for isa in ISAS:
        assert_bits_equal(gemm._run_kernel(kernels.kernel_library(), "bf16", x, None, weight, None, n, isa), expected)
    assert_bits_equal(gemm.bf16_linear(x, weight), expected)


# --- accuracy against float64 and the dequantised matmul --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 17, 300])
def test_close_to_float64_and_to_dequantise_then_matmul(fmt: str, m: int) -> None:
    g = torch.Generator().manual_seed(m)
    n, k = 72, 416
    x, sx = activations(m, k, fmt != "bf16", g)
    if fmt == "fp8":
        weight, scale = fp8_operands(n, k, g)
        w, sw = fp8_values(weight, scale)
        y, block = gemm.fp8_linear(x, sx, weight, scale), 128
        dense = Q.dequant_fp8_weight(weight, scale)
    elif fmt == "fp4":
        weight, scale = fp4_operands(n, k, g)
        w, sw = fp4_values(weight, scale)
        y, block = gemm.fp4_linear(x, sx, weight, scale), 32
        dense = Q.dequant_fp4_weight(weight, scale)
    else:
        weight = torch.randn(n, k, generator=g).bfloat16()
        w, sw, block = weight.float(), None, k
        y, dense = gemm.bf16_linear(x, weight), weight.float()
    ref, mag = float64_reference(x, sx, w, sw, block)
    terms = block + math.ceil(k / block) + 2
    assert ((y.double() - ref).abs() <= terms * U * mag).all()
    # What formats.quantized_linear computes: the scaled activations against the dense weight, one fp32 GEMM.
    xs = x * sx.repeat_interleave(128, 1)[:, :k] if sx is not None else x
    assert ((y.double() - F.linear(xs, dense).double()).abs() <= (terms + k) * U * mag).all()


# --- the official kernels' vectors ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [REFERENCE_KERNELS, BOUNDARY_KERNELS], ids=["reference", "decode_boundaries"])
def test_official_gemm_vectors_bit_identical(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not present")
    kv = load_file(str(path))
    for fmt, fn in (("fp8", gemm.fp8_linear), ("fp4", gemm.fp4_linear)):
        q, s = Q.act_quant(kv[f"{fmt}_linear.x"], 128)
        y = fn(q.float(), s, kv[f"{fmt}_linear.weight"], kv[f"{fmt}_linear.weight_scale"]).bfloat16()
        assert torch.equal(y.view(torch.int16), kv[f"{fmt}_linear.y"].view(torch.int16)), fmt


# --- row invariance ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "bf16"])
def test_rows_do_not_depend_on_the_batch(fmt: str) -> None:
    """Each row of an M=300 call (the panel schedule) equals the same row computed alone and in batches of
    3, 8 and 16 (the fused decode schedule) and 17, at one and two threads."""
    g = torch.Generator().manual_seed(7)
    n, k = 200, 512
    x, sx = activations(300, k, fmt != "bf16", g)
    if fmt == "fp8":
        weight, scale = fp8_operands(n, k, g)
    elif fmt == "fp4":
        weight, scale = fp4_operands(n, k, g)
    else:
        weight, scale = torch.randn(n, k, generator=g).bfloat16(), None

    def run(rows: slice) -> torch.Tensor:
        xr, sr = x[rows], sx[rows] if sx is not None else None
        if fmt == "fp8":
            return gemm.fp8_linear(xr, sr, weight, scale)
        if fmt == "fp4":
            return gemm.fp4_linear(xr, sr, weight, scale)
        return gemm.bf16_linear(xr, weight)

    full = run(slice(None))
    for i in (0, 1, 5, 150, 299):
        assert_bits_equal(run(slice(i, i + 1)), full[i : i + 1])
    for start, size in ((10, 3), (20, 8), (100, 16), (40, 17), (283, 17)):
        assert_bits_equal(run(slice(start, start + size)), full[start : start + size])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_bits_equal(run(slice(None)), full)
        assert_bits_equal(run(slice(7, 8)), full[7:8])
    finally:
        torch.set_num_threads(threads)


# --- shapes, errors and the fallback ----------------------------------------------------------------------------


def test_empty_and_mismatched_shapes() -> None:
    weight, scale = fp8_operands(40, 256, torch.Generator().manual_seed(0))
    assert gemm.fp8_linear(torch.zeros(0, 256), None, weight, scale).shape == (0, 40)
    with pytest.raises(ValueError, match="K=255"):
        gemm.fp8_linear(torch.zeros(1, 255), None, weight, scale)
    with pytest.raises(ValueError, match="x_scale"):
        gemm.fp8_linear(torch.zeros(1, 256), torch.ones(1, 3), weight, scale)
    with pytest.raises(ValueError, match="fp32"):
        gemm.fp8_linear(torch.zeros(1, 256, dtype=torch.bfloat16), None, weight, scale)
    with pytest.raises(ValueError, match="e8m0"):
        gemm.fp8_linear(torch.zeros(1, 256), None, weight, scale.float())


def test_non_contiguous_activations() -> None:
    g = torch.Generator().manual_seed(3)
    weight, scale = fp4_operands(50, 128, g)
    x = torch.randn(128, 6, generator=g).t()
    assert_bits_equal(gemm.fp4_linear(x, None, weight, scale), gemm.fp4_linear(x.contiguous(), None, weight, scale))


@pytest.mark.parametrize("fmt", ["fp8", "fp4", "bf16"])
def test_torch_path_keeps_the_block_order(fmt: str) -> None:
    """The path for other devices (and for CPUs without a compiler): the same per-block arithmetic with a
    BLAS sum inside each block, so within the blocks' rounding of the exact emulation, over row tiles."""
    g = torch.Generator().manual_seed(11)
    m, n, k = 5, 300, 352
    x, sx = activations(m, k, fmt != "bf16", g)
    if fmt == "fp8":
        weight, scale = fp8_operands(n, k, g)
        got, (w, sw), block = gemm._fp8_linear_torch(x, sx, weight, scale), fp8_values(weight, scale), 128
    elif fmt == "fp4":
        weight, scale = fp4_operands(n, k, g)
        got, (w, sw), block = gemm._fp4_linear_torch(x, sx, weight, scale), fp4_values(weight, scale), 32
    else:
        weight = torch.randn(n, k, generator=g).bfloat16()
        got, w, sw, block = gemm._bf16_linear_torch(x, weight), weight.float(), None, k
    _, mag = float64_reference(x, sx, w, sw, block)
    expected = emulate(x, sx, w, sw, block)
    assert ((got - expected).abs().double() <= 2 * (block + 2) * U * mag).all()


def test_falls_back_to_torch_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler() -> None:
        raise RuntimeError("command 'c++' failed\nerror: no compiler")

    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_build_failed", False)
    monkeypatch.setattr(kernels, "_build", no_compiler)
    g = torch.Generator().manual_seed(5)
    weight, scale = fp8_operands(64, 256, g)
    x, sx = activations(2, 256, True, g)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        y = gemm.fp8_linear(x, sx, weight, scale)
    assert kernels.kernel_isa() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warns only once
        assert_bits_equal(gemm.fp8_linear(x, sx, weight, scale), y)
    assert_bits_equal(y, gemm._fp8_linear_torch(x, sx, weight, scale))
