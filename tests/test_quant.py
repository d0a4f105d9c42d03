"""FP8/FP4/e8m0 quantisation, Hadamard and quantised GEMMs against the official kernel vectors and by hand.

The quantisers are discontinuous, so every check here is exact (bit-identical) unless a comment says why not:
the manifest lists all of these kernel vectors as "exact", and one flipped rounding cascades end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsv4.numerics import formats as Q

KERNELS = Path(__file__).parent / "data" / "reference" / "kernels.safetensors"


@pytest.fixture(scope="module")
def kv() -> dict[str, torch.Tensor]:
    return load_file(str(KERNELS))


def bits(x: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so that comparisons also see the sign of zero."""
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b)), f"max |diff| {(a.float() - b.float()).abs().max().item()}"


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value (254 of the 256 codes; the two NaN codes dropped)."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return v[~v.isnan()]


# --- kernel vectors (all exact per manifest tolerances.kernels) -------------------------------------------


def test_act_quant_vector(kv: dict[str, torch.Tensor]) -> None:
    q, s = Q.act_quant(kv["act_quant.x"], 128)
    assert_bits_equal(q, kv["act_quant.q"])
    assert_bits_equal(Q.float_to_e8m0(s), kv["act_quant.s"])


def test_kv_fp8_sim_vector(kv: dict[str, torch.Tensor]) -> None:
    x = kv["kv_fp8_sim.x"]
    y = torch.cat([Q.fp8_simulate(x[:, :448], 64), x[:, 448:]], dim=-1)
    assert_bits_equal(y, kv["kv_fp8_sim.y"])


def test_fp4_sim_vector(kv: dict[str, torch.Tensor]) -> None:
    assert_bits_equal(Q.fp4_simulate(kv["fp4_sim.x"], 32), kv["fp4_sim.y"])


def test_hadamard_vector(kv: dict[str, torch.Tensor]) -> None:
    assert_bits_equal(Q.hadamard(kv["hadamard.x"]), kv["hadamard.y"])


def test_fp8_linear_vector(kv: dict[str, torch.Tensor]) -> None:
    w = Q.dequant_fp8_weight(kv["fp8_linear.weight"], kv["fp8_linear.weight_scale"])
    assert_bits_equal(Q.quantized_linear(kv["fp8_linear.x"], w, simulate=True), kv["fp8_linear.y"])


def test_fp4_linear_vector(kv: dict[str, torch.Tensor]) -> None:
    w = Q.dequant_fp4_weight(kv["fp4_linear.weight"], kv["fp4_linear.weight_scale"])
    assert w.shape == (128, 256)
    assert_bits_equal(Q.quantized_linear(kv["fp4_linear.x"], w, simulate=True), kv["fp4_linear.y"])


# --- e8m0 and the power-of-two scale ----------------------------------------------------------------------


def test_e8m0_decode_bytes() -> None:
    b = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8)
    f = Q.e8m0_to_float(b)
    expected = torch.tensor([2.0**-127, 2.0**-126, 1.0, 2.0, 2.0**127])
    assert torch.equal(f[:5], expected)
    assert f[5].isnan()
    assert torch.equal(Q.e8m0_to_float(b.view(torch.float8_e8m0fnu)).nan_to_num(), f.nan_to_num())


def test_e8m0_encode_round_trip() -> None:
    p = 2.0 ** torch.arange(-127, 128, dtype=torch.float64)
    e = Q.float_to_e8m0(p.float())
    assert e.dtype == torch.float8_e8m0fnu
    assert torch.equal(e.view(torch.uint8), torch.arange(0, 255, dtype=torch.int32).to(torch.uint8))
    assert torch.equal(Q.e8m0_to_float(e), p.float())


def test_pow2_scale_at_exact_powers_of_two() -> None:
    k = torch.arange(-20, 20, dtype=torch.float32)
    amax = 448.0 * 2.0**k  # amax / 448 lands exactly on 2^k
    assert torch.equal(Q.pow2_scale(amax, 448.0), 2.0**k)
    assert torch.equal(Q.pow2_scale(6.0 * 2.0**k, 6.0), 2.0**k)
    assert Q.pow2_scale(torch.tensor(448.0), 448.0).item() == 1.0
    above = torch.nextafter(torch.tensor(448.0), torch.tensor(1e9))
    below = torch.nextafter(torch.tensor(448.0), torch.tensor(0.0))
    assert Q.pow2_scale(above, 448.0).item() == 2.0
    assert Q.pow2_scale(below, 448.0).item() == 1.0


def test_pow2_scale_matches_ceil_log2_of_the_rounded_product() -> None:
    amax = torch.exp(torch.linspace(-12, 12, 5001)).float()
    for max_value in (448.0, 6.0):
        v = (amax * torch.tensor(1 / max_value, dtype=torch.float32)).double()
        expected = (2.0 ** torch.ceil(torch.log2(v))).float()
        assert torch.equal(Q.pow2_scale(amax, max_value), expected)


# --- FP8 activation quantisation by hand ------------------------------------------------------------------


