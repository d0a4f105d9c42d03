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
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from dsv4.chat.encoding import EncodingError, SampledInvoke, completion_mode_for_prompt
from dsv4.chat.grammar import GrammarError, completion_grammar
from dsv4.chat.openai import ChatPrompt
from dsv4.chat.parser import ParsedCompletion
from dsv4.chat.tokenizer import TooManyTokens
from dsv4.engine.constraint import compiler_for
from dsv4.engine.sampling import SamplingParams
from dsv4.server.body import parse_json, read_body
from dsv4.server.engine_client import (
    EngineClient,
    EngineError,
    GenerationStream,
    QueueFull,
    SequenceDelta,
    SequenceRequest,
)
from dsv4.server.errors import APIError, bad_request
from dsv4.server.journal import Journal
from dsv4.server.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH
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
# The tool-call memory's journal, in the session directory (next to the engine's checkpoints).
TOOL_CALL_JOURNAL = "server/tool_calls.jsonl"
# The prompt memory's journal of the model's own spellings of its outputs (see ``PromptMemory``).
SPELLING_JOURNAL = "server/sampled_spellings.jsonl"
# Bodies larger than this are parsed, validated and rendered in a worker thread rather than on the event
# loop, so that /health and the open streams are never held up by another request's JSON.
OFFLOAD_BYTES = 64 * 2**10


