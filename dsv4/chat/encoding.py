"""Byte-exact DeepSeek-V4 prompt rendering.

The model was trained on prompts produced by the official ``encoding_dsv4.py``; any byte that differs from
what it would produce (a newline, the order of two tool results, a dropped ``</think>``) shifts the model
off-distribution and also breaks prefix-cache reuse. Everything here therefore reproduces the official
encoder's output exactly, including its quirks (consecutive user turns are merged, a user text that follows
tool results joins their turn, earlier developer turns vanish when thinking is dropped). Behaviour only
differs where the official encoder would crash; those cases raise :class:`EncodingError` or are rendered
leniently as documented on the function concerned.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
# Listed by the official README as a task token although the encoder never emits it; the tokenizer needs it.
EXTRACTED_URL = "<｜extracted_url｜>"

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_CLOSE = f"</{DSML}parameter>"
# What separates the assistant's visible content from its tool-call block.
TOOL_CALLS_SEPARATOR = "\n\n"

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")

MAX_EFFORT_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
    "root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked."
    "\n\n"
)

_TOOLS_HEADER = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing "
    f'a "{TOOL_CALLS_OPEN}" block like the following:\n\n'
    f"{TOOL_CALLS_OPEN}\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f"{TOOL_CALLS_CLOSE}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
    'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
    f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
_TOOLS_FOOTER = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
_RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

# Roles that survive when earlier thinking is dropped, whatever their position.
_ROLES_KEPT_WHEN_DROPPING = frozenset({"user", "system", "tool", "latest_reminder", "direct_search_results"})


class EncodingError(ValueError):
    """A message list the V4 prompt format cannot express (unknown role, malformed tool call, ...)."""


@dataclass(frozen=True)
class SampledInvoke:
    """One tool call exactly as the model sampled it.

    Clients re-serialise tool-call arguments (reordering keys, changing spacing or unicode escapes), so
    re-rendering a history from the client's copy would not reproduce the bytes the model produced and the
    cached KV prefix would stop matching. Keyed by tool-call id, this record lets the encoder put back the
    sampled ``dsml`` text whenever the client's call still means the same thing (same ``name``, arguments
    equal as JSON to ``arguments``).
    """

    name: str
    arguments: str
    dsml: str


def to_json(value: Any) -> str:
    """JSON the way the official encoder writes it: default separators, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False)


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    thinking_mode: str = "chat",
    context: Sequence[Mapping[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
    *,
    sampled_tool_calls: Mapping[str, SampledInvoke] | None = None,
) -> str:
    """Render ``messages`` as the V4 prompt string, byte for byte as the official encoder does.

    ``context`` holds messages already rendered into a cache: only ``messages`` are rendered, without BOS,
    but the context still decides transitions, tool-result order and which reasoning is dropped.
    ``sampled_tool_calls`` (tool-call id -> :class:`SampledInvoke`) restores the exact sampled text of
    earlier tool calls; without it each call is rendered canonically from its arguments.
    """
    _check_options(thinking_mode, reasoning_effort)
    history = _merge_tool_messages(context or [])
    new = _merge_tool_messages(messages)
    _order_tool_results(history + new)
    full = history + new

    # Tool-using conversations keep every turn's reasoning (thinking interleaves with tool calls).
    drop = drop_thinking and not any(message.get("tools") for message in full)
    first_to_render = len(history)
    if thinking_mode == "thinking" and drop:
        full = _drop_earlier_thinking(full)
        first_to_render = len(_drop_earlier_thinking(history))

    renderer = _Renderer(full, thinking_mode, drop, reasoning_effort, sampled_tool_calls or {})
    prompt = BOS if add_default_bos_token and not history else ""
    return prompt + "".join(renderer.render(index) for index in range(first_to_render, len(full)))


def render_assistant_completion(
    message: Mapping[str, Any],
    thinking_mode: str = "chat",
    *,
    sampled_tool_calls: Mapping[str, SampledInvoke] | None = None,
) -> str:
    """The text the model samples for ``message`` after a prompt that ends in ``<｜Assistant｜>`` + mode token.

    In thinking mode that is ``reasoning</think>content[tool calls]<EOS>`` (the opening ``<think>`` belongs
    to the prompt); in chat mode, and for quick-instruction task outputs (render those with ``"chat"``), it
    is ``content[tool calls]<EOS>``. A completion parsed by :mod:`dsv4.chat.parser` renders back to the
    sampled bytes when its :class:`SampledInvoke` records are passed.
    """
    _check_options(thinking_mode, None)
    return _render_assistant(message, with_reasoning=thinking_mode == "thinking", sampled=sampled_tool_calls or {})


def completion_mode_for_prompt(prompt: str) -> str:
    """The ``thinking_mode`` to parse a completion of ``prompt`` with.

    The sampled text opens inside a reasoning section exactly when the prompt ends with ``<think>``;
    chat turns, dropped-thinking positions and task outputs all start directly in content.
    """
    return "thinking" if prompt.endswith(THINK_START) else "chat"


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The ``## Tools`` section: fixed DSML instructions, then one JSON schema per line."""
    schemas = []
    for position, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise EncodingError(f"tools[{position}] must be an object")
        function = tool.get("function", tool if "name" in tool else None)
        if not isinstance(function, Mapping):
            raise EncodingError(f'tools[{position}] has no "function" object')
        schemas.append(to_json(function))
    return _TOOLS_HEADER + "\n".join(schemas) + _TOOLS_FOOTER


def render_tool_call_parameters(arguments: str | Mapping[str, Any]) -> str:
    """The DSML parameter lines for one call's arguments.

    Strings are written raw with ``string="true"``; every other value as JSON with ``string="false"``.
    Arguments that are not a JSON object become one string parameter named ``arguments`` holding the raw
    text (the official encoder does this for invalid JSON and crashes on other non-objects).
    """
    if isinstance(arguments, Mapping):
        values: Mapping[str, Any] = arguments
    else:
        try:
            decoded = json.loads(arguments)
        except (TypeError, ValueError):
            decoded = None
        values = decoded if isinstance(decoded, dict) else {"arguments": arguments}
    return "\n".join(
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f"{value if isinstance(value, str) else to_json(value)}{PARAMETER_CLOSE}"
        for key, value in values.items()
    )


def render_tool_calls(
    tool_calls: Sequence[Mapping[str, Any]] | None, sampled: Mapping[str, SampledInvoke] | None = None
) -> str:
    """The tool-call block that follows an assistant's content (empty when there are no calls)."""
    if not tool_calls:
        return ""
    invokes = "\n".join(_render_invoke(position, call, sampled or {}) for position, call in enumerate(tool_calls))
    return f"{TOOL_CALLS_SEPARATOR}{TOOL_CALLS_OPEN}\n{invokes}\n{TOOL_CALLS_CLOSE}"


def same_json(left: Any, right: Any) -> bool:
    """Whether two decoded JSON values mean the same thing to a client.

    Key order is ignored and ``1`` equals ``1.0`` (JavaScript clients cannot keep them apart), but a boolean
    never equals a number, unlike Python's ``True == 1``.
    """
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same_json(left[key], right[key]) for key in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(same_json(a, b) for a, b in zip(left, right, strict=True))
    return type(left) is type(right) and left == right


def _check_options(thinking_mode: str, reasoning_effort: str | None) -> None:
    if thinking_mode not in THINKING_MODES:
        raise EncodingError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise EncodingError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")


def _text(value: Any, where: str) -> str:
    """Message text; ``None`` counts as empty (the official encoder writes ``content or ""``)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EncodingError(f"{where} must be a string, got {type(value).__name__}")
    return value


def _merge_tool_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Fold tool results and user texts into user turns made of content blocks.

    V4 has no tool role: results travel inside the next user turn. A result joins the preceding user turn;
    a user text joins it too unless that turn carries a quick-instruction task (the joining text's own task
    is then lost, as in the official encoder). Works on deep copies so callers' messages stay untouched.
    """
    merged: list[dict[str, Any]] = []
    for position, original in enumerate(messages):
        if not isinstance(original, Mapping):
            raise EncodingError(f"messages[{position}] must be an object")
        message = copy.deepcopy(dict(original))
        role = message.get("role")
        previous_is_user = bool(merged) and merged[-1].get("role") == "user"
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id", ""),
                "content": message.get("content", ""),
            }
            if previous_is_user:
                merged[-1]["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": message.get("content", "")}
            if previous_is_user and merged[-1].get("task") is None:
                merged[-1]["content_blocks"].append(block)
            else:
                user: dict[str, Any] = {"role": "user", "content_blocks": [block]}
                if "task" in message:
                    user["task"] = message["task"]
                merged.append(user)
        else:
            merged.append(message)
    return merged


