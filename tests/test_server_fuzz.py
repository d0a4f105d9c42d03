"""A property-based fuzzer for the HTTP layer: both APIs' request schemas with random types and values,
missing fields, unicode (lone surrogates, special tokens, NUL), huge numbers, and raw bytes, against the
scripted engine of test_server_api (so a request that validates is generated in milliseconds).

The properties, for every request: no 5xx, an ``x-request-id`` header, every error body well-formed in the
route's shape (OpenAI ``{"error": {"message", "type", "param", "code"}}``, Anthropic ``{"type": "error",
"error": {"type", "message"}}``), every success a parseable JSON body or a well-formed event stream without
an error event; and after them all, no error logged, no 5xx counted, nothing left running, /health ok.
Deterministic (``derandomize=True``), more than 2,000 requests per run.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from test_server_api import MODEL, ScriptedEngine, wait_for

from dsv4.chat.encoding import EOS
from dsv4.server.app import create_app, serve_in_thread
from dsv4.server.serving import ServerConfig

CHAT, COMPLETIONS, MESSAGES, COUNT = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
)
ROUTES = [CHAT, COMPLETIONS, MESSAGES, COUNT]
# Requests sent by this module, checked against the floor the issue sets.
SENT = {"requests": 0}
MIN_REQUESTS = 2000


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[httpx.Client, ScriptedEngine, ErrorLog]]:
    engine = ScriptedEngine()
    engine.reply = lambda prompt: "Hi</think>Hello <｜DSML｜> there!" + EOS
    errors = ErrorLog()
    loggers = [logging.getLogger(name) for name in ("dsv4.server", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        logger.addHandler(errors)
    app = create_app(engine, ServerConfig(model_names=(MODEL, "alias"), max_body_bytes=1 << 20, max_json_depth=12))
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            yield client, engine, errors
    finally:
        for logger in loggers:
            logger.removeHandler(errors)


# ------------------------------------------------------------------------------------------- checking


def check(response: httpx.Response, path: str) -> None:
    SENT["requests"] += 1
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers.get("x-request-id"), response.headers
    anthropic = path.startswith("/v1/messages")
    if response.status_code >= 400:
        body = response.json()
        if anthropic:
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
            assert isinstance(body["error"]["type"], str)
        else:
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
            assert isinstance(body["error"]["type"], str)
            assert body["error"]["param"] is None or isinstance(body["error"]["param"], str)
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        return
    assert response.status_code == 200, response.text[:500]
    if not response.headers["content-type"].startswith("text/event-stream"):
        assert isinstance(response.json(), dict)
        return
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events, response.text[:500]
    if anthropic:
        payloads = [json.loads(event) for event in events]
        assert payloads[0]["type"] == "message_start" and payloads[-1]["type"] == "message_stop", payloads
        assert all(p["type"] != "error" for p in payloads), payloads
    else:
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            assert "error" not in json.loads(event), event


def post(client: httpx.Client, path: str, body: Any) -> None:
    """Send ``body`` (Python's JSON, so NaN and Infinity go out as such) and check the answer."""
    check(client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}), path)


# ----------------------------------------------------------------------------------------- strategies

# Characters that have broken servers: lone surrogates, special and markup tokens, NUL, combining marks.
SURROGATES = ["\ud800", "\udfff"]
NASTY = ["\ud83d\ude00", "<｜User｜>", "<｜end▁of▁sentence｜>", "</think>", "<think>", "｜DSML｜", "\x00", "\u0301"]
NASTY += ["\n", '"', "\\", "é", "中", "Hi", " there"]
huge = st.sampled_from([-(2**63) - 1, 2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, 1e-308, 2**31])