def test_act_quant_zero_block_scale_is_2_pow_minus_22() -> None:
    q, s = Q.act_quant(torch.zeros(2, 256, dtype=torch.bfloat16), 128)
    assert torch.equal(s, torch.full((2, 2), 2.0**-22))  # 1e-4 * fp32(1/448) -> ceil(log2) = -22
    assert torch.equal(q.float(), torch.zeros(2, 256))


def test_fp8_grid_values_round_trip() -> None:
    grid = e4m3_grid()  # includes +-448, so every block's scale is 1 (grid blocks of 127 values, two blocks)
    x = grid.reshape(2, 127)
    x = torch.cat([x, torch.full((2, 1), 448.0)], dim=-1)
    q, s = Q.act_quant(x, 128)
    assert torch.equal(s, torch.ones(2, 1))
    assert torch.equal(q.float(), x)
    for dtype in (torch.float32, torch.bfloat16):
        assert_bits_equal(Q.fp8_simulate(x.to(dtype), 128), x.to(dtype))


def test_fp8_ties_round_to_even() -> None:
    # Scale 1 (amax 448). Step is 1/8 in [1, 2), 1/4 in [2, 4), 32 in [256, 448].
    x = torch.tensor([1.0625, 1.1875, 2.125, 2.375, 272.0, 304.0, -1.0625, 448.0])
    expected = torch.tensor([1.0, 1.25, 2.0, 2.5, 256.0, 320.0, -1.0, 448.0])
    q, s = Q.act_quant(x, 8)
    assert s.item() == 1.0
    assert torch.equal(q.float(), expected)


def test_fp8_scaled_block() -> None:
    # amax 3.0 -> 3 * fp32(1/448) in (2^-8, 2^-7] -> scale 2^-7; x / scale = 384 exactly, 1/128 -> 1.
    x = torch.tensor([3.0, 1 / 128, -0.75, 0.0])
    q, s = Q.act_quant(x, 4)
    assert s.item() == 2.0**-7
    assert torch.equal(q.float(), torch.tensor([384.0, 1.0, -96.0, 0.0]))


# --- FP4 --------------------------------------------------------------------------------------------------


def test_fp4_ties_round_to_even() -> None:
    # Scale 1 (amax 6: 6 * fp32(1/6) rounds to exactly 1.0).
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    rounded = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    grid = list(Q.FP4_VALUES)
    x = torch.tensor(ties + [-t for t in ties] + grid + [-g for g in grid] + [0.0, 6.0])
    expected = torch.tensor(rounded + [-r for r in rounded] + grid + [-g for g in grid] + [0.0, 6.0])
    q, s = Q.fp4_act_quant(x, 32)
    assert s.item() == 1.0
    assert torch.equal(q, expected)
    assert torch.signbit(q[7]).item()  # -0.25 rounds to -0, as the hardware cast does
    assert_bits_equal(Q.fp4_simulate(x.bfloat16(), 32), expected.bfloat16())


def test_fp4_zero_block_and_scale() -> None:
    q, s = Q.fp4_act_quant(torch.zeros(32), 32)
    assert s.item() == 2.0**-126 and torch.equal(q, torch.zeros(32))
    # amax 0.7 -> 0.7/6 in (2^-4, 2^-3] -> scale 2^-3; 0.7 * 8 = 5.6 -> 6.
    q, s = Q.fp4_act_quant(torch.tensor([0.7] + [0.0] * 31), 32)
    assert s.item() == 2.0**-3 and q[0].item() == 6.0


# --- weights ----------------------------------------------------------------------------------------------


def test_fp8_weight_round_trip_on_grid() -> None:
    g = torch.Generator().manual_seed(0)
    grid = e4m3_grid()
    out_f, in_f = 200, 300  # partial edge blocks in both dims
    w = grid[torch.randint(len(grid), (out_f, in_f), generator=g)]
    block_exp = torch.randint(-10, 4, (2, 3), generator=g).float()
    w = w * (2.0**block_exp).repeat_interleave(128, 0)[:out_f].repeat_interleave(128, 1)[:, :in_f]
    w8, s = Q.quant_fp8_weight(w)
    assert w8.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and s.shape == (2, 3)
    assert torch.equal(Q.dequant_fp8_weight(w8, s), w)


def test_fp8_weight_scale_fits_block_amax() -> None:
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    w[0, 0] = 448.0 * 2.0**-8  # a block whose amax / 448 is exactly a power of two
    w8, s = Q.quant_fp8_weight(w)
    sf = Q.e8m0_to_float(s)
    amax = w.reshape(2, 128, 1, 128).abs().amax(dim=(1, 3))
    assert sf[0, 0].item() == 2.0**-8
    assert ((amax <= 448 * sf) & (amax > 224 * sf)).all()
    # Round-to-nearest in e4m3 (3 mantissa bits): relative error <= 2^-4 for normal values, plus the
    # absolute half-step of the subnormal range (2^-10 * scale).
    err = (Q.dequant_fp8_weight(w8, s) - w).abs()
    bound = w.abs() * 2.0**-4 + 2.0**-10 * sf.repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert (err <= bound).all()


