"""``POST /v1/chat/completions`` and ``POST /v1/completions`` in OpenAI's wire format.

The model's raw output goes through :class:`dsv4.chat.parser.CompletionParser`, which splits it into
``reasoning_content``, ``content`` and tool calls as it streams; the parser's events map one to one onto
OpenAI's chunk deltas (a tool call is announced with its id and name when its invoke opens, and gets its
complete arguments when it closes). Tool calls are remembered by id with the DSML the model sampled, so the
history a client sends back renders to the same bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dsv4.chat.encoding import completion_mode_for_prompt
from dsv4.chat.openai import ChatPrompt, RequestError, from_openai_request
from dsv4.chat.parser import (
    CompletionParser,
    ContentDelta,
    ParserEvent,
    ReasoningDelta,
    Recovery,
    ToolCallArguments,
    ToolCallStart,
)
from dsv4.chat.tokenizer import ChatTokenizer
from dsv4.engine.sampler import SampledToken
from dsv4.engine.sampling import MAX_LOGPROBS, SamplingParams
from dsv4.server.engine_client import EngineError, SequenceDelta
from dsv4.server.errors import APIError, bad_request
from dsv4.server.serving import (
    MAX_CHOICES,
    REQUEST_ID,
    Backend,
    EncodedPrompt,
    EventStreamResponse,
    SamplingFields,
    StrictModel,
    choice_params,
    engine_failure,
    json_dumps,
    parse_body,
    sampling_error,
)

log = logging.getLogger("dsv4.server")

# The legacy completions API's default when max_tokens is absent.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# OpenAI's ranges.
MAX_TEMPERATURE = 2.0
MAX_LOGIT_BIAS = 100


class StreamOptions(StrictModel):
    include_usage: bool | None = None


class OpenAIRequest(SamplingFields):
    """What both OpenAI endpoints take besides their prompt."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: Any = None


class ChatCompletionRequest(OpenAIRequest):
    """The transport and sampling fields; messages, tools and the reasoning switches are validated by
    :func:`dsv4.chat.openai.from_openai_request`."""

    messages: list[Any]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


Fields = TypeVar("Fields", bound=OpenAIRequest)


async def read_request(request: Request, backend: Backend, model: type[Fields]) -> tuple[dict[str, Any], Fields]:
    """The body of an OpenAI request, raw and validated: a served model, 1..MAX_CHOICES choices, OpenAI's
    temperature range and a logit_bias within the vocabulary."""
    body = await backend.read_json(request)
    fields = await backend.offload(request, parse_body, model, body)
    backend.check_model(fields.model)
    if not 1 <= fields.num_choices <= MAX_CHOICES:
        raise bad_request(f"n must be an integer in [1, {MAX_CHOICES}], got {fields.num_choices}", "n")
    if fields.temperature is not None and not 0 <= fields.temperature <= MAX_TEMPERATURE:
        raise bad_request(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {fields.temperature}", "temperature")
    check_logit_bias(fields.logit_bias, backend.engine.vocab_size)
    return body, fields


def check_logit_bias(value: Any, vocab_size: int) -> None:
    """OpenAI's ``logit_bias``: token id (a string of digits) -> a bias in [-100, 100].

    The engine has no per-token bias, so a well-formed map with a non-zero bias is refused too: ignoring it
    would sample tokens the client banned.
    """
    if value is None:
        return
    if not isinstance(value, dict):
        raise bad_request(f"logit_bias must be an object of token id -> bias, got {type(value).__name__}", "logit_bias")
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 20) or not 0 <= int(key) < vocab_size:
            raise bad_request(
                f"logit_bias: {key!r} is not a token id of this model's vocabulary [0, {vocab_size})", "logit_bias"
            )
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise bad_request(
                f"logit_bias[{key}] must be a number in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias!r}",
                "logit_bias",
            )
    if any(bias != 0 for bias in value.values()):
        raise bad_request("logit_bias is not supported: this engine applies no per-token bias", "logit_bias")


