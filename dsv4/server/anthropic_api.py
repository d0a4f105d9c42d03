"""``POST /v1/messages`` (and ``/v1/messages/count_tokens``) in Anthropic's Messages format.

A Messages request is translated into the OpenAI chat shape that :mod:`dsv4.chat.openai` turns into a V4
prompt: ``system`` becomes a system message, ``tool_result`` blocks become tool messages, assistant
``thinking`` blocks become ``reasoning_content`` and ``tool_use`` blocks become tool calls. Structural
errors are reported with Anthropic paths (``messages[2].content[0].tool_use_id``) before the translation,
so a client sees where its own request is wrong.

Thinking follows Anthropic's semantics, not the server default: it is on only when the request's
``thinking.type`` is ``enabled`` or ``adaptive`` (``budget_tokens`` is accepted and not enforced).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dsv4.chat.encoding import completion_mode_for_prompt
from dsv4.chat.openai import ChatPrompt, RequestError, from_openai_request
from dsv4.chat.parser import (
    CompletionParser,
    ContentDelta,
    ParsedCompletion,
    ParserEvent,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
)
from dsv4.engine.sampling import SamplingParams
from dsv4.server.engine_client import EngineError, SequenceDelta
from dsv4.server.errors import APIError, bad_request
from dsv4.server.openai_api import log_recoveries
from dsv4.server.serving import (
    REQUEST_ID,
    Backend,
    EncodedPrompt,
    EventStreamResponse,
    StrictModel,
    engine_failure,
    json_dumps,
    parse_body,
    sampling_error,
    unless_disconnected,
)

log = logging.getLogger("dsv4.server")

_THINKING_ON = ("enabled", "adaptive")
# Anthropic's effort levels, in the words dsv4.chat.openai understands.
_EFFORTS = ("low", "medium", "high", "xhigh", "max")
# Anthropic's temperature range (OpenAI's is [0, 2]).
MAX_TEMPERATURE = 1.0


class CountTokensRequest(StrictModel):
    model: str
    messages: list[Any]
    system: str | list[Any] | None = None
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    stream: bool | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


Fields = TypeVar("Fields", bound=CountTokensRequest)


def new_tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise bad_request(f"{where} must be an object, got {type(value).__name__}", where)
    return value


def _string(value: Any, where: str, *, non_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{where} must be a string, got {type(value).__name__}", where)
    if non_empty and not value:
        raise bad_request(f"{where} must not be empty", where)
    return value


def _blocks(content: Any, where: str) -> list[Mapping[str, Any]]:
    """Content as a list of blocks; a plain string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or an array of content blocks", where)
    return [_object(block, f"{where}[{j}]") for j, block in enumerate(content)]


def _text(content: Any, where: str) -> str:
    """System prompts and tool results: a string or text blocks, joined as the V4 encoder joins parts."""
    parts = []
    for j, block in enumerate(_blocks(content, where)):
        if block.get("type") != "text":
            raise bad_request(f"{where}[{j}]: only text blocks are supported here, got {block.get('type')!r}", where)
        parts.append(_string(block.get("text"), f"{where}[{j}].text"))
    return "\n\n".join(parts)


