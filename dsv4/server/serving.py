"""What the OpenAI and Anthropic endpoints share: request parsing, prompt building, admission, delta
consumption with metrics, server-sent events, and request ids.

Every check that can fail runs before a sequence reaches the engine, so a bad request costs no cache and
gets a status code; once a response has started streaming, failures can only be reported in the stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from dsv4.chat.encoding import EncodingError, SampledInvoke
from dsv4.chat.openai import ChatPrompt
from dsv4.chat.parser import ParsedCompletion
from dsv4.engine.sampling import SamplingParams
from dsv4.server.engine_client import (
    EngineClient,
    EngineError,
    GenerationStream,
    QueueFull,
    SequenceDelta,
    SequenceRequest,
)
from dsv4.server.errors import APIError, bad_request
from dsv4.server.metrics import SequenceClock, ServerMetrics
from dsv4.server.prompt_cache import PromptMemory

log = logging.getLogger("dsv4.server")

# The id of the HTTP request being handled, for log lines (set by the app's middleware).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Choices per request: each is a full sequence in the engine, so a large n is a denial of service.
MAX_CHOICES = 16
# Tool calls whose sampled DSML is remembered for byte-stable re-rendering (a few hundred bytes each).
TOOL_CALL_MEMORY = 65536
# Characters of reasoning remembered for tool-calling turns, restored when a client drops it (oldest out).
REASONING_MEMORY_CHARS = 16 * 2**20
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class ServerConfig:
    model_names: tuple[str, ...]  # the first is reported in responses; the others are accepted aliases
    default_thinking: bool = True  # for OpenAI requests that neither switch thinking nor set an effort


class StrictModel(BaseModel):
    """Request bodies: types are checked strictly (``"2"`` is not an integer, as with OpenAI), unknown fields
    are ignored because agent SDKs send many we do not use."""

    model_config = ConfigDict(strict=True, extra="allow")


class SamplingFields(StrictModel):
    """Sampling fields shared by the OpenAI endpoints; names follow OpenAI, then vLLM for the extensions."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    n: int | None = None

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    def sampling_kwargs(self) -> dict[str, Any]:
        names = (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "stop_token_ids",
            "min_tokens",
            "ignore_eos",
        )
        kwargs = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.stop is not None:
            kwargs["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return kwargs


Model = TypeVar("Model", bound=BaseModel)
T = TypeVar("T")


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_body(model: type[Model], body: dict[str, Any]) -> Model:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "missing":
            raise bad_request(f"missing required parameter '{param}'", param) from None
        raise bad_request(f"invalid value for '{param}': {first['msg']}", param) from None


def sampling_error(error: ValueError) -> APIError:
    """SamplingParams.validate names the field first in its message."""
    message = str(error)
    return bad_request(message, message.split(" ", 1)[0])


def choice_params(base: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice; a seeded request gives choice i the seed ``seed + i`` so that the
    choices differ yet each is reproducible."""
    if base.seed is None:
        return [base] * n
    return [SamplingParams(**{**vars(base), "seed": base.seed + i}) for i in range(n)]


class ToolCallMemory:
    """Tool-call id -> what the model sampled in the turn that made the call, so that a history sent back by
    a client renders to the same bytes the model produced, which keeps prefix caches hot.

    Two things are remembered: each call's DSML (clients re-serialise arguments), and the reasoning of the
    turn (many clients drop ``reasoning_content`` or thinking blocks, yet tool conversations render every
    turn's reasoning). Both are bounded, least recently used first out.
    """

    def __init__(self, capacity: int = TOOL_CALL_MEMORY, reasoning_chars: int = REASONING_MEMORY_CHARS) -> None:
        self._capacity = capacity
        self._calls: OrderedDict[str, SampledInvoke] = OrderedDict()
        self._reasoning_limit = reasoning_chars
        # one entry per turn, keyed by its call ids; each call id points at its turn
        self._turns: OrderedDict[tuple[str, ...], str] = OrderedDict()
        self._turn_of: dict[str, tuple[str, ...]] = {}
        self._reasoning_chars = 0

    def remember(self, calls: Mapping[str, SampledInvoke]) -> None:
        for call_id, call in calls.items():
            self._calls[call_id] = call
            self._calls.move_to_end(call_id)
        while len(self._calls) > self._capacity:
            self._calls.popitem(last=False)

    def recall(self, call_ids: Iterable[str]) -> dict[str, SampledInvoke]:
        return {call_id: self._calls[call_id] for call_id in call_ids if call_id in self._calls}

    def remember_turn(self, message: ParsedCompletion) -> None:
        """A finished completion: its well-formed calls' DSML, and its reasoning when it called tools."""
        self.remember(message.sampled_tool_calls())
        if message.tool_calls and message.reasoning_content:
            self.remember_reasoning([call.id for call in message.tool_calls], message.reasoning_content)

    def remember_reasoning(self, call_ids: Sequence[str], reasoning: str) -> None:
        if not call_ids or len(reasoning) > self._reasoning_limit:
            return
        turn = tuple(call_ids)
        self._forget_turn(turn)
        for call_id in turn:
            if call_id in self._turn_of:
                self._forget_turn(self._turn_of[call_id])
        self._turns[turn] = reasoning
        self._reasoning_chars += len(reasoning)
        self._turn_of.update(dict.fromkeys(turn, turn))
        while self._reasoning_chars > self._reasoning_limit:
            self._forget_turn(next(iter(self._turns)))

    def _forget_turn(self, turn: tuple[str, ...]) -> None:
        reasoning = self._turns.pop(turn, None)
        if reasoning is None:
            return
        self._reasoning_chars -= len(reasoning)
        for call_id in turn:
            if self._turn_of.get(call_id) == turn:
                del self._turn_of[call_id]

    def recall_reasoning(self, call_ids: Iterable[str]) -> str | None:
        """The reasoning sampled in the turn that made the first remembered one of ``call_ids``."""
        for call_id in call_ids:
            turn = self._turn_of.get(call_id)
            if turn is not None:
                self._turns.move_to_end(turn)
                return self._turns[turn]
        return None

    def restore_reasoning(self, chat: ChatPrompt) -> ChatPrompt:
        """``chat`` with the sampled reasoning put back into assistant tool-call turns that came without any.

        Whether it is rendered stays the encoder's decision (tool conversations keep every turn's reasoning;
        otherwise it is dropped before the last user turn), exactly as if the client had sent it back.
        """
        messages = list(chat.messages)
        restored = False
        for position, message in enumerate(messages):
            if message.get("role") != "assistant" or not message.get("tool_calls") or message.get("reasoning_content"):
                continue
            reasoning = self.recall_reasoning(call["id"] for call in message["tool_calls"])
            if reasoning is not None:
                messages[position] = {**message, "reasoning_content": reasoning}
                restored = True
        return replace(chat, messages=messages) if restored else chat


def _history_call_ids(chat: ChatPrompt) -> list[str]:
    return [call["id"] for message in chat.messages for call in message.get("tool_calls") or ()]


@dataclass(frozen=True)
class EncodedPrompt:
    text: str
    token_ids: list[int]


class Backend:
    """The state the endpoints share: the engine, metrics, served model names, and the memories that make
    a history sent back render and tokenise to what the model saw (tool calls and their turns' reasoning,
    prompts and their sampled outputs)."""

    def __init__(self, engine: EngineClient, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(engine)
        self.tool_calls = ToolCallMemory()
        self.prompts = PromptMemory(engine.tokenizer)

    @property
    def model_name(self) -> str:
        return self.config.model_names[0]

    def check_model(self, name: str) -> None:
        if name not in self.config.model_names:
            served = ", ".join(self.config.model_names)
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves {served}",
                param="model",
                code="model_not_found",
            )

    def check_prompt(self, token_ids: list[int], param: str) -> None:
        if not token_ids:
            raise bad_request("the prompt is empty", param)
        limit = self.engine.max_model_len
        if len(token_ids) >= limit:
            raise bad_request(
                f"this model's maximum context length is {limit} tokens, and the prompt has {len(token_ids)} "
                "(at least one token must be left to generate)",
                param,
                code="context_length_exceeded",
            )

    async def encode_chat(self, chat: ChatPrompt) -> EncodedPrompt:
        """Render and tokenise off the event loop: a long agent history takes milliseconds to encode.

        Tool calls and dropped reasoning are restored as sampled, and the text is tokenised incrementally
        from the longest recorded prompt or prompt + output it extends (:class:`PromptMemory`)."""
        sampled = self.tool_calls.recall(_history_call_ids(chat))
        chat = self.tool_calls.restore_reasoning(chat)

        def encode() -> EncodedPrompt:
            text = chat.render(sampled_tool_calls=sampled)
            return EncodedPrompt(text, self.prompts.encode(text))

        try:
            prompt = await asyncio.to_thread(encode)
        except EncodingError as error:
            raise bad_request(str(error), "messages") from None
        self.check_prompt(prompt.token_ids, "messages")
        return prompt

    def remember_prompt(self, prompt: EncodedPrompt) -> None:
        """A chat prompt was submitted: later prompts that extend its text reuse its ids."""
        self.prompts.remember(prompt.text, prompt.token_ids)

    def remember_completion(self, prompt: EncodedPrompt, output_ids: list[int], finish: SequenceDelta) -> None:
        """A chat sequence finished: later prompts that extend prompt + its output reuse the sampled ids."""
        self.prompts.remember_completion(
            prompt.text, prompt.token_ids, output_ids, finish.finish_reason, finish.stop_reason
        )

    async def encode_text(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.engine.tokenizer.encode, text)

    def default_max_tokens(self, prompt_ids: list[int]) -> int:
        return self.engine.max_model_len - len(prompt_ids)

    def submit(self, prompts: list[list[int]], params: list[list[SamplingParams]]) -> GenerationStream:
        """Queue ``len(params[p])`` sequences for each prompt ``p``; sequence ids derive from the request id."""
        request_id = REQUEST_ID.get()
        requests = [
            SequenceRequest(f"{request_id}-{p}-{i}", ids, choice)
            for p, (ids, choices) in enumerate(zip(prompts, params, strict=True))
            for i, choice in enumerate(choices)
        ]
        try:
            return self.engine.submit(requests)
        except QueueFull as error:
            raise APIError(
                429,
                f"the server is at capacity ({error}); retry shortly",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        except EngineError as error:
            raise APIError(503, str(error), code="engine_unavailable") from None

    async def collect(
        self,
        request: Request,
        stream: GenerationStream,
        arrival: float,
        on_delta: Callable[[int, SequenceDelta], None],
    ) -> None:
        """A non-streaming response's generation: every delta to ``on_delta`` until the stream ends. A client
        that hangs up aborts it, an engine failure becomes an API error, and the stream is always closed."""

        async def consume() -> None:
            async for index, delta in self.deltas(stream, arrival):
                on_delta(index, delta)

        try:
            await unless_disconnected(request, consume())
        except EngineError as error:
            raise engine_failure(error) from None
        finally:
            stream.close()

    async def deltas(self, stream: GenerationStream, arrival: float) -> AsyncIterator[tuple[int, SequenceDelta]]:
        """The stream's deltas, counted into the metrics as they pass."""
        metrics = self.metrics
        clocks: dict[int, SequenceClock] = {}
        async for index, delta in stream:
            clock = clocks.get(index)
            if clock is None:
                clock = clocks[index] = SequenceClock(metrics, arrival)
                metrics.prompt_tokens.inc(delta.num_prompt_tokens)
                metrics.prefix_cache_hit_tokens.inc(delta.num_cached_tokens)
            clock.tokens(len(delta.token_ids))
            metrics.generation_tokens.inc(len(delta.token_ids))
            if delta.finished:
                metrics.sequences_finished.labels(delta.finish_reason).inc()
                metrics.request_latency.observe(time.monotonic() - arrival)
            yield index, delta


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client hangs up first; then cancel it (its ``finally`` aborts the
    sequences and frees their cache) instead of generating for nobody."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        log.info("client disconnected; request aborted")
        raise APIError(499, "the client closed the connection")
    return task.result()


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose generation is aborted however the response ends.

    Starlette cancels the body iterator when the client disconnects, which leaves async generators
    suspended rather than closed; ``on_close`` (the stream's abort) therefore runs here, in ``finally``.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def json_dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def engine_failure(error: EngineError) -> APIError:
    return APIError(500, f"generation failed: {error}", code="engine_error")
