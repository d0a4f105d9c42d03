"""The engine: chunked prefill and ragged batches against the reference vectors, preemption, abort, the
public ``LLM`` API and ``dsv4 generate``.

Long runs use fp32_nosim, where the reference tolerance is tight (5e-4) and a correct engine sits near the
natural noise (3.6e-5). The tests pin torch to one thread: on a small shared host, two threads per process
oversubscribe the cores and run several times slower, and nothing here depends on the thread count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv4 import LLM, SamplingParams
from dsv4.cli import main
from dsv4.engine.llm import RequestOutput
from dsv4.engine.vectors import run_vectors_through_engine
from dsv4.tiny import TINY_RANDOM, TINY_RANDOM_CONTEXT, write_random_checkpoint

REF = Path(__file__).parent / "data" / "reference"
CKPT = REF / "ckpt"
ATOL = 5e-4  # the manifest's fp32_nosim tolerance
# Solo and batched runs of a sequence differ only in GEMM row counts: BLAS picks another kernel (GEMV for
# one row, blocked GEMM for many) and so another summation order, a last-bit difference per product that
# grows to ~2e-5 through the layers (the reference's own noise between two valid fp32 runs is 3.6e-5).
# 1e-4 keeps a 5x margin and sits far below any semantic error (>2); bit-identity is what batch-invariant
# engines give (test_batch_invariant_*), at the price of the reference's one-row decode rounding.
BATCH_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vectors() -> dict[str, torch.Tensor]:
    return load_file(REF / "vectors.safetensors")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> LLM:
    # fp32_nosim: in bf16 with the FP8 simulation, batch composition changes GEMM blockings and the
    # rounding flips cascade, so a seeded sequence's tokens would depend on its batch companions.
    return LLM(tiny_dir, "fp32_nosim", max_num_seqs=8, num_blocks=32, chunk_size=64, progress=False)


def assert_pool_empty(llm: LLM) -> None:
    """No sequence holds anything: what the pool still holds belongs to prefix-cache checkpoints, and
    dropping them frees every block and slot (reference counts are exact)."""
    assert llm.pool is not None and not llm.has_unfinished
    assert llm.pool.used_bytes == llm.prefix_stats().cached_bytes
    if llm.prefix_cache is not None:
        llm.prefix_cache.clear()
    assert llm.pool.num_free_blocks == llm.pool.num_blocks
    assert llm.pool.num_free_slots == llm.pool.max_sequences
    assert llm.pool.used_bytes == 0


def run_all(
    llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], **kwargs
) -> list[RequestOutput]:
    """Queue every prompt (with one shared or one per-prompt SamplingParams), step until all finish, return
    the final outputs in order."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    ids = [llm.add_request(p, sp, **kwargs) for p, sp in zip(prompts, each, strict=True)]
    done: dict[str, RequestOutput] = {}
    while llm.has_unfinished:
        done.update((o.request_id, o) for o in llm.step() if o.finished)
    return [done[i] for i in ids]


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 1280, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------- reference vectors
@pytest.mark.parametrize(
    "chunk, batch",
    [
        (1, False),
        (3, False),
        (4, False),
        (5, False),
        (127, False),
        (128, False),
        (129, False),
        (300, False),
        (None, True),
    ],
    ids=["chunk1", "chunk3", "chunk4", "chunk5", "chunk127", "chunk128", "chunk129", "chunk300", "batch"],
)
def test_vectors_through_engine(vectors: dict[str, torch.Tensor], chunk: int | None, batch: bool) -> None:
    logits = run_vectors_through_engine(REF, "fp32_nosim", chunk=chunk, batch=batch)
    assert sorted(logits) == [0, 1]
    for i, mine in logits.items():
        ref = vectors[f"prompt{i}.fp32_nosim.logits"]
        assert mine.shape == ref.shape == (49, 1280)
        assert (mine - ref).abs().amax(dim=-1).max() <= ATOL
        assert torch.equal(mine.argmax(-1), ref.argmax(-1))


