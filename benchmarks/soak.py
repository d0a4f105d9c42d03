"""Soak test of ``dsv4 serve``: concurrent clients of every kind for minutes, hostile input and an injected
engine fault, then a check that the server is healthy, idle and holds no cache.

It starts ``dsv4 serve --model tiny-random`` as a subprocess - a server as a user runs it, with its own
interpreter, event loop and engine thread, so that the clients (here) and the server never share a GIL -
and drives it for ``--minutes`` with ``--clients`` concurrent asyncio clients (httpx), each of them picking,
request after request, one of:

* valid requests: OpenAI chat (plain, multi-turn, with tools; streaming or not), ``/v1/completions``
  (streaming or not), Anthropic ``/v1/messages`` (plain or with a tool_use/tool_result history, streaming
  or not) and ``count_tokens``, with random sampling parameters (temperature, seeds, stops, ``n``,
  logprobs, thinking on or off);
* client aborts: a long stream the client hangs up on after a few events;
* bodies over ``--max-body-bytes`` (413), sent with a Content-Length or chunked;
* malformed bodies (400): bad JSON, wrong types, nesting deeper than the server's limit, lone UTF-16
  surrogates, ``NaN``.

An injected engine fault: the server runs with ``DSV4_TEST_FAULT_TOKEN`` (``dsv4/server/fault_injection.py``),
and every ``--fault-every`` seconds one more client sends a prompt starting with that token; the step
computing it raises. That request, and any other whose sequence was in the same step, must fail with a
500 (or an error event in its stream) quoting the injected fault; every other request must be served.

Meanwhile a probe, in a thread of its own so that the clients' event loop cannot delay it, polls
``/health`` every ``--health-interval`` seconds and records its latency; the server's RSS is read from
``/proc/PID/status`` (VmRSS, VmHWM) every few seconds, the first time after one warm-up request of each
kind. At the end the clients finish their request in flight, the script waits for the engine to run and
queue nothing (``/metrics``), and prints requests by kind, responses by status (expected, injected fault,
unexpected), ``/health`` p50/p99 under load, the KV cache still held by sequences once idle, RSS growth,
the ERROR lines of the server's log that are not the injected fault's, and how the server shut down on
SIGTERM.

It exits non-zero on: an unexpected status (a 5xx other than the injected fault's, a 4xx for a valid
request, a 200 for a malformed one), a request or ``/health`` poll that hung past ``--request-timeout``,
a stream cut without its end marker, a ``/health`` that was not 200, an engine not idle within
``--idle-timeout``, KV cache held at idle, an unexpected ERROR in the server's log, no injected fault
seen, a server that died or did not exit cleanly on SIGTERM.

    python benchmarks/soak.py                                # 8 clients, 10 minutes
    python benchmarks/soak.py --clients 2 --minutes 0.1      # a smoke run (tests/test_soak.py)

Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from dsv4.server.fault_injection import FAULT_MESSAGE, FAULT_TOKEN_ENV
from dsv4.tiny import TINY_RANDOM

# tiny-random's last token id ("wz"): no prompt of the soak starts with it, and chat prompts begin with BOS
FAULT_TOKEN = 1279
# The server's default nesting limit (dsv4/server/limits.py); the deep bodies go well beyond it.
DEEP_LEVELS = 200
RSS_INTERVAL = 5.0  # seconds between two reads of the server's RSS
PROGRESS_INTERVAL = 30.0
STARTUP_TIMEOUT = 600.0  # the first run writes tiny-random to the cache
SHUTDOWN_TIMEOUT = 30.0
POST_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens")

# The words of the prompts; none starts with "wz" (FAULT_TOKEN), so neither does a text prompt.
TEXT = (
    "the agent reads a file runs tests and fixes bug in parser while server streams tokens back to many clients "
    "at once cache blocks are shared by reference freed with their last holder tool result can be long reply "
    "short history grows every turn of session"
)
WORDS = tuple(TEXT.split())

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the repository",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run",
            "description": "Run a shell command",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
                "required": ["command"],
            },
        },
    },
]
ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Call:
    """One HTTP request of a client, and what a correct server answers to it."""

    kind: str
    path: str
    body: bytes
    expect: int  # the right status: 200 for a valid request, 4xx for a hostile one
    stream: bool = False
    abort_after: int | None = None  # stream events to read before hanging up
    chunked: bool = False  # sent without a Content-Length
    on_reply: Callable[[dict[str, Any]], None] | None = None  # sees a non-streamed 200's body


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


class Client:
    """The request generator of one client: its own random stream and its own multi-turn conversation."""

    def __init__(self, seed: int, model: str, max_body_bytes: int) -> None:
        self.rng = random.Random(seed)
        self.model = model
        self.max_body_bytes = max_body_bytes
        self.conversation: list[dict[str, Any]] = []
        # weight, kind: valid requests are most of the traffic, as on a real server
        self.kinds: list[tuple[float, Callable[[], Call]]] = [
            (10, self.chat),
            (6, self.chat_turn),
            (6, self.chat_tools),
            (6, self.completion),
            (8, self.messages),
            (2, self.count_tokens),
            (4, self.abort),
            (3, self.oversized),
            (6, self.malformed),
        ]

    def next_call(self) -> Call:
        weights, makers = zip(*self.kinds, strict=True)
        return self.rng.choices(makers, weights)[0]()

    # -------------------------------------------------------------------- valid
    def text(self, low: int = 4, high: int = 60) -> str:
        return " ".join(self.rng.choices(WORDS, k=self.rng.randint(low, high))).capitalize()

    def openai_sampling(self) -> dict[str, Any]:
        rng = self.rng
        fields: dict[str, Any] = {"max_tokens": rng.randint(1, 32), "temperature": rng.choice([0, 0.6, 1.0, 1.5])}
        if rng.random() < 0.3:
            fields["seed"] = rng.randrange(2**31)
        if rng.random() < 0.2:
            fields["top_p"] = rng.choice([0.5, 0.9])
        if rng.random() < 0.2:
            fields["stop"] = rng.sample(WORDS, 2)
        if rng.random() < 0.1:
            fields["n"] = 2
        if rng.random() < 0.2:
            fields["presence_penalty"] = rng.choice([-1.0, 0.5, 2.0])
        return fields

    def chat_body(self, messages: list[dict[str, Any]], stream: bool, **extra: Any) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {"model": self.model, "messages": messages, **self.openai_sampling(), **extra}
        body["reasoning_effort"] = rng.choice(["none", "high", "max"])
        if rng.random() < 0.2:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        return body

    def chat(self) -> Call:
        stream = self.rng.random() < 0.5
        messages = [{"role": "user", "content": self.text()}]
        if self.rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": self.text(2, 20)})
        return Call(
            "chat-stream" if stream else "chat",
            "/v1/chat/completions",
            _json(self.chat_body(messages, stream)),
            200,
            stream,
        )

    def chat_turn(self) -> Call:
        """The next turn of this client's conversation, which sends its history back (prefix-cache hits)."""
        if len(self.conversation) >= 16:
            self.conversation = []
        self.conversation.append({"role": "user", "content": self.text()})
        history = list(self.conversation)

        def on_reply(reply: dict[str, Any]) -> None:
            message = reply["choices"][0]["message"]
            self.conversation.append(
                {
                    "role": "assistant",
                    "content": message.get("content") or "",
                    "reasoning_content": message.get("reasoning_content"),
                }
            )

        body = self.chat_body(history, stream=False, n=1)
        return Call("chat-turn", "/v1/chat/completions", _json(body), 200, on_reply=on_reply)

    def chat_tools(self) -> Call:
        rng = self.rng
        stream = rng.random() < 0.5
        messages: list[dict[str, Any]] = [{"role": "user", "content": self.text()}]
        if rng.random() < 0.5:  # a history with a call and its result
            call_id = f"call_{rng.randrange(10**9)}"
            arguments = json.dumps({"path": f"src/{rng.choice(WORDS)}.py"})
            messages += [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": call_id, "type": "function", "function": {"name": "read_file", "arguments": arguments}}
                    ],
                },
                {"role": "tool", "tool_call_id": call_id, "content": self.text(20, 200)},
            ]
        choice: Any = rng.choice(["auto", "none", "required", {"type": "function", "function": {"name": "run"}}])
        body = self.chat_body(messages, stream, tools=TOOLS, tool_choice=choice)
        return Call("chat-tools-stream" if stream else "chat-tools", "/v1/chat/completions", _json(body), 200, stream)

    def completion(self) -> Call:
        rng = self.rng
        stream = rng.random() < 0.5
        prompt: Any = self.text()
        if rng.random() < 0.3:  # token ids; never starting with the fault token
            prompt = [rng.randrange(3, FAULT_TOKEN) for _ in range(rng.randint(1, 40))]
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, **self.openai_sampling()}
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
        if stream:
            body["stream"] = True
        return Call("completions-stream" if stream else "completions", "/v1/completions", _json(body), 200, stream)

    def messages_body(self, stream: bool, max_tokens: int | None = None) -> dict[str, Any]:
        rng = self.rng
        messages: list[dict[str, Any]] = [{"role": "user", "content": self.text()}]
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens or rng.randint(1, 32),
            "messages": messages,
            "temperature": rng.choice([0, 0.5, 1.0]),
        }
        if rng.random() < 0.4:
            tool_id = f"toolu_{rng.randrange(10**9)}"
            messages += [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": self.text(2, 10)},
                        {"type": "tool_use", "id": tool_id, "name": "run", "input": {"command": "pytest -q"}},
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": self.text()}]},
            ]
            body["tools"] = ANTHROPIC_TOOLS
        if rng.random() < 0.3:
            body["system"] = self.text(2, 20)
        if rng.random() < 0.4:
            body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
        if rng.random() < 0.2:
            body["stop_sequences"] = rng.sample(WORDS, 2)
        if stream:
            body["stream"] = True
        return body

    def messages(self) -> Call:
        stream = self.rng.random() < 0.5
        body = self.messages_body(stream)
        return Call("messages-stream" if stream else "messages", "/v1/messages", _json(body), 200, stream)

    def count_tokens(self) -> Call:
        body = self.messages_body(stream=False)
        del body["max_tokens"]
        return Call("count-tokens", "/v1/messages/count_tokens", _json(body), 200)

    # -------------------------------------------------------------------- hostile
    def abort(self) -> Call:
        """A long stream that the client hangs up on after a few events."""
        rng = self.rng
        after = rng.randint(1, 6)
        if rng.random() < 0.5:
            body = self.chat_body([{"role": "user", "content": self.text()}], stream=True, max_tokens=256)
            body.pop("stop", None)
            body.pop("n", None)
            return Call("abort", "/v1/chat/completions", _json(body), 200, True, abort_after=after)
        body = self.messages_body(stream=True, max_tokens=256)
        body.pop("stop_sequences", None)
        return Call("abort", "/v1/messages", _json(body), 200, True, abort_after=after)

    def oversized(self) -> Call:
        path = self.rng.choice(POST_ROUTES)
        padding = "x" * (self.max_body_bytes + self.rng.randint(1, 65536))
        body = {"model": self.model, "messages": [{"role": "user", "content": padding}], "max_tokens": 4}
        return Call("oversized", path, _json(body), 413, chunked=self.rng.random() < 0.5)

    def malformed(self) -> Call:
        rng = self.rng
        path = rng.choice(POST_ROUTES[:3])
        valid = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        if path == "/v1/completions":
            valid = json.dumps({"model": self.model, "prompt": "hi", "max_tokens": 4})
        deep = "[" * DEEP_LEVELS + "]" * DEEP_LEVELS
        field_name = "prompt" if path == "/v1/completions" else "messages"
        raw = rng.choice(
            [
                valid[: rng.randrange(1, len(valid) - 1)],  # truncated
                valid.replace(",", ",,", 1),  # bad JSON
                "not json at all",
                valid[:-1] + ', "metadata": ' + deep + "}",  # nested too deep
                valid.replace("hi", "a\\ud800b"),  # lone surrogate
                valid[:-1] + ', "temperature": NaN}',
                valid[:-1] + ', "max_tokens": "ten"}',  # wrong types
                valid[:-1] + f', "{field_name}": 42}}',
                valid[:-1] + ', "temperature": {"hot": true}}',
                "[1, 2, 3]",  # not an object
            ]
        )
        return Call("malformed", path, raw.encode(), 400)


