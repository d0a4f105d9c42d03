"""The HTTP layer under hostile input, against the scripted engine of test_server_api: body and nesting
limits, strings that are not text, OpenAI's and Anthropic's ranges, max_tokens beyond the context, requests
larger than the engine, /health while a 10 MB request is parsed, refused or tokenised, unexpected errors (a
well-formed 500 with the request id, the connection still usable), aborted streams counted as 499, and the
start-up check of ``--max-model-len``."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server_api import MODEL, ScriptedEngine, wait_for

from dsv4.chat.encoding import EOS
from dsv4.cli import main
from dsv4.server import openai_api
from dsv4.server.app import RequestIdFilter, create_app, serve_in_thread
from dsv4.server.engine_client import GenerationStream, SequenceRequest
from dsv4.server.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH
from dsv4.server.serving import ServerConfig

CHAT, COMPLETIONS, MESSAGES, COUNT = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
)
USER = [{"role": "user", "content": "Hi"}]
MAX_BODY = 256 * 1024
MAX_DEPTH = 16


class LightEngine(ScriptedEngine):
    """The scripted engine, keeping only the end of each prompt: it decodes prompts on the event loop, which
    for a prompt of a million tokens would measure the fake rather than the server."""

    def submit(self, requests: Sequence[SequenceRequest]) -> GenerationStream:
        return super().submit([SequenceRequest(r.request_id, r.prompt_token_ids[-16:], r.params) for r in requests])


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, str, LightEngine]]:
    """Two servers on one engine: the default limits, and small ones (256 KiB bodies, 16 levels)."""
    engine = LightEngine()
    default = create_app(engine, ServerConfig(model_names=(MODEL,)))
    small = create_app(engine, ServerConfig(model_names=(MODEL,), max_body_bytes=MAX_BODY, max_json_depth=MAX_DEPTH))
    with serve_in_thread(default) as url, serve_in_thread(small) as small_url:
        yield url, small_url, engine


@pytest.fixture
def engine(served: tuple[str, str, LightEngine]) -> Iterator[LightEngine]:
    engine = served[2]
    yield engine
    engine.reply = lambda prompt: "Hello there!" + EOS
    engine.hold.clear()
    engine.max_model_len = 2048
    wait_for(lambda: engine.stats().running == 0)


@pytest.fixture
def url(served: tuple[str, str, LightEngine], engine: LightEngine) -> str:
    return served[0]


@pytest.fixture
def small_url(served: tuple[str, str, LightEngine], engine: LightEngine) -> str:
    return served[1]


def post_raw(client: httpx.Client, path: str, raw: bytes) -> httpx.Response:
    return client.post(path, content=raw, headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, path: str, status: int, *, param: str | None = None) -> str:
    """The response is ``status`` with a well-formed error body of the route's API; returns its message."""
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        message = body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        if param is not None:
            assert body["error"]["param"] == param
        message = body["error"]["message"]
    assert isinstance(message, str) and message
    return message


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def body_for(path: str, content: str = "Hi", **extra: object) -> dict[str, object]:
    if path == COMPLETIONS:
        return {"model": MODEL, "prompt": content, "max_tokens": 4, **extra}
    messages = [{"role": "user", "content": content}]
    if path in (MESSAGES, COUNT):
        return {"model": MODEL, "messages": messages, **({"max_tokens": 4} if path == MESSAGES else {}), **extra}
    return {"model": MODEL, "messages": messages, "max_tokens": 4, **extra}


ROUTES = [CHAT, COMPLETIONS, MESSAGES, COUNT]


# ------------------------------------------------------------------------------------------ body limits


def test_defaults_are_documented() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "--max-body-bytes" in readme and "--max-json-depth" in readme
    assert DEFAULT_MAX_BODY_BYTES == 32 * 2**20 and "32 MiB" in readme
    assert f"{DEFAULT_MAX_JSON_DEPTH} levels" in readme


