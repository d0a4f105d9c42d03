"""Batch-invariant numerics (``Numerics.batch_invariant``): the building blocks that make a row's bits
independent of its batch. The end-to-end proof - a ragged batch giving each sequence exactly its solo
logits, and preemption replaying exactly - is in ``test_engine.py``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dsv4.cache.pool import KVPool
from dsv4.config import ModelConfig
from dsv4.engine.sampling import SamplingParams
from dsv4.engine.scheduler import Scheduler
from dsv4.engine.sequence import Sequence
from dsv4.numerics import modes as N
from dsv4.tiny import tiny_config

INVARIANT = replace(N.MODES["fp32_nosim"], batch_invariant=True)
# (in, out) of the tiny model's GEMMs, and the small benchmark config's widest ones
SHAPES = [(256, 128), (128, 2048), (256, 256), (1024, 24), (256, 1280), (1024, 512), (512, 8192)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{k}x{n}" for k, n in SHAPES])
def test_linear_rows_do_not_depend_on_the_batch(shape: tuple[int, int], dtype: torch.dtype) -> None:
    k, n = shape
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(64, k, generator=g).to(dtype)
    full = INVARIANT.linear(x, w)
    # from INVARIANT_ROWS rows on nothing is padded; bf16 runs as the fp32 GEMM of its upcasts
    assert torch.equal(full, F.linear(x.float(), w.float()).to(dtype))
    for m in range(1, 41):
        assert torch.equal(INVARIANT.linear(x[:m], w), full[:m]), f"{m} rows"


@pytest.mark.parametrize("fn", [torch.sigmoid, F.softplus, F.silu, torch.rsqrt], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_elements_do_not_depend_on_the_tensor_size(fn, dtype: torch.dtype) -> None:
    x = (torch.rand(200, 4, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    full = INVARIANT.pointwise(fn, x)
    for m in range(1, 80):
        assert torch.equal(INVARIANT.pointwise(fn, x[:m]), full[:m]), f"{m} rows"


@pytest.mark.parametrize("fn", [torch.sigmoid, F.silu], ids=lambda f: f.__name__)
def test_pointwise_elements_do_not_depend_on_threads(fn) -> None:
    """Above 32K elements torch splits elementwise work between threads; the padded ops still round each
    element alike at 1 and 2 threads and whatever the tensor's length."""
    big = torch.randn(200_777, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = INVARIANT.pointwise(fn, big)
        torch.set_num_threads(2)
        for n in (40_000, 65_537, 131_072, 200_777):
            assert torch.equal(INVARIANT.pointwise(fn, big[:n]), want[:n]), f"{n} elements"
    finally:
        torch.set_num_threads(threads)


def test_plain_numerics_change_nothing() -> None:
    x, w = torch.randn(3, 256), torch.randn(128, 256)
    plain = N.MODES["fp32_nosim"]
    assert torch.equal(plain.linear(x, w), F.linear(x, w))
    assert plain.pad_rows(x) is x and torch.equal(plain.pointwise(torch.sigmoid, x), torch.sigmoid(x))


def test_check_batch_invariance(monkeypatch: pytest.MonkeyPatch) -> None:
    N.check_batch_invariance(SHAPES)  # this machine's BLAS rounds alike from INVARIANT_ROWS rows up

    def row_count_dependent(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, w.T) + (len(x) < 20) * 1e-3

    monkeypatch.setattr(N.F, "linear", row_count_dependent)
    with pytest.raises(ValueError, match="batch invariance does not hold"):
        N.check_batch_invariance([(256, 128)])


def _sequence(request_id: str, prompt_len: int, outputs: int = 0) -> Sequence:
    seq = Sequence(request_id, list(range(2, 2 + prompt_len)), SamplingParams(max_tokens=50), [1], 4096)
    seq.output_ids.extend(range(3, 3 + outputs))
    return seq


def test_aligned_chunks_end_at_fixed_boundaries() -> None:
    """Prompt chunks end at multiples of chunk_size whatever else is scheduled; a chunk that does not fit
    the remaining budget waits whole; a recomputed output is fed one token per step."""
    config: ModelConfig = tiny_config()
    pool = KVPool(config, "fp32_nosim", num_blocks=16, max_sequences=4)
    with pytest.raises(ValueError, match="aligned chunks need"):
        Scheduler(pool, 4, 64, 64, aligned_chunks=True)
    scheduler = Scheduler(pool, 4, 64 + 4 + 30, 64, aligned_chunks=True)
    long, short, resumed = _sequence("long", 150), _sequence("short", 40), _sequence("resumed", 10, outputs=3)
    for seq in (long, short, resumed):
        scheduler.add(seq)
    cuts: dict[str, list[tuple[int, int]]] = {"long": [], "short": [], "resumed": []}
    for _ in range(10):
        out = scheduler.schedule()
        assert out.num_tokens <= scheduler.max_num_batched_tokens
        for chunk in out.chunks:
            cuts[chunk.seq.request_id].append((chunk.start, chunk.length))
        scheduler.update(out.chunks)
    assert cuts["long"] == [(0, 64), (64, 64), (128, 22)]
    assert cuts["short"] == [(0, 40)]  # waited for the step after long's first chunk: 64 + 40 > 98
    assert cuts["resumed"] == [(0, 10), (10, 1), (11, 1), (12, 1)]
    assert all(seq.num_uncomputed == 0 for seq in (long, short, resumed))