def test_vectors_argument_checks() -> None:
    with pytest.raises(ValueError, match="either"):
        run_vectors_through_engine(REF, "fp32_nosim")
    with pytest.raises(ValueError, match="either"):
        run_vectors_through_engine(REF, "fp32_nosim", chunk=4, batch=True)


# ---------------------------------------------------------------------------------------- batching
def test_ragged_batch_matches_solo() -> None:
    llm = LLM(CKPT, "fp32_nosim", max_num_seqs=8, num_blocks=16, chunk_size=4096, progress=False)
    prompts = random_prompts([1, 7, 64, 127, 128, 129, 200, 333])
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    batched = run_all(llm, prompts, params, capture_logits=True)
    assert_pool_empty(llm)
    for prompt, b in zip(prompts, batched, strict=True):
        (solo,) = run_all(llm, [prompt], params, capture_logits=True)
        assert solo.token_ids == b.token_ids
        assert solo.logits is not None and b.logits is not None and solo.logits.shape == (4, 1280)
        assert (solo.logits - b.logits).abs().max() <= BATCH_ATOL
    assert_pool_empty(llm)


@pytest.mark.parametrize("mode", ["fp32_nosim", "bf16_official"])
def test_batch_invariant_ragged_batch_is_exactly_solo(mode: str) -> None:
    """With batch-invariant numerics each of 8 sequences gets bit for bit its solo logits and, seeded, its
    solo tokens - in bf16 with the FP8 simulation too, where any 1-ulp difference would cascade. The
    64-token chunks and the budget (64 + 8) make the batched prompts wait for room and share steps with
    decodes, unlike the solo ones."""
    llm = LLM(CKPT, mode, max_num_seqs=8, num_blocks=16, chunk_size=64, batch_invariant=True, progress=False)
    prompts = random_prompts([1, 7, 64, 127, 128, 129, 200, 333])
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=5, ignore_eos=True) for i in range(8)]
    batched = run_all(llm, prompts, params, capture_logits=True)
    for prompt, p, b in zip(prompts, params, batched, strict=True):
        (solo,) = run_all(llm, [prompt], p, capture_logits=True)
        assert solo.token_ids == b.token_ids
        assert solo.logits is not None and b.logits is not None
        assert torch.equal(solo.logits, b.logits), f"{len(prompt)}-token prompt: {(solo.logits - b.logits).abs().max()}"
    assert_pool_empty(llm)