@pytest.mark.parametrize("path", ROUTES)
def test_a_body_over_the_limit_gets_413_and_the_connection_serves_on(small_url: str, path: str) -> None:
    big = json.dumps(body_for(path, "x" * MAX_BODY)).encode()
    with httpx.Client(base_url=small_url, timeout=30) as client:
        message = assert_error(post_raw(client, path, big), path, 413)
        assert f"a Content-Length of {len(big)} bytes" in message and str(MAX_BODY) in message
        if path.startswith("/v1/messages"):
            assert client.post(path, content=big).json()["error"]["type"] == "request_too_large"

        # no Content-Length (chunked): refused once the bytes read pass the limit
        def chunks() -> Iterator[bytes]:
            for start in range(0, len(big), 65536):
                yield big[start : start + 65536]

        response = client.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert "more than" in assert_error(response, path, 413)
        assert client.post(path, json=body_for(path)).status_code == 200
        assert client.get("/health").status_code == 200


def test_a_body_under_the_limit_is_served(small_url: str) -> None:
    with httpx.Client(base_url=small_url, timeout=30) as client:
        # ~200 KB of JSON in an unknown field: parsed in a worker thread, and ignored
        body = {**body_for(CHAT), "metadata": {"blob": ["y" * 1000] * 200}}
        assert client.post(CHAT, json=body).status_code == 200


@pytest.mark.parametrize("path", ROUTES)
def test_nesting_beyond_the_limit_gets_400(small_url: str, url: str, path: str) -> None:
    def nested(levels: int) -> object:
        value: object = 0
        for _ in range(levels):
            value = [value]
        return value

    with httpx.Client(base_url=small_url, timeout=30) as client:
        # the body is level 1, "metadata" holds MAX_DEPTH - 1 more levels: at the limit, accepted
        assert client.post(path, json={**body_for(path), "metadata": nested(MAX_DEPTH - 1)}).status_code == 200
        response = client.post(path, json={**body_for(path), "metadata": nested(MAX_DEPTH)})
        message = assert_error(response, path, 400)
        assert f"deeper than {MAX_DEPTH} levels" in message and "metadata" in message
    with httpx.Client(base_url=url, timeout=30) as client:
        # far beyond Python's recursion limit: a 400 too, not a RecursionError
        raw = json.dumps(body_for(path))[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
        assert "deeper than" in assert_error(post_raw(client, path, raw.encode()), path, 400)
        assert client.get("/health").status_code == 200


# --------------------------------------------------------------------------------- strings and numbers


SURROGATE_BODIES = {
    CHAT: (
        '{"model": "M", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "messages[0].content",
    ),
    COMPLETIONS: ('{"model": "M", "prompt": ["ok", "\\udfff"]}', "prompt[1]"),
    MESSAGES: (
        '{"model": "M", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "text", '
        '"text": "x\\uDBFF"}]}]}',
        "messages[0].content[0].text",
    ),
    COUNT: ('{"model": "M", "messages": [], "system": "\\ud83d"}', "system"),
}


@pytest.mark.parametrize("path", ROUTES)
def test_lone_surrogates_get_400_naming_the_field(url: str, path: str) -> None:
    raw, field = SURROGATE_BODIES[path]
    raw = raw.replace('"M"', json.dumps(MODEL))
    with httpx.Client(base_url=url, timeout=30) as client:
        message = assert_error(post_raw(client, path, raw.encode()), path, 400, param=field)
        assert message.startswith(f"{field}:") and "surrogate" in message
        # in a key, and as raw (CESU-style) bytes that Python's JSON decoder lets through
        keyed = json.dumps(body_for(path))[:-1] + ', "metadata": {"k\\ud800": 1}}'
        assert "surrogate" in assert_error(post_raw(client, path, keyed.encode()), path, 400)
        raw_bytes = json.dumps(body_for(path)).encode().replace(b'"Hi"', b'"H\xed\xa0\x80i"')
        assert "surrogate" in assert_error(post_raw(client, path, raw_bytes), path, 400)
        # a proper pair is one character, and fine
        paired = json.dumps(body_for(path)).replace('"Hi"', '"\\ud83d\\ude00"')
        assert post_raw(client, path, paired.encode()).status_code == 200


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("NaN", b'{"model": "%s", "messages": [], "temperature": NaN}'),
        ("Infinity", b'{"model": "%s", "messages": [], "temperature": -Infinity}'),
        ("a 5000-digit integer", b'{"model": "%s", "messages": [], "seed": ' + b"9" * 5000 + b"}"),
    ],
)
def test_numbers_json_has_not_get_400(url: str, name: str, raw: bytes) -> None:
    response = httpx.post(f"{url}{CHAT}", content=raw % MODEL.encode())
    assert "not valid JSON" in assert_error(response, CHAT, 400)


