"""Agent sessions with and without prefix reuse: an agent trace replayed at 8K, 32K and 128K tokens of history.

Per context length, one trace: a long first prompt (a system prompt and a "repository dump" of random ids)
followed by turns that each re-send the whole history plus the previous reply (minus its last token, which
the engine never computed, as an agent client sends it back) and a tool result of ``--turn-tokens`` random
ids. Replies are ``--reply-tokens`` greedy tokens (``ignore_eos``). The final turn's prompt is the context
length. Two engines on one random checkpoint, side by side in one run:

* **with reuse**: ``LLM(prefix_cache=True, session_dir=<temp dir>)``, every turn; per turn: time to first
  token (``first_token_time - arrival_time``, the step loop driven here), tokens computed
  (``prefix_stats().computed_tokens`` delta, the reply's decode steps included), tokens restored, hit rate
  (restored / prompt), and the time the turn spent writing checkpoints through to disk (the session store's
  writes, timed by wrapping them on the instance). A turn restoring less than its whole previous history
  is counted, with the reason.
* **without reuse**: ``LLM(prefix_cache=False)``, only the last ``--cold-turns`` turns (a cold 128K prefill
  of the ``small`` config takes ~8-10 minutes on 2 cores, so the default, 1, keeps the full run near 25
  minutes; 2 makes it ~35), one output token each, after a short warm-up request.

It prints the ratio of mean time to first token without / with reuse over the turns both ran (turn 1, cold
for both, excluded), bytes per cached token in memory (``cached_bytes`` / tokens of the longest checkpoint)
and on disk (``disk_bytes`` / the same), and a restart: a new engine on the session directory (its
construction timed, then a short warm-up request) replays the last turn, restoring the previous history
from disk (the restore timed: pool room, files read and verified, pool filled), against the cold engine's
time for the same prompt.

Floors on the project's 2-core CPU machine (``small`` config, 2 threads, the defaults): mean time to first
token with reuse at least 20x better than without at 32K, and 50x at 128K. The script prints PASS/FAIL and
exits non-zero on a FAIL. Timings only mean something on an otherwise idle machine: when other processes
share the cores, two torch threads spend their time waiting for each other (the script warns when the load
average exceeds the core count).

    python benchmarks/agent_sessions.py                                  # 8K, 32K, 128K: ~25 minutes idle
    python benchmarks/agent_sessions.py --contexts 8192 --turns 3        # ~1-2 minutes
    python benchmarks/agent_sessions.py --quick                          # tiny, 2K and 4K, 100-token tools

Progress goes to stderr, results to stdout. The checkpoint is a random one of ``benchmarks/engine.py``'s
configs (``--config small``, the default, or ``tiny``), computed in fp32 without simulation.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dsv4 import LLM, SamplingParams
from dsv4.cache import layout
from dsv4.tiny import tiny_config, write_random_checkpoint


def _engine_configs() -> dict[str, dict[str, Any]]:
    """``CONFIGS`` of ``benchmarks/engine.py`` (the benchmarks directory is not a package)."""
    spec = importlib.util.spec_from_file_location("_dsv4_bench_engine", Path(__file__).with_name("engine.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIGS


CONFIGS = _engine_configs()
NUMERICS = "fp32_nosim"
MAX_NUM_SEQS = 2
SYSTEM_TOKENS = 1024
MIN_FIRST_PROMPT = 1024
WARMUP_TOKENS = 128
FLOORS = {32768: 20.0, 131072: 50.0}  # context -> minimum mean TTFT ratio without / with reuse


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Timer:
    """Accumulated seconds of the calls of the functions it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed


def instrument_disk(llm: LLM) -> tuple[Timer, Timer]:
    """Time the session store's writes and its file reads (load: read and verify) of this engine (the bound
    methods are replaced on the instance only; nothing in dsv4 changes)."""
    store = llm.prefix_cache.disk if llm.prefix_cache is not None else None
    writes, loads = Timer(), Timer()
    if store is not None:
        store.put_block = writes.wrap(store.put_block)  # type: ignore[method-assign]
        store.put_checkpoint = writes.wrap(store.put_checkpoint)  # type: ignore[method-assign]
        store.load = loads.wrap(store.load)  # type: ignore[method-assign]
    return writes, loads