def fault_call(model: str) -> Call:
    """The request the injected fault fails: a prompt that starts with the fault token."""
    body = {"model": model, "prompt": [FAULT_TOKEN, 5, 6, 7], "max_tokens": 4}
    return Call("injected-fault", "/v1/completions", _json(body), 500)


# ---------------------------------------------------------------------------------------------- outcomes


EXPECTED, INJECTED, UNEXPECTED = "expected", "injected fault", "UNEXPECTED"


@dataclass
class Tally:
    """Every answer the clients got: by outcome label and verdict, and latency by kind."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    unexpected_kinds: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few unexpected answers, for the report

    def record(self, call: Call, outcome: str, verdict: str, seconds: float, detail: str = "") -> None:
        self.outcomes[outcome, verdict] += 1
        self.latencies.setdefault(call.kind, []).append(seconds)
        if verdict == UNEXPECTED:
            self.unexpected_kinds[call.kind] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{call.kind} {call.path}: {outcome} {detail[:300]}")

    def count(self, verdict: str) -> int:
        return sum(n for (_, v), n in self.outcomes.items() if v == verdict)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())


def _error_message(payload: Any) -> str | None:
    """The message of an OpenAI or Anthropic error body or event, None when ``payload`` is not one."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message"))
    return None


async def _events(response: httpx.Response) -> AsyncIterator[Any]:
    """The JSON payloads of a server-sent event stream (OpenAI's ``[DONE]`` as the string itself)."""
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            yield data if data == "[DONE]" else json.loads(data)