def test_batch_invariant_preemption_replays_exactly() -> None:
    """A preempted sequence recomputes its output one token per step, as it first computed it: its logits
    after resuming are bit-identical to an undisturbed run's."""
    prompts = random_prompts([250, 249, 248], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    roomy = LLM(CKPT, "bf16_official", max_num_seqs=3, num_blocks=8, batch_invariant=True, progress=False)
    tight = LLM(CKPT, "bf16_official", max_num_seqs=3, num_blocks=4, batch_invariant=True, progress=False)
    expected = run_all(roomy, prompts, params, capture_logits=True)
    got = run_all(tight, prompts, params, capture_logits=True)
    assert sum(o.metrics.num_preemptions for o in got) > 0
    for g, e in zip(got, expected, strict=True):
        assert g.token_ids == e.token_ids and g.logits is not None and e.logits is not None
        assert torch.equal(g.logits, e.logits)
    assert_pool_empty(tight)


def test_scheduler_budget_and_order(tiny: LLM) -> None:
    """Decodes go first, every step stays within the token budget and max_num_seqs."""
    assert tiny.scheduler is not None
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for p in random_prompts([150, 5, 90, 40, 3, 70, 20, 200, 11, 9], seed=1):
        tiny.add_request(p, params)
    while tiny.has_unfinished:
        scheduled = tiny.scheduler.schedule()
        assert scheduled.num_tokens <= tiny.scheduler.max_num_batched_tokens
        assert len(tiny.scheduler.running) <= 8
        kinds = [c.length == 1 and c.start >= len(c.seq.prompt_ids) for c in scheduled.chunks]
        assert kinds == sorted(kinds, reverse=True)  # all decodes before any prefill chunk
        results = tiny.runner.run(scheduled.chunks)
        for r in results:
            r.chunk.seq.append(r.token, r.logits)
        tiny.scheduler.update(scheduled.chunks)
        tiny._requests = {k: s for k, s in tiny._requests.items() if not s.finished}
    assert_pool_empty(tiny)


# ---------------------------------------------------------------------------------------- preemption, abort
@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_preempted_sequences_produce_the_same_tokens(seeded: bool) -> None:
    # Three 250-token prompts each cross into a second 256-token block while decoding; four blocks
    # cannot hold all three, so the newest is preempted and recomputed from prompt + output.
    prompts = random_prompts([250, 249, 248], seed=2)
    params = [
        SamplingParams(
            temperature=1.0 if seeded else 0.0, seed=100 + i if seeded else None, max_tokens=14, ignore_eos=True
        )
        for i in range(3)
    ]
    roomy = LLM(CKPT, "fp32_nosim", max_num_seqs=3, num_blocks=8, progress=False)
    tight = LLM(CKPT, "fp32_nosim", max_num_seqs=3, num_blocks=4, progress=False)
    expected = roomy.generate(prompts, params)
    got = tight.generate(prompts, params)
    assert sum(o.metrics.num_preemptions for o in got) > 0
    assert all(o.metrics.num_preemptions == 0 for o in expected)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 14 for o in got)
    assert_pool_empty(roomy)
    assert_pool_empty(tight)


def test_sequence_larger_than_the_pool_stops_with_length() -> None:
    llm = LLM(CKPT, "fp32_nosim", max_num_seqs=1, num_blocks=1, progress=False)
    (out,) = llm.generate([random_prompts([250])[0]], SamplingParams(temperature=0.0, max_tokens=20))
    # one block holds 256 tokens: the prompt and 6 fed outputs, from which the 7th is sampled
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    assert_pool_empty(llm)
    with pytest.raises(ValueError, match="cannot fit"):
        llm.add_request(random_prompts([300])[0], SamplingParams())


