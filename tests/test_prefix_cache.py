"""The prefix cache through the engine: an agent's next turn computes only its new tokens and gets the
logits a cold run gets; checkpoints are evicted before running sequences suffer, reference counts stay
exact under random traffic, and the disk tier survives a restart and refuses bad files.

Exactness is judged as the engine tests judge batching: by default within ``BATCH_ATOL`` of a cold run in
fp32_nosim (a restored prefix changes only GEMM row counts, as batching does), and bit for bit with
batch-invariant numerics in every mode.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from dsv4 import LLM, SamplingParams
from dsv4.cache.prefix import prefix_digests
from dsv4.engine.llm import RequestOutput
from dsv4.tiny import write_random_checkpoint

BATCH_ATOL = 1e-4  # as in test_engine.py: GEMM row-count rounding, 5x below the reference's own noise
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("prefix"))


def engine(ckpt: Path, mode: str = "fp32_nosim", **kwargs) -> LLM:
    options = {"max_num_seqs": 4, "num_blocks": 48, "chunk_size": 64, "progress": False, **kwargs}
    return LLM(ckpt, mode, **options)


def run(llm: LLM, prompt: list[int], params: SamplingParams = GREEDY) -> RequestOutput:
    request_id = llm.add_request(prompt, params, capture_logits=True)
    while llm.has_unfinished:
        for output in llm.step():
            if output.finished and output.request_id == request_id:
                final = output
    return final


def fresh_tokens(g: random.Random, n: int) -> list[int]:
    return [g.randrange(2, 1280) for _ in range(n)]


def agent_turns(llm: LLM, cold: LLM, turns: int, exact: bool, seed: int = 0) -> None:
    """Each turn re-sends the history: previous prompt + previous output (without its last, never computed,
    token, as a client re-sending the assistant's reply before the stop token does) + a tool result."""
    g = random.Random(seed)
    history, previous = fresh_tokens(g, 150), []
    for turn in range(turns):
        before = llm.prefix_stats()
        warm = run(llm, history)
        computed = llm.prefix_stats().computed_tokens - before.computed_tokens
        reference = run(cold, history)
        assert warm.token_ids == reference.token_ids, f"turn {turn}"
        assert warm.logits is not None and reference.logits is not None
        if exact:
            assert torch.equal(warm.logits, reference.logits), f"turn {turn}"
        else:
            assert (warm.logits - reference.logits).abs().max() <= BATCH_ATOL, f"turn {turn}"
        decode_steps = len(warm.token_ids) - 1
        if turn > 0 and not exact:  # from turn 2 on: only the new tokens (and the decode steps)
            assert warm.num_cached_tokens == len(previous) - 1
            assert computed == len(history) - warm.num_cached_tokens + decode_steps
        assert llm.prefix_stats().hit_tokens - before.hit_tokens == warm.num_cached_tokens
        previous = history + warm.token_ids
        history = previous[:-1] + fresh_tokens(g, 20 + 13 * turn)


def test_agent_turns_compute_only_new_tokens(ckpt: Path) -> None:
    agent_turns(engine(ckpt), engine(ckpt, prefix_cache=False), turns=8, exact=False)


@pytest.mark.parametrize("mode", ["fp32_nosim", "fp32_sim", "bf16_official"])
def test_batch_invariant_reuse_is_bit_identical(ckpt: Path, mode: str) -> None:
    """Aligned engines reuse checkpoints on the chunk grid only (see the scheduler): a turn recomputes at most
    one chunk of its history, and every bit equals a cold run."""
    llm = engine(ckpt, mode, batch_invariant=True)
    agent_turns(llm, engine(ckpt, mode, batch_invariant=True, prefix_cache=False), turns=4, exact=True)
    assert llm.prefix_stats().hit_tokens > 0


def test_a_repeated_prompt_reuses_its_interval_checkpoints(ckpt: Path) -> None:
    """Checkpoints inside a long prompt (every ``checkpoint_interval`` tokens, where chunks are cut): a second
    request that shares only the first 300 tokens restores 256 of them."""
    llm = engine(ckpt, checkpoint_interval=128)
    g = random.Random(1)
    prompt = fresh_tokens(g, 400)
    run(llm, prompt)
    branched = prompt[:300] + fresh_tokens(g, 50)
    warm = run(llm, branched)
    assert warm.num_cached_tokens == 256
    reference = run(engine(ckpt, prefix_cache=False), branched)
    assert warm.token_ids == reference.token_ids
    assert (warm.logits - reference.logits).abs().max() <= BATCH_ATOL


def test_evicted_checkpoint_falls_back_to_a_shorter_one(ckpt: Path) -> None:
    llm, cold = engine(ckpt), engine(ckpt, prefix_cache=False)
    g = random.Random(2)
    first = fresh_tokens(g, 120)
    out1 = run(llm, first)
    second = first + out1.token_ids[:-1] + fresh_tokens(g, 40)
    out2 = run(llm, second)
    third = second + out2.token_ids[:-1] + fresh_tokens(g, 30)
    assert llm.prefix_cache is not None
    longest = llm.prefix_cache.match(third)
    assert longest is not None and longest.num_tokens == len(second) + len(out2.token_ids) - 1
    llm.prefix_cache.evict(longest)
    warm = run(llm, third)
    assert warm.num_cached_tokens == len(second)  # the end of the second prompt
    reference = run(cold, third)
    assert warm.token_ids == reference.token_ids
    assert (warm.logits - reference.logits).abs().max() <= BATCH_ATOL


def test_checkpoints_give_way_to_running_sequences(ckpt: Path) -> None:
    """A pool full of checkpoints still admits and completes a prompt that needs all of it: checkpoints are
    evicted (least recently used first), never a running sequence preempted for them."""
    llm = engine(ckpt, num_blocks=8, block_tokens=128, max_num_seqs=2, checkpoint_slots=6)
    g = random.Random(3)
    for _ in range(6):
        run(llm, fresh_tokens(g, 100), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    assert llm.prefix_stats().checkpoints >= 6
    big = run(llm, fresh_tokens(g, 900), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(big.token_ids) == 4 and big.finish_reason == "length" and big.metrics.num_preemptions == 0
    assert llm.prefix_stats().evictions > 0


def test_unanswered_tails_are_evicted_last(ckpt: Path) -> None:
    llm = engine(ckpt, checkpoint_slots=3, max_num_seqs=1)
    g = random.Random(4)
    prompt = fresh_tokens(g, 50)
    out = run(llm, prompt)  # a prompt end and an output end (the tail)
    tail = prompt + out.token_ids[:-1]
    for _ in range(3):  # each adds a prompt end and a tail
        run(llm, fresh_tokens(g, 50), SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    assert llm.prefix_cache is not None
    hit = llm.prefix_cache.match(tail + [7])
    assert hit is not None and hit.num_tokens == len(tail) and hit.tail


def test_random_traffic_keeps_reference_counts_exact(ckpt: Path) -> None:
    """200 requests over a few shared histories, with random aborts, in a pool small enough to evict and
    preempt: every block is referenced exactly by the sequences and checkpoints that hold it, and once the
    checkpoints are dropped every block and slot is free."""
    llm = engine(ckpt, num_blocks=12, block_tokens=128, max_num_seqs=4, checkpoint_slots=5)
    g = random.Random(5)
    bases = [fresh_tokens(g, g.randrange(60, 400)) for _ in range(4)]
    pending: list[str] = []
    for _ in range(200):
        base = g.choice(bases)
        prompt = base[: g.randrange(1, len(base) + 1)] + fresh_tokens(g, g.randrange(0, 40))
        params = SamplingParams(temperature=1.0, seed=g.randrange(1000), max_tokens=g.randrange(1, 6))
        pending.append(llm.add_request(prompt, params))
        for _ in range(g.randrange(0, 3)):
            llm.step()
        if pending and g.random() < 0.2:
            llm.abort(pending.pop(g.randrange(len(pending))))
        check_refcounts(llm)
    while llm.has_unfinished:
        llm.step()
    check_refcounts(llm)
    pool, cache = llm.pool, llm.prefix_cache
    assert pool is not None and cache is not None
    assert pool.used_bytes == llm.prefix_stats().cached_bytes
    assert llm.prefix_stats().hit_tokens > 0 and llm.prefix_stats().evictions > 0
    cache.clear()
    assert pool.num_free_blocks == pool.num_blocks and pool.num_free_slots == pool.max_sequences


def check_refcounts(llm: LLM) -> None:
    assert llm.pool is not None and llm.scheduler is not None and llm.prefix_cache is not None
    holders = [s.cache for s in llm.scheduler.running if s.cache is not None]
    holders += [c.seq for c in llm.prefix_cache._lru.values()]
    counts = [0] * llm.pool.num_blocks
    for seq in holders:
        for block in seq.blocks:
            counts[block] += 1
    assert counts == [llm.pool.refcount(b) for b in range(llm.pool.num_blocks)]
    assert llm.pool.num_free_blocks == counts.count(0)
    assert llm.pool.num_free_slots == llm.pool.max_sequences - len(holders)


def test_export_and_import_rebuild_a_sequence_exactly(ckpt: Path) -> None:
    """What the disk tier stores of a sequence (every stored row, the slot's live state, the counts) rebuilds
    it bit for bit, in bf16_official with its FP8/FP4-coded rows."""
    llm = engine(ckpt, "bf16_official", block_tokens=128)
    run(llm, fresh_tokens(random.Random(6), 300))  # its output's checkpoint: 305 tokens, a partial block
    pool, cache = llm.pool, llm.prefix_cache
    assert cache is not None and pool is not None
    checkpoint = max(cache._lru.values(), key=lambda c: c.num_tokens)
    full = checkpoint.num_tokens // 128
    blocks = [pool.export_block(b) for b in checkpoint.seq.blocks[:full]]
    state = pool.export_state(checkpoint.seq)
    copy = pool.import_sequence(checkpoint.num_tokens, blocks, state)
    for original, rebuilt in zip(blocks, map(pool.export_block, copy.blocks[:full]), strict=True):
        assert original.keys() == rebuilt.keys()
        assert all(torch.equal(original[k].view(torch.uint8), rebuilt[k].view(torch.uint8)) for k in original)
    again = pool.export_state(copy)
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k].view(torch.uint8), state[k].view(torch.uint8)) for k in state)
    pool.free(copy)
    with pytest.raises(ValueError, match="full blocks"):
        pool.import_sequence(checkpoint.num_tokens + 128, blocks, state)


def test_sessions_survive_a_restart(ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Turns 1-2 on one engine, turn 3 on a new engine over the same session directory: restored from disk,
    computing only the new tokens, with a cold run's logits. A corrupted checkpoint file is refused."""
    g = random.Random(7)
    first = fresh_tokens(g, 200)
    llm = engine(ckpt, session_dir=tmp_path)
    out1 = run(llm, first)
    second = first + out1.token_ids[:-1] + fresh_tokens(g, 30)
    out2 = run(llm, second)
    third = second + out2.token_ids[:-1] + fresh_tokens(g, 25)
    assert llm.prefix_stats().disk_checkpoints == 4
    del llm

    restarted = engine(ckpt, session_dir=tmp_path)
    warm = run(restarted, third)
    assert warm.num_cached_tokens == len(second) + len(out2.token_ids) - 1
    assert restarted.prefix_stats().disk_hits == 1
    reference = run(engine(ckpt, prefix_cache=False), third)
    assert warm.token_ids == reference.token_ids
    assert (warm.logits - reference.logits).abs().max() <= BATCH_ATOL

    key = prefix_digests(third, [warm.num_cached_tokens])[warm.num_cached_tokens]
    (path,) = tmp_path.glob(f"*/checkpoints/{key}.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="dsv4.sessions"):
        again = run(engine(ckpt, session_dir=tmp_path), third)
    assert again.num_cached_tokens < warm.num_cached_tokens  # the corrupted one is not used
    assert any("checksum" in r.getMessage() or "corrupt" in r.getMessage() for r in caplog.records)
    assert (again.logits - reference.logits).abs().max() <= BATCH_ATOL


def test_options_are_checked(ckpt: Path) -> None:
    with pytest.raises(ValueError, match="prefix cache"):
        engine(ckpt, prefix_cache=False, session_dir="/tmp/x")
    with pytest.raises(ValueError, match="checkpoint_slots"):
        engine(ckpt, checkpoint_slots=-1)
    with pytest.raises(ValueError, match="checkpoint_interval"):
        engine(ckpt, checkpoint_interval=0)


def test_a_request_that_cannot_fit_yet_evicts_nothing(ckpt: Path) -> None:
    """While running sequences hold the blocks a waiting request needs, evicting checkpoints would lose
    prefixes and gain nothing: they stay until the room can really be made."""
    llm = engine(ckpt, num_blocks=7, block_tokens=128, max_num_seqs=2, chunk_size=512)
    g = random.Random(8)
    run(llm, fresh_tokens(g, 100), SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))  # 1 block
    long = llm.add_request(fresh_tokens(g, 600), SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    while llm.scheduler is not None and not any(s.num_computed >= 600 for s in llm.scheduler.running):
        llm.step()
    waiting = llm.add_request(fresh_tokens(g, 300), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    for _ in range(5):
        llm.step()
    # the first prompt's (1 block) and the long one's prompt end (a copy of its partial 5th block); the long
    # one holds 5 blocks: nothing is free, and the 2 reclaimable blocks are fewer than the 3 that the waiting
    # request's first chunk (its whole prompt) needs
    assert llm.prefix_stats().evictions == 0 and llm.prefix_stats().checkpoints == 2
    done = {}
    while llm.has_unfinished:
        done.update((o.request_id, o) for o in llm.step() if o.finished)
    assert done[long].finish_reason == "length" and len(done[waiting].token_ids) == 2


def test_a_failing_step_ends_its_sequences_and_keeps_the_cache_sound(ckpt: Path, monkeypatch) -> None:
    """A forward that raises ends the sequences of that step (their partly written caches freed, never kept
    as checkpoints); the checkpoints and the engine go on serving."""
    from dsv4.engine.llm import StepFailed

    llm = engine(ckpt)
    g = random.Random(9)
    history = fresh_tokens(g, 200)
    first = run(llm, history)
    checkpoints = llm.prefix_stats().checkpoints
    model, forward = llm.model, type(llm.model).forward
    poisoned = 977

    def faulty(self, tokens, spans, logit_rows=None):
        if bool((tokens == poisoned).any()):
            raise RuntimeError("injected fault")
        return forward(self, tokens, spans, logit_rows)

    monkeypatch.setattr(type(model), "forward", faulty)
    bad = llm.add_request(history + first.token_ids[:-1] + [poisoned], GREEDY)
    with pytest.raises(StepFailed) as failure:
        while llm.has_unfinished:
            llm.step()
    assert failure.value.request_ids == [bad] and not llm.has_unfinished
    check_refcounts(llm)
    assert llm.prefix_stats().checkpoints == checkpoints
    good = run(llm, history + first.token_ids[:-1] + [5, 6, 7])
    assert good.num_cached_tokens == len(history) + len(first.token_ids) - 1