async def perform(client: httpx.AsyncClient, call: Call) -> tuple[str, str, str]:
    """Send ``call``; returns the outcome's label, its verdict and a detail for the report."""
    headers = {"content-type": "application/json"}
    content: Any = call.body
    if call.chunked:

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(call.body), 65536):
                yield call.body[start : start + 65536]

        content = chunks()
    async with client.stream("POST", call.path, content=content, headers=headers) as response:
        status = response.status_code
        if not call.stream or status != 200:
            raw = await response.aread()
            try:
                payload = json.loads(raw)
            except ValueError:
                return str(status), UNEXPECTED, f"not JSON: {raw[:200]!r}"
            message = _error_message(payload)
            if status == 500 and message is not None and FAULT_MESSAGE in message:
                return "500 (injected fault)", INJECTED, ""
            if status != call.expect:
                return str(status), UNEXPECTED, message or ""
            if status >= 400 and message is None:
                return f"{status}, no error body", UNEXPECTED, raw[:200].decode(errors="replace")
            if status == 200 and call.on_reply is not None:
                call.on_reply(payload)
            return str(status), EXPECTED, ""
        events = 0
        async for payload in _events(response):
            events += 1
            if call.abort_after is not None and events >= call.abort_after:
                return "200, aborted by the client", EXPECTED, ""
            message = _error_message(payload)
            if message is not None:
                if FAULT_MESSAGE in message:
                    return "200, stream ended by the injected fault", INJECTED, ""
                return "200, error event", UNEXPECTED, message
            if payload == "[DONE]" or (isinstance(payload, dict) and payload.get("type") == "message_stop"):
                return "200", EXPECTED, ""
        return "200, stream cut without its end", UNEXPECTED, f"after {events} events"


