"""The server's side of the prefix cache that needs no model: the engine client passes the engine's cached
tokens and prefix-cache stats through, ``/metrics`` exposes them, and ``dsv4 serve`` hands its cache options
to the engine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dsv4.engine.llm
import dsv4.server.app
from dsv4.cache.prefix import PrefixCacheStats
from dsv4.chat.tokenizer import build_test_tokenizer
from dsv4.cli import build_parser
from dsv4.engine.sampling import SamplingParams
from dsv4.server.commands import prefix_cache_kwargs
from dsv4.server.engine_client import EngineStats, LLMEngineClient, SequenceRequest
from dsv4.server.metrics import ServerMetrics

STATS = PrefixCacheStats(
    checkpoints=3,
    cached_bytes=4096,
    hit_tokens=700,
    computed_tokens=300,
    evictions=2,
    disk_checkpoints=5,
    disk_bytes=1 << 20,
    disk_hits=4,
)


class FakeLLM:
    """What LLMEngineClient reads of an LLM: one request that yields two tokens, 6 of its prompt cached."""

    def __init__(self) -> None:
        self.tokenizer = build_test_tokenizer()
        self.scheduler = SimpleNamespace(max_num_seqs=2, running=[], waiting=[])
        self.pool = SimpleNamespace(used_bytes=10, free_bytes=20)
        self.source = "fake"
        self.max_model_len = 128
        self.config = SimpleNamespace(vocab_size=self.tokenizer.vocab_size)
        self._pending: list[tuple[str, list[int]]] = []
        self._steps: list[Any] = []

    @property
    def has_unfinished(self) -> bool:
        return bool(self._steps)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> None:
        def output(ids: list[int], finish: str | None) -> Any:
            return SimpleNamespace(
                request_id=request_id,
                delta_token_ids=ids,
                delta_text="x" * len(ids),
                logprobs=None,
                finished=finish is not None,
                finish_reason=finish,
                stop_reason=None,
                num_prompt_tokens=len(prompt_ids),
                num_cached_tokens=6,
            )

        self._steps += [output([50], None), output([51], "length")]

    def step(self) -> list[Any]:
        return [self._steps.pop(0)]

    def abort(self, request_id: str) -> None:
        pass

    def prefix_stats(self) -> PrefixCacheStats:
        return STATS


def test_engine_client_passes_cached_tokens_and_prefix_stats() -> None:
    client = LLMEngineClient(FakeLLM(), max_queue=1)  # type: ignore[arg-type]
    assert client.stats().prefix == STATS

    async def run() -> list[Any]:
        client.start()
        stream = client.submit([SequenceRequest("a", list(range(10)), SamplingParams(max_tokens=2))])
        return [delta async for _, delta in stream]

    try:
        deltas = asyncio.run(run())
    finally:
        client.close()
    assert [d.token_ids for d in deltas] == [[50], [51]]
    assert all(d.num_cached_tokens == 6 and d.num_prompt_tokens == 10 for d in deltas)


def test_metrics_expose_the_prefix_cache() -> None:
    engine = SimpleNamespace(
        stats=lambda: EngineStats(running=1, waiting=0, kv_used_bytes=1, kv_free_bytes=2, prefix=STATS)
    )
    body, _ = ServerMetrics(engine).exposition()  # type: ignore[arg-type]
    text = body.decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["dsv4_prefix_cache_checkpoints"] == 3
    assert samples["dsv4_prefix_cache_bytes"] == 4096
    assert samples["dsv4_session_disk_bytes"] == 1 << 20
    assert samples["dsv4_session_disk_checkpoints"] == 5
    assert samples["dsv4_prefix_cache_evictions_total"] == 2
    assert samples["dsv4_session_disk_hits_total"] == 4
    assert samples["dsv4_prompt_tokens_computed_total"] == 300
    assert "# TYPE dsv4_prefix_cache_evictions_total counter" in text
    assert "# TYPE dsv4_prefix_cache_checkpoints gauge" in text
    # an engine without a prefix cache reports zeros
    plain = SimpleNamespace(stats=lambda: EngineStats(running=0, waiting=0, kv_used_bytes=0, kv_free_bytes=0))
    assert b"dsv4_prefix_cache_checkpoints 0.0" in ServerMetrics(plain).exposition()[0]  # type: ignore[arg-type]


def serve_args(*extra: str) -> Any:
    return build_parser().parse_args(["serve", *extra])


def test_serve_cache_options() -> None:
    assert prefix_cache_kwargs(serve_args()) == {"prefix_cache": True, "checkpoint_interval": None, "session_dir": None}
    args = serve_args("--session-dir", "/tmp/s", "--session-disk-gb", "1.5", "--checkpoint-interval", "256")
    assert prefix_cache_kwargs(args) == {
        "prefix_cache": True,
        "checkpoint_interval": 256,
        "session_dir": Path("/tmp/s"),
        "session_disk_bytes": 3 * 2**29,
    }
    assert prefix_cache_kwargs(serve_args("--no-prefix-cache"))["prefix_cache"] is False
    for bad, message in (
        (["--session-disk-gb", "2"], "needs --session-dir"),
        (["--session-dir", "d", "--session-disk-gb", "0"], "must be > 0"),
        (["--checkpoint-interval", "0"], "must be >= 1"),
        (["--no-prefix-cache", "--session-dir", "d"], "need the prefix cache"),
    ):
        with pytest.raises(ValueError, match=message):
            prefix_cache_kwargs(serve_args(*bad))


def test_serve_hands_the_options_to_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_llm(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(dsv4.engine.llm, "LLM", fake_llm)
    monkeypatch.setattr(dsv4.server.app, "configure_logging", lambda level: None)
    args = serve_args("--session-dir", "sessions", "--session-disk-gb", "2", "--checkpoint-interval", "1024")
    with pytest.raises(Stop):
        args.func(args)
    assert seen["session_dir"] == Path("sessions") and seen["session_disk_bytes"] == 2 * 2**30
    assert seen["checkpoint_interval"] == 1024 and seen["prefix_cache"] is True


def test_tool_call_memory_survives_a_restart_through_its_journal(tmp_path: Path) -> None:
    """What a restarted server needs to render a history as sampled - each call's DSML and its turn's
    reasoning - is replayed from the journal; a torn last line is skipped, and an overgrown journal is
    compacted to what is remembered."""
    from dsv4.chat.parser import ParsedCompletion, ParsedToolCall
    from dsv4.server.serving import ToolCallMemory

    journal = tmp_path / "server" / "tool_calls.jsonl"

    def turn(i: int) -> ParsedCompletion:
        call = ParsedToolCall(f"call_{i}", "read", '{"path": "a"}', f"<invoke {i}>", True)
        return ParsedCompletion("", f"thinking {i}", [call], [], True)

    memory = ToolCallMemory(capacity=2, reasoning_chars=25, journal=journal)  # 2 calls, 2 turns' reasoning
    for i in range(20):
        memory.remember_turn(turn(i))
    with journal.open("a") as f:
        f.write('{"calls": {"call_x"')  # a crash mid-write
    restarted = ToolCallMemory(capacity=2, reasoning_chars=25, journal=journal)
    assert set(restarted.recall(["call_18", "call_19", "call_0"])) == {"call_18", "call_19"}
    assert restarted.recall(["call_19"])["call_19"].dsml == "<invoke 19>"
    assert restarted.recall_reasoning(["call_19"]) == "thinking 19"
    assert restarted.recall_reasoning(["call_0"]) is None
    assert len(journal.read_text().splitlines()) == 2  # 21 lines > 4 x (2 calls + 2 turns): compacted
    again = ToolCallMemory(capacity=2, reasoning_chars=25, journal=journal)
    assert again.recall_reasoning(["call_18"]) == "thinking 18" and again.recall(["call_18"])
