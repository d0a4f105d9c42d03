"""The HTTP layer of ``dsv4 serve`` against a scripted engine: wire formats (OpenAI and Anthropic, stream and
not), tool and reasoning round trips, validation, back-pressure and disconnects. A real uvicorn server on
loopback is driven with the official ``openai`` and ``anthropic`` clients; the model is replaced by an
engine that "samples" a scripted reply token by token, so every assertion can be exact."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import anthropic
import httpx
import openai
import pytest

from dsv4.chat.encoding import EOS
from dsv4.chat.openai import REQUIRED_TOOL_INSTRUCTION, forced_tool_instruction
from dsv4.chat.tokenizer import build_test_tokenizer
from dsv4.engine.sampler import SampledToken
from dsv4.engine.sampling import SamplingParams
from dsv4.server.app import create_app, serve_in_thread
from dsv4.server.engine_client import EngineStats, GenerationStream, QueueFull, SequenceDelta, SequenceRequest
from dsv4.server.serving import ServerConfig

MODEL = "dsv4-test"
DSML = "｜DSML｜"
# A tool call as the model samples it; "[1,2]" is deliberately not the canonical "[1, 2]" so that the
# re-rendered history shows whether the sampled bytes were kept.
TOOL_CALL = (
    f"\n\n<{DSML}tool_calls>\n"
    f'<{DSML}invoke name="get_weather">\n'
    f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
    f'<{DSML}parameter name="days" string="false">[1,2]</{DSML}parameter>\n'
    f"</{DSML}invoke>\n"
    f"</{DSML}tool_calls>"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "array"}},
        },
    },
}


class ScriptedEngine:
    """An :class:`EngineClient` whose sequences produce ``reply(prompt)`` one token per event-loop turn.

    It records every prompt and SamplingParams it receives and every abort, and ``hold`` pauses all
    generation (to fill the queue, or to disconnect mid-stream). Stop strings are only looked for within
    one token's text.
    """

    def __init__(self) -> None:
        self.tokenizer = build_test_tokenizer()
        self.max_model_len = 2048
        self.vocab_size = self.tokenizer.vocab_size
        self.capacity = 4
        self.reply: Callable[[str], str] = lambda prompt: "Hello there!" + EOS
        self.prompts: list[str] = []
        self.params: list[SamplingParams] = []
        self.aborted: list[str] = []
        self.hold = threading.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def healthy(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._tasks), waiting=0, kv_used_bytes=0, kv_free_bytes=1 << 20)

    def submit(self, requests: Sequence[SequenceRequest]) -> GenerationStream:
        if len(self._tasks) + len(requests) > self.capacity:
            raise QueueFull(f"{len(self._tasks)} in flight")
        stream = GenerationStream([r.request_id for r in requests], self._abort)
        loop = asyncio.get_running_loop()
        for index, request in enumerate(requests):
            self.prompts.append(self.tokenizer.decode(request.prompt_token_ids))
            self.params.append(request.params)
            self._tasks[request.request_id] = loop.create_task(self._generate(stream, index, request))
        return stream

    def _abort(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        for request_id in request_ids:
            task = self._tasks.pop(request_id, None)
            if task is not None:
                task.cancel()

    async def _generate(self, stream: GenerationStream, index: int, request: SequenceRequest) -> None:
        params = request.params
        ids = self.tokenizer.encode(self.reply(self.tokenizer.decode(request.prompt_token_ids)))
        detokenizer = self.tokenizer.incremental_detokenizer()
        for position, token in enumerate(ids):
            while self.hold.is_set():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)
            finish: str | None = None
            stop: str | int | None = None
            piece = ""
            if token == self.tokenizer.eos_token_id:
                finish, stop = "stop", token
            else:
                piece = detokenizer.push(token)
                for stop_string in params.stop:
                    if stop_string in piece:
                        piece, finish, stop = piece[: piece.index(stop_string)], "stop", stop_string
                if finish is None and position + 1 >= params.max_tokens:
                    finish = "length"
            logprobs = None
            if params.logprobs is not None:
                top = [(token, -0.25), *((t, -3.0 - t / 1000) for t in range(1, params.logprobs))]
                logprobs = [SampledToken(token, -0.25, top[: params.logprobs])]
            delta = SequenceDelta([token], piece, logprobs, finish, stop, len(request.prompt_token_ids), 0)
            stream.push(index, delta)
            if finish is not None:
                break
        self._tasks.pop(request.request_id, None)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, ScriptedEngine]]:
    engine = ScriptedEngine()
    app = create_app(engine, ServerConfig(model_names=(MODEL, "alias")))
    with serve_in_thread(app) as url:
        yield url, engine


@pytest.fixture
def engine(served: tuple[str, ScriptedEngine]) -> Iterator[ScriptedEngine]:
    engine = served[1]
    yield engine
    engine.reply = lambda prompt: "Hello there!" + EOS
    engine.hold.clear()
    engine.prompts.clear()
    engine.params.clear()


@pytest.fixture
def url(served: tuple[str, ScriptedEngine]) -> str:
    return served[0]


@pytest.fixture
def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def claude(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------- OpenAI chat


def test_chat_non_stream(oai: openai.OpenAI, engine: ScriptedEngine) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], reasoning_effort="none", max_tokens=50
    )
    reply = raw.parse()
    assert raw.headers["x-request-id"] and reply.id == f"chatcmpl-{raw.headers['x-request-id']}"
    assert reply.model == MODEL and reply.object == "chat.completion"
    choice = reply.choices[0]
    assert choice.message.content == "Hello there!" and choice.finish_reason == "stop"
    assert choice.message.tool_calls is None and choice.logprobs is None
    assert engine.prompts == ["<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"]
    tokenizer = engine.tokenizer
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tokenizer.encode(engine.prompts[0]))
    assert reply.usage.completion_tokens == len(tokenizer.encode("Hello there!")) + 1  # + EOS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details is not None and reply.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_stream_with_reasoning(oai: openai.OpenAI, engine: ScriptedEngine) -> None:
    engine.reply = lambda prompt: "Two plus two.</think>It is 4." + EOS
    chunks = list(
        oai.chat.completions.create(
            model="alias",  # an alias is accepted; the first name is reported
            messages=[{"role": "user", "content": "2+2?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert engine.prompts[0].endswith("<｜Assistant｜><think>")  # thinking is the server default
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model == MODEL
    assert len({c.id for c in chunks}) == 1
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == "Two plus two." and content == "It is 4."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(engine.tokenizer.encode("Two plus two.</think>It is 4.")) + 1


def _tool_request(**extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        **extra,
    }


def test_tool_round_trip_stream_then_history(oai: openai.OpenAI, engine: ScriptedEngine) -> None:
    engine.reply = lambda prompt: "I should look it up.</think>" + TOOL_CALL + EOS
    chunks = list(oai.chat.completions.create(**_tool_request(stream=True)))
    tool_deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(tool_deltas) == 2
    opened, closed = tool_deltas[0][0], tool_deltas[1][0]
    assert opened.index == 0 and opened.type == "function" and opened.id and opened.id.startswith("call_")
    assert opened.function is not None and opened.function.name == "get_weather" and opened.function.arguments == ""
    assert closed.index == 0 and closed.id is None and closed.function is not None
    assert json.loads(closed.function.arguments or "") == {"city": "Paris", "days": [1, 2]}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning == "I should look it up."

    # The client sends the call back re-serialised (as clients do) with the tool's result.
    arguments = json.dumps(json.loads(closed.function.arguments or ""))
    engine.reply = lambda prompt: "Sunny.</think>It will be sunny in Paris." + EOS
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": reasoning,
            "tool_calls": [
                {"id": opened.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": opened.id, "content": '{"forecast": "sunny"}'},
    ]
    reply = oai.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL])  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "It will be sunny in Paris."
    assert getattr(reply.choices[0].message, "reasoning_content", None) == "Sunny."
    prompt = engine.prompts[-1]
    # the sampled bytes come back, reasoning included (tool conversations keep it), and the result follows
    assert "I should look it up.</think>" + TOOL_CALL + EOS in prompt
    assert prompt.endswith('<tool_result>{"forecast": "sunny"}</tool_result><｜Assistant｜><think>')


def test_tool_call_non_stream(oai: openai.OpenAI, engine: ScriptedEngine) -> None:
    engine.reply = lambda prompt: "</think>" + TOOL_CALL + EOS
    reply = oai.chat.completions.create(**_tool_request())
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": [1, 2]}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("tool_choice", "instruction", "has_tools"),
    [
        ("auto", None, True),
        ("required", REQUIRED_TOOL_INSTRUCTION, True),
        ({"type": "function", "function": {"name": "get_weather"}}, forced_tool_instruction("get_weather"), True),
        ("none", None, False),
    ],
)
def test_tool_choice_shapes_the_prompt(
    oai: openai.OpenAI, engine: ScriptedEngine, tool_choice: object, instruction: str | None, has_tools: bool
) -> None:
    oai.chat.completions.create(**_tool_request(tool_choice=tool_choice, max_tokens=2))
    prompt = engine.prompts[-1]
    assert ("## Tools" in prompt) == has_tools
    assert instruction is None or instruction in prompt


def test_n_seed_stop_logprobs(oai: openai.OpenAI, engine: ScriptedEngine) -> None:
    reply = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        reasoning_effort="none",
        n=2,
        seed=7,
        stop=["!"],
        temperature=0.5,
        top_p=0.9,
        logprobs=True,
        top_logprobs=2,
    )
    assert [p.seed for p in engine.params] == [7, 8]
    assert all(p.stop == ["!"] and p.temperature == 0.5 and p.top_p == 0.9 and p.logprobs == 2 for p in engine.params)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.message.content == "Hello there" and choice.finish_reason == "stop"
        assert choice.logprobs is not None and choice.logprobs.content
        text = "".join(entry.token for entry in choice.logprobs.content)
        assert text.startswith("Hello there")
        first = choice.logprobs.content[0]
        assert first.logprob == -0.25 and len(first.top_logprobs) == 2 and first.bytes == list(first.token.encode())
    assert reply.usage is not None and reply.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in reply.choices if c.logprobs and c.logprobs.content
    )


def test_max_completion_tokens_wins(oai: openai.OpenAI, engine: ScriptedEngine) -> None:
    reply = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=50, max_completion_tokens=2
    )
    assert engine.params[-1].max_tokens == 2
    assert reply.choices[0].finish_reason == "length" and reply.usage and reply.usage.completion_tokens == 2


def test_max_tokens_defaults_to_the_rest_of_the_context(oai: openai.OpenAI, engine: ScriptedEngine) -> None:
    oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    prompt_tokens = len(engine.tokenizer.encode(engine.prompts[-1]))
    assert engine.params[-1].max_tokens == engine.max_model_len - prompt_tokens


# ------------------------------------------------------------------------------------------ completions


def test_completions(oai: openai.OpenAI, engine: ScriptedEngine) -> None:
    engine.reply = lambda prompt: " world, again." + EOS
    reply = oai.completions.create(model=MODEL, prompt="Hello", max_tokens=20, logprobs=1)
    assert engine.prompts == ["Hello"]  # raw: no template, no BOS
    choice = reply.choices[0]
    assert choice.text == " world, again." and choice.finish_reason == "stop"
    assert choice.logprobs is not None and choice.logprobs.tokens and choice.logprobs.text_offset
    assert "".join(choice.logprobs.tokens).startswith(" world, again.")
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.top_logprobs and choice.logprobs.top_logprobs[0]

    ids = engine.tokenizer.encode("Hi")
    reply = oai.completions.create(model=MODEL, prompt=[ids, ids], n=2, max_tokens=3)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    three = engine.tokenizer.decode(engine.tokenizer.encode(" world, again.")[:3])
    assert all(c.text == three and c.finish_reason == "length" for c in reply.choices)
    assert reply.usage is not None and reply.usage.prompt_tokens == 2 * len(ids)
    assert engine.params[-1].max_tokens == 3


def test_completions_stream(oai: openai.OpenAI, engine: ScriptedEngine) -> None:
    engine.reply = lambda prompt: "abc def" + EOS
    chunks = list(oai.completions.create(model=MODEL, prompt="x", stream=True, stream_options={"include_usage": True}))
    assert engine.params[-1].max_tokens == 16  # the legacy API's default
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "abc def"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 1


# ------------------------------------------------------------------------------------------- Anthropic


def test_anthropic_message(claude: anthropic.Anthropic, engine: ScriptedEngine) -> None:
    message = claude.messages.create(
        model=MODEL, max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "Hi"}]
    )
    # no thinking unless the request asks for it, as with Anthropic's API
    assert engine.prompts == ["<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>"]
    assert message.id.startswith("msg_") and message.model == MODEL and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello there!"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == len(engine.tokenizer.encode(engine.prompts[0]))
    assert message.usage.output_tokens == len(engine.tokenizer.encode("Hello there!")) + 1


def test_anthropic_stop_sequence_and_max_tokens(claude: anthropic.Anthropic, engine: ScriptedEngine) -> None:
    message = claude.messages.create(
        model=MODEL, max_tokens=64, stop_sequences=["!"], messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "!"
    assert message.content[0].text == "Hello there"  # type: ignore[union-attr]
    message = claude.messages.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 1


def test_anthropic_tool_round_trip_streamed(claude: anthropic.Anthropic, engine: ScriptedEngine) -> None:
    engine.reply = lambda prompt: "Need the forecast.</think>Checking." + TOOL_CALL + EOS
    tools = [
        {
            "name": "get_weather",
            "description": "Weather forecast",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    request = {
        "model": MODEL,
        "max_tokens": 200,
        "tools": tools,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    }
    with claude.messages.stream(**request) as stream:  # type: ignore[arg-type]
        events = list(stream)
        first = stream.get_final_message()
    assert engine.prompts[-1].endswith("<｜Assistant｜><think>")
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in first.content] == ["thinking", "text", "tool_use"]
    thinking, text, tool_use = first.content
    assert thinking.thinking == "Need the forecast." and text.text == "Checking."  # type: ignore[union-attr]
    assert tool_use.name == "get_weather" and tool_use.input == {"city": "Paris", "days": [1, 2]}  # type: ignore[union-attr]
    assert tool_use.id.startswith("toolu_")  # type: ignore[union-attr]
    assert first.stop_reason == "tool_use"

    engine.reply = lambda prompt: "Done.</think>Sunny." + EOS
    request["messages"] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}],  # type: ignore[union-attr]
        },
    ]
    second = claude.messages.create(**request)  # type: ignore[arg-type]
    assert [b.type for b in second.content] == ["thinking", "text"] and second.stop_reason == "end_turn"
    prompt = engine.prompts[-1]
    assert "Need the forecast.</think>Checking." + TOOL_CALL + EOS in prompt
    assert prompt.endswith("<tool_result>sunny</tool_result><｜Assistant｜><think>")


def test_anthropic_raw_event_sequence(url: str, engine: ScriptedEngine) -> None:
    engine.reply = lambda prompt: "Hmm.</think>Hi!" + EOS
    body = {
        "model": MODEL,
        "max_tokens": 32,
        "stream": True,
        "thinking": {"type": "adaptive"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
    }
    with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in data] == names
    deltas = [d["delta"]["type"] for d in data if d["type"] == "content_block_delta"]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(deltas) == {"thinking_delta", "signature_delta", "text_delta"}
    starts = [d for d in data if d["type"] == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [(0, "thinking"), (1, "text")]
    stops = [d["index"] for d in data if d["type"] == "content_block_stop"]
    assert stops == [0, 1]
    final = next(d for d in data if d["type"] == "message_delta")
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == len(engine.tokenizer.encode("Hmm.</think>Hi!")) + 1


def test_anthropic_count_tokens(claude: anthropic.Anthropic, engine: ScriptedEngine) -> None:
    count = claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    expected = engine.tokenizer.encode("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>")
    assert count.input_tokens == len(expected) and engine.prompts == []


# ------------------------------------------------------------------------------------ service endpoints


def test_models_health_metrics(oai: openai.OpenAI, url: str, engine: ScriptedEngine) -> None:
    assert [m.id for m in oai.models.list()] == [MODEL, "alias"]
    assert oai.models.retrieve("alias").id == "alias"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in (
        "dsv4_requests_running",
        "dsv4_requests_waiting",
        "dsv4_kv_cache_used_bytes",
        "dsv4_kv_cache_free_bytes 1.048576e+06",
        "dsv4_prefix_cache_hit_tokens_total",
        "dsv4_prefix_cache_checkpoints 0.0",
        "dsv4_prefix_cache_bytes 0.0",
        "dsv4_prefix_cache_evictions_total 0.0",
        "dsv4_session_disk_bytes 0.0",
        "dsv4_session_disk_hits_total 0.0",
        "dsv4_prompt_tokens_total",
        "dsv4_generation_tokens_total",
        "dsv4_time_to_first_token_seconds_bucket",
        "dsv4_time_per_output_token_seconds_bucket",
        'dsv4_http_requests_total{route="/v1/chat/completions",status="200"}',
        'dsv4_sequences_finished_total{finish_reason="length"}',
    ):
        assert name in text, name


# ------------------------------------------------------------------------------------------- validation

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]
MALFORMED: list[tuple[str, str, object, int]] = [
    # (name, path, body - bytes are sent raw, expected status)
    ("not json", CHAT, b"{not json", 400),
    ("json array", CHAT, b"[1, 2]", 400),
    ("invalid utf-8", CHAT, b'{"model": "\xff"}', 400),
    ("missing model", CHAT, {"messages": USER}, 400),
    ("missing messages", CHAT, {"model": MODEL}, 400),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": USER}, 404),
    ("messages not a list", CHAT, {"model": MODEL, "messages": "Hi"}, 400),
    ("empty messages", CHAT, {"model": MODEL, "messages": []}, 400),
    ("unknown role", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("content wrong type", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400),
    ("temperature string", CHAT, {"model": MODEL, "messages": USER, "temperature": "hot"}, 400),
    ("temperature negative", CHAT, {"model": MODEL, "messages": USER, "temperature": -1}, 400),
    ("top_p zero", CHAT, {"model": MODEL, "messages": USER, "top_p": 0}, 400),
    ("max_tokens zero", CHAT, {"model": MODEL, "messages": USER, "max_tokens": 0}, 400),
    ("max_tokens string", CHAT, {"model": MODEL, "messages": USER, "max_tokens": "10"}, 400),
    ("n too large", CHAT, {"model": MODEL, "messages": USER, "n": 100}, 400),
    ("n zero", CHAT, {"model": MODEL, "messages": USER, "n": 0}, 400),
    ("stop not strings", CHAT, {"model": MODEL, "messages": USER, "stop": [1]}, 400),
    ("top_logprobs without logprobs", CHAT, {"model": MODEL, "messages": USER, "top_logprobs": 2}, 400),
    ("top_logprobs too many", CHAT, {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 50}, 400),
    ("seed float", CHAT, {"model": MODEL, "messages": USER, "seed": 1.5}, 400),
    ("stream not bool", CHAT, {"model": MODEL, "messages": USER, "stream": "yes"}, 400),
    (
        "unknown tool choice",
        CHAT,
        {**_tool_request(), "tool_choice": {"type": "function", "function": {"name": "x"}}},
        400,
    ),
    ("required without tools", CHAT, {"model": MODEL, "messages": USER, "tool_choice": "required"}, 400),
    ("tool without type", CHAT, {"model": MODEL, "messages": USER, "tools": [{"function": {"name": "f"}}]}, 400),
    (
        "tool result without call",
        CHAT,
        {"model": MODEL, "messages": [*USER, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
        400,
    ),
    ("bad reasoning effort", CHAT, {"model": MODEL, "messages": USER, "reasoning_effort": "extreme"}, 400),
    ("prompt too long", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "word " * 1000}]}, 400),
    ("completions empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("completions token out of vocab", "/v1/completions", {"model": MODEL, "prompt": [10**6]}, 400),
    ("completions echo", "/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400),
    ("messages missing max_tokens", "/v1/messages", {"model": MODEL, "messages": USER}, 400),
    ("messages unknown model", "/v1/messages", {"model": "claude", "max_tokens": 5, "messages": USER}, 404),
    (
        "messages image block",
        "/v1/messages",
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        400,
    ),
    ("messages bad role", "/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": [{"role": "system"}]}, 400),
    (
        "messages bad thinking",
        "/v1/messages",
        {"model": MODEL, "max_tokens": 5, "messages": USER, "thinking": {"type": "sometimes"}},
        400,
    ),
    (
        "messages bad tool_choice",
        "/v1/messages",
        {"model": MODEL, "max_tokens": 5, "messages": USER, "tool_choice": {"type": "all"}},
        400,
    ),
    ("unknown route", "/v1/engines", {}, 404),
]


@pytest.mark.parametrize(("name", "path", "body", "status"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_4xx(url: str, name: str, path: str, body: object, status: int) -> None:
    if isinstance(body, bytes):
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(url + path, json=body)
    assert response.status_code == status, response.text
    error = response.json()
    if path.startswith("/v1/messages"):
        assert error["type"] == "error" and error["error"]["type"] in ("invalid_request_error", "not_found_error")
        assert error["error"]["message"]
    else:
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_wrong_method_and_sdk_errors(url: str, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    assert httpx.get(url + CHAT).status_code == 405
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="nope", messages=USER)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=MODEL, messages=USER, temperature=-2)  # type: ignore[arg-type]
    assert bad.value.param == "temperature"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=5, messages=USER)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- back-pressure and disconnects


def test_queue_full_gets_429_with_retry_after(url: str, engine: ScriptedEngine) -> None:
    engine.hold.set()
    body = {"model": MODEL, "messages": USER, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as client:
        streams = [client.stream("POST", CHAT, json=body) for _ in range(engine.capacity)]
        responses = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in responses)
            refused = client.post(CHAT, json=body)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            refused = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": USER})
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        finally:
            engine.hold.clear()
            for s in streams:
                s.__exit__(None, None, None)
    wait_for(lambda: engine.stats().running == 0)
    assert client.is_closed


def test_stream_disconnect_aborts(url: str, engine: ScriptedEngine) -> None:
    engine.hold.set()
    body = {"model": MODEL, "messages": USER, "stream": True}
    before = len(engine.aborted)
    with httpx.stream("POST", url + CHAT, json=body, timeout=30) as response:
        first = next(response.iter_lines())  # the role chunk goes out before any token
        assert first.startswith("data: ")
    wait_for(lambda: len(engine.aborted) == before + 1)
    engine.hold.clear()
    wait_for(lambda: engine.stats().running == 0)


def test_non_stream_disconnect_aborts(url: str, engine: ScriptedEngine) -> None:
    engine.hold.set()
    before = len(engine.aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + CHAT, json={"model": MODEL, "messages": USER}, timeout=1.0)
    wait_for(lambda: len(engine.aborted) == before + 1)
    engine.hold.clear()
    wait_for(lambda: engine.stats().running == 0)