async def run_call(client: httpx.AsyncClient, call: Call, tally: Tally, timeout: float) -> None:
    start = time.monotonic()
    try:
        outcome, verdict, detail = await asyncio.wait_for(perform(client, call), timeout)
    except TimeoutError:
        outcome, verdict, detail = f"hang (no answer in {timeout:g} s)", UNEXPECTED, ""
    except httpx.TransportError as error:
        outcome, verdict, detail = f"transport error ({type(error).__name__})", UNEXPECTED, str(error)
    tally.record(call, outcome, verdict, time.monotonic() - start, detail)


# ---------------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, key: str = "VmRSS") -> int | None:
    """``key`` (VmRSS, VmHWM) of /proc/PID/status in KiB; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def scrape(url: str) -> dict[str, float]:
    """/metrics as ``name{label=value,...}`` -> value."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


class HealthProbe(threading.Thread):
    """Polls /health from its own thread and connection: its latency is the server's, not the clients'
    event loop's."""

    def __init__(self, url: str, interval: float, timeout: float) -> None:
        super().__init__(name="soak-health", daemon=True)
        self.url, self.interval, self.timeout = url, interval, timeout
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    status = str(client.get("/health").status_code)
                except httpx.TimeoutException:
                    status = f"hang (no answer in {self.timeout:g} s)"
                except httpx.TransportError as error:
                    status = f"transport error ({type(error).__name__})"
                self.latencies.append(time.perf_counter() - start)
                self.statuses[status] += 1
                self.stop.wait(self.interval)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(port: int, max_body_bytes: int, log_path: Path) -> Server:
    command = [
        *(sys.executable, "-m", "dsv4.cli", "serve", "--model", TINY_RANDOM, "--port", str(port)),
        *("--max-body-bytes", str(max_body_bytes)),
    ]
    env = {**os.environ, FAULT_TOKEN_ENV: str(FAULT_TOKEN)}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"dsv4 serve exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"dsv4 serve did not answer /health within {STARTUP_TIMEOUT:g} s:\n{server.log_tail()}")