# ------------------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("path", "field", "value", "status"),
    [
        (CHAT, "temperature", 2.0, 200),
        (CHAT, "temperature", 2.5, 400),
        (CHAT, "temperature", 100, 400),
        (CHAT, "temperature", 1e999, 400),  # 1e999 parses as inf
        (COMPLETIONS, "temperature", 3, 400),
        (MESSAGES, "temperature", 1.0, 200),
        (MESSAGES, "temperature", 1.5, 400),
        (MESSAGES, "temperature", 5, 400),
        (CHAT, "top_p", 0, 400),
        (CHAT, "top_p", 1.01, 400),
        (MESSAGES, "top_p", 0.0, 400),
        (MESSAGES, "top_p", 1.0, 200),
        (CHAT, "seed", 2**64, 400),
        (CHAT, "seed", 2**64 - 2, 400),  # with n=3 the last choice's seed is 2**64: out of range
        (MESSAGES, "stop_sequences", [""], 400),
    ],
)
def test_sampling_ranges(url: str, path: str, field: str, value: object, status: int) -> None:
    extra = {"n": 3} if field == "seed" else {}
    raw = json.dumps({**body_for(path), **extra, field: value}).replace("Infinity", "1e999")
    response = httpx.post(f"{url}{path}", content=raw.encode(), timeout=30)
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        message = assert_error(response, path, status, param=field)
        assert message.startswith(field)


@pytest.mark.parametrize(
    ("logit_bias", "status", "words"),
    [
        ({"5": 0}, 200, ""),
        ({}, 200, ""),
        ({"1280": 1}, 400, "vocabulary"),
        ({"-1": 1}, 400, "vocabulary"),
        ({"abc": 1}, 400, "vocabulary"),
        ({"99999999999999999999999": 1}, 400, "vocabulary"),
        ({"5": 101}, 400, "[-100, 100]"),
        ({"5": -100.5}, 400, "[-100, 100]"),
        ({"5": "1"}, 400, "[-100, 100]"),
        ([5], 400, "object"),
        ({"5": 10}, 400, "not supported"),
    ],
)
def test_logit_bias(url: str, logit_bias: object, status: int, words: str) -> None:
    for path in (CHAT, COMPLETIONS):
        response = httpx.post(f"{url}{path}", json={**body_for(path), "logit_bias": logit_bias}, timeout=30)
        if status == 200:
            assert response.status_code == 200, response.text
        else:
            assert words in assert_error(response, path, status, param="logit_bias")


def test_anthropic_tool_result_names_tool_use_id(url: str) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "sunny"}]},
        ],
    }
    message = assert_error(httpx.post(f"{url}{MESSAGES}", json=body), MESSAGES, 400)
    assert message.startswith("messages[2].content[0].tool_use_id:") and "toolu_2" in message
    assert "tool_call_id" not in message
    body["messages"][2]["content"][0]["tool_use_id"] = "toolu_1"  # type: ignore[index]
    assert httpx.post(f"{url}{MESSAGES}", json=body).status_code == 200
    body["tool_choice"] = {"type": "tool", "name": "w"}
    assert "tool_choice.name" in assert_error(httpx.post(f"{url}{MESSAGES}", json=body), MESSAGES, 400)


# ------------------------------------------------------------------------------------ context, capacity


def prompt_tokens(engine: ScriptedEngine, url: str, path: str) -> int:
    count = httpx.post(f"{url}{COUNT}", json=body_for(COUNT)).json()["input_tokens"]
    return count if path != COMPLETIONS else len(engine.tokenizer.encode("Hi"))


@pytest.mark.parametrize(
    ("path", "field"),
    [(CHAT, "max_tokens"), (CHAT, "max_completion_tokens"), (COMPLETIONS, "max_tokens"), (MESSAGES, "max_tokens")],
)
def test_max_tokens_beyond_the_context_gets_400(url: str, engine: ScriptedEngine, path: str, field: str) -> None:
    body = body_for(path)
    body.pop("max_tokens", None)
    if path == CHAT:
        body["reasoning_effort"] = "none"  # the prompt count_tokens measures (no thinking)
    response = httpx.post(f"{url}{path}", json={**body, field: 1_000_000_000})
    message = assert_error(response, path, 400, param=field)
    assert "maximum context length is 2048" in message
    if path != MESSAGES:
        assert response.json()["error"]["code"] == "context_length_exceeded"
    room = engine.max_model_len - prompt_tokens(engine, url, path)
    assert httpx.post(f"{url}{path}", json={**body, field: room}).status_code == 200
    assert httpx.post(f"{url}{path}", json={**body, field: room + 1}).status_code == 400