def test_fp4_nibble_order() -> None:
    # Byte 0x21: low nibble 1 (0.5) is the even element, high nibble 2 (1.0) the odd one.
    # Byte 0xF8: low nibble 8 (-0), high nibble 15 (-6). Byte 0x7B: low 11 (-1.5), high 7 (6).
    packed = torch.tensor([[0x21, 0xF8 - 256, 0x7B] + [0] * 13], dtype=torch.int8)
    scale = torch.tensor([[127]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^0
    w = Q.dequant_fp4_weight(packed, scale)
    assert w.shape == (1, 32)
    assert w[0, :6].tolist() == [0.5, 1.0, -0.0, -6.0, -1.5, 6.0]
    assert torch.signbit(w[0, 2]).item()
    scale2 = torch.tensor([[125]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^-2
    assert Q.dequant_fp4_weight(packed, scale2)[0, :2].tolist() == [0.125, 0.25]


def test_fp4_weight_round_trip_on_grid() -> None:
    g = torch.Generator().manual_seed(2)
    table = torch.tensor(Q.FP4_VALUES + tuple(-v for v in Q.FP4_VALUES[1:]))
    w = table[torch.randint(len(table), (64, 128), generator=g)]
    w[:, ::32] = 6.0  # every block spans the full grid, so its scale is exactly the chosen power of two
    exps = torch.randint(-12, 3, (64, 4), generator=g).float()
    w = w * (2.0**exps).repeat_interleave(32, 1)
    packed, s = Q.quant_fp4_weight(w)
    assert packed.dtype == torch.int8 and packed.shape == (64, 64)
    assert torch.equal(Q.e8m0_to_float(s), 2.0**exps)
    assert torch.equal(Q.dequant_fp4_weight(packed, s), w)


# --- Hadamard ---------------------------------------------------------------------------------------------


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_is_the_scaled_sylvester_matrix(n: int) -> None:
    m = Q.hadamard(torch.eye(n)).double()
    # Every entry is exactly +-fp32(n^-0.5): the butterfly of a unit vector only adds zeros.
    assert torch.equal(m, sylvester(n) * torch.tensor(n**-0.5, dtype=torch.float32).double())
    # Orthogonal up to the fp32 rounding of n^-0.5 (relative 2^-24, squared -> ~1.2e-7).
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)


def test_hadamard_is_involutive_and_keeps_dtype() -> None:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    y = Q.hadamard(Q.hadamard(x))
    # Two fp32 passes, each of log2(64) = 6 roundings of size 2^-24 relative on O(1) values.
    assert torch.allclose(y, x, atol=1e-5, rtol=0)
    assert Q.hadamard(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        Q.hadamard(torch.zeros(2, 12))


# --- quantized_linear -------------------------------------------------------------------------------------


def test_quantized_linear_without_simulation_is_a_plain_fp32_linear() -> None:
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(4, 256, generator=g), torch.randn(64, 256, generator=g)
    assert torch.equal(Q.quantized_linear(x, w, simulate=False), F.linear(x, w))
    xb = x.bfloat16()
    assert torch.equal(Q.quantized_linear(xb, w, simulate=False), F.linear(xb.float(), w).bfloat16())
    assert torch.equal(
        Q.quantized_linear(xb, w, simulate=True),
        F.linear(Q.fp8_simulate(xb, 128).float(), w).bfloat16(),
    )


# --- storage codecs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_entry_codec_is_lossless(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 7, 512, generator=g) * torch.logspace(-6, 3, 7).reshape(1, 7, 1)).to(dtype)
    x[0, 0, :64] = 0  # an all-zero block
    sim = torch.cat([Q.fp8_simulate(x[..., :448], 64), x[..., 448:]], dim=-1)
    q, s, rope = Q.pack_fp8_entries(x, 448)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (3, 7, 448)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (3, 7, 7)
    assert rope.dtype == dtype and rope.shape == (3, 7, 64)
    assert_bits_equal(Q.unpack_fp8_entries(q, s, rope, dtype), sim)
    assert_bits_equal(Q.unpack_fp8_entries(*Q.pack_fp8_entries(sim, 448), dtype), sim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp4_entry_codec_is_lossless(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 4, 128, generator=g) * torch.logspace(-5, 4, 4).reshape(1, 4, 1)).to(dtype)
    x[0, 0, :32] = 0
    sim = Q.fp4_simulate(x, 32)
    packed, s = Q.pack_fp4_entries(x)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 4, 64)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (5, 4, 4)
    assert_bits_equal(Q.unpack_fp4_entries(packed, s, dtype), sim)
    assert_bits_equal(Q.unpack_fp4_entries(*Q.pack_fp4_entries(sim), dtype), sim)


def test_fp4_codec_matches_the_weight_nibble_layout() -> None:
    x = torch.tensor([[0.5, 1.0, -0.0, -6.0] + [0.0] * 28])
    packed, s = Q.pack_fp4_entries(x)
    assert packed[0, :2].tolist() == [0x21, 0xF8]
    assert s.view(torch.uint8).item() == 127
