"""``dsv4 serve`` with the real engine on a small random model: outputs equal the engine's own, sixteen
concurrent streams, the KV pool empty afterwards, a client killed mid-stream freeing its blocks, and the
``serve`` command itself (the ``tiny-random`` preset, a graceful SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsv4.chat.encoding import completion_mode_for_prompt, encode_messages
from dsv4.chat.parser import CompletionParser, ParsedCompletion
from dsv4.engine.llm import LLM
from dsv4.engine.sampling import SamplingParams
from dsv4.server.app import create_app, serve_in_thread
from dsv4.server.engine_client import EngineError, LLMEngineClient, QueueFull, SequenceRequest
from dsv4.server.serving import ServerConfig
from dsv4.tiny import TINY_RANDOM_CONTEXT, tiny_config, write_random_checkpoint

MODEL = "tiny"
# bf16_official rounds differently for different batch shapes (then FP8 simulation amplifies it), so only
# fp32_nosim lets a sequence batched with fifteen others match the reference token for token
NUMERICS = "fp32_nosim"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # two layers (window and CSA) keep sixteen concurrent sequences fast on a loaded CPU
    config = tiny_config(n_layers=2, n_mtp_layers=0, n_heads=4, head_dim=128, n_routed_experts=4)
    return write_random_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", config, seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> LLM:
    """A second engine on the same weights: what the server must reproduce."""
    return LLM(checkpoint, NUMERICS, progress=False)


@pytest.fixture(scope="module")
def url(checkpoint: Path) -> Iterator[str]:
    engine = LLMEngineClient(LLM(checkpoint, NUMERICS, max_num_seqs=16, progress=False), max_queue=4)
    with serve_in_thread(create_app(engine, ServerConfig(model_names=(MODEL,)))) as base:
        yield base


@pytest.fixture
def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def pool_is_empty(url: str) -> bool:
    """Nothing runs, waits or holds cache bytes (what the prefix cache holds is free for new sequences)."""
    m = metrics(url)
    return m["dsv4_requests_running"] == m["dsv4_requests_waiting"] == m["dsv4_kv_cache_used_bytes"] == 0


def expected(reference: LLM, messages: list[dict[str, str]], params: SamplingParams) -> ParsedCompletion:
    """The reference engine's completion of the chat, parsed as the server parses it."""
    prompt = encode_messages(messages, "chat")
    (out,) = reference.generate([prompt], params)
    parser = CompletionParser(completion_mode_for_prompt(prompt))
    parser.feed(out.text)
    parser.close(eos=out.finish_reason == "stop")
    return parser.message


def test_chat_matches_the_engine(oai: openai.OpenAI, reference: LLM) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    reply = oai.chat.completions.create(
        model=MODEL, messages=messages, reasoning_effort="none", seed=5, max_tokens=4, logprobs=True, top_logprobs=2
    )  # type: ignore[arg-type]
    want = expected(reference, messages, SamplingParams(seed=5, max_tokens=4, logprobs=2))
    choice = reply.choices[0]
    assert (choice.message.content or "") == want.content
    assert getattr(choice.message, "reasoning_content", None) == (want.reasoning_content or None)
    assert reply.usage is not None and reply.usage.completion_tokens <= 4
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content) == reply.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
    assert reference.tokenizer is not None
    assert reply.usage.prompt_tokens == len(reference.tokenizer.encode(encode_messages(messages, "chat")))


def test_sixteen_concurrent_streams(url: str, oai: openai.OpenAI, reference: LLM) -> None:
    conversations = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(16)]

    def run(i: int) -> tuple[str, str, str | None]:
        chunks = list(
            oai.chat.completions.create(
                model=MODEL,
                messages=conversations[i],  # type: ignore[arg-type]
                reasoning_effort="none",
                seed=100 + i,
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 4
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        return content, reasoning, finish

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    for i, (content, reasoning, finish) in enumerate(results):
        want = expected(reference, conversations[i], SamplingParams(seed=100 + i, max_tokens=4))
        assert (content, reasoning) == (want.content, want.reasoning_content), i
        assert finish in ("stop", "length", "tool_calls")
    assert pool_is_empty(url)
    assert metrics(url)["dsv4_generation_tokens_total"] >= 16


def test_client_killed_mid_stream_frees_its_blocks(url: str) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the sequence is running and holds cache
        assert metrics(url)["dsv4_kv_cache_used_bytes"] > 0
    wait_for(lambda: pool_is_empty(url))


def test_reasoning_round_trip(oai: openai.OpenAI, reference: LLM) -> None:
    first = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Think about it."}], max_tokens=6, seed=1
    )
    reasoning = getattr(first.choices[0].message, "reasoning_content", None) or ""
    history = [
        {"role": "user", "content": "Think about it."},
        {"role": "assistant", "content": first.choices[0].message.content or "", "reasoning_content": reasoning},
        {"role": "user", "content": "And now?"},
    ]
    second = oai.chat.completions.create(model=MODEL, messages=history, max_tokens=2, seed=2)  # type: ignore[arg-type]
    assert reference.tokenizer is not None and second.usage is not None
    prompt = encode_messages(history, "thinking")
    assert second.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))