def test_completions_default_max_tokens_fits_the_room_left(url: str, engine: ScriptedEngine) -> None:
    ids = [100] * (engine.max_model_len - 3)
    response = httpx.post(f"{url}{COMPLETIONS}", json={"model": MODEL, "prompt": ids})
    assert response.status_code == 200 and engine.params[-1].max_tokens == 3


def test_more_sequences_than_the_engine_holds_get_400_not_429(url: str, engine: ScriptedEngine) -> None:
    assert engine.capacity == 4
    for body in (
        {"model": MODEL, "prompt": ["a", "b", "c", "d", "e"], "max_tokens": 2},
        {"model": MODEL, "prompt": ["a", "b"], "n": 3, "max_tokens": 2},
    ):
        message = assert_error(httpx.post(f"{url}{COMPLETIONS}", json=body), COMPLETIONS, 400, param="prompt")
        assert "holds at most 4" in message
    chat = {"model": MODEL, "messages": USER, "n": 5, "max_tokens": 2}
    assert "holds at most 4" in assert_error(httpx.post(f"{url}{CHAT}", json=chat), CHAT, 400, param="n")
    four = {"model": MODEL, "prompt": ["a", "b", "c", "d"], "max_tokens": 2}
    assert httpx.post(f"{url}{COMPLETIONS}", json=four).status_code == 200


# ------------------------------------------------------------------------------- /health under a big body


def health_latency_during(url: str, send: callable) -> tuple[float, httpx.Response]:  # type: ignore[valid-type]
    """The worst /health round trip while ``send()`` runs in another thread, and its response."""
    result: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: result.append(send()))
    with httpx.Client(base_url=url, timeout=30) as probe:
        probe.get("/health")
        worker.start()
        worst = 0.0
        while worker.is_alive():
            start = time.monotonic()
            assert probe.get("/health").status_code == 200
            worst = max(worst, time.monotonic() - start)
            time.sleep(0.005)
    worker.join()
    return worst, result[0]


TEN_MB = ("All work and no play makes Jack a dull boy. " * 250_000)[:10_000_000]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, MESSAGES])
def test_health_is_not_stalled_by_a_10_mb_message(url: str, path: str) -> None:
    """10 MB is parsed in a worker thread and refused from its length alone (it cannot fit 2048 tokens
    whatever its tokens): no tokenising. Before: 20 s to refuse it and /health stalled for seconds."""
    raw = json.dumps(body_for(path, TEN_MB)).encode()
    start = time.monotonic()
    worst, response = health_latency_during(url, lambda: httpx.post(f"{url}{path}", content=raw, timeout=120))
    assert "maximum context length is 2048 tokens, and the prompt has at least" in assert_error(response, path, 400)
    assert time.monotonic() - start < 20
    assert worst < 1.0, f"/health took {worst:.3f} s"  # measured 20-70 ms on a loaded 2-core machine


def test_health_is_not_stalled_while_a_large_prompt_is_tokenised(url: str, engine: ScriptedEngine) -> None:
    """A context large enough that 1 MB must really be tokenised (~600K tokens, seconds of work): the
    tokenizer runs in a worker thread without the GIL, so /health keeps answering; then a prompt over the
    context is refused from its token count."""
    engine.max_model_len = 10_000_000
    text = TEN_MB[:1_000_000]
    worst, response = health_latency_during(
        url, lambda: httpx.post(f"{url}{COMPLETIONS}", json=body_for(COMPLETIONS, text), timeout=120)
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(text))
    assert worst < 1.0, f"/health took {worst:.3f} s"
    engine.max_model_len = 100_000
    worst, response = health_latency_during(
        url, lambda: httpx.post(f"{url}{CHAT}", json=body_for(CHAT, text), timeout=120)
    )
    message = assert_error(response, CHAT, 400)
    assert "maximum context length is 100000 tokens, and the prompt has 5" in message  # counted, not bounded
    assert worst < 1.0, f"/health took {worst:.3f} s"