def _call_id(call: Any) -> str:
    if not isinstance(call, Mapping):
        return ""
    function = call.get("function")
    nested = function.get("id", "") if isinstance(function, Mapping) else ""
    return call.get("id") or nested or ""


def _order_tool_results(messages: list[dict[str, Any]]) -> None:
    """Put each user turn's tool results in the order of the latest assistant's calls (in place).

    Results whose id is unknown sort as if they answered the first call; the sort is stable and text
    blocks keep their positions, exactly like the official encoder.
    """
    call_order: dict[str, int] = {}
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            call_order = {}
            for position, call in enumerate(message["tool_calls"]):
                if call_id := _call_id(call):
                    call_order[call_id] = position
        elif role == "user":
            blocks = message["content_blocks"]
            results = [block for block in blocks if block["type"] == "tool_result"]
            if len(results) > 1 and call_order:
                ordered = iter(sorted(results, key=lambda block: call_order.get(block["tool_use_id"], 0)))
                message["content_blocks"] = [
                    next(ordered) if block["type"] == "tool_result" else block for block in blocks
                ]


def _last_user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") in ("user", "developer"):
            return index
    return -1


def _drop_earlier_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user/developer turn: strip assistant reasoning and remove developer turns."""
    last_user = _last_user_index(messages)
    kept = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role in _ROLES_KEPT_WHEN_DROPPING or index >= last_user:
            kept.append(message)
        elif role == "assistant":
            kept.append({key: value for key, value in message.items() if key != "reasoning_content"})
    return kept


def _tool_call_function(position: int, call: Any) -> tuple[str, str | Mapping[str, Any]]:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise EncodingError(f'tool_calls[{position}] must be an object with a "function" object')
    name = call["function"].get("name")
    arguments = call["function"].get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise EncodingError(f"tool_calls[{position}].function.name must be a non-empty string")
    if not isinstance(arguments, str | Mapping):
        raise EncodingError(f"tool_calls[{position}].function.arguments must be a JSON string")
    return name, arguments


def _matches_sample(name: str, arguments: str | Mapping[str, Any], sample: SampledInvoke) -> bool:
    if name != sample.name:
        return False
    if arguments == sample.arguments:
        return True
    try:
        decoded = json.loads(arguments) if isinstance(arguments, str) else arguments
        return same_json(decoded, json.loads(sample.arguments))
    except ValueError:
        return False


def _render_invoke(position: int, call: Mapping[str, Any], sampled: Mapping[str, SampledInvoke]) -> str:
    name, arguments = _tool_call_function(position, call)
    sample = sampled.get(_call_id(call))
    if sample is not None and _matches_sample(name, arguments, sample):
        return sample.dsml
    return f'<{DSML}invoke name="{name}">\n{render_tool_call_parameters(arguments)}\n{INVOKE_CLOSE}'


def _render_assistant(message: Mapping[str, Any], with_reasoning: bool, sampled: Mapping[str, SampledInvoke]) -> str:
    reasoning = _text(message.get("reasoning_content"), "assistant reasoning_content") + THINK_END
    return (
        (reasoning if with_reasoning else "")
        + _text(message.get("content"), "assistant content")
        + render_tool_calls(message.get("tool_calls"), sampled)
        + ("" if message.get("wo_eos") else EOS)
    )


def _tool_result_text(content: Any) -> str:
    """A tool result's text; list contents keep their text blocks and name the ones V4 cannot show."""
    if isinstance(content, list):
        return "\n\n".join(
            _text(block.get("text", ""), "tool result text")
            if isinstance(block, Mapping) and block.get("type") == "text"
            else f"[Unsupported {block.get('type') if isinstance(block, Mapping) else type(block).__name__}]"
            for block in content
        )
    return _text(content, "tool message content")


