"""The lightning indexer's scores (dsv4/numerics/index_scores.py, csrc/index_scores.cpp).

The kernel's contract: each score is one fixed sequence of IEEE operations - per head an fp32 fma chain
over the head dimension in increasing order, then ReLU, the head weight and an fp32 sum over heads in
increasing order, with bf16 roundings at the points where the official bf16 einsum/multiply/sum round - so a
query's scores do not depend on the other queries, on where its keys lie in the pool, on the thread count
or on the instruction set. Checked here against a float64 evaluation of the formula (within a stated rounding
bound), against an exact emulation of the bf16 rounding points, and against itself across batches, layouts
and instruction sets (bit for bit).
"""

from __future__ import annotations

import pytest
import torch

from dsv4.config import FP4_BLOCK
from dsv4.numerics import kernels
from dsv4.numerics.formats import pack_fp4_entries, unpack_fp4_entries
from dsv4.numerics.index_scores import KeyRows, index_scores
from dsv4.numerics.modes import get_numerics

NUMERICS = get_numerics("fp32_nosim")
ISAS = ["avx512", "portable"] if kernels.kernel_isa() == "avx512" else ["portable"]
U = 2.0**-24  # fp32 unit roundoff

pytestmark = pytest.mark.skipif(kernels.kernel_library() is None, reason="the CPU kernels could not be built")


def operands(n_q: int, heads: int, dim: int, n_keys: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, heads, dim, generator=g)
    w = torch.randn(n_q, heads, generator=g)
    keys = torch.randn(n_keys, dim, generator=g)
    return q, w, keys


def paged(keys: torch.Tensor, per_block: int, seed: int) -> KeyRows:
    """The same keys scattered over shuffled blocks of a larger store, as the pool holds them."""
    n_blocks = -(-len(keys) // per_block)
    blocks = torch.randperm(2 * n_blocks, generator=torch.Generator().manual_seed(seed))[:n_blocks]
    store = torch.full((2 * n_blocks * per_block, keys.shape[1]), float("nan"))  # unread rows stay NaN
    for i, b in enumerate(blocks.tolist()):
        part = keys[i * per_block : (i + 1) * per_block]
        store[b * per_block : b * per_block + len(part)] = part
    return KeyRows(store, blocks, per_block, len(keys))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("heads", "dim"), [(16, 128), (5, 24), (64, 128)])