def _user_messages(blocks: list[Mapping[str, Any]], where: str, tool_use_ids: set[str]) -> list[dict[str, Any]]:
    """A user turn: its text, and each tool_result as a tool message, in block order. A tool_result must
    answer a tool_use block of an earlier assistant turn (``tool_use_ids``)."""
    messages: list[dict[str, Any]] = []
    texts: list[dict[str, str]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append({"type": "text", "text": _string(block.get("text"), f"{at}.text")})
        elif kind == "tool_result":
            if texts:
                messages.append({"role": "user", "content": texts})
                texts = []
            result = _text(block.get("content") or "", f"{at}.content")
            if block.get("is_error"):
                result = f"Error: {result}"
            call_id = _string(block.get("tool_use_id"), f"{at}.tool_use_id", non_empty=True)
            if call_id not in tool_use_ids:
                raise bad_request(
                    f"{at}.tool_use_id: no earlier assistant tool_use block has id {call_id!r}", f"{at}.tool_use_id"
                )
            messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
        else:
            raise bad_request(f"{at}: {kind!r} blocks are not supported in user turns (text and tool_result)", at)
    if texts:
        messages.append({"role": "user", "content": texts})
    return messages


def _assistant_message(blocks: list[Mapping[str, Any]], where: str) -> dict[str, Any]:
    reasoning: list[str] = []
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "thinking":
            reasoning.append(_string(block.get("thinking"), f"{at}.thinking"))
        elif kind == "redacted_thinking":
            continue  # opaque to us: there is nothing to render
        elif kind == "text":
            text.append(_string(block.get("text"), f"{at}.text"))
        elif kind == "tool_use":
            arguments = json.dumps(_object(block.get("input"), f"{at}.input"), ensure_ascii=False)
            calls.append(
                {
                    "id": _string(block.get("id"), f"{at}.id", non_empty=True),
                    "type": "function",
                    "function": {
                        "name": _string(block.get("name"), f"{at}.name", non_empty=True),
                        "arguments": arguments,
                    },
                }
            )
        else:
            raise bad_request(f"{at}: {kind!r} blocks are not supported in assistant turns", at)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: list[Any]) -> list[dict[str, Any]]:
    converted = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        tool = _object(tool, f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            raise bad_request(f"tools[{i}]: server tools ({tool.get('type')!r}) are not supported", f"tools[{i}].type")
        name = _string(tool.get("name"), f"tools[{i}].name", non_empty=True)
        if name in names:
            raise bad_request(f"tools[{i}].name: duplicate tool name {name!r}", f"tools[{i}].name")
        names.add(name)
        function: dict[str, Any] = {"name": name}
        if tool.get("description") is not None:
            function["description"] = _string(tool["description"], f"tools[{i}].description")
        function["parameters"] = dict(_object(tool.get("input_schema", {}), f"tools[{i}].input_schema"))
        if tool.get("strict") is not None:  # inputs that follow input_schema, enforced while sampling
            if not isinstance(tool["strict"], bool):
                raise bad_request(f"tools[{i}].strict must be true or false", f"tools[{i}].strict")
            function["strict"] = tool["strict"]
        converted.append({"type": "function", "function": function})
    return converted


def _tool_choice(choice: Mapping[str, Any], tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        if not tools:
            raise bad_request("tool_choice.type 'any' needs at least one tool in 'tools'", "tool_choice.type")
        return "required"
    if kind == "tool":
        name = _string(choice.get("name"), "tool_choice.name")
        if name not in [tool["function"]["name"] for tool in tools]:
            raise bad_request(f"tool_choice.name: {name!r} is not one of the request's tools", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    raise bad_request(f"tool_choice.type must be 'auto', 'any', 'tool' or 'none', got {kind!r}", "tool_choice.type")


def to_openai_body(request: CountTokensRequest) -> dict[str, Any]:
    """The request as an OpenAI chat body for :func:`from_openai_request`."""
    messages: list[dict[str, Any]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": _text(request.system, "system")})
    tool_use_ids: set[str] = set()
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        message = _object(message, where)
        role = message.get("role")
        blocks = _blocks(message.get("content"), f"{where}.content")
        if role == "user":
            messages += _user_messages(blocks, where, tool_use_ids)
        elif role == "assistant":
            messages.append(_assistant_message(blocks, where))
            tool_use_ids.update(call["id"] for call in messages[-1].get("tool_calls", ()))
        else:
            raise bad_request(f"{where}.role must be 'user' or 'assistant', got {role!r}", f"{where}.role")
    if not request.messages:
        raise bad_request("messages must not be empty", "messages")
    body: dict[str, Any] = {"messages": messages}
    tools = _tools(request.tools or [])
    if tools:
        body["tools"] = tools
    if request.tool_choice is not None:
        body["tool_choice"] = _tool_choice(request.tool_choice, tools)
        disable_parallel = request.tool_choice.get("disable_parallel_tool_use", False)
        if not isinstance(disable_parallel, bool):
            raise bad_request("tool_choice.disable_parallel_tool_use must be true or false", "tool_choice")
        body["parallel_tool_calls"] = not disable_parallel
    kind = (request.thinking or {}).get("type", "disabled")
    if kind not in (*_THINKING_ON, "disabled"):
        raise bad_request(f"thinking.type must be 'enabled', 'adaptive' or 'disabled', got {kind!r}", "thinking.type")
    body["thinking"] = {"type": "enabled" if kind in _THINKING_ON else "disabled"}
    effort = (request.output_config or {}).get("effort")
    if effort is not None and kind in _THINKING_ON:
        if effort not in _EFFORTS:
            raise bad_request(f"output_config.effort must be one of {list(_EFFORTS)}", "output_config.effort")
        body["reasoning_effort"] = effort
    return body


def chat_prompt(request: CountTokensRequest) -> ChatPrompt:
    try:
        return from_openai_request(to_openai_body(request), default_thinking=False)
    except RequestError as error:
        raise bad_request(str(error), error.field) from None


async def _read(request: Request, backend: Backend, model: type[Fields]) -> Fields:
    body = await backend.read_json(request)
    fields = await backend.offload(request, parse_body, model, body)
    backend.check_model(fields.model)
    return fields


async def _prompt(request: Request, fields: CountTokensRequest, backend: Backend) -> EncodedPrompt:
    chat = await backend.offload(request, chat_prompt, fields)
    return await backend.encode_chat(chat)


def anthropic_error_event(error: APIError) -> str:
    return sse(error.anthropic_body())


def stop_details(parsed: ParsedCompletion, finish: SequenceDelta) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) in Anthropic's terms."""
    if parsed.tool_calls:
        return "tool_use", None
    if finish.finish_reason == "length":
        return "max_tokens", None
    if isinstance(finish.stop_reason, str):
        return "stop_sequence", finish.stop_reason
    return "end_turn", None


def content_blocks(parsed: ParsedCompletion) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if parsed.reasoning_content:
        # V4 reasoning carries no signature; clients send it back as they got it and it is not checked
        blocks.append({"type": "thinking", "thinking": parsed.reasoning_content, "signature": ""})
    if parsed.content:
        blocks.append({"type": "text", "text": parsed.content})
    for call in parsed.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)})
    return blocks


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached_tokens,
        "output_tokens": output_tokens,
    }


