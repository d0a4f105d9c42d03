"""Sparse attention with sink: the official kernel vector and the softmax-with-sink formula in fp64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv4.model.sparse_attention import sparse_attention

KERNELS = Path(__file__).parent / "data" / "reference" / "kernels.safetensors"


def dense_reference_attention(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor, scale: float
) -> torch.Tensor:
    """Spec §3.5 directly in fp64: softmax over the valid logits plus one sink logit whose value is zero.

    A query with no valid entry gets 0 (the sink takes all the weight, or nothing is attended at all).
    """
    qd, kvd, sd = q.double(), kv.double(), sink.double()
    valid = idx >= 0
    k = kvd[idx.long().clamp_min(0)]  # [T, K, D]
    z = torch.einsum("thd,tkd->thk", qd, k) * scale
    z = z.masked_fill(~valid.unsqueeze(1), -torch.inf)
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    p = torch.exp(z - m)
    denom = p.sum(-1) + torch.exp(sd.unsqueeze(0) - m.squeeze(-1))
    out = torch.einsum("thk,tkd->thd", p, k) / torch.where(denom > 0, denom, 1.0).unsqueeze(-1)
    return out.to(q.dtype)


def random_case(
    t: int = 7, h: int = 4, d: int = 32, n: int = 300, k: int = 150, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Random inputs with logits of O(1-10) spread, -1 slots scattered, and the block layouts the online
    softmax must handle: a row whose first 64-slot block is all -1, a row with only one valid slot and a
    row with none."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, d, generator=g) * 2
    kv = torch.randn(n, d, generator=g) * 2
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(t)])
    idx[torch.rand(t, k, generator=g) < 0.3] = -1
    idx[1, : min(64, k - 1)] = -1
    idx[2, :] = -1
    idx[2, k - 1] = 5
    idx[3, :] = -1
    sink = torch.randn(h, generator=g)
    return q, kv, idx, sink, d**-0.5


# --- the official kernel vector ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vector() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(KERNELS))


def run_vector(v: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    o = sparse_attention(
        v["sparse_attn.q"][0],
        v["sparse_attn.kv"][0],
        v["sparse_attn.topk_idxs"][0],
        v["sparse_attn.attn_sink"],
        v["sparse_attn.softmax_scale"].item(),
    )
    return o, v["sparse_attn.o"][0]


def test_vector_within_manifest_tolerance(vector: dict[str, torch.Tensor]) -> None:
    # manifest tolerances.kernels.sparse_attn_o: max <= 1.6e-2 (2 bf16 ulps at |o| ~ 2-4), mean <= 2e-3.
    o, ref = run_vector(vector)
    assert o.dtype == torch.bfloat16 and o.shape == ref.shape
    diff = (o.float() - ref.float()).abs()
    assert diff.max().item() <= 1.6e-2 and diff.mean().item() <= 2e-3


def test_vector_is_bit_exact(vector: dict[str, torch.Tensor]) -> None:
    # The emulation follows the kernel's block order and casts, and is bit-exact here. The bound above does
    # not catch small deviations (summing the bf16-cast probabilities stays within it at 1.6e-2), so this
    # guards the exact variant. If a BLAS with another fp32 summation order for q.k ever breaks it while
    # the bound still holds, that is rounding noise, not a semantic error.
    o, ref = run_vector(vector)
    assert torch.equal(o, ref)


# --- against the formula in fp64 --------------------------------------------------------------------------

# fp32 inputs: the only differences from fp64 are fp32 rounding of logits, exp and the running sums
# (relative ~1e-7 per op, a few hundred ops) on outputs of O(1), so 1e-5 is tight and safe.
FP32_ATOL = 1e-5


def test_fp32_matches_formula() -> None:
    q, kv, idx, sink, scale = random_case()
    o = sparse_attention(q, kv, idx, sink, scale)
    assert o.dtype == torch.float32 and not o.isnan().any()
    torch.testing.assert_close(o, dense_reference_attention(q, kv, idx, sink, scale), atol=FP32_ATOL, rtol=0)
    assert torch.equal(o[3], torch.zeros_like(o[3]))  # the all -1 row


@pytest.mark.parametrize("k", [1, 63, 64, 65, 200])
def test_fp32_block_boundaries(k: int) -> None:
    q, kv, idx, sink, scale = random_case(k=k, n=256, seed=k)
    o = sparse_attention(q, kv, idx, sink, scale)
    torch.testing.assert_close(o, dense_reference_attention(q, kv, idx, sink, scale), atol=FP32_ATOL, rtol=0)


def test_bf16_matches_formula_within_rounding() -> None:
    q, kv, idx, sink, scale = random_case(seed=1)
    q, kv = q.bfloat16(), kv.bfloat16()
    o = sparse_attention(q, kv, idx, sink, scale)
    assert o.dtype == torch.bfloat16
    ref = dense_reference_attention(q.float(), kv.float(), idx, sink, scale)
    # bf16 probabilities (relative 2^-9) and the bf16 output rounding (half an ulp, 2^-9 relative at
    # |o| <= 4): a couple of bf16 ulps at the output's magnitude, as in the manifest's bound.
    torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=0)


def test_huge_sink_takes_all_the_weight() -> None:
    q, kv, idx, _, scale = random_case(seed=2)
    o = sparse_attention(q, kv, idx, torch.full((q.shape[1],), 1e4), scale)
    # exp(sink - m) ~ e^(1e4 - O(10)) overflows fp32 to inf, so the output is exactly 0.
    assert torch.equal(o, torch.zeros_like(o))
    o = sparse_attention(q, kv, idx, torch.full((q.shape[1],), 60.0), scale)
    # With sink 60 against logits of O(10), the sink holds all but ~e^-40 of the mass.
    assert o.abs().max().item() < 1e-10


def test_minus_inf_sink_is_plain_softmax() -> None:
    q, kv, idx, _, scale = random_case(seed=3)
    sink = torch.full((q.shape[1],), -torch.inf)
    o = sparse_attention(q, kv, idx, sink, scale)
    valid = idx >= 0
    k = kv.double()[idx.long().clamp_min(0)]
    z = torch.einsum("thd,tkd->thk", q.double(), k).mul(scale).masked_fill(~valid.unsqueeze(1), -torch.inf)
    has_any = valid.any(-1)
    expected = torch.einsum("thk,tkd->thd", torch.softmax(z[has_any], dim=-1), k[has_any])
    torch.testing.assert_close(o[has_any].double(), expected, atol=FP32_ATOL, rtol=0)
    # Rows without any entry: no sink either, still 0 and not NaN.
    assert torch.equal(o[~has_any], torch.zeros_like(o[~has_any]))


def test_sink_lowers_the_weights_by_the_formula_factor() -> None:
    # One valid entry per query: o = kv_j * e^z / (e^z + e^sink) exactly in closed form.
    q, kv, _, sink, scale = random_case(seed=4)
    idx = torch.full((q.shape[0], 70), -1)
    idx[:, 66] = torch.arange(q.shape[0])
    o = sparse_attention(q, kv, idx, sink, scale)
    z = torch.einsum("thd,td->th", q.double(), kv[: q.shape[0]].double()) * scale
    w = torch.sigmoid(z - sink.double())
    # fp32 rounding of one logit, one exp and one division on values of O(5): a few 1e-7.
    expected = w.unsqueeze(-1) * kv[: q.shape[0]].double().unsqueeze(1)
    torch.testing.assert_close(o.double(), expected, atol=2e-6, rtol=0)


def test_all_invalid_bf16() -> None:
    q, kv, _, sink, scale = random_case(seed=5)
    o = sparse_attention(q.bfloat16(), kv.bfloat16(), torch.full((q.shape[0], 128), -1), sink, scale)
    assert o.dtype == torch.bfloat16 and torch.equal(o.float(), torch.zeros(o.shape))


def test_long_prefills_are_split_into_query_passes_without_changing_the_result(monkeypatch):
    import dsv4.model.sparse_attention as module

    g = torch.Generator().manual_seed(11)
    q, kv = torch.randn(300, 4, 64, generator=g), torch.randn(500, 64, generator=g)
    idx, sink = torch.randint(-1, 500, (300, 130), generator=g), torch.randn(4, generator=g)
    whole = sparse_attention(q, kv, idx, sink, 0.125)
    monkeypatch.setattr(module, "QUERY_CHUNK_ELEMENTS", 64 * 64 * 7)  # passes of 7 queries
    assert torch.equal(sparse_attention(q, kv, idx, sink, 0.125), whole)