def build_params(
    fields: SamplingFields, max_tokens: int, logprobs: int | None, grammar: str | None = None
) -> list[SamplingParams]:
    params = SamplingParams(
        **fields.sampling_kwargs(), seed=fields.seed, max_tokens=max_tokens, logprobs=logprobs, grammar=grammar
    )
    choices = choice_params(params, fields.num_choices)
    try:
        for choice in choices[:1] + choices[-1:]:  # a seeded request's last choice has the largest seed
            choice.validate()
    except ValueError as error:
        raise sampling_error(error) from None
    return choices


def openai_error_event(error: APIError) -> str:
    """How an OpenAI stream that has started reports an error: an error object, then the end marker."""
    return f"data: {json_dumps(error.openai_body())}\n\ndata: [DONE]\n\n"


def openai_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _token_bytes(tokenizer: ChatTokenizer, token_id: int) -> bytes:
    return tokenizer.token_bytes[token_id] if 0 <= token_id < len(tokenizer.token_bytes) else b""


def _token_entry(tokenizer: ChatTokenizer, token_id: int, logprob: float | None) -> dict[str, Any]:
    raw = _token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: ChatTokenizer, tokens: list[SampledToken]) -> dict[str, Any]:
    content = [
        {
            **_token_entry(tokenizer, t.token_id, t.logprob),
            "top_logprobs": [_token_entry(tokenizer, i, lp) for i, lp in t.top],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def log_recoveries(recoveries: list[Recovery], index: int) -> None:
    for recovery in recoveries:
        log.info("choice %d: repaired model output (%s): %s", index, recovery.kind, recovery.detail)


class ChatChoice:
    """One choice's parser and bookkeeping, shared by the streaming and the complete response."""

    def __init__(self, index: int, prompt: EncodedPrompt, backend: Backend) -> None:
        self.index = index
        self._backend = backend
        self._prompt = prompt
        self.parser = CompletionParser(completion_mode_for_prompt(prompt.text))
        self.token_ids: list[int] = []
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.logprobs: list[SampledToken] = []
        self._engine_finish: str | None = None

    def update(self, delta: SequenceDelta) -> list[ParserEvent]:
        self.token_ids += delta.token_ids
        self.completion_tokens += len(delta.token_ids)
        self.cached_tokens = delta.num_cached_tokens
        self.logprobs += delta.logprobs or []
        events = self.parser.feed(delta.text)
        if delta.finished:
            self._engine_finish = delta.finish_reason
            # a stop token (EOS) or stop string ended it: the completion is whole, not cut off
            events += self.parser.close(eos=delta.finish_reason == "stop")
            self._backend.tool_calls.remember_turn(self.parser.message)
            self._backend.remember_completion(self._prompt, self.token_ids, delta)
            log_recoveries(self.parser.message.recoveries, self.index)
        return events

    @property
    def finish_reason(self) -> str:
        if self.parser.message.tool_calls:
            return "tool_calls"
        return "length" if self._engine_finish == "length" else "stop"

    def message(self) -> dict[str, Any]:
        parsed = self.parser.message
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
        if not parsed.tool_calls and message["content"] is None:
            message["content"] = ""
        if parsed.reasoning_content:
            message["reasoning_content"] = parsed.reasoning_content
        if parsed.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
        return message


def chunk_deltas(events: list[ParserEvent]) -> list[dict[str, Any]]:
    """OpenAI deltas for parser events; neighbouring text of one kind goes out as one delta."""
    deltas: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, ReasoningDelta | ContentDelta):
            key = "reasoning_content" if isinstance(event, ReasoningDelta) else "content"
            if deltas and list(deltas[-1]) == [key]:
                deltas[-1][key] += event.text
            else:
                deltas.append({key: event.text})
        elif isinstance(event, ToolCallStart):
            call = {"index": event.index, "id": event.id, "type": "function"}
            deltas.append({"tool_calls": [call | {"function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, ToolCallArguments):
            deltas.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.arguments}}]})
    return deltas


def chat_prompt(body: dict[str, Any], default_thinking: bool) -> ChatPrompt:
    try:
        return from_openai_request(body, default_thinking=default_thinking)
    except RequestError as error:
        raise bad_request(str(error), error.field) from None


