"""OpenAI chat-completions request bodies -> the V4 encoder's messages and options.

Only the fields that shape the prompt are read here (messages, tools, tool_choice, reasoning_effort, the
thinking switch, response_format); sampling and transport fields are the server's business. Everything is
validated up front so that a bad request fails with a :class:`RequestError` naming the offending field
instead of producing a subtly wrong prompt.

Choices the official encoder leaves open, made here:

* ``tools`` and ``response_format`` are attached to the first system message; a system message with empty
  content is put first when the request has none (the official encoder then starts the prompt with
  ``"\\n\\n## Tools"``).
* OpenAI's ``developer`` role is the newer name for ``system`` and is mapped to it. V4's own developer
  role (an internal search-agent user turn) is reachable only through the encoder directly.
  ``latest_reminder`` is accepted as an extension role.
* ``tool_choice``: ``auto`` (or absent) changes nothing, so the prompt stays byte-exact. ``none`` leaves
  the tool block out of the prompt. ``required`` and a named function add one instruction line to the system
  message, just before the tool block; the resulting :class:`ChatPrompt` says what was asked
  (``tool_choice``, ``forced_tool``, the tools, ``response_format``, ``parallel_tool_calls``) so that the
  server can enforce it while sampling (:mod:`dsv4.chat.grammar`).
* ``reasoning_effort``: ``none`` turns thinking off; ``minimal``, ``low``, ``medium`` and ``high`` are V4's
  plain thinking ("Think High"); ``xhigh`` and ``max`` add the max-effort preamble ("Think Max").
* Text content given as a list of parts is joined with blank lines, as the official encoder joins the
  parts of a tool result; other part types are rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsv4.chat.encoding import SampledInvoke, encode_messages

_REASONING_EFFORTS: dict[str, str] = {
    "minimal": "high",
    "low": "high",
    "medium": "high",
    "high": "high",
    "xhigh": "max",
    "max": "max",
}
_ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
_RESPONSE_FORMATS = ("text", "json_object", "json_schema")
REQUIRED_TOOL_INSTRUCTION = "You MUST call at least one of the tools below in your reply."


def forced_tool_instruction(name: str) -> str:
    return f"You MUST call the tool `{name}` in your reply."


class RequestError(ValueError):
    """An OpenAI request the V4 prompt cannot be built from; ``field`` is the JSON path at fault."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class ChatPrompt:
    """A request in the encoder's terms, plus what the server needs to check and parse the reply."""

    messages: list[dict[str, Any]]
    thinking_mode: str
    reasoning_effort: str | None
    drop_thinking: bool
    # "auto", "none", "required" or "function" (then ``forced_tool`` names it).
    tool_choice: str
    forced_tool: str | None
    tool_names: tuple[str, ...]
    # What the reply is constrained by (dsv4.chat.grammar): the request's tools, even when tool_choice
    # "none" keeps them out of the prompt, its response_format, and whether a block may hold several calls.
    tools: tuple[dict[str, Any], ...] = ()
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def render(self, *, sampled_tool_calls: Mapping[str, SampledInvoke] | None = None) -> str:
        return encode_messages(
            self.messages,
            self.thinking_mode,
            drop_thinking=self.drop_thinking,
            reasoning_effort=self.reasoning_effort,
            sampled_tool_calls=sampled_tool_calls,
        )