def _with_tools_and_format(text: str, message: Mapping[str, Any]) -> str:
    if message.get("tools"):
        text += "\n\n" + render_tools(message["tools"])
    if message.get("response_format"):
        text += "\n\n" + _RESPONSE_FORMAT_HEADER + to_json(message["response_format"])
    return text


class _Renderer:
    """Renders one message of a prepared (merged, ordered, possibly thinking-dropped) conversation."""

    def __init__(
        self,
        messages: list[dict[str, Any]],
        thinking_mode: str,
        drop_thinking: bool,
        reasoning_effort: str | None,
        sampled: Mapping[str, SampledInvoke],
    ) -> None:
        self.messages = messages
        self.thinking = thinking_mode == "thinking"
        self.drop_thinking = drop_thinking
        self.reasoning_effort = reasoning_effort
        self.sampled = sampled
        self.last_user = _last_user_index(messages)

    def render(self, index: int) -> str:
        preamble = MAX_EFFORT_PREAMBLE if index == 0 and self.thinking and self.reasoning_effort == "max" else ""
        return preamble + self._body(index) + self._transition(index)

    def _body(self, index: int) -> str:
        message = self.messages[index]
        role = message.get("role")
        if role == "system":
            return _with_tools_and_format(_text(message.get("content"), "system content"), message)
        if role == "developer":
            content = _text(message.get("content"), "developer content")
            if not content:
                raise EncodingError(f"messages[{index}]: a developer message needs non-empty content")
            return USER + _with_tools_and_format(content, message)
        if role == "user":
            return USER + "\n\n".join(self._user_block(block) for block in message["content_blocks"])
        if role == "latest_reminder":
            return LATEST_REMINDER + _text(message.get("content"), "latest_reminder content")
        if role == "assistant":
            previous_has_task = index > 0 and self.messages[index - 1].get("task") is not None
            keeps_reasoning = not self.drop_thinking or index > self.last_user
            with_reasoning = self.thinking and not previous_has_task and keeps_reasoning
            return _render_assistant(message, with_reasoning, self.sampled)
        raise EncodingError(f"messages[{index}]: unknown role {role!r}")

    @staticmethod
    def _user_block(block: Mapping[str, Any]) -> str:
        if block["type"] == "text":
            return _text(block["text"], "user content")
        return f"<tool_result>{_tool_result_text(block['content'])}</tool_result>"

    def _transition(self, index: int) -> str:
        """What opens the next turn: only before an assistant or latest_reminder turn, or at the very end."""
        is_last = index + 1 == len(self.messages)
        if not is_last and self.messages[index + 1].get("role") not in ("assistant", "latest_reminder"):
            return ""
        message = self.messages[index]
        task = message.get("task")
        if task is not None:
            if task not in TASK_TOKENS:
                raise EncodingError(f"messages[{index}]: unknown task {task!r}, expected one of {list(TASK_TOKENS)}")
            if task != "action":
                return TASK_TOKENS[task]
            return ASSISTANT + (THINK_START if self.thinking else THINK_END) + TASK_TOKENS[task]
        if message.get("role") not in ("user", "developer"):
            return ""
        opens_thinking = self.thinking and (not self.drop_thinking or index >= self.last_user)
        return ASSISTANT + (THINK_START if opens_thinking else THINK_END)