async def chat_completions(request: Request, backend: Backend) -> Response:
    arrival = time.monotonic()
    body, fields = await read_request(request, backend, ChatCompletionRequest)
    chat = await backend.offload(request, chat_prompt, body, backend.config.default_thinking)
    top_logprobs = None
    if fields.logprobs:
        top_logprobs = fields.top_logprobs or 0
        if not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top_logprobs}", "top_logprobs")
    elif fields.top_logprobs is not None:
        raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
    prompt = await backend.encode_chat(chat)
    grammar = await backend.grammar(chat, prompt)
    max_tokens, param = fields.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = fields.max_tokens, "max_tokens"
    if max_tokens is None:  # the rest of the context; an explicit value must fit in it
        params = build_params(fields, backend.default_max_tokens(prompt.token_ids), top_logprobs, grammar)
    else:
        params = build_params(fields, max_tokens, top_logprobs, grammar)
        backend.check_context(len(prompt.token_ids), max_tokens, param)
    stream = backend.submit([prompt.token_ids], [params])
    backend.remember_prompt(prompt)

    choices = [ChatChoice(i, prompt, backend) for i in range(fields.num_choices)]
    base = {
        "id": f"chatcmpl-{REQUEST_ID.get()}",
        "created": int(time.time()),
        "model": backend.model_name,
    }
    prompt_tokens = len(prompt.token_ids)

    def usage() -> dict[str, Any]:
        completion = sum(c.completion_tokens for c in choices)
        return openai_usage(prompt_tokens, completion, choices[0].cached_tokens)

    def log_done() -> None:
        finishes = ",".join(c.finish_reason for c in choices)
        log.info(
            "chat completion: %d prompt + %d generated tokens, finish %s",
            prompt_tokens,
            sum(c.completion_tokens for c in choices),
            finishes,
        )

    if fields.stream:
        include_usage = bool(fields.stream_options and fields.stream_options.include_usage)

        def chunk(choice_chunks: list[dict[str, Any]], usage_value: dict[str, Any] | None = None) -> str:
            payload = {**base, "object": "chat.completion.chunk", "choices": choice_chunks}
            if include_usage:
                payload["usage"] = usage_value
            return f"data: {json_dumps(payload)}\n\n"

        def choice_chunk(index: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None} | extra

        async def events() -> AsyncIterator[str]:
            for choice in choices:
                yield chunk([choice_chunk(choice.index, {"role": "assistant", "content": ""})])
            try:
                async for index, delta in backend.deltas(stream, arrival):
                    choice = choices[index]
                    deltas = chunk_deltas(choice.update(delta))
                    logprobs = None
                    if top_logprobs is not None and delta.logprobs:
                        logprobs = chat_logprobs(backend.engine.tokenizer, delta.logprobs)
                        deltas = deltas or [{}]
                    for position, out in enumerate(deltas):
                        yield chunk([choice_chunk(index, out, logprobs=logprobs if position == 0 else None)])
                    if delta.finished:
                        yield chunk([choice_chunk(index, {}, finish_reason=choice.finish_reason)])
                if include_usage:
                    yield chunk([], usage())
                log_done()
            except EngineError as error:
                yield f"data: {json_dumps(engine_failure(error).openai_body())}\n\n"
            yield "data: [DONE]\n\n"

        return EventStreamResponse(events(), stream.close, openai_error_event)

    await backend.collect(request, stream, arrival, lambda index, delta: choices[index].update(delta))
    log_done()
    tokenizer = backend.engine.tokenizer
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": c.index,
                    "message": c.message(),
                    "logprobs": None if top_logprobs is None else chat_logprobs(tokenizer, c.logprobs),
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage(),
        }
    )


# ---------------------------------------------------------------------------------------- /v1/completions