class Schemas:
    """Request-body strategies of both APIs. ``chaos=False``: well-typed values in the official ranges, so
    that most requests reach generation (fields still come and go, and conversations can still be wrong);
    ``chaos=True``: any field may hold any JSON value, numbers are huge, NaN or inf, strings hold lone
    surrogates, and required fields go missing."""

    def __init__(self, chaos: bool) -> None:
        self.chaos = chaos
        pieces = NASTY + SURROGATES if chaos else NASTY
        alphabet = st.characters(exclude_categories=() if chaos else ("Cs",))
        self.text = st.one_of(
            st.text(alphabet, max_size=12), st.lists(st.sampled_from(pieces), max_size=4).map("".join)
        )
        scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=chaos), huge, self.text)
        self.junk = st.recursive(
            scalar,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(self.text, inner, max_size=3),
            max_leaves=6,
        )

    def maybe(self, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        """``strategy``, or in chaos now and then any JSON value at all."""
        return st.one_of(strategy, strategy, strategy, self.junk) if self.chaos else strategy

    def real(self, low: float, high: float) -> st.SearchStrategy[Any]:
        if not self.chaos:
            return st.floats(low, high)
        return self.maybe(st.one_of(st.floats(low - 1, high + 1), huge, st.sampled_from([float("nan"), float("inf")])))

    def integer(self, low: int, high: int) -> st.SearchStrategy[Any]:
        if not self.chaos:
            return st.integers(low, high)
        return self.maybe(st.one_of(st.integers(low - 2, high + 2), huge, st.integers(-(2**70), 2**70)))

    def one_of_names(self, names: list[str]) -> st.SearchStrategy[Any]:
        return self.maybe(st.sampled_from(names + (["", "bogus"] if self.chaos else [])))

    # -------------------------------------------------------------------------------- OpenAI
    def openai_turns(self) -> tuple[st.SearchStrategy[Any], ...]:
        """(user, assistant, assistant calling call_1, tool answering call_1) messages."""
        text, maybe = self.text, self.maybe
        part = st.fixed_dictionaries({"type": self.one_of_names(["text"]), "text": maybe(text)})
        content = st.one_of(text, text, st.lists(part, max_size=2), *([st.none(), self.junk] if self.chaos else []))
        function = st.fixed_dictionaries(
            {
                "name": self.one_of_names(["get_weather"]),
                "arguments": maybe(st.sampled_from(['{"city": "Paris"}', "{}"]) | text),
            }
        )
        call = st.fixed_dictionaries(
            {"id": self.one_of_names(["call_1"]), "type": self.one_of_names(["function"]), "function": maybe(function)}
        )
        user = st.fixed_dictionaries({"role": self.one_of_names(["user", "system", "developer"]), "content": content})
        assistant = st.fixed_dictionaries(
            {"role": self.one_of_names(["assistant"]), "content": content}, optional={"reasoning_content": maybe(text)}
        )
        calling = st.fixed_dictionaries(
            {
                "role": self.one_of_names(["assistant"]),
                "content": content,
                "tool_calls": maybe(st.lists(call, min_size=0 if self.chaos else 1, max_size=2)),
            },
            optional={"reasoning_content": maybe(text)},
        )
        tool = st.fixed_dictionaries(
            {"role": self.one_of_names(["tool"]), "tool_call_id": self.one_of_names(["call_1"])},
            optional={"content": content},
        )
        return user, assistant, calling, tool

    def openai_messages(self) -> st.SearchStrategy[Any]:
        """A conversation: turns, maybe a tool call and its result, then (mostly) a user turn; in chaos any
        turns in any order."""
        user, assistant, calling, tool = self.openai_turns()
        if self.chaos:
            return self.maybe(st.lists(st.one_of(user, assistant, calling, tool), max_size=4))
        exchange = st.one_of(st.just([]), st.tuples(calling, tool).map(list))
        last = st.one_of(st.tuples(user).map(list), st.just([]))
        head = st.lists(st.one_of(user, assistant), max_size=2)
        return st.tuples(head, exchange, last).map(lambda t: t[0] + t[1] + t[2]).filter(bool)

    def schema(self) -> st.SearchStrategy[Any]:
        plain = st.just({"type": "object", "properties": {"city": {"type": "string"}}})
        return st.one_of(plain, self.junk) if self.chaos else plain

    def openai_tools(self) -> st.SearchStrategy[Any]:
        function = st.fixed_dictionaries(
            {"name": self.one_of_names(["get_weather", "f"] if self.chaos else ["get_weather"])},
            optional={"description": self.maybe(self.text), "parameters": self.schema()},
        )
        tool = st.fixed_dictionaries({"type": self.one_of_names(["function"]), "function": self.maybe(function)})
        return self.maybe(st.lists(tool, max_size=2 if self.chaos else 1))

    def sampling(self) -> dict[str, st.SearchStrategy[Any]]:
        maybe, text = self.maybe, self.text
        vocab = st.integers(0, 1279) if not self.chaos else st.one_of(st.integers(-5, 2000), huge)
        bias_keys = ["0", "5", "1279"] + (["1280", "-1", "x"] if self.chaos else [])
        return {
            "temperature": self.real(0, 2),
            "top_p": self.real(0.01, 1) if not self.chaos else self.real(0, 1),
            "top_k": self.integer(-1, 50),
            "min_p": self.real(0, 1),
            "presence_penalty": self.real(-2, 2),
            "frequency_penalty": self.real(-2, 2),
            "repetition_penalty": self.real(0.5, 2),
            "seed": self.integer(0, 100),
            "stop": maybe(st.one_of(text.filter(bool), st.lists(text.filter(bool), max_size=3))),
            "stop_token_ids": maybe(st.lists(vocab, max_size=3)),
            "min_tokens": self.integer(0, 3),
            "ignore_eos": maybe(st.booleans()),
            "n": self.integer(1, 3),
            "stream": maybe(st.booleans()),
            "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})),
            # the engine has no per-token bias: only zero biases are accepted
            "logit_bias": maybe(st.dictionaries(st.sampled_from(bias_keys), self.real(-100, 100), max_size=2))
            if self.chaos
            else st.dictionaries(st.sampled_from(bias_keys), st.just(0), max_size=2),
            "user": text,
        }

    def chat(self) -> st.SearchStrategy[dict[str, Any]]:
        maybe = self.maybe
        choice = st.one_of(
            st.sampled_from(["auto", "none", "required"]),
            st.fixed_dictionaries(
                {
                    "type": st.just("function"),
                    "function": st.fixed_dictionaries({"name": self.one_of_names(["get_weather"])}),
                }
            ),
        )
        response_format = st.fixed_dictionaries(
            {"type": self.one_of_names(["text", "json_object", "json_schema"])},
            optional={"json_schema": maybe(st.fixed_dictionaries({"schema": self.schema()}))},
        )
        kwargs = st.fixed_dictionaries(
            {}, optional={"thinking": maybe(st.booleans()), "drop_thinking": maybe(st.booleans())}
        )
        return self.body(
            {"messages": self.openai_messages()},
            {
                **self.sampling(),
                "max_tokens": self.integer(1, 40),
                "max_completion_tokens": self.integer(1, 40),
                "logprobs": maybe(st.booleans()),
                "top_logprobs": self.integer(0, 20),
                "tools": self.openai_tools(),
                "tool_choice": maybe(choice),
                "reasoning_effort": self.one_of_names(["none", "low", "medium", "high", "xhigh", "max"]),
                "thinking": maybe(st.fixed_dictionaries({"type": self.one_of_names(["enabled", "disabled"])})),
                "chat_template_kwargs": maybe(kwargs),
                "response_format": maybe(response_format),
            },
        )

    def completion(self) -> st.SearchStrategy[dict[str, Any]]:
        ids = st.lists(
            st.integers(0, 1279) if not self.chaos else st.one_of(st.integers(-3, 3000), huge), min_size=1, max_size=6
        )
        prompt = st.one_of(
            self.text, st.lists(self.text, min_size=1, max_size=4), ids, st.lists(ids, min_size=1, max_size=4)
        )
        return self.body(
            {"prompt": self.maybe(prompt)},
            {
                **self.sampling(),
                "max_tokens": self.integer(1, 40),
                "logprobs": self.integer(0, 20),
                "echo": st.booleans() if self.chaos else st.just(False),
                "suffix": self.maybe(self.text) if self.chaos else st.just(""),
            },
        )

    # ----------------------------------------------------------------------------- Anthropic
    def anthropic_messages(self) -> st.SearchStrategy[Any]:
        text, maybe = self.text, self.maybe
        text_block = st.fixed_dictionaries({"type": st.just("text"), "text": maybe(text)})
        tool_use = st.fixed_dictionaries(
            {
                "type": st.just("tool_use"),
                "id": self.one_of_names(["toolu_1"]),
                "name": self.one_of_names(["get_weather"]),
                "input": maybe(st.dictionaries(text, self.junk if self.chaos else text, max_size=2)),
            }
        )
        tool_result = st.fixed_dictionaries(
            {"type": st.just("tool_result"), "tool_use_id": self.one_of_names(["toolu_1"])},
            optional={
                "content": maybe(st.one_of(text, st.lists(text_block, max_size=2))),
                "is_error": maybe(st.booleans()),
            },
        )
        thinking = st.fixed_dictionaries({"type": st.just("thinking"), "thinking": maybe(text), "signature": text})
        if not self.chaos:  # turns, maybe a tool_use and its tool_result, then a user turn
            said = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": text})
            calling = st.fixed_dictionaries(
                {"role": st.just("assistant"), "content": st.tuples(thinking, text_block, tool_use).map(list)}
            )
            answer = st.fixed_dictionaries(
                {"role": st.just("user"), "content": st.tuples(tool_result, text_block).map(list)}
            )
            exchange = st.one_of(st.just([]), st.tuples(calling, answer).map(list))
            user = st.fixed_dictionaries(
                {"role": st.just("user"), "content": st.one_of(text, st.lists(text_block, min_size=1, max_size=2))}
            )
            return st.tuples(st.lists(said, max_size=2), exchange, st.tuples(user).map(list)).map(
                lambda t: t[0] + t[1] + t[2]
            )
        user_blocks = st.lists(st.one_of(text_block, tool_result), max_size=3)
        assistant_blocks = st.lists(st.one_of(thinking, text_block, tool_use), max_size=3)
        extra: list[st.SearchStrategy[Any]] = []
        if self.chaos:
            odd = st.fixed_dictionaries({"type": st.sampled_from(["redacted_thinking", "image", "document"])})
            extra = [st.lists(st.one_of(text_block, tool_use, tool_result, thinking, odd, self.junk), max_size=3)]
        user = st.fixed_dictionaries(
            {"role": self.one_of_names(["user"]), "content": maybe(st.one_of(text, user_blocks, *extra))}
        )
        assistant = st.fixed_dictionaries(
            {"role": self.one_of_names(["assistant"]), "content": maybe(st.one_of(text, assistant_blocks, *extra))}
        )
        last = st.fixed_dictionaries({"role": st.just("user"), "content": text})
        turns = st.lists(st.one_of(user, assistant), max_size=4)
        return maybe(turns.flatmap(lambda m: st.just(m) | last.map(lambda u: [*m, u])))

    def anthropic_fields(self) -> dict[str, st.SearchStrategy[Any]]:
        maybe, text = self.maybe, self.text
        text_block = st.fixed_dictionaries({"type": st.just("text"), "text": maybe(text)})
        tool = st.fixed_dictionaries(
            {"name": self.one_of_names(["get_weather", "f"] if self.chaos else ["get_weather"])},
            optional={"description": maybe(text), "input_schema": self.schema(), "type": self.one_of_names(["custom"])},
        )
        choice = st.fixed_dictionaries(
            {"type": self.one_of_names(["auto", "any", "tool", "none"])},
            optional={"name": self.one_of_names(["get_weather"])},
        )
        thinking = st.fixed_dictionaries(
            {"type": self.one_of_names(["enabled", "adaptive", "disabled"])},
            optional={"budget_tokens": self.integer(1024, 2048)},
        )
        return {
            "system": maybe(st.one_of(text, st.lists(text_block, max_size=2))),
            "tools": maybe(st.lists(tool, max_size=2 if self.chaos else 1)),
            "tool_choice": maybe(choice),
            "thinking": maybe(thinking),
            "output_config": maybe(st.fixed_dictionaries({"effort": self.one_of_names(["low", "high", "max"])})),
            "metadata": self.junk,
        }

    def count(self) -> st.SearchStrategy[dict[str, Any]]:
        return self.body({"messages": self.anthropic_messages()}, self.anthropic_fields())

    def messages(self) -> st.SearchStrategy[dict[str, Any]]:
        return self.body(
            {"max_tokens": self.integer(1, 40), "messages": self.anthropic_messages()},
            {
                **self.anthropic_fields(),
                "stream": self.maybe(st.booleans()),
                "stop_sequences": self.maybe(st.lists(self.text.filter(bool), max_size=2)),
                "temperature": self.real(0, 1),
                "top_p": self.real(0.01, 1) if not self.chaos else self.real(0, 1),
                "top_k": self.integer(0, 50),
            },
        )

    def body(
        self, required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
    ) -> st.SearchStrategy[dict[str, Any]]:
        """A body with ``model``, the required fields and some optional ones; in chaos, required ones go
        missing now and then."""
        model = st.sampled_from([MODEL, "alias"])
        if self.chaos:
            model = st.one_of(model, model, self.text, self.junk)
        strategy = st.fixed_dictionaries({"model": model, **required}, optional=optional)
        if not self.chaos:
            return strategy
        drop = st.sets(st.sampled_from(["model", *required]), max_size=2)
        return st.tuples(strategy, drop, st.integers(0, 9)).map(
            lambda t: {k: v for k, v in t[0].items() if t[2] or k not in t[1]}
        )


CLEAN, CHAOS = Schemas(chaos=False), Schemas(chaos=True)
MUTANTS = st.one_of(
    CHAOS.junk,
    st.lists(CHAOS.junk, min_size=1, max_size=2),
    st.dictionaries(CHAOS.text, CHAOS.junk, min_size=1, max_size=2),
    st.sampled_from(["\ud800", "a\udfffb", "", "<｜User｜>", 0, -1, 2**64, 10**30, 1e308, -0.5, True, None, [], {}]),
)


def locations(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) inside ``value``."""
    found: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
        for key in keys:
            found.append((node, key))
            stack.append(node[key])
    return found


@st.composite
def mutated(draw: st.DrawFn, clean: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A clean body with one to three spots broken - a value replaced by another type, a huge number or a
    string that is not text, or removed - so that the fault sits behind valid fields and reaches deep code."""
    body = copy.deepcopy(draw(clean))  # strategies may hand out shared objects (st.just): never edit those
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        spots = locations(body)
        if not spots:
            break
        if draw(st.booleans()):  # half of the time a top-level field: each is read by different code
            spots = [(body, key) for key in body] or spots
        container, key = draw(st.sampled_from(spots))
        if draw(st.integers(0, 4)) == 0:
            del container[key]
        else:
            container[key] = copy.deepcopy(draw(MUTANTS))
    return body


def either(build: str) -> st.SearchStrategy[dict[str, Any]]:
    clean = getattr(CLEAN, build)()
    return st.one_of(clean, mutated(clean), mutated(clean), getattr(CHAOS, build)())


# -------------------------------------------------------------------------------------------- the fuzz


@fuzz_settings(650)
@given(body=either("chat"))
def test_fuzz_chat_completions(server: tuple[httpx.Client, ScriptedEngine, ErrorLog], body: dict[str, Any]) -> None:
    post(server[0], CHAT, body)


@fuzz_settings(400)
@given(body=either("completion"))
def test_fuzz_completions(server: tuple[httpx.Client, ScriptedEngine, ErrorLog], body: dict[str, Any]) -> None:
    post(server[0], COMPLETIONS, body)


@fuzz_settings(550)
@given(body=either("messages"))
def test_fuzz_anthropic_messages(server: tuple[httpx.Client, ScriptedEngine, ErrorLog], body: dict[str, Any]) -> None:
    post(server[0], MESSAGES, body)


@fuzz_settings(150)
@given(body=either("count"))
def test_fuzz_anthropic_count_tokens(
    server: tuple[httpx.Client, ScriptedEngine, ErrorLog], body: dict[str, Any]
) -> None:
    post(server[0], COUNT, body)


valid_bodies = st.sampled_from(
    [
        (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
        (COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 3}),
        (MESSAGES, {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}),
        (COUNT, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
    ]
)


@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """Bytes of every kind: random, random text, a valid body cut or with bytes overwritten, deep nesting."""
    path, body = draw(valid_bodies)
    raw = json.dumps(body).encode()
    kind = draw(st.sampled_from(["bytes", "text", "cut", "flip", "nest", "json"]))
    if kind == "bytes":
        return draw(st.sampled_from(ROUTES)), draw(st.binary(max_size=64))
    if kind == "text":
        return path, draw(st.text(max_size=64)).encode("utf-8", "surrogatepass")
    if kind == "cut":
        return path, raw[: draw(st.integers(0, len(raw)))]
    if kind == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        return path, raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at + 1 :]
    if kind == "nest":
        depth = draw(st.sampled_from([10, 11, 12, 13, 100, 5000]))
        return path, raw[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    return path, json.dumps(draw(CHAOS.junk)).encode("utf-8", "surrogatepass")


@fuzz_settings(500)
@given(case=raw_bodies())
def test_fuzz_raw_bytes(server: tuple[httpx.Client, ScriptedEngine, ErrorLog], case: tuple[str, bytes]) -> None:
    path, raw = case
    check(server[0].post(path, content=raw, headers={"content-type": "application/json"}), path)


@fuzz_settings(50)
@given(name=st.text(max_size=20))
def test_fuzz_model_paths(server: tuple[httpx.Client, ScriptedEngine, ErrorLog], name: str) -> None:
    response = server[0].get("/v1/models/" + quote(name.encode("utf-8", "surrogatepass"), safe=""))
    SENT["requests"] += 1
    assert response.status_code in (200, 404, 405), response.text
    assert response.headers.get("x-request-id")


def test_server_is_healthy_after_the_fuzz(server: tuple[httpx.Client, ScriptedEngine, ErrorLog]) -> None:
    client, engine, errors = server
    if not SENT["requests"]:
        pytest.skip("checks what the fuzz tests above left: run the module")
    assert SENT["requests"] >= MIN_REQUESTS, SENT
    assert errors.messages == []
    wait_for(lambda: engine.stats().running == 0)
    assert client.get("/health").json() == {"status": "ok"}
    statuses: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "dsv4_http_requests_total":
                status = sample.labels["status"]
                statuses[status] = statuses.get(status, 0) + sample.value
    assert not [s for s in statuses if s.startswith("5")], statuses
    assert statuses.get("200", 0) > 200  # the fuzz reaches generation, not only validation
    assert client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}).status_code == 200