# ---------------------------------------------------------------------------------- unexpected errors


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger("dsv4.server"), logging.getLogger("uvicorn.error")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_an_unexpected_error_is_a_well_formed_500(
    url: str, records: Records, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(openai_api, "chat_completions", broken)
    monkeypatch.setattr("dsv4.server.anthropic_api.messages", broken)
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.post(path, json=body_for(path))
        request_id = response.headers["x-request-id"]
        message = assert_error(response, path, 500)
        assert "RuntimeError" in message and request_id in message and "a bug" not in message
        errors = [r for r in records.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # once, by us, not again by uvicorn
        assert errors[0].request_id == request_id and errors[0].exc_info is not None  # type: ignore[attr-defined]
        # the same connection serves the next request
        assert client.post(COUNT, json=body_for(COUNT)).status_code == 200
        assert client.get("/health").status_code == 200
    assert metric(url, "dsv4_http_requests_total", route=path, status="500") >= 1


def test_an_error_mid_stream_ends_the_stream_with_an_error_event(
    url: str, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, delta: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(openai_api.ChatChoice, "update", broken)
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.post(CHAT, json={**body_for(CHAT), "stream": True})
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "KeyError" in error["message"]
        assert client.post(CHAT, json=body_for(CHAT)).status_code == 500  # the same bug, not streamed
        monkeypatch.undo()
        assert client.post(CHAT, json=body_for(CHAT)).status_code == 200
    assert len([r for r in records.records if "unhandled error" in r.getMessage()]) == 2


# ---------------------------------------------------------------------------------- aborted streams


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_an_aborted_stream_is_counted_and_logged_as_499(
    url: str, engine: ScriptedEngine, records: Records, path: str
) -> None:
    before = {status: metric(url, "dsv4_http_requests_total", route=path, status=status) for status in ("200", "499")}
    engine.hold.set()
    aborted = len(engine.aborted)
    with httpx.stream("POST", f"{url}{path}", json={**body_for(path), "stream": True}, timeout=30) as response:
        request_id = response.headers["x-request-id"]
        assert next(response.iter_lines())
    wait_for(lambda: len(engine.aborted) == aborted + 1)
    wait_for(lambda: metric(url, "dsv4_http_requests_total", route=path, status="499") == before["499"] + 1)
    assert metric(url, "dsv4_http_requests_total", route=path, status="200") == before["200"]
    lines = [r.getMessage() for r in records.records if getattr(r, "request_id", None) == request_id]
    assert any(f"POST {path} 499" in line and "client closed the connection" in line for line in lines), lines


# -------------------------------------------------------------------------------------------- start-up


def test_max_model_len_above_the_model_is_refused_at_start_up(
    reference_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for model, allowed in (("tiny-random", 65536), (str(reference_dir / "ckpt"), 4096), ("v4-flash", None)):
        assert main(["serve", "--model", model, "--max-model-len", "100000000"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("dsv4: error: --max-model-len 100000000 is above the context of") and model in error
        if allowed is not None:
            assert f"({allowed} tokens" in error
    assert main(["serve", "--max-model-len", "1"]) == 2
    assert "must be >= 2" in capsys.readouterr().err
    for flag in ("--max-body-bytes", "--max-json-depth"):
        assert main(["serve", flag, "0"]) == 2
        assert flag in capsys.readouterr().err


def test_prompt_memory_limit_counts_the_recorded_prefix() -> None:
    from dsv4.chat.tokenizer import TooManyTokens, build_test_tokenizer
    from dsv4.server.prompt_cache import PromptMemory

    tok = build_test_tokenizer()
    memory = PromptMemory(tok)
    head = "<｜User｜>hello<｜Assistant｜></think>"
    memory.remember(head, [7] * 10)
    rest = tok.encode(EOS + "more words")
    assert memory.encode(head + EOS + "more words", limit=10 + len(rest)) == [7] * 10 + rest
    with pytest.raises(TooManyTokens) as refused:
        memory.encode(head + EOS + "more words", limit=10 + len(rest) - 1)
    assert refused.value.count == 10 + len(rest)
    with pytest.raises(TooManyTokens):
        memory.encode(head, limit=9)  # the recorded ids alone are over
    assert memory.encode(head, limit=10) == [7] * 10
