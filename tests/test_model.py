"""The model's numerics: against the official-reference vectors in every mode, against itself across
call shapes (decode vs full forward, any continuation split), and hand-checkable properties of its parts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dsv4.cache.contiguous import ContiguousCache
from dsv4.commands.check_vectors import check_kernels, check_mode
from dsv4.config import ModelConfig
from dsv4.model.attention import window_indices
from dsv4.model.batch import Span
from dsv4.model.compressor import Compressor
from dsv4.model.hyper import sinkhorn_split
from dsv4.model.loading import load_model
from dsv4.model.rope import Rotary, rope_frequencies
from dsv4.numerics.modes import get_numerics
from dsv4.tiny import tiny_config

# fp32 noise between two call shapes of the same math (different GEMM shapes, online-softmax blocking):
# the vector authors measured <= 3.6e-5 for such variants; a semantic error moves logits by >= 2.8.
SHAPE_NOISE = 1e-4


@pytest.fixture(scope="module")
def vectors(reference_dir):
    manifest = json.loads((reference_dir / "manifest.json").read_text())
    return manifest, load_file(reference_dir / "vectors.safetensors")


@pytest.mark.parametrize("mode", ["fp32_nosim", "fp32_sim", "bf16_official"])
def test_reference_vectors(reference_dir, vectors, mode):
    manifest, tensors = vectors
    result = check_mode(reference_dir, manifest, tensors, mode)
    assert result.passed, result.problems
    # The simulated modes reached the exact tier (bf16_official bit-identical) on the first development CPU;
    # on the current one (Sapphire Rapids: AVX-512, AMX) one FP8/FP4 rounding somewhere flips early and both
    # reach the statistical tier only, with the same code - issue #15 tracks the exact tier. Until then the
    # manifest's rules are the bar, as for every other implementation.
    if mode == "fp32_nosim":
        # 2.9e-5 to 3.1e-5 on the current CPU, 2e-5 on the first: the vector authors measured up to 3.6e-5
        # between two valid fp32 runs, and a semantic error moves logits by >= 2.8.
        assert max(p.max_abs for p in result.prompts) < 5e-5


def test_kernel_vectors(reference_dir):
    failed = [k.name for k in check_kernels(reference_dir / "kernels.safetensors") if not k.passed]
    assert not failed


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, "fp32_nosim", progress=False)


def _new_cache(model) -> ContiguousCache:
    return ContiguousCache(model.n_cache_layers, model.config.window_size, model.numerics.dtype)


def _run(model, ids: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Feed ``ids`` in consecutive calls of the given lengths; logits at every position."""
    cache, rows, pos = _new_cache(model), [], 0
    for n in splits:
        chunk = ids[pos : pos + n]
        rows.append(model(chunk, [Span(0, n, pos, cache)], logit_rows=torch.arange(n)).logits)
        pos += n
    return torch.cat(rows)


def test_decode_after_long_prompt_equals_full_forward(tiny_model):
    """500-token prompt in one call, then decode steps across CSA (503, 507, 511) and HCA (511) boundaries:
    every position equals the full forward."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, tiny_model.config.vocab_size, (514,), generator=g)
    full = _run(tiny_model, ids, [514])
    stepwise = _run(tiny_model, ids, [500] + [1] * 14)
    assert (full - stepwise).abs().max() <= SHAPE_NOISE
    assert torch.equal(full.argmax(-1), stepwise.argmax(-1))


def test_token_by_token_equals_full_forward(tiny_model):
    """Decoding from the very first token crosses every window and compression boundary one step at a time."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, tiny_model.config.vocab_size, (136,), generator=g)
    full = _run(tiny_model, ids, [136])
    stepwise = _run(tiny_model, ids, [1] * 136)  # crosses the window (128) and the first HCA entry (127)
    assert (full - stepwise).abs().max() <= SHAPE_NOISE


@pytest.mark.parametrize("splits", [[1, 3, 4, 5, 127, 128, 129, 33], [257, 3, 170], [130, 300], [4, 124, 1, 1, 300]])
def test_continuation_equals_one_shot(tiny_model, splits):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, tiny_model.config.vocab_size, (sum(splits),), generator=g)
    assert (_run(tiny_model, ids, [len(ids)]) - _run(tiny_model, ids, splits)).abs().max() <= SHAPE_NOISE


def test_two_sequences_in_one_forward_equal_solo(tiny_model):
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(2, 1280, (200,), generator=g), torch.randint(2, 1280, (77,), generator=g)
    ca, cb = _new_cache(tiny_model), _new_cache(tiny_model)
    tiny_model(a[:150], [Span(0, 150, 0, ca)])
    together = tiny_model(torch.cat([a[150:], b]), [Span(0, 50, 150, ca), Span(50, 77, 0, cb)]).logits
    solo = torch.stack([_run(tiny_model, a, [200])[-1], _run(tiny_model, b, [77])[-1]])
    assert (together - solo).abs().max() <= SHAPE_NOISE


def test_mtp_predicts_from_main_hidden_state(tiny_model):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 1280, (20,), generator=g)
    cache = _new_cache(tiny_model)
    out = tiny_model(ids[:-1], [Span(0, 19, 0, cache)], logit_rows=torch.arange(19))
    logits = tiny_model.mtp_forward(out.hidden, ids[1:], [Span(0, 19, 0, cache)])
    assert logits.shape == (1, 1280) and torch.isfinite(logits).all()
    other = tiny_model.mtp_forward(out.hidden, ids[1:].flip(0), [Span(0, 19, 0, _new_cache(tiny_model))])
    assert not torch.equal(logits, other)  # the next-token input matters