def test_abort_frees_everything(tiny: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    ids = [tiny.add_request(p, params) for p in random_prompts([100, 30, 10, 5, 80, 60, 20, 40, 70, 90])]
    for _ in range(3):
        tiny.step()
    assert tiny.pool is not None and tiny.pool.num_free_slots < tiny.pool.max_sequences
    for request_id in ids:
        tiny.abort(request_id)
    tiny.abort("no-such-request")
    assert_pool_empty(tiny)


def test_stream_closed_early_aborts(tiny: LLM) -> None:
    stream = tiny.stream([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    next(stream)
    stream.close()
    assert_pool_empty(tiny)


# ---------------------------------------------------------------------------------------- the public API
def test_generate_max_tokens_and_logprobs(tiny: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    (out,) = tiny.generate("Hello world, this is a test.", params)
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    assert out.num_prompt_tokens == len(tiny.tokenizer.encode("Hello world, this is a test."))
    assert out.logprobs is not None and len(out.logprobs) == 12
    for token, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == token and lp.logprob is not None and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == token  # greedy: the chosen token is the most likely
    assert out.text == tiny.tokenizer.decode(out.token_ids)
    assert_pool_empty(tiny)


def test_generate_stop_token_ids_and_strings(tiny: LLM) -> None:
    prompt = "The quick brown fox"
    base = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    (full,) = tiny.generate(prompt, base)
    ids = full.token_ids

    stop_id = ids[6]
    first = ids.index(stop_id)
    (out,) = tiny.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id])
    )
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == ids[: first + 1]
    assert out.text == tiny.tokenizer.decode(ids[:first])  # the stop token's text is not output

    stop = full.text[len(full.text) // 2 :][:2]
    (out,) = tiny.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    assert out.token_ids == ids[: len(out.token_ids)]
    assert_pool_empty(tiny)


def test_stream_deltas_add_up(tiny: LLM) -> None:
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=25, ignore_eos=True)
    outputs = list(tiny.stream("Once upon a time", params))
    (final,) = tiny.generate("Once upon a time", params)  # seeded: the same tokens again
    assert outputs[-1].finished and outputs[-1].token_ids == final.token_ids
    assert "".join(o.delta_text for o in outputs) == final.text
    assert [t for o in outputs for t in o.delta_token_ids] == final.token_ids
    assert_pool_empty(tiny)


def test_seeded_requests_ignore_their_batch(tiny: LLM) -> None:
    prompts = ["a", "bb", "ccc", "dddd"]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=8, ignore_eos=True) for s in range(4)]
    together = tiny.generate(prompts, params)
    alone = [tiny.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert_pool_empty(tiny)


def test_bad_requests(tiny: LLM) -> None:
    with pytest.raises(ValueError, match="temperature"):
        tiny.generate("x", SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="token ids"):
        tiny.generate([[0, 99999]])
    with pytest.raises(ValueError, match="empty"):
        tiny.generate([[]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        tiny.generate(["a", "b"], [SamplingParams()])
    assert_pool_empty(tiny)


def test_preset_refuses_to_generate() -> None:
    llm = LLM("v4-flash", progress=False)
    assert llm.config.n_layers > 5 and llm.model is None
    with pytest.raises(ValueError, match="shapes only"):
        llm.generate("hi")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        LLM("/nonexistent/model")


def test_reference_checkpoint_defaults_to_official_numerics() -> None:
    llm = LLM(CKPT, progress=False, max_num_seqs=1, num_blocks=2)
    assert llm.numerics == "bf16_official" and llm.tokenizer is None
    with pytest.raises(ValueError, match="token ids"):
        llm.generate("text needs a tokenizer")
    (out,) = llm.generate([[0, 5, 9]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.text == ""


# ---------------------------------------------------------------------------------------- CLI
def test_cli_generate(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--max-tokens", "5", "--temperature", "0", "--quiet"]
    )
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--max-tokens", "3", "--chat", "--seed", "1"]
    rc = main([*argv, "--quiet"])
    assert rc == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "not a checkpoint directory"),
        (["--model", "v4-pro"], "shapes only"),
        (["--max-tokens", "0"], "max_tokens"),
    ],
)
def test_cli_errors(tiny_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--quiet", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_tiny_random_is_a_model_name_everywhere(tmp_path, monkeypatch) -> None:
    """``tiny-random`` resolves to a cached random checkpoint for the library and every command alike."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    llm = LLM("tiny-random", progress=False)
    assert (
        llm.model is not None
        and (tmp_path / "dsv4" / f"tiny-random-{TINY_RANDOM_CONTEXT}" / "tokenizer.json").is_file()
    )
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3
    assert llm.pool is not None and llm.pool.used_bytes == llm.prefix_stats().cached_bytes


def test_warm_up_compiles_every_decode_batch_before_the_first_request() -> None:
    """After ``warm_up`` (what ``dsv4 serve`` runs before it listens), decode batches of 1 to 16 sequences
    compile nothing more: the first requests do not wait for inductor."""
    from torch._dynamo.utils import counters

    llm = LLM(TINY_RANDOM, max_num_seqs=16, progress=False)
    llm.warm_up()
    compiled = counters["stats"]["unique_graphs"]
    for n in (1, 3, 5, 16):
        llm.generate([[7 + i, 8, 9] for i in range(n)], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert counters["stats"]["unique_graphs"] == compiled