@dataclass(frozen=True)
class ServerConfig:
    model_names: tuple[str, ...]  # the first is reported in responses; the others are accepted aliases
    default_thinking: bool = True  # for OpenAI requests that neither switch thinking nor set an effort
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger bodies get 413 before they are read
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH  # deeper bodies get 400
    session_dir: Path | None = None  # the engine's session directory: the tool-call memory persists there too
    strict_tools: bool = False  # every tool's arguments follow its schema, as if each had strict: true

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.max_json_depth < 2:
            raise ValueError(f"max_json_depth must be >= 2 (a body holding a list), got {self.max_json_depth}")


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

    With a ``journal`` (a file in the session directory) every remembered turn is appended to it as one JSON
    line and replayed at start-up, so that after a restart a history sent back still renders to what the
    restored checkpoints hold. A torn last line (a crash mid-write) is skipped; the file is rewritten from
    what is remembered once it grows past ``JOURNAL_COMPACT_FACTOR`` times that.
    """

    def __init__(
        self,
        capacity: int = TOOL_CALL_MEMORY,
        reasoning_chars: int = REASONING_MEMORY_CHARS,
        journal: Path | None = None,
    ) -> None:
        self._capacity = capacity
        self._calls: OrderedDict[str, SampledInvoke] = OrderedDict()
        self._reasoning_limit = reasoning_chars
        # one entry per turn, keyed by its call ids; each call id points at its turn
        self._turns: OrderedDict[tuple[str, ...], str] = OrderedDict()
        self._turn_of: dict[str, tuple[str, ...]] = {}
        self._reasoning_chars = 0
        self._journal = Journal(journal) if journal is not None else None
        if self._journal is not None:
            lines = self._journal.replay(self._read)
            self._journal.compact(lines, len(self._calls) + len(self._turns), self._records)

    def _read(self, record: dict[str, Any]) -> None:
        calls = {i: SampledInvoke(*fields) for i, fields in record["calls"].items() if fields is not None}
        self._remember(calls, record.get("reasoning"), list(record["calls"]))

    def _record(self, call_ids: Iterable[str], reasoning: str | None) -> dict[str, Any]:
        calls = {i: [c.name, c.arguments, c.dsml] if (c := self._calls.get(i)) else None for i in call_ids}
        return {"calls": calls, "reasoning": reasoning}

    def _records(self) -> list[dict[str, Any]]:
        """What is remembered now: one record per turn with reasoning, one per other call."""
        in_turns = {call_id for turn in self._turns for call_id in turn}
        records = [self._record(turn, reasoning) for turn, reasoning in self._turns.items()]
        return records + [self._record([call_id], None) for call_id in self._calls if call_id not in in_turns]

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
        calls = message.sampled_tool_calls()
        reasoning = message.reasoning_content if message.tool_calls else None
        self._remember(calls, reasoning, [call.id for call in message.tool_calls])
        if self._journal is not None and (calls or reasoning):
            # a malformed call has no DSML (None) but still names the turn its reasoning belongs to
            ids = [*calls, *(c.id for c in message.tool_calls if c.id not in calls)]
            self._journal.append([self._record(ids, reasoning)])

    def _remember(
        self, calls: Mapping[str, SampledInvoke], reasoning: str | None, call_ids: Sequence[str] | None = None
    ) -> None:
        self.remember(calls)
        if reasoning:
            self.remember_reasoning(list(calls) if call_ids is None else call_ids, reasoning)

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
        session = config.session_dir
        self.tool_calls = ToolCallMemory(journal=session / TOOL_CALL_JOURNAL if session else None)
        self.prompts = PromptMemory(engine.tokenizer, journal=session / SPELLING_JOURNAL if session else None)
        # no token stands for more bytes than this (nor characters: a character is at least one byte), so a
        # text of more than max_model_len * this characters cannot fit, and is refused without tokenising it
        self._max_token_chars = max(1, max(map(len, engine.tokenizer.token_bytes), default=1))

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, within the byte and nesting limits, with no string that cannot be
        encoded; a large body is parsed in a worker thread (and marked so, for :meth:`offload`)."""
        raw = await read_body(request, self.config.max_body_bytes)
        request.state.large_body = len(raw) > OFFLOAD_BYTES
        return await self.offload(request, parse_json, raw, self.config.max_json_depth)

    async def offload(self, request: Request, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` - validation or rendering of the request's body - in a worker thread when the
        body is large, inline otherwise (a thread hop costs more than a small body's work)."""
        if getattr(request.state, "large_body", False):
            return await asyncio.to_thread(work, *args)
        return work(*args)

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
        self._check_prompt_length(len(token_ids), param)

    def _check_prompt_length(self, tokens: int, param: str, at_least: bool = False) -> None:
        limit = self.engine.max_model_len
        if tokens >= limit:
            raise bad_request(
                f"this model's maximum context length is {limit} tokens, and the prompt has "
                f"{'at least ' if at_least else ''}{tokens} (at least one token must be left to generate)",
                param,
                code="context_length_exceeded",
            )

    def check_text_fits(self, text: str, param: str) -> None:
        """Refuse, without tokenising it, a text too long to fit the context whatever its tokens."""
        self._check_prompt_length(math.ceil(len(text) / self._max_token_chars), param, at_least=True)

    def check_context(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        """OpenAI's and vLLM's rule: a request whose prompt plus ``max_tokens`` cannot fit the context is a
        400, rather than a generation silently cut short by the context."""
        limit = self.engine.max_model_len
        if prompt_tokens + max_tokens > limit:
            raise bad_request(
                f"this model's maximum context length is {limit} tokens; the prompt has {prompt_tokens} and "
                f"{param} asks for {max_tokens} more ({prompt_tokens + max_tokens} in all): lower {param} to at "
                f"most {limit - prompt_tokens}, or shorten the prompt",
                param,
                code="context_length_exceeded",
            )

    def check_capacity(self, sequences: int, param: str) -> None:
        """A request that needs more sequences than the engine ever holds at once is a 400: a 429 would
        have the client retry a request that can never succeed."""
        capacity = getattr(self.engine, "capacity", None)
        if capacity is not None and sequences > capacity:
            raise bad_request(
                f"this request needs {sequences} sequences (prompts x n) and the server holds at most "
                f"{capacity} at once (dsv4 serve --max-num-seqs + --max-queue)",
                param,
            )

    async def encode_chat(self, chat: ChatPrompt) -> EncodedPrompt:
        """Render and tokenise off the event loop: a long agent history takes milliseconds to encode.

        Tool calls and dropped reasoning are restored as sampled, and the text is tokenised incrementally
        from the longest recorded prompt or prompt + output it extends (:class:`PromptMemory`)."""
        sampled = self.tool_calls.recall(_history_call_ids(chat))
        chat = self.tool_calls.restore_reasoning(chat)

        def encode() -> EncodedPrompt:
            text = chat.render(sampled_tool_calls=sampled)
            self.check_text_fits(text, "messages")
            try:
                return EncodedPrompt(text, self.prompts.encode(text, limit=self.engine.max_model_len - 1))
            except TooManyTokens as error:
                self._check_prompt_length(error.count, "messages", at_least=not error.exact)
                raise

        try:
            prompt = await asyncio.to_thread(encode)
        except EncodingError as error:
            raise bad_request(str(error), "messages") from None
        self.check_prompt(prompt.token_ids, "messages")
        return prompt

    async def grammar(self, chat: ChatPrompt, prompt: EncodedPrompt) -> str | None:
        """The grammar the reply is held to (``dsv4.chat.grammar``), or None when the request promises
        nothing; compiled once here, so that a schema llguidance cannot enforce is a 400 naming its field
        before anything is queued (the engine reuses the compiled grammar)."""
        tokenizer = self.engine.tokenizer
        try:
            grammar = completion_grammar(
                thinking=completion_mode_for_prompt(prompt.text) == "thinking",
                tools=chat.tools,
                tool_choice=chat.tool_choice,
                forced_tool=chat.forced_tool,
                response_format=chat.response_format,
                special_token_ids=tokenizer.special_token_ids,
                parallel_tool_calls=chat.parallel_tool_calls,
                strict_tools=self.config.strict_tools,
            )
        except GrammarError as error:
            raise bad_request(str(error), error.field) from None
        if grammar is None:
            return None
        try:  # compiling drops the GIL; a large schema takes milliseconds
            await asyncio.to_thread(compiler_for(tokenizer, self.engine.vocab_size).check, grammar)
        except ValueError as error:
            field = "response_format" if chat.response_format is not None and not chat.tools else "tools"
            raise bad_request(f"the request's tools or response_format cannot be enforced: {error}", field) from None
        return grammar

    def remember_prompt(self, prompt: EncodedPrompt) -> None:
        """A chat prompt was submitted: later prompts that extend its text reuse its ids."""
        self.prompts.remember(prompt.text, prompt.token_ids)

    def remember_completion(self, prompt: EncodedPrompt, output_ids: list[int], finish: SequenceDelta) -> None:
        """A chat sequence finished: later prompts that extend prompt + its output reuse the sampled ids."""
        self.prompts.remember_completion(
            prompt.text, prompt.token_ids, output_ids, finish.finish_reason, finish.stop_reason
        )

    async def encode_text(self, text: str, param: str) -> list[int]:
        """Tokenise off the event loop; a text that cannot fit the context is refused as soon as that is
        known: from its length alone, or from its token count before its ids are listed."""
        self.check_text_fits(text, param)
        try:
            return await asyncio.to_thread(self.engine.tokenizer.encode, text, limit=self.engine.max_model_len - 1)
        except TooManyTokens as error:
            self._check_prompt_length(error.count, param)
            raise

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
        self.check_capacity(len(requests), "n")
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
    A bug that raises once the stream has started cannot change the status any more: it is logged and
    ends the stream with an error event (``error_event``), so the client sees why and the connection stays
    usable.
    """

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], None], error_event: Callable[[APIError], str]
    ) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(self._guarded(content, error_event), media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    @staticmethod
    async def _guarded(content: AsyncIterator[str], error_event: Callable[[APIError], str]) -> AsyncIterator[str]:
        try:
            async for event in content:
                yield event
        except Exception as error:
            log.exception("unhandled error in a stream")
            yield error_event(internal_error(error))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def json_dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def engine_failure(error: EngineError) -> APIError:
    return APIError(500, f"generation failed: {error}", code="engine_error")


def internal_error(error: BaseException) -> APIError:
    """What a client is told of a bug: its kind and the request id to report, not the traceback."""
    return APIError(
        500, f"internal server error ({type(error).__name__}); request id {REQUEST_ID.get()}", code="internal_error"
    )