def stop_server(server: Server) -> tuple[int | None, float]:
    """SIGTERM (graceful shutdown), then the exit status and how long it took; None if it had to be killed."""
    start = time.monotonic()
    if server.alive():
        server.process.send_signal(signal.SIGTERM)
    try:
        code: int | None = server.process.wait(SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        code = None
    return code, time.monotonic() - start


def unexpected_log_errors(log_path: Path) -> list[str]:
    """The server's ERROR and CRITICAL log lines that are not about the injected fault."""
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if re.search(r" (ERROR|CRITICAL) ", line) and FAULT_MESSAGE not in line]


# ---------------------------------------------------------------------------------------------- the soak


@dataclass
class Options:
    clients: int
    minutes: float
    fault_every: float
    max_body_bytes: int
    health_interval: float
    request_timeout: float
    idle_timeout: float
    seed: int


@dataclass
class Run:
    """What the soak measured, for the report and the verdict."""

    tally: Tally
    probe: HealthProbe
    seconds: float
    rss: list[tuple[float, int]]  # (seconds since the clients started, KiB)
    rss_peak_kib: int | None = None
    idle_seconds: float | None = None  # None: not idle within --idle-timeout
    metrics: dict[str, float] = field(default_factory=dict)
    log_errors: list[str] = field(default_factory=list)
    died: bool = False
    exit_code: int | None = None
    shutdown_seconds: float = 0.0


async def soak(server: Server, options: Options, model: str, console: Console) -> Run:
    tally = Tally()
    timeout = options.request_timeout
    pid = server.process.pid

    # warm-up: one request of each valid kind, so that the RSS baseline holds what serving allocates once
    warm = Client(options.seed, model, options.max_body_bytes)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as client:
        for make in (warm.chat, warm.chat_turn, warm.chat_tools, warm.completion, warm.messages, warm.count_tokens):
            await run_call(client, make(), tally, timeout)

    probe = HealthProbe(server.url, options.health_interval, timeout)
    run = Run(tally, probe, 0.0, rss=[])
    start = time.monotonic()
    deadline = start + 60 * options.minutes
    stop = asyncio.Event()
    probe.start()

    async def client_loop(index: int) -> None:
        generator = Client(options.seed * 1000 + index + 1, model, options.max_body_bytes)
        async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as client:
            while not stop.is_set():
                await run_call(client, generator.next_call(), tally, timeout)

    async def fault_loop() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as client:
            delay = options.fault_every / 2
            while True:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return
                except TimeoutError:
                    pass
                await run_call(client, fault_call(model), tally, timeout)
                delay = options.fault_every

    async def watch() -> None:
        """Samples RSS, prints progress, and ends the run at the deadline or when the server dies."""
        next_progress = start + PROGRESS_INTERVAL
        while time.monotonic() < deadline:
            now = time.monotonic()
            rss = rss_kib(pid)
            if rss is not None:
                run.rss.append((now - start, rss))
            if not server.alive():
                run.died = True
                break
            if now >= next_progress:
                next_progress += PROGRESS_INTERVAL
                console.print(
                    f"{(now - start) / 60:5.1f} min: {tally.total} requests, {tally.count(INJECTED)} failed by "
                    f"the injected fault, {tally.count(UNEXPECTED)} unexpected; RSS {rss or 0:,} KiB"
                )
            await asyncio.sleep(min(RSS_INTERVAL, max(0.0, deadline - time.monotonic())))
        stop.set()

    await asyncio.gather(watch(), fault_loop(), *(client_loop(i) for i in range(options.clients)))
    run.seconds = time.monotonic() - start
    probe.stop.set()
    await asyncio.to_thread(probe.join)

    if server.alive():
        run.idle_seconds = await asyncio.to_thread(wait_idle, server.url, options.idle_timeout)
        run.metrics = await asyncio.to_thread(scrape, server.url)
        rss = rss_kib(pid)
        if rss is not None:
            run.rss.append((time.monotonic() - start, rss))
        run.rss_peak_kib = rss_kib(pid, "VmHWM")
    run.died = run.died or not server.alive()
    return run