def test_fp32_scores_within_the_rounding_bound(isa: str, heads: int, dim: int) -> None:
    """|kernel - exact| <= (dim + heads + 1) u Σ_h |w_h| Σ_c |q_hc k_c|: each head's chain of ``dim`` fmas
    errs by at most dim·u·Σ|q k| (relative to the magnitudes summed), ReLU and the weight add one rounding,
    and the chain over heads ``heads`` more. Past ``usable`` the row is -inf."""
    q, w, keys = operands(6, heads, dim, 203, seed=heads)
    usable = torch.tensor([0, 1, 31, 33, 150, 203])
    got = index_scores(q, w, [KeyRows.of(keys)], [6], usable, 203, NUMERICS, isa=isa)
    exact = torch.einsum("shd,td->sht", q.double(), keys.double()).relu().mul(w.double().unsqueeze(-1)).sum(1)
    mag = torch.einsum("shd,td->sht", q.double().abs(), keys.double().abs()).mul(w.double().abs().unsqueeze(-1))
    bound = (dim + heads + 1) * U * mag.sum(1)
    future = torch.arange(203) >= usable[:, None]
    assert got.dtype == torch.float32
    assert bool(torch.isneginf(got[future]).all())
    assert bool(((got.double() - exact).abs() <= bound)[~future].all())


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_rounds_where_the_official_einsum_does(isa: str) -> None:
    """With keys and queries whose head products are exact in fp32 (few significant bits), the only
    roundings are the bf16 ones: each head's product, each weighted term, and the fp32 sum over heads once.
    An emulation of exactly those must agree bit for bit (also with torch's own bf16 ops on this CPU)."""
    g = torch.Generator().manual_seed(3)
    heads, dim, n = 12, 32, 97
    q = (torch.randint(-8, 9, (4, heads, dim), generator=g) / 8).bfloat16()
    keys = (torch.randint(-8, 9, (n, dim), generator=g) / 16).bfloat16()
    w = torch.randn(4, heads, generator=g).bfloat16()
    usable = torch.tensor([97, 64, 3, 0])
    got = index_scores(q, w, [KeyRows.of(keys)], [4], usable, n, NUMERICS, isa=isa)
    dots = torch.einsum("shd,td->sht", q.double(), keys.double()).float()  # exact
    terms = (dots.bfloat16().relu().float() * w.float().unsqueeze(-1)).bfloat16().float()
    acc = torch.zeros(4, n)
    for h in range(heads):
        acc = acc + terms[:, h]
    expected = acc.bfloat16().masked_fill(torch.arange(n) >= usable[:, None], float("-inf"))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    assert torch.equal(got, index_scores(q, w, [KeyRows.of(keys)], [4], usable, n, NUMERICS, isa="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_scores_alike_in_any_batch_layout_and_isa(dtype: torch.dtype) -> None:
    """A decode query alone, the same query as one row of a prefill chunk, and the same query in a group
    of sequences whose keys are scattered over pool blocks: the same bits, on every instruction set and
    thread count."""
    q, w, keys = operands(40, 16, 128, 300, seed=7)
    q, w, keys = q.to(dtype), w.to(dtype), keys.to(dtype)
    usable = torch.arange(261, 301)
    chunk = index_scores(q, w, [KeyRows.of(keys)], [40], usable, 300, NUMERICS)
    others = [operands(1, 16, 128, n, seed=n) for n in (5, 300, 64)]
    group_keys = [paged(o[2].to(dtype), 64, seed=i) for i, o in enumerate(others)]
    for isa in ISAS:
        for row in (0, 17, 39):
            alone = index_scores(
                q[row : row + 1],
                w[row : row + 1],
                [KeyRows.of(keys)],
                [1],
                usable[row : row + 1],
                300,
                NUMERICS,
                isa=isa,
            )
            assert torch.equal(alone[0], chunk[row])
            group_q = torch.cat([others[0][0].to(dtype), q[row : row + 1], others[1][0].to(dtype)])
            group_w = torch.cat([others[0][1].to(dtype), w[row : row + 1], others[1][1].to(dtype)])
            members = [group_keys[0], paged(keys, 64, seed=row), group_keys[1]]
            in_group = index_scores(
                group_q, group_w, members, [1, 1, 1], torch.tensor([5, int(usable[row]), 300]), 320, NUMERICS, isa=isa
            )
            assert torch.equal(in_group[1, :300], chunk[row])
            assert bool(torch.isneginf(in_group[0, 5:]).all()) and bool(torch.isneginf(in_group[1, 300:]).all())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(index_scores(q, w, [KeyRows.of(keys)], [40], usable, 300, NUMERICS), chunk)
    finally:
        torch.set_num_threads(threads)


def test_never_reads_past_a_sequences_keys() -> None:
    """usable beyond a sequence's count is clamped to it: the rows past the count (NaN here) are not read,
    and a sequence without keys scores -inf everywhere."""
    q, w, keys = operands(2, 8, 64, 70, seed=11)
    rows = paged(keys, 32, seed=1)  # 3 blocks, the last one partly NaN past key 70
    got = index_scores(q, w, [rows, KeyRows.of(torch.empty(0, 0))], [1, 1], torch.tensor([96, 4]), 96, NUMERICS)
    assert bool(torch.isfinite(got[0, :70]).all()) and bool(torch.isneginf(got[0, 70:]).all())
    assert bool(torch.isneginf(got[1]).all())


def test_torch_path_agrees_within_the_bound() -> None:
    """The fallback (other devices, no compiler) computes the same formula through a BLAS einsum."""
    q, w, keys = operands(3, 16, 128, 130, seed=5)
    usable = torch.tensor([130, 77, 1])
    rows = paged(keys, 64, seed=2)
    got = index_scores(q, w, [rows], [3], usable, 130, NUMERICS, isa="torch")
    kernel = index_scores(q, w, [rows], [3], usable, 130, NUMERICS)
    mag = torch.einsum("shd,td->sht", q.abs(), keys.abs()).mul(w.abs().unsqueeze(-1)).sum(1)
    finite = torch.isfinite(kernel)
    assert torch.equal(finite, torch.isfinite(got))
    assert bool(((got - kernel).abs() <= 2 * (128 + 16 + 1) * U * mag)[finite].all())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_keys_read_in_place_score_as_their_decoded_values(isa: str, dtype: torch.dtype) -> None:
    """The simulated modes store index keys as FP4 codes with e8m0 scales; the kernel decodes them as it
    reads, exactly (an e2m1 value times a power of two), so the scores equal those of the decoded keys."""
    q, w, keys = operands(3, 16, 128, 150, seed=9)
    codes, scales = pack_fp4_entries(keys * 4.0 ** torch.randint(-3, 4, (150, 1)), FP4_BLOCK)
    decoded = unpack_fp4_entries(codes, scales, dtype)
    paged_codes = paged(codes.view(torch.uint8).float(), 64, seed=4)  # the same block order for both parts
    paged_scales = paged(scales.view(torch.uint8).float(), 64, seed=4)
    stored = KeyRows(
        paged_codes.rows.nan_to_num().to(torch.uint8),
        paged_codes.blocks,
        64,
        150,
        paged_scales.rows.nan_to_num().to(torch.uint8),
    )
    usable = torch.tensor([150, 70, 2])
    q, w = q.to(dtype), w.to(dtype)
    got = index_scores(q, w, [stored], [3], usable, 150, NUMERICS, isa=isa)
    assert torch.equal(got, index_scores(q, w, [KeyRows.of(decoded)], [3], usable, 150, NUMERICS, isa=isa))
    assert torch.equal(stored.gather(dtype), decoded)


def test_a_layout_that_does_not_hold_its_keys_is_refused() -> None:
    """The kernel reads raw memory, so a block table too short for the count, or naming rows past the
    storage, is a ValueError before the call rather than a read out of bounds."""
    q, w, keys = operands(1, 4, 32, 64, seed=2)
    store = torch.zeros(128, 32)
    for blocks, count in ((torch.tensor([0]), 64), (torch.tensor([4, 1]), 64), (torch.tensor([-1]), 10)):
        with pytest.raises(ValueError, match="do not fit"):
            index_scores(q, w, [KeyRows(store, blocks, 32, count)], [1], torch.tensor([count]), 64, NUMERICS)