def _object(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RequestError(field, f"must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, field: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise RequestError(field, f"must be an array, got {type(value).__name__}")
    return value


def _string(value: Any, field: str, *, non_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RequestError(field, f"must be a string, got {type(value).__name__}")
    if non_empty and not value:
        raise RequestError(field, "must not be empty")
    return value


def _text_content(value: Any, field: str) -> str:
    """A message's text: a string, null, or a list of text parts."""
    if value is None or isinstance(value, str):
        return value or ""
    parts = []
    for position, part in enumerate(_list(value, field)):
        part = _object(part, f"{field}[{position}]")
        kind = part.get("type")
        if kind != "text":
            raise RequestError(f"{field}[{position}].type", f"{kind!r} parts are not supported (text only)")
        parts.append(_string(part.get("text"), f"{field}[{position}].text"))
    return "\n\n".join(parts)


def _tool_calls(value: Any, field: str) -> list[dict[str, Any]]:
    calls = []
    for position, call in enumerate(_list(value, field)):
        where = f"{field}[{position}]"
        call = _object(call, where)
        if call.get("type", "function") != "function":
            raise RequestError(f"{where}.type", f"must be 'function', got {call.get('type')!r}")
        function = _object(call.get("function"), f"{where}.function")
        calls.append(
            {
                "id": _string(call.get("id"), f"{where}.id", non_empty=True),
                "type": "function",
                "function": {
                    "name": _string(function.get("name"), f"{where}.function.name", non_empty=True),
                    "arguments": _string(function.get("arguments"), f"{where}.function.arguments"),
                },
            }
        )
    return calls


def _messages(value: Any) -> list[dict[str, Any]]:
    messages = _list(value, "messages")
    if not messages:
        raise RequestError("messages", "must not be empty")
    mapped: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for position, message in enumerate(messages):
        where = f"messages[{position}]"
        message = _object(message, where)
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"{where}.role", f"unknown role {role!r}, expected one of {list(_ROLES)}")
        if role == "tool":
            call_id = _string(message.get("tool_call_id"), f"{where}.tool_call_id", non_empty=True)
            if call_id not in call_ids:
                raise RequestError(f"{where}.tool_call_id", f"no earlier assistant tool call has id {call_id!r}")
            mapped.append(
                {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": _text_content(message.get("content"), f"{where}.content"),
                }
            )
        elif role == "assistant":
            assistant: dict[str, Any] = {
                "role": "assistant",
                "content": _text_content(message.get("content"), f"{where}.content"),
            }
            if message.get("reasoning_content") is not None:
                assistant["reasoning_content"] = _string(message["reasoning_content"], f"{where}.reasoning_content")
            if message.get("tool_calls"):
                assistant["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
                call_ids.update(call["id"] for call in assistant["tool_calls"])
            mapped.append(assistant)
        else:
            mapped.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _text_content(message.get("content"), f"{where}.content"),
                }
            )
    return mapped


def _tools(value: Any) -> list[dict[str, Any]]:
    tools = _list(value, "tools")
    names: set[str] = set()
    for position, tool in enumerate(tools):
        where = f"tools[{position}]"
        tool = _object(tool, where)
        if tool.get("type") != "function":
            raise RequestError(f"{where}.type", f"must be 'function', got {tool.get('type')!r}")
        function = _object(tool.get("function"), f"{where}.function")
        name = _string(function.get("name"), f"{where}.function.name", non_empty=True)
        if name in names:
            raise RequestError(f"{where}.function.name", f"duplicate tool name {name!r}")
        names.add(name)
        if "parameters" in function:
            _object(function["parameters"], f"{where}.function.parameters")
    return [dict(tool) for tool in tools]


def _tool_choice(value: Any, tool_names: Sequence[str]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise RequestError("tool_choice", f"must be 'auto', 'none', 'required' or a function, got {value!r}")
        if value == "required" and not tool_names:
            raise RequestError("tool_choice", "'required' needs at least one tool in 'tools'")
        return value, None
    choice = _object(value, "tool_choice")
    if choice.get("type") != "function":
        raise RequestError("tool_choice.type", f"must be 'function', got {choice.get('type')!r}")
    name = _string(_object(choice.get("function"), "tool_choice.function").get("name"), "tool_choice.function.name")
    if name not in tool_names:
        raise RequestError("tool_choice.function.name", f"{name!r} is not one of the request's tools")
    return "function", name


def _thinking_switch(body: Mapping[str, Any]) -> bool | None:
    """The explicit on/off switch, from ``thinking`` or ``chat_template_kwargs.thinking``; None when absent."""
    choices: list[tuple[str, bool]] = []
    if body.get("thinking") is not None:
        kind = _object(body["thinking"], "thinking").get("type")
        if kind not in ("enabled", "disabled"):
            raise RequestError("thinking.type", f"must be 'enabled' or 'disabled', got {kind!r}")
        choices.append(("thinking.type", kind == "enabled"))
    kwargs = _object(body.get("chat_template_kwargs") or {}, "chat_template_kwargs")
    if kwargs.get("thinking") is not None:
        if not isinstance(kwargs["thinking"], bool):
            raise RequestError("chat_template_kwargs.thinking", "must be true or false")
        choices.append(("chat_template_kwargs.thinking", kwargs["thinking"]))
    if len({enabled for _, enabled in choices}) > 1:
        raise RequestError(choices[1][0], f"contradicts {choices[0][0]}")
    return choices[0][1] if choices else None


def _reasoning(body: Mapping[str, Any], default_thinking: bool) -> tuple[str, str | None]:
    switch = _thinking_switch(body)
    effort_name = body.get("reasoning_effort")
    if effort_name is None:
        effort = None
    elif effort_name == "none":
        if switch:
            raise RequestError("reasoning_effort", "'none' contradicts thinking being enabled")
        switch, effort = False, None
    elif isinstance(effort_name, str) and effort_name in _REASONING_EFFORTS:
        effort = _REASONING_EFFORTS[effort_name]
    else:
        known = ["none", *_REASONING_EFFORTS]
        raise RequestError("reasoning_effort", f"must be one of {known}, got {effort_name!r}")
    thinking = default_thinking if switch is None else switch
    return ("thinking", effort) if thinking else ("chat", None)


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    response_format = _object(value, "response_format")
    kind = response_format.get("type")
    if kind not in _RESPONSE_FORMATS:
        raise RequestError("response_format.type", f"must be one of {list(_RESPONSE_FORMATS)}, got {kind!r}")
    if kind == "json_schema":
        schema = _object(response_format.get("json_schema"), "response_format.json_schema")
        _object(schema.get("schema", {}), "response_format.json_schema.schema")
    return None if kind == "text" else dict(response_format)


def _system_message(messages: list[dict[str, Any]]) -> dict[str, Any]:
    for message in messages:
        if message["role"] == "system":
            return message
    system: dict[str, Any] = {"role": "system", "content": ""}
    messages.insert(0, system)
    return system


def from_openai_request(body: Mapping[str, Any], *, default_thinking: bool = True) -> ChatPrompt:
    """Validate an OpenAI chat-completions body and express it as encoder input.

    ``default_thinking`` decides the mode when the request neither switches thinking on or off nor sets
    ``reasoning_effort`` to ``none``.
    """
    body = _object(body, "request")
    messages = _messages(body.get("messages"))
    tools = _tools(body["tools"]) if body.get("tools") is not None else []
    tool_names = tuple(tool["function"]["name"] for tool in tools)
    tool_choice, forced_tool = _tool_choice(body.get("tool_choice"), tool_names)
    thinking_mode, reasoning_effort = _reasoning(body, default_thinking)
    response_format = _response_format(body.get("response_format"))

    kwargs = _object(body.get("chat_template_kwargs") or {}, "chat_template_kwargs")
    drop_thinking = kwargs.get("drop_thinking", True)
    if not isinstance(drop_thinking, bool):
        raise RequestError("chat_template_kwargs.drop_thinking", "must be true or false")

    instruction = ""
    if tool_choice == "required":
        instruction = REQUIRED_TOOL_INSTRUCTION
    elif forced_tool is not None:
        instruction = forced_tool_instruction(forced_tool)
    if (tools and tool_choice != "none") or response_format:
        system = _system_message(messages)
        if instruction:
            system["content"] += ("\n\n" if system["content"] else "") + instruction
        if tools and tool_choice != "none":
            system["tools"] = tools
        if response_format:
            system["response_format"] = response_format
    parallel_tool_calls = body.get("parallel_tool_calls", True)
    if not isinstance(parallel_tool_calls, bool):
        raise RequestError("parallel_tool_calls", "must be true or false")
    return ChatPrompt(
        messages=messages,
        thinking_mode=thinking_mode,
        reasoning_effort=reasoning_effort,
        drop_thinking=drop_thinking,
        tool_choice=tool_choice,
        forced_tool=forced_tool,
        tool_names=tool_names,
        tools=tuple(tools),
        response_format=response_format,
        parallel_tool_calls=parallel_tool_calls,
    )