def test_tool_conversation_reuses_the_previous_turn(oai: openai.OpenAI) -> None:
    """Turn 2 of a tool conversation (reasoning kept) starts with turn 1's prompt and sampled ids, so the
    engine restores them from its prefix cache instead of computing them again."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    for seed in range(16):
        messages: list[dict[str, str]] = [{"role": "user", "content": f"Weather, take {seed}?"}]
        first = oai.chat.completions.create(model=MODEL, messages=messages, tools=[tool], max_tokens=4, seed=seed)  # type: ignore[arg-type,list-item]
        message = first.choices[0].message
        reasoning = getattr(message, "reasoning_content", None) or ""
        if "\ufffd" in reasoning + (message.content or "") or message.tool_calls:
            continue  # a random model's bytes that are not whole UTF-8 cannot come back as the same ids
        messages += [
            {"role": "assistant", "content": message.content or "", "reasoning_content": reasoning},
            {"role": "user", "content": "And tomorrow?"},
        ]
        second = oai.chat.completions.create(model=MODEL, messages=messages, tools=[tool], max_tokens=2, seed=seed)  # type: ignore[arg-type,list-item]
        assert first.usage is not None and second.usage is not None and second.usage.prompt_tokens_details
        # a reply cut off by max_tokens never ran its last token through the model
        turn1 = first.usage.prompt_tokens + first.usage.completion_tokens - (first.choices[0].finish_reason == "length")
        assert second.usage.prompt_tokens_details.cached_tokens >= turn1
        return
    pytest.fail("no seed sampled whole UTF-8 text")


def test_anthropic_stream_and_completions(url: str, reference: LLM) -> None:
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)
    with client.messages.stream(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Hi"}]) as stream:
        message = stream.get_final_message()
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use") and 1 <= message.usage.output_tokens <= 3

    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, seed=9)
    (want,) = reference.generate(["The sky is"], SamplingParams(seed=9, max_tokens=3))
    assert reply.choices[0].text == want.text and reply.choices[0].finish_reason == want.finish_reason
    wait_for(lambda: pool_is_empty(url))


def test_engine_client_bounds_its_queue_and_fails_streams_on_close(checkpoint: Path) -> None:
    engine = LLMEngineClient(LLM(checkpoint, NUMERICS, max_num_seqs=1, progress=False), max_queue=1)
    request = SequenceRequest("a", [5, 6, 7], SamplingParams(max_tokens=1000, ignore_eos=True))

    async def scenario() -> None:
        engine.start()
        first = engine.submit([request])
        with pytest.raises(QueueFull):  # one running plus one waiting is the limit
            engine.submit([replace(request, request_id="b"), replace(request, request_id="c")])
        second = engine.submit([replace(request, request_id="b")])
        await anext(first)  # generating
        await asyncio.to_thread(engine.close)
        for stream in (first, second):
            with pytest.raises(EngineError, match="shutting down"):
                async for _ in stream:
                    pass
        with pytest.raises(EngineError):
            engine.submit([replace(request, request_id="d")])

    asyncio.run(scenario())
    stats = engine.stats()
    assert not engine.healthy and stats.kv_used_bytes == 0 and stats.running == 0


def test_a_faulting_step_fails_its_requests_and_the_engine_serves_on(checkpoint: Path, monkeypatch) -> None:
    """A forward that raises fails the requests of that step with an error in their responses; the next
    request is served; three failing steps in a row mark the engine unhealthy."""
    llm = LLM(checkpoint, NUMERICS, max_num_seqs=2, progress=False)
    forward = type(llm.model).forward
    poisoned = 977

    def faulty(self, tokens, spans, logit_rows=None):
        if bool((tokens == poisoned).any()):
            raise RuntimeError("injected fault")
        return forward(self, tokens, spans, logit_rows)

    monkeypatch.setattr(type(llm.model), "forward", faulty)
    engine = LLMEngineClient(llm, max_queue=4)
    params = SamplingParams(max_tokens=3, ignore_eos=True)

    async def run(request_id: str, prompt: list[int]) -> list[int] | EngineError:
        tokens: list[int] = []
        try:
            async for _, delta in engine.submit([SequenceRequest(request_id, prompt, params)]):
                tokens += delta.token_ids
        except EngineError as error:
            return error
        return tokens

    async def scenario() -> None:
        engine.start()
        failed = await run("bad", [5, poisoned, 7])
        assert isinstance(failed, EngineError) and "injected fault" in str(failed)
        assert engine.healthy and len(await run("good", [5, 6, 7])) == 3
        for i in range(3):
            assert isinstance(await run(f"bad{i}", [poisoned, 6]), EngineError)
        assert not engine.healthy

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
    assert llm.pool is not None and engine.stats().kv_used_bytes == 0


# ------------------------------------------------------------------------------------------ the command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """``dsv4 serve --model tiny-random ARGS`` on a free port, its stderr in ``tmp_path/serve.log``: yields the
    process, its base URL and the log once ``/health`` answers; kills it on the way out if it still runs."""
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "dsv4.cli", "serve", "--model", "tiny-random", "--port", str(port), *args]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen(command, env=env, stderr=log_file, text=True)
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert server.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{base}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=240)
        yield server, base, log_path
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_tiny_random_and_graceful_sigterm(tmp_path: Path) -> None:
    with serving(tmp_path, "--batch-invariant") as (server, base, log_path):
        assert (tmp_path / "dsv4" / f"tiny-random-{TINY_RANDOM_CONTEXT}" / "tokenizer.json").is_file()
        body = {
            "model": "tiny-random",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 32,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
            request_id = response.headers["x-request-id"]
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.send_signal(signal.SIGTERM)  # the open stream is drained before the server stops
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("length", "tool_calls")
        assert server.wait(timeout=60) == 0
        assert f"[{request_id}] POST /v1/chat/completions 200" in log_path.read_text()


def test_serve_refuses_a_shapes_only_preset() -> None:
    command = [sys.executable, "-m", "dsv4.cli", "serve", "--model", "v4-flash"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "shapes only" in result.stderr