# ---------------------------------------------------------------------------------------------- parts
@pytest.mark.parametrize("ratio,rotate", [(4, False), (128, False), (4, True)])
def test_compressor_entries_contain_exactly_their_window(ratio, rotate):
    """Perturbing token t changes exactly the entries whose (overlapping) windows contain t."""
    config = tiny_config()
    spec = config.layer(1 if ratio == 4 else 2)
    numerics = get_numerics("fp32_nosim")
    width = config.index_head_dim if rotate else config.head_dim
    comp = Compressor(config, ratio, width, rotate, numerics, Rotary(config, spec))
    g = torch.Generator().manual_seed(0)
    for p in comp.parameters():
        p.data = torch.randn(p.shape, generator=g).to(p.dtype)
    x = torch.randn(4 * ratio, config.dim, generator=g)

    def entries(inputs: torch.Tensor) -> torch.Tensor:
        return comp(inputs, 0, ContiguousCache(1, 128, torch.float32).layer(0), "kv")

    base = entries(x)
    for t in (0, ratio - 1, ratio, 2 * ratio + 1):
        bumped = x.clone()
        bumped[t] += 1.0
        changed = {j for j in range(len(base)) if not torch.equal(entries(bumped)[j], base[j])}
        expected = {t // ratio, t // ratio + 1} if ratio == 4 else {t // ratio}
        assert changed == expected & set(range(len(base))), (t, changed)


def test_sinkhorn_is_doubly_stochastic():
    g = torch.Generator().manual_seed(0)
    mixes = torch.randn(64, 24, generator=g)
    _, post, comb = sinkhorn_split(mixes, torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g), 4, 20, 1e-6)
    assert torch.allclose(comb.sum(-2), torch.ones(64, 4), atol=1e-5)  # ends on a column normalisation
    # 20 iterations bring rows close to 1 too (Sinkhorn converges geometrically; 1e-2 covers skewed inputs)
    assert torch.allclose(comb.sum(-1), torch.ones(64, 4), atol=1e-2)
    assert ((post > 0) & (post < 2)).all()


def test_compiled_sinkhorn_survives_thread_count_changes():
    """Each thread count is a new set of compiled graphs (a dynamo guard): a process that changes it a few
    times, as ``benchmarks/tp.py`` does per rank count, must not hit the recompile limit (a hard failure under
    fullgraph), and the compiled loop keeps computing what the eager one does."""
    from dsv4.model.hyper import _normalize, _sinkhorn_iterations, compile_decode_batches

    comb = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    before = torch.get_num_threads()
    try:
        for threads in (2, 1, 3, 1, 2):
            torch.set_num_threads(threads)
            compile_decode_batches(4, 20, 1e-6)
            with torch.inference_mode():
                assert torch.equal(_normalize(comb, 20, 1e-6), _sinkhorn_iterations(comb, 20, 1e-6))
    finally:
        torch.set_num_threads(before)


def test_sinkhorn_runs_eagerly_when_dynamo_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCH_COMPILE_DISABLE=1 (torch._dynamo.config.disable) makes a fullgraph compile raise rather than run
    eagerly: the decode batches' loop must then run eagerly, with the same bits."""
    from dsv4.model.hyper import _normalize, _sinkhorn_iterations

    comb = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)) + 0.1
    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    with torch.inference_mode():
        assert torch.equal(_normalize(comb, 20, 1e-6), _sinkhorn_iterations(comb, 20, 1e-6))


def test_yarn_frequencies_match_the_spec():
    """Flash numbers: pairs 0..15 keep their frequency, pairs >= 25 are divided by 16 (spec §3.3)."""
    flash = ModelConfig.preset("v4-flash")
    plain = 1.0 / (160000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    yarn = rope_frequencies(flash, flash.layer(2))
    assert torch.equal(yarn[:16], plain[:16])
    assert torch.allclose(yarn[25:], plain[25:] / 16)
    window_only = rope_frequencies(flash, flash.layer(0))
    assert torch.allclose(window_only, 1.0 / (10000.0 ** (torch.arange(0, 64, 2) / 64)))


def test_rope_inverse_and_relative_position():
    config = tiny_config()
    rot = Rotary(config, config.layer(1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 256, generator=g)
    pos = torch.tensor([0, 1, 7, 500, 4000])
    cis = rot.at(pos)
    assert torch.allclose(rot.rotate(rot.rotate(x, cis), cis, inverse=True), x, atol=1e-5)
    assert torch.equal(rot.rotate(x, cis)[..., :192], x[..., :192])  # only the last 64 dims rotate
    # q·k depends on the position difference only
    q, k = torch.randn(1, 256, generator=g), torch.randn(1, 256, generator=g)
    dots = [
        (rot.rotate(q, rot.at(torch.tensor([p + 9]))) * rot.rotate(k, rot.at(torch.tensor([p])))).sum()
        for p in (0, 100, 1000)
    ]
    assert all(math.isclose(d.item(), dots[0].item(), rel_tol=1e-4) for d in dots)


def test_window_indices_follow_the_reference_layout():
    # first prefill of 5 tokens: width 5, valid rows first, -1 after
    assert window_indices(0, 5, 128, 0)[2].tolist() == [0, 1, 2, -1, -1]
    # decode at position 200 with 127 rows before: all 128 rows, oldest first
    assert window_indices(200, 1, 128, 127)[0].tolist() == list(range(128))
    # decode at position 3: rows 0..3 then padding to the whole window
    row = window_indices(3, 1, 128, 3)[0].tolist()
    assert row[:4] == [0, 1, 2, 3] and set(row[4:]) == {-1} and len(row) == 128