def sse(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json_dumps(data)}\n\n"


class BlockWriter:
    """Turns parser events into content-block events: one block open at a time, each started, extended
    and stopped in order, as Anthropic streams them."""

    def __init__(self) -> None:
        self.index = -1
        self._open: str | None = None

    def _start(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self.stop()
        self.index += 1
        self._open = kind
        return [*events, sse({"type": "content_block_start", "index": self.index, "content_block": block})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": self.index, "delta": delta})

    def stop(self) -> list[str]:
        if self._open is None:
            return []
        events = []
        if self._open == "thinking":
            events.append(self._delta({"type": "signature_delta", "signature": ""}))
        self._open = None
        return [*events, sse({"type": "content_block_stop", "index": self.index})]

    def events(self, parsed: list[ParserEvent]) -> list[str]:
        out: list[str] = []
        for event in parsed:
            if isinstance(event, ReasoningDelta):
                if self._open != "thinking":
                    out += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
            elif isinstance(event, ContentDelta):
                if self._open != "text":
                    out += self._start("text", {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": event.text}))
            elif isinstance(event, ToolCallStart):
                block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
                out += self._start("tool_use", block)
            elif isinstance(event, ToolCallArguments):
                out.append(self._delta({"type": "input_json_delta", "partial_json": event.arguments}))
        return out


async def count_tokens(request: Request, backend: Backend) -> Response:
    fields = await _read(request, backend, CountTokensRequest)
    prompt = await _prompt(request, fields, backend)
    return JSONResponse({"input_tokens": len(prompt.token_ids)})


def sampling_params(fields: MessagesRequest) -> SamplingParams:
    """The request's sampling fields in Anthropic's ranges (temperature in [0, 1])."""
    if fields.temperature is not None and not 0 <= fields.temperature <= MAX_TEMPERATURE:
        raise bad_request(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {fields.temperature}", "temperature")
    names = ("temperature", "top_p", "top_k")
    kwargs = {name: getattr(fields, name) for name in names if getattr(fields, name) is not None}
    params = SamplingParams(**kwargs, max_tokens=fields.max_tokens, stop=list(fields.stop_sequences or []))
    try:
        params.validate()
    except ValueError as error:
        api_error = sampling_error(error)
        if api_error.param == "stop":  # SamplingParams' name for it
            raise bad_request(api_error.message.replace("stop", "stop_sequences", 1), "stop_sequences") from None
        raise api_error from None
    return params


async def messages(request: Request, backend: Backend) -> Response:
    arrival = time.monotonic()
    fields = await _read(request, backend, MessagesRequest)
    params = sampling_params(fields)
    chat = await backend.offload(request, chat_prompt, fields)
    prompt = await backend.encode_chat(chat)
    params = replace(params, grammar=await backend.grammar(chat, prompt))
    backend.check_context(len(prompt.token_ids), fields.max_tokens, "max_tokens")
    stream = backend.submit([prompt.token_ids], [[params]])
    backend.remember_prompt(prompt)

    parser = CompletionParser(completion_mode_for_prompt(prompt.text), make_tool_call_id=new_tool_use_id)
    message_id = f"msg_{REQUEST_ID.get()}"
    prompt_tokens = len(prompt.token_ids)
    output_ids: list[int] = []
    output_tokens = 0

    def update(delta: SequenceDelta) -> list[ParserEvent]:
        nonlocal output_tokens
        output_ids.extend(delta.token_ids)
        output_tokens = len(output_ids)
        events = parser.feed(delta.text)
        if delta.finished:
            events += parser.close(eos=delta.finish_reason == "stop")
            backend.tool_calls.remember_turn(parser.message)
            backend.remember_completion(prompt, output_ids, delta)
            log_recoveries(parser.message.recoveries, 0)
            log.info("message: %d prompt + %d generated tokens", prompt_tokens, output_tokens)
        return events

    if fields.stream:

        async def events() -> AsyncIterator[str]:
            start = {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": backend.model_name,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage(prompt_tokens, 0, 0),
            }
            yield sse({"type": "message_start", "message": start})
            yield sse({"type": "ping"})
            blocks = BlockWriter()
            try:
                async for _, delta in backend.deltas(stream, arrival):
                    for event in blocks.events(update(delta)):
                        yield event
                    if delta.finished:
                        for event in blocks.stop():
                            yield event
                        reason, sequence = stop_details(parser.message, delta)
                        yield sse(
                            {
                                "type": "message_delta",
                                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                "usage": usage(prompt_tokens, delta.num_cached_tokens, output_tokens),
                            }
                        )
                        yield sse({"type": "message_stop"})
            except EngineError as error:
                yield sse(engine_failure(error).anthropic_body())

        return EventStreamResponse(events(), stream.close, anthropic_error_event)

    async def collect() -> SequenceDelta:
        async for _, delta in backend.deltas(stream, arrival):
            update(delta)
            if delta.finished:
                return delta
        raise EngineError("the stream ended without finishing")

    try:
        final = await unless_disconnected(request, collect())
    except EngineError as error:
        raise engine_failure(error) from None
    finally:
        stream.close()
    reason, sequence = stop_details(parser.message, final)
    return JSONResponse(
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": backend.model_name,
            "content": content_blocks(parser.message),
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage(prompt_tokens, final.num_cached_tokens, output_tokens),
        }
    )