async def _completion_prompts(fields: CompletionRequest, backend: Backend) -> list[list[int]]:
    prompt = fields.prompt
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [list(prompt)]  # type: ignore[arg-type]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if not items:
        raise bad_request("prompt must not be an empty list", "prompt")
    backend.check_capacity(len(items) * fields.num_choices, "prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = await backend.encode_text(item, "prompt")
        else:
            backend.check_prompt(item, "prompt")  # its length first: the range check below is O(length)
            ids = item
        if ids and not (min(ids) >= 0 and max(ids) < backend.engine.vocab_size):
            raise bad_request(f"prompt token ids must be in [0, {backend.engine.vocab_size})", "prompt")
        backend.check_prompt(ids, "prompt")
        prompts.append(ids)
    return prompts


class _TextChoice:
    def __init__(self, index: int, tokenizer: ChatTokenizer, want_logprobs: bool) -> None:
        self.index = index
        self._tokenizer = tokenizer
        self.text = ""
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list[Any]] | None = None
        if want_logprobs:
            self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self._offset = 0

    def update(self, delta: SequenceDelta) -> dict[str, list[Any]] | None:
        """Fold in a delta; returns the delta's own logprobs in the legacy format."""
        self.text += delta.text
        self.completion_tokens += len(delta.token_ids)
        self.cached_tokens = delta.num_cached_tokens
        if delta.finished:
            self.finish_reason = "length" if delta.finish_reason == "length" else "stop"
        if self.logprobs is None or not delta.logprobs:
            return None
        new: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token in delta.logprobs:
            text = _token_bytes(self._tokenizer, token.token_id).decode("utf-8", "replace")
            new["tokens"].append(text)
            new["token_logprobs"].append(token.logprob)
            new["top_logprobs"].append(
                {_token_bytes(self._tokenizer, i).decode("utf-8", "replace"): lp for i, lp in token.top}
            )
            new["text_offset"].append(self._offset)
            self._offset += len(text)
        for key, values in new.items():
            self.logprobs[key] += values
        return new


async def completions(request: Request, backend: Backend) -> Response:
    arrival = time.monotonic()
    body, fields = await read_request(request, backend, CompletionRequest)
    if fields.echo:
        raise bad_request("echo is not supported", "echo")
    if fields.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if fields.logprobs is not None and not 0 <= fields.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {fields.logprobs}", "logprobs")
    prompts = await _completion_prompts(fields, backend)
    longest = max(len(p) for p in prompts)
    max_tokens = fields.max_tokens
    if max_tokens is None:  # the default is cut to the room left; an explicit value must fit
        max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS, backend.engine.max_model_len - longest)
    params = build_params(fields, max_tokens, fields.logprobs)
    if fields.max_tokens is not None:
        backend.check_context(longest, max_tokens, "max_tokens")
    stream = backend.submit(prompts, [params] * len(prompts))

    tokenizer = backend.engine.tokenizer
    choices = [_TextChoice(i, tokenizer, fields.logprobs is not None) for i in range(len(prompts) * fields.num_choices)]
    base = {
        "id": f"cmpl-{REQUEST_ID.get()}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": backend.model_name,
    }
    prompt_tokens = sum(len(p) for p in prompts)

    def usage() -> dict[str, Any]:
        completion = sum(c.completion_tokens for c in choices)
        cached = sum(choices[p * fields.num_choices].cached_tokens for p in range(len(prompts)))
        return openai_usage(prompt_tokens, completion, cached)

    if fields.stream:
        include_usage = bool(fields.stream_options and fields.stream_options.include_usage)

        def chunk(choice_chunks: list[dict[str, Any]], usage_value: dict[str, Any] | None = None) -> str:
            payload = {**base, "choices": choice_chunks}
            if include_usage:
                payload["usage"] = usage_value
            return f"data: {json_dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                async for index, delta in backend.deltas(stream, arrival):
                    choice = choices[index]
                    logprobs = choice.update(delta)
                    if delta.text or logprobs or delta.finished:
                        out = {
                            "index": index,
                            "text": delta.text,
                            "logprobs": logprobs,
                            "finish_reason": choice.finish_reason,
                        }
                        yield chunk([out])
                if include_usage:
                    yield chunk([], usage())
            except EngineError as error:
                yield f"data: {json_dumps(engine_failure(error).openai_body())}\n\n"
            yield "data: [DONE]\n\n"

        return EventStreamResponse(events(), stream.close, openai_error_event)

    await backend.collect(request, stream, arrival, lambda index, delta: choices[index].update(delta))
    return JSONResponse(
        {
            **base,
            "choices": [
                {"index": c.index, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                for c in choices
            ],
            "usage": usage(),
        }
    )