@dataclass
class TurnResult:
    prompt_tokens: int
    cached: int
    computed: int
    ttft: float  # seconds
    seconds: float  # the whole turn: prefill, reply, checkpoint write-through
    output: list[int]
    disk_write: float = 0.0
    evictions: int = 0


def run_turn(llm: LLM, prompt: list[int], max_tokens: int, label: str) -> TurnResult:
    """One request alone in the engine, stepped to completion here; a progress bar for long prefills."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    before = llm.prefix_stats()
    start = time.perf_counter()
    request_id = llm.add_request(prompt, params)
    seq = llm._requests[request_id]
    bar = None
    final = None
    while final is None:
        for out in llm.step():
            if out.request_id == request_id and out.finished:
                final = out
        if bar is None and seq.num_computed - seq.num_cached_tokens > 4 * llm.chunk_size:
            bar = tqdm(total=len(prompt), initial=seq.num_cached_tokens, unit="tok", desc=label, leave=False)
        if bar is not None:
            bar.update(max(0, min(seq.num_computed, len(prompt)) - bar.n))
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    after = llm.prefix_stats()
    assert final.metrics.first_token_time is not None
    return TurnResult(
        prompt_tokens=len(prompt),
        cached=final.num_cached_tokens,
        computed=after.computed_tokens - before.computed_tokens,
        ttft=final.metrics.first_token_time - final.metrics.arrival_time,
        seconds=seconds,
        output=list(final.token_ids),
        evictions=after.evictions - before.evictions,
    )


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def first_prompt_tokens(context: int, turns: int, turn_tokens: int, reply_tokens: int) -> int:
    """The first prompt's length, so that the last turn's prompt is ``context`` tokens."""
    return context - (turns - 1) * (reply_tokens - 1 + turn_tokens)


def pool_blocks(context: int, args: argparse.Namespace) -> int:
    """Blocks for the longest sequence (its last prompt and reply) plus one partial block per state slot
    (every checkpoint may own one) and a margin."""
    slots = MAX_NUM_SEQS * 5  # running + the default 4 x max_num_seqs checkpoint slots
    return layout.blocks_for(context + args.reply_tokens + 1) + slots + 8


def make_llm(path: Path, context: int, args: argparse.Namespace, warm: bool = True, **kwargs: Any) -> tuple[LLM, float]:
    """A fresh engine and its construction time, then (``warm``) warmed up by one short request of unrelated
    ids (a fresh engine's first forward is slower: a timed turn should not pay for it). The engine with reuse
    is not: its first turn is cold anyway, and a warm-up would add its checkpoints to the memory and disk
    figures."""
    start = time.perf_counter()
    llm = LLM(
        path, NUMERICS, max_num_seqs=MAX_NUM_SEQS, num_blocks=pool_blocks(context, args), progress=False, **kwargs
    )
    seconds = time.perf_counter() - start
    if warm:
        run_turn(llm, random_ids(WARMUP_TOKENS, llm.config.vocab_size, seed=12345), 2, "warm-up")
    return llm, seconds


def miss_reason(turn: int, result: TurnResult, expected: int, interval: int | None) -> str | None:
    """Why a turn restored less than its whole previous history (None when it restored all of it)."""
    if turn == 1:
        return "first turn: cold"
    if result.cached >= expected:
        return None
    if result.evictions:
        return f"{result.evictions} checkpoint(s) evicted from memory during the turn"
    if result.cached == 0:
        return "no checkpoint of the previous history found"
    if interval and result.cached % interval == 0:
        return f"only the interval checkpoint at {result.cached} found, not the previous reply's end"
    return f"restored {result.cached} of {expected}: unexplained"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def bench_context(path: Path, context: int, args: argparse.Namespace, vocab: int, tmp: Path) -> dict[str, Any]:
    turns = args.turns
    first = first_prompt_tokens(context, turns, args.turn_tokens, args.reply_tokens)
    system = random_ids(min(SYSTEM_TOKENS, first // 4), vocab, seed=1)
    history = system + random_ids(first - len(system), vocab, seed=context)
    tools = [random_ids(args.turn_tokens, vocab, seed=context * 1000 + t) for t in range(2, turns + 1)]
    session_dir = tmp / f"sessions-{context}"

    # ---- with reuse: every turn
    llm, load_reuse = make_llm(path, context, args, warm=False, session_dir=session_dir)
    writes, _ = instrument_disk(llm)
    prompts: list[list[int]] = []
    reuse: list[TurnResult] = []
    expected: list[int] = []
    reasons: list[str | None] = []
    for turn in range(1, turns + 1):
        if turn > 1:
            expected.append(len(history) + len(reuse[-1].output) - 1)
            history = history + reuse[-1].output[:-1] + tools[turn - 2]
        else:
            expected.append(0)
        prompts.append(list(history))
        log(f"[{context}] turn {turn}/{turns} with reuse: {len(history)} prompt tokens")
        written = writes.seconds
        result = run_turn(llm, history, args.reply_tokens, f"{context} turn {turn} reuse")
        result.disk_write = writes.seconds - written
        reuse.append(result)
        reasons.append(miss_reason(turn, result, expected[-1], llm.checkpoint_interval))
    stats = llm.prefix_stats()
    longest = len(prompts[-1]) + len(reuse[-1].output) - 1  # the last reply's end: the longest checkpoint
    pool = llm.pool
    assert pool is not None
    memory = {
        "checkpoints": stats.checkpoints,
        "cached_bytes": stats.cached_bytes,
        "slot_bytes": pool.slot_nbytes,
        "block_bytes": pool.block_nbytes,
        "disk_checkpoints": stats.disk_checkpoints,
        "disk_bytes": stats.disk_bytes,
        "evictions": stats.evictions,
        "interval": llm.checkpoint_interval,
        "write_seconds": writes.seconds,
        "write_calls": writes.calls,
    }
    del llm
    gc.collect()

    # ---- without reuse: the last --cold-turns turns, one output token each (only the TTFT is compared)
    cold_llm, load_cold = make_llm(path, context, args, prefix_cache=False)
    cold: dict[int, TurnResult] = {}
    for turn in range(max(1, turns - args.cold_turns + 1), turns + 1):
        log(f"[{context}] turn {turn}/{turns} without reuse: {len(prompts[turn - 1])} prompt tokens")
        cold[turn] = run_turn(cold_llm, prompts[turn - 1], 1, f"{context} turn {turn} cold")
    del cold_llm
    gc.collect()

    # ---- a restart before the last turn: a new engine on the session directory replays it from disk
    log(f"[{context}] restart: a new engine on the session directory replays turn {turns}")
    disk_llm, load_disk = make_llm(path, context, args, session_dir=session_dir)
    _, reads = instrument_disk(disk_llm)
    restores = Timer()  # the whole restore: room in the pool, the files read and verified, the pool filled
    assert disk_llm.prefix_cache is not None
    disk_llm.prefix_cache._load = restores.wrap(disk_llm.prefix_cache._load)  # type: ignore[method-assign]
    restored = run_turn(disk_llm, prompts[-1], args.reply_tokens, f"{context} turn {turns} from disk")
    disk_hits = disk_llm.prefix_stats().disk_hits
    del disk_llm
    gc.collect()

    return {
        "context": context,
        "load_average": os.getloadavg()[0],
        "prompts": prompts,
        "reuse": reuse,
        "expected": expected,
        "reasons": reasons,
        "cold": cold,
        "longest": longest,
        "memory": memory,
        "load": {"reuse": load_reuse, "cold": load_cold, "disk": load_disk},
        "restored": restored,
        "restore_read": reads.seconds,
        "restore": restores.seconds,
        "disk_hits": disk_hits,
    }


def report(r: dict[str, Any], bytes_per_token: int) -> bool | None:
    """Print one context's results; returns whether it meets its floor (None: no floor at this length)."""
    context, reuse, cold = r["context"], r["reuse"], r["cold"]
    print(
        f"\n=== context {context}: {len(reuse)} turns, final prompt {len(r['prompts'][-1])} tokens "
        f"(load average {r['load_average']:.1f}) ==="
    )
    cores = os.cpu_count() or 1
    if r["load_average"] > cores + 0.5:
        why = "timings are unreliable"
        if torch.get_num_threads() > 1:  # seen here: a 2-thread run at load 4-7 was 10-20x slower than idle
            why = "torch's threads wait on each other's descheduled peers: timings are unreliable"
            why += " (--threads 1 suffers less)"
        print(f"warning: load average {r['load_average']:.1f} on {cores} cores: other processes share the CPUs; {why}")
    header = (
        f"{'turn':>4} | {'prompt':>7} | {'cached':>7} | {'hit':>6} | {'computed':>8} | {'TTFT ms':>9} | "
        f"{'turn s':>7} | {'disk wr ms':>10} || {'cold TTFT ms':>12} | {'cold comp.':>10} | {'ratio':>8}"
    )
    print(header + "\n" + "-" * len(header))
    for turn, res in enumerate(reuse, start=1):
        c = cold.get(turn)
        ratio = f"{c.ttft / res.ttft:>7.1f}x" if c is not None else f"{'-':>8}"
        print(
            f"{turn:>4} | {res.prompt_tokens:>7} | {res.cached:>7} | {res.cached / res.prompt_tokens:>6.1%} | "
            f"{res.computed:>8} | {ms(res.ttft):>9} | {res.seconds:>7.2f} | {ms(res.disk_write):>10} || "
            f"{ms(c.ttft if c else None):>12} | {c.computed if c else '-':>10} | {ratio}"
        )
    prompted = sum(res.prompt_tokens for res in reuse)
    restored_all = sum(res.cached for res in reuse)
    computed = sum(res.computed for res in reuse)
    print(
        f"session: {restored_all} of {prompted} prompt tokens restored ({restored_all / prompted:.1%}); "
        f"{computed} tokens computed with reuse, {prompted + len(reuse) * (len(reuse[0].output) - 1)} without"
    )
    misses = [(turn, why) for turn, why in enumerate(r["reasons"], start=1) if why is not None]
    print(f"turns restoring less than their whole previous history: {len(misses)}")
    for turn, why in misses:
        print(f"  turn {turn}: {why}")

    both = [t for t in cold if t > 1]
    verdict: bool | None = None
    if both:
        with_reuse = statistics.mean(reuse[t - 1].ttft for t in both)
        without = statistics.mean(cold[t].ttft for t in both)
        ratio = without / with_reuse
        floor = FLOORS.get(context)
        line = (
            f"mean TTFT over turns {','.join(map(str, both))}: without reuse {ms(without)} ms, with reuse "
            f"{ms(with_reuse)} ms: {ratio:.1f}x"
        )
        if floor is not None:
            verdict = ratio >= floor
            line += f"  [{'PASS' if verdict else 'FAIL'}: floor {floor:.0f}x]"
        print(line)
    else:
        print("no turn after the first ran without reuse (--cold-turns): no TTFT ratio")

    m, longest = r["memory"], r["longest"]
    blocks_bytes = m["cached_bytes"] - m["checkpoints"] * m["slot_bytes"]
    print(
        f"memory: {m['checkpoints']} checkpoints, {m['cached_bytes'] / 2**20:.1f} MiB held by the cache "
        f"({m['checkpoints']} state slots of {m['slot_bytes'] / 2**20:.2f} MiB, {blocks_bytes / 2**20:.1f} MiB "
        f"of blocks), {m['evictions']} evictions, checkpoint interval {m['interval']}; longest checkpoint {longest} "
        f"tokens: {m['cached_bytes'] / longest:.0f} B/token, blocks alone {blocks_bytes / longest:.0f} B/token "
        f"(layout: {bytes_per_token} B/token)"
    )
    print(
        f"disk: {m['disk_checkpoints']} checkpoints, {m['disk_bytes'] / 2**20:.1f} MiB: "
        f"{m['disk_bytes'] / longest:.0f} B/token of the longest session; write-through "
        f"{m['write_seconds']:.2f} s in {m['write_calls']} writes over the session "
        f"({sum(res.seconds for res in reuse):.1f} s of turns)"
    )
    load = r["load"]
    restored, last = r["restored"], len(reuse)
    print(
        f"restart: engine construction {load['disk']:.2f} s with the session directory (cold engine "
        f"{load['cold']:.2f} s, first reuse engine {load['reuse']:.2f} s); after a {WARMUP_TOKENS}-token warm-up "
        f"request, turn {last} replayed: "
        f"{restored.cached} tokens restored ({r['disk_hits']} disk hit(s) in {ms(r['restore'])} ms, of which "
        f"reading the files {ms(r['restore_read'])} ms), "
        f"{restored.computed} computed, TTFT {ms(restored.ttft)} ms"
    )
    if last in cold:
        print(
            f"  vs recomputing it: cold TTFT {ms(cold[last].ttft)} ms: {cold[last].ttft / restored.ttft:.1f}x; "
            f"vs the in-memory turn: {ms(reuse[-1].ttft)} ms"
        )
    sys.stdout.flush()
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8192,32768,131072", help="comma-separated final prompt lengths")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small", help="random checkpoint's config")
    parser.add_argument("--turns", type=int, default=6, help="turns per session, the long first prompt included")
    parser.add_argument("--turn-tokens", type=int, default=300, help="new tokens (a tool result) per turn")
    parser.add_argument("--reply-tokens", type=int, default=32, help="greedy reply tokens per turn")
    parser.add_argument("--cold-turns", type=int, default=1, help="last turns also run without reuse")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: contexts 2048,4096, config tiny, 100-token tool results"
    )
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.config, args.turn_tokens = "2048,4096", "tiny", 100
    if args.turns < 1 or args.reply_tokens < 2 or args.turn_tokens < 1 or args.cold_turns < 1:
        parser.error("--turns >= 1, --reply-tokens >= 2, --turn-tokens >= 1 and --cold-turns >= 1 needed")
    contexts = [int(c) for c in args.contexts.split(",")]
    for context in contexts:
        if first_prompt_tokens(context, args.turns, args.turn_tokens, args.reply_tokens) < MIN_FIRST_PROMPT:
            parser.error(f"context {context} is too short for {args.turns} turns of {args.turn_tokens} tokens")
    torch.set_num_threads(args.threads)

    verdicts: dict[int, bool] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(**CONFIGS[args.config], max_position_embeddings=max(contexts) * 2)
        path = write_random_checkpoint(Path(tmp) / "ckpt", config)
        bytes_per_token = layout.bytes_per_token(config, NUMERICS).total
        print(
            f"config: {args.config}, {NUMERICS}, torch threads: {torch.get_num_threads()}, turns: {args.turns}, "
            f"tool result: {args.turn_tokens} tokens, reply: {args.reply_tokens} tokens, cold turns: "
            f"{args.cold_turns}, max_num_seqs: {MAX_NUM_SEQS}"
        )
        for context in contexts:
            result = bench_context(path, context, args, config.vocab_size, Path(tmp))
            verdict = report(result, bytes_per_token)
            if verdict is not None:
                verdicts[context] = verdict
    print(f"\ntotal run time: {time.perf_counter() - start:.0f} s")
    if verdicts:
        print("floors: " + ", ".join(f"{c}: {'PASS' if ok else 'FAIL'}" for c, ok in verdicts.items()))
    if not all(verdicts.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