def wait_idle(url: str, timeout: float) -> float | None:
    """Seconds until the engine runs and queues nothing, None if it still does after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        metrics = scrape(url)
        if metrics.get("dsv4_requests_running") == 0 and metrics.get("dsv4_requests_waiting") == 0:
            return time.monotonic() - start
        time.sleep(0.2)
    return None


# ---------------------------------------------------------------------------------------------- the report


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def ms(seconds: float) -> str:
    return f"{1000 * seconds:,.1f} ms"


def report(run: Run, options: Options, console: Console) -> list[str]:
    """Prints the tables; returns the failed checks."""
    tally, probe = run.tally, run.probe
    kinds = Table(title=f"Requests: {options.clients} clients for {run.seconds / 60:.1f} min (warm-up included)")
    for column in ("kind", "requests", "p50", "p99", "unexpected"):
        kinds.add_column(column, justify="left" if column == "kind" else "right")
    for kind, values in sorted(tally.latencies.items()):
        p50, p99 = percentile(values, 50), percentile(values, 99)
        kinds.add_row(kind, f"{len(values):,}", ms(p50), ms(p99), str(tally.unexpected_kinds[kind]))
    console.print(kinds)

    outcomes = Table(title="Responses")
    for column in ("outcome", "count", "verdict"):
        outcomes.add_column(column, justify="right" if column == "count" else "left")
    for (outcome, verdict), count in sorted(tally.outcomes.items(), key=lambda item: (item[0][1], item[0][0])):
        style = "bold red" if verdict == UNEXPECTED else None
        outcomes.add_row(outcome, f"{count:,}", verdict, style=style)
    console.print(outcomes)

    metrics = run.metrics
    server = Table(title="Server", show_header=False)
    server.add_column("what")
    server.add_column("value")
    health = ", ".join(f"{status}: {n:,}" for status, n in sorted(probe.statuses.items()))
    if probe.latencies:
        lat = probe.latencies
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        server.add_row("/health under load", f"p50 {ms(p50)}, p99 {ms(p99)}, max {ms(max(lat))} ({health})")
    served = sum(n for (outcome, _), n in tally.outcomes.items() if outcome == "200")
    server.add_row("requests served (200, to the end)", f"{served:,} of {tally.total:,}")
    server.add_row("tokens generated", f"{int(metrics.get('dsv4_generation_tokens_total', 0)):,}")
    by_status: Counter[str] = Counter()
    for name, value in metrics.items():
        match = re.fullmatch(r"dsv4_http_requests_total\{route=(.*),status=(\d+)\}", name)
        if match and match.group(1) in POST_ROUTES:
            by_status[match.group(2)] += int(value)
    server.add_row("server's count of POST answers", ", ".join(f"{s}: {n:,}" for s, n in sorted(by_status.items())))
    if run.idle_seconds is not None:
        server.add_row("idle after the clients stopped", f"in {run.idle_seconds:.1f} s")
        server.add_row(
            "KV cache held by sequences at idle",
            f"{int(metrics.get('dsv4_kv_cache_used_bytes', -1)):,} bytes (blocks and state slots; must be 0)",
        )
        pool = metrics.get("dsv4_kv_cache_used_bytes", 0) + metrics.get("dsv4_kv_cache_free_bytes", 0)
        server.add_row(
            "KV pool; held by the prefix cache at idle",
            f"{pool / 2**20:,.1f} MiB; {metrics.get('dsv4_prefix_cache_bytes', 0) / 2**20:,.1f} MiB in "
            f"{int(metrics.get('dsv4_prefix_cache_checkpoints', 0)):,} checkpoints (reusable, evicted first)",
        )
    if run.rss:
        first, last = run.rss[0][1], run.rss[-1][1]
        middle = min(run.rss, key=lambda sample: abs(sample[0] - run.rss[-1][0] / 2))[1]
        server.add_row(
            "RSS (VmRSS) after warm-up / half-way / end",
            f"{first / 1024:,.1f} / {middle / 1024:,.1f} / {last / 1024:,.1f} MiB "
            f"(growth {(last - first) / 1024:+,.1f} MiB, second half {(last - middle) / 1024:+,.1f} MiB)",
        )
    if run.rss_peak_kib is not None:
        server.add_row("peak RSS (VmHWM)", f"{run.rss_peak_kib / 1024:,.1f} MiB")
    server.add_row("ERROR lines in its log, injected fault's excluded", str(len(run.log_errors)))
    shutdown = "killed" if run.exit_code is None else f"exit status {run.exit_code}"
    server.add_row("SIGTERM", f"{shutdown} after {run.shutdown_seconds:.1f} s")
    console.print(server)

    failures = []
    if tally.count(UNEXPECTED):
        failures.append(f"{tally.count(UNEXPECTED)} unexpected answers, e.g.\n  " + "\n  ".join(tally.examples))
    if not tally.count(INJECTED):
        failures.append("no request failed by the injected fault: the fault path was not exercised")
    if set(probe.statuses) - {"200"}:
        failures.append(f"/health was not always 200: {health}")
    if run.died:
        failures.append("the server died")
    elif run.idle_seconds is None:
        failures.append(f"the engine was not idle {options.idle_timeout:g} s after the clients stopped (a hang)")
    elif metrics.get("dsv4_kv_cache_used_bytes") != 0:
        failures.append(f"KV cache held at idle: {metrics.get('dsv4_kv_cache_used_bytes')} bytes")
    if run.log_errors:
        failures.append("ERROR lines in the server's log:\n  " + "\n  ".join(run.log_errors[:10]))
    if run.exit_code != 0:
        failures.append(f"the server did not shut down cleanly on SIGTERM ({shutdown})")
    return failures


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long the clients run (default 10)")
    p.add_argument("--fault-every", type=float, default=30.0, metavar="S", help="seconds between injected faults")
    p.add_argument(
        "--max-body-bytes", type=int, default=256 * 1024, help="the server's body limit; oversized bodies exceed it"
    )
    p.add_argument("--health-interval", type=float, default=0.1, metavar="S", help="seconds between /health polls")
    p.add_argument(
        "--request-timeout", type=float, default=120.0, metavar="S", help="a request unanswered this long is a hang"
    )
    p.add_argument(
        "--idle-timeout", type=float, default=60.0, metavar="S", help="the engine must be idle this soon after the end"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.clients < 1 or args.minutes <= 0 or args.fault_every <= 0:
        p.error("--clients, --minutes and --fault-every must be positive")
    return Options(**vars(args))


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    out, progress = Console(), Console(stderr=True)
    if not out.is_terminal:  # a report written to a file or pipe: rich would wrap it at 80 columns
        out.width = 120
    with tempfile.TemporaryDirectory(prefix="dsv4-soak-") as tmp:
        log_path = Path(tmp) / "serve.log"
        progress.print(f"starting dsv4 serve --model {TINY_RANDOM} ({FAULT_TOKEN_ENV}={FAULT_TOKEN})")
        server = start_server(free_port(), options.max_body_bytes, log_path)
        try:
            model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
            progress.print(f"soaking {server.url} (pid {server.process.pid}) for {options.minutes:g} min")
            run = asyncio.run(soak(server, options, model, progress))
        finally:
            run_exit = stop_server(server)
        run.exit_code, run.shutdown_seconds = run_exit
        run.log_errors = unexpected_log_errors(log_path)
        failures = report(run, options, out)
        if failures:
            out.print("[bold red]FAIL[/]")
            for failure in failures:
                out.print(f"- {failure}", markup=False, highlight=False)
            out.print("the server's log ends:", markup=False)
            out.print(server.log_tail(), markup=False, highlight=False)
            return 1
    out.print("[bold green]PASS[/]: no unexpected answer, healthy throughout, idle with no KV cache held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
