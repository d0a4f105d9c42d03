"""Streaming parser for V4 assistant completions: reasoning, content and DSML tool calls.

Feed it the text the model samples after the prompt, chunk by chunk, and it yields events as soon as their
meaning is certain. Text that might still turn into a marker (``</think>``, the start of a tool-call block,
EOS) is held back, so no fragment of markup ever reaches the client as content.

On well-formed output the final message equals the official strict parser's result (plus generated tool-call
ids). The model also makes a few known slips, and the official parser would reject all of them; here each is
repaired and reported as a :class:`Recovery`: ``</think>`` missing before a tool-call block
(``missing_think_end``), invokes without the ``tool_calls`` wrapper (``missing_tool_calls_wrapper``), ASCII
``|`` in DSML markers (``ascii_pipe``), a ``string="false"`` value that is not JSON (``invalid_json_parameter``),
output cut off before its end (``truncated``; an unfinished call is dropped, never shown as content) and text
after the tool-call block (``text_after_tool_calls``). Rarer damage is reported as ``unclosed_invoke``,
``unclosed_tool_calls``, ``malformed_tool_call``, ``duplicate_parameter``, ``missing_string_attribute``,
``stray_think_tag``, ``stray_dsml_tag``, ``reasoning_in_chat_mode`` or ``text_after_eos``.

The parser's input may start with the transition tokens the prompt already ends with (``<think>``,
``</think>``, a quick-instruction task token): they are skipped, so the text after ``<｜Assistant｜>`` in a
rendered conversation parses as well as the sampled completion alone.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsv4.chat.encoding import (
    DSML,
    EOS,
    INVOKE_CLOSE,
    PARAMETER_CLOSE,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    THINKING_MODES,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
    TOOL_CALLS_SEPARATOR,
    SampledInvoke,
    to_json,
)

_INVOKE_HEAD = f"<{DSML}invoke"
_PARAMETER_HEAD = f"<{DSML}parameter"
# Names exclude '"' and '>' so that the first '>' always settles whether a tag is readable, however the
# text was chunked.
_INVOKE_OPEN = re.compile(rf'<{DSML}invoke\s*name="([^">]*)">')
_PARAMETER_OPEN = re.compile(rf'<{DSML}parameter\s+name="([^">]*)"(?:\s+string="(true|false)")?\s*>')
# Longest run we wait for the ">" that closes a DSML tag before calling the tag malformed.
_TAG_LIMIT = 256
# A DSML tag outside a block is dropped whole: up to its ">", or up to the next "<" (or the length limit)
# when it never closes.
_STRAY_DSML_TAG = re.compile(
    rf"</?{DSML}(?:[^<>]{{0,{_TAG_LIMIT}}}>|[^<>]{{0,{_TAG_LIMIT}}}(?=<)|[^<>]{{{_TAG_LIMIT}}})"
)
_PARTIAL_DSML_TAG = re.compile(rf"</?{DSML}[^<>]{{0,{_TAG_LIMIT - 1}}}\Z")


def _normalise_pipes(text: str) -> str:
    """Fold ASCII ``|`` into the fullwidth ``｜`` of the markers; both are one code point, so offsets hold."""
    return text.replace("|", "｜")


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """An invoke opened: its name is known, its arguments are not yet."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """An invoke closed: ``arguments`` is the complete JSON object text, as the official parser builds it."""

    index: int
    id: str
    arguments: str


@dataclass(frozen=True)
class Recovery:
    """A slip in the model's output that was repaired; ``kind`` is stable, ``detail`` is for humans."""

    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "detail": self.detail}


ParserEvent = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArguments | Recovery


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str
    # The invoke exactly as sampled, from ``<｜DSML｜invoke`` through ``</｜DSML｜invoke>``.
    dsml: str
    # False when a recovery touched this call: its sampled text is then not worth reproducing.
    well_formed: bool

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedCompletion:
    content: str
    reasoning_content: str
    tool_calls: list[ParsedToolCall]
    recoveries: list[Recovery]
    ended_with_eos: bool

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish_reason: calls win, then a clean EOS; anything else ran out of tokens."""
        if self.tool_calls:
            return "tool_calls"
        return "stop" if self.ended_with_eos else "length"

    def to_openai(self) -> dict[str, Any]:
        """The assistant message in OpenAI shape (the official parser's fields, tool calls with ids)."""
        return {
            "role": "assistant",
            "content": self.content,
            "reasoning_content": self.reasoning_content,
            "tool_calls": [call.to_openai() for call in self.tool_calls],
        }

    def sampled_tool_calls(self) -> dict[str, SampledInvoke]:
        """Tool-call id -> sampled DSML, for byte-stable re-rendering; only well-formed calls qualify,
        so that re-rendering heals a slipped call instead of showing the model its own mistake."""
        return {
            call.id: SampledInvoke(call.name, call.arguments, call.dsml) for call in self.tool_calls if call.well_formed
        }


class _State(enum.Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    BLOCK = "tool-call block"
    INVOKE = "tool call"
    VALUE = "parameter value"
    DONE = "done"


class _PromptTail(enum.Enum):
    """How much of the prompt's closing tokens may still appear at the start of the input (and be skipped)."""

    MODE_TOKENS = "<think> or </think>, then a task token"
    TASK_TOKEN = "a task token"
    PASSED = "nothing"


class _Marker(enum.Enum):
    EOS = "eos"
    THINK_END = "think_end"
    THINK_START = "think_start"
    BLOCK = "block"
    BARE_INVOKE = "bare_invoke"
    TASK = "task"
    STRAY_DSML = "stray_dsml"


# Markers recognised in reasoning and content, written with fullwidth pipes (scans are pipe-normalised).
_TEXT_MARKERS: list[tuple[str, _Marker]] = [
    (EOS, _Marker.EOS),
    (THINK_END, _Marker.THINK_END),
    (THINK_START, _Marker.THINK_START),
    (TOOL_CALLS_SEPARATOR + TOOL_CALLS_OPEN, _Marker.BLOCK),
    (TOOL_CALLS_OPEN, _Marker.BLOCK),
    (TOOL_CALLS_SEPARATOR + _INVOKE_HEAD, _Marker.BARE_INVOKE),
    (_INVOKE_HEAD, _Marker.BARE_INVOKE),
]
_TASK_MARKERS = [(token, _Marker.TASK) for token in TASK_TOKENS.values()]
# Beginnings worth holding back besides the markers themselves: any DSML tag could be opening.
_HOLD_PREFIXES = [text for text, _ in _TEXT_MARKERS] + [f"</{DSML}"]
_VALUE_ENDS = [PARAMETER_CLOSE, EOS]
_BLOCK_HEADS = (_INVOKE_HEAD, TOOL_CALLS_CLOSE, EOS)
_INVOKE_HEADS = (_PARAMETER_HEAD, INVOKE_CLOSE, _INVOKE_HEAD, TOOL_CALLS_CLOSE, EOS)


def _start_of_partial(scan: str, markers: list[str]) -> int:
    """Where the longest suffix of ``scan`` that is a proper prefix of one of ``markers`` begins."""
    for start in range(max(0, len(scan) - max(map(len, markers))), len(scan)):
        tail = scan[start:]
        if any(len(tail) < len(marker) and marker.startswith(tail) for marker in markers):
            return start
    return len(scan)


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _OpenCall:
    index: int
    id: str
    name: str
    parameters: dict[str, tuple[str, bool]] = field(default_factory=dict)
    dsml: list[str] = field(default_factory=list)
    skipped: str = ""
    # Whitespace seen since the last element; it joins ``skipped`` only if more skipped text follows.
    pending_space: str = ""
    well_formed: bool = True


class CompletionParser:
    """Incremental parser of one assistant completion.

    ``thinking_mode`` says where the sampled text starts: inside the reasoning section ("thinking", the
    prompt ended with ``<think>``) or in the content ("chat"; also use it for quick-instruction task
    outputs). :func:`dsv4.chat.encoding.completion_mode_for_prompt` picks it from the prompt.
    Call :meth:`feed` with each chunk and :meth:`close` at the end, then read :attr:`message`.
    """

    def __init__(self, thinking_mode: str = "chat", *, make_tool_call_id: Callable[[], str] = new_tool_call_id):
        if thinking_mode not in THINKING_MODES:
            raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
        self._make_id = make_tool_call_id
        self._state = _State.REASONING if thinking_mode == "thinking" else _State.CONTENT
        self._buffer = ""
        # Characters consumed so far; recoveries cite offsets so that they read the same however chunked.
        self._offset = 0
        self._marker_start = 0
        self._tail = _PromptTail.MODE_TOKENS
        self._after_block = False
        self._skipped_after_block = ""
        self._block_has_wrapper = False
        self._value_parts: list[str] = []
        self._value_parameter: tuple[str, bool | None] = ("", None)
        self._call: _OpenCall | None = None
        self._calls_started = 0
        self._reported_ascii_pipe = False
        self._reported_after_eos = False
        self._events: list[ParserEvent] = []
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tool_calls: list[ParsedToolCall] = []
        self._recoveries: list[Recovery] = []
        self._ended_with_eos = False
        self._message: ParsedCompletion | None = None

    @property
    def message(self) -> ParsedCompletion:
        if self._message is None:
            raise RuntimeError("the completion is not finished: call close() first")
        return self._message

    @property
    def recoveries(self) -> list[Recovery]:
        return list(self._recoveries)

    def feed(self, text: str) -> list[ParserEvent]:
        if self._message is not None:
            raise RuntimeError("feed() after close()")
        if self._state is _State.DONE:
            self._note_text_after_eos(text)
        else:
            self._buffer += text
            self._advance()
        return self._take_events()

    def close(self, *, eos: bool = False) -> list[ParserEvent]:
        """End the completion. ``eos`` tells that generation stopped on EOS without its text being fed."""
        if self._message is None:
            self._advance()
            if self._state is not _State.DONE:
                self._finish(eos)
            self._message = ParsedCompletion(
                content="".join(self._content),
                reasoning_content="".join(self._reasoning),
                tool_calls=list(self._tool_calls),
                recoveries=list(self._recoveries),
                ended_with_eos=self._ended_with_eos,
            )
        return self._take_events()

    # ---- plumbing

    def _take_events(self) -> list[ParserEvent]:
        events, self._events = self._events, []
        return events

    def _recover(self, kind: str, detail: str) -> None:
        recovery = Recovery(kind, detail)
        self._recoveries.append(recovery)
        self._events.append(recovery)

    def _consume(self, length: int) -> str:
        taken, self._buffer = self._buffer[:length], self._buffer[length:]
        self._offset += length
        if self._call is not None:
            self._call.dsml.append(taken)
        return taken

    def _check_pipes(self, raw: str) -> None:
        """Report ASCII pipes in DSML markup once per completion; every call they touch loses byte-stability."""
        if "|" not in raw or "DSML" not in raw:
            return
        if self._call is not None:
            self._call.well_formed = False
        if not self._reported_ascii_pipe:
            self._reported_ascii_pipe = True
            self._recover("ascii_pipe", f"ASCII '|' instead of '｜' in a DSML marker at offset {self._offset}")

    def _emit_text(self, text: str) -> None:
        if not text:
            return
        self._tail = _PromptTail.PASSED
        if self._state is _State.REASONING:
            self._reasoning.append(text)
            self._events.append(ReasoningDelta(text))
            return
        if self._after_block:
            stripped = text.lstrip()
            self._skipped_after_block += text[: len(text) - len(stripped)]
            if not stripped:
                return
            self._after_block = False
            self._skipped_after_block = ""
            self._recover(
                "text_after_tool_calls",
                f"content resumes after the tool-call block at offset {self._offset - len(stripped)}",
            )
            text = stripped
        self._content.append(text)
        self._events.append(ContentDelta(text))

    def _note_text_after_eos(self, text: str) -> None:
        if text and not self._reported_after_eos:
            self._reported_after_eos = True
            self._recover("text_after_eos", "text after EOS was ignored")

    def _advance(self) -> None:
        handlers: dict[_State, Callable[[], bool]] = {
            _State.REASONING: self._advance_text,
            _State.CONTENT: self._advance_text,
            _State.BLOCK: self._advance_block,
            _State.INVOKE: self._advance_invoke,
            _State.VALUE: self._advance_value,
        }
        while self._state is not _State.DONE and handlers[self._state]():
            pass
        if self._state is _State.DONE and self._buffer:
            self._note_text_after_eos(self._buffer)
            self._buffer = ""

    # ---- reasoning and content

    def _next_marker(self, scan: str) -> tuple[int, int, _Marker] | None:
        """Earliest complete marker as (position, length, kind); the longer one wins a tie."""
        if self._tail is not _PromptTail.PASSED:
            for token, kind in _TASK_MARKERS:
                if scan.startswith(token):  # a task token counts only as the prompt's last token
                    return 0, len(token), kind
        best: tuple[int, int, _Marker] | None = None
        for text, kind in _TEXT_MARKERS:
            position = scan.find(text)
            if position != -1 and (best is None or (position, -len(text)) < (best[0], -best[1])):
                best = (position, len(text), kind)
        stray = _STRAY_DSML_TAG.search(scan)
        if stray and (best is None or stray.start() < best[0]):
            best = (stray.start(), stray.end() - stray.start(), _Marker.STRAY_DSML)
        return best

    def _held_from(self, scan: str) -> int:
        """Where the tail that could still grow into a marker begins (``len(scan)`` when nothing is held)."""
        if self._tail is not _PromptTail.PASSED and any(
            len(scan) < len(token) and token.startswith(scan) for token, _ in _TASK_MARKERS
        ):
            return 0
        partial_tag = _PARTIAL_DSML_TAG.search(scan)
        return min(_start_of_partial(scan, _HOLD_PREFIXES), partial_tag.start() if partial_tag else len(scan))

    def _advance_text(self) -> bool:
        scan = _normalise_pipes(self._buffer)
        found = self._next_marker(scan)
        if found is None:
            held = self._held_from(scan)
            self._emit_text(self._consume(held))
            return False
        position, length, kind = found
        self._emit_text(self._consume(position))
        self._marker_start = self._offset
        raw = self._buffer[:length]
        self._check_pipes(raw)
        if kind is _Marker.BARE_INVOKE:
            # Keep the invoke head in the buffer: the block state parses the whole tag.
            self._consume(length - len(_INVOKE_HEAD))
        else:
            self._consume(length)
        self._on_marker(kind, raw)
        return True

    def _on_marker(self, kind: _Marker, raw: str) -> None:
        tail, self._tail = self._tail, _PromptTail.PASSED
        in_reasoning = self._state is _State.REASONING
        if kind is _Marker.EOS:
            if in_reasoning:
                self._recover("missing_think_end", f"EOS inside the reasoning at offset {self._marker_start}")
            self._end(eos=True)
        elif kind is _Marker.THINK_END and (in_reasoning or tail is _PromptTail.MODE_TOKENS):
            self._state = _State.CONTENT
            if tail is _PromptTail.MODE_TOKENS:
                self._tail = _PromptTail.TASK_TOKEN  # "</think><｜action｜>" ends a chat-mode action prompt
        elif kind is _Marker.THINK_START and tail is _PromptTail.MODE_TOKENS:
            if not in_reasoning:
                self._recover("reasoning_in_chat_mode", "the completion opened a reasoning section")
            self._state = _State.REASONING
            self._tail = _PromptTail.MODE_TOKENS  # "<think></think>" or "<think><｜action｜>" may follow
        elif kind is _Marker.TASK:
            self._state = _State.CONTENT  # a task's output never has a reasoning section
        elif kind in (_Marker.BLOCK, _Marker.BARE_INVOKE):
            self._open_block(kind is _Marker.BLOCK, in_reasoning)
        elif kind is _Marker.STRAY_DSML:
            self._recover("stray_dsml_tag", f"dropped {raw!r} outside a tool-call block at offset {self._marker_start}")
        else:
            self._recover("stray_think_tag", f"dropped {raw!r} at offset {self._marker_start}")

    def _open_block(self, has_wrapper: bool, in_reasoning: bool) -> None:
        if in_reasoning:
            self._recover("missing_think_end", f"tool calls began inside the reasoning at offset {self._marker_start}")
        if not has_wrapper:
            self._recover(
                "missing_tool_calls_wrapper", f"invoke without {TOOL_CALLS_OPEN} at offset {self._marker_start}"
            )
        self._block_has_wrapper = has_wrapper
        self._after_block = False
        self._state = _State.BLOCK

    def _close_block(self) -> None:
        self._state = _State.CONTENT
        self._after_block = True

    # ---- tool-call block

    def _skip_whitespace(self) -> str:
        """Drop leading whitespace; return the pipe-normalised rest of the buffer."""
        self._consume(len(self._buffer) - len(self._buffer.lstrip()))
        return _normalise_pipes(self._buffer)

    @staticmethod
    def _may_become(scan: str, heads: tuple[str, ...]) -> bool:
        """Whether ``scan`` is still too short to tell it from one of ``heads``."""
        return any(len(scan) < len(head) and head.startswith(scan) for head in heads)

    def _advance_block(self) -> bool:
        scan = self._skip_whitespace()
        if not scan:
            return False
        if scan.startswith(_INVOKE_HEAD):
            return self._open_invoke(scan)
        if scan.startswith(TOOL_CALLS_CLOSE):
            self._check_pipes(self._consume(len(TOOL_CALLS_CLOSE)))
            self._close_block()
            return True
        if self._may_become(scan, _BLOCK_HEADS):
            return False
        # EOS or prose: the block is over; the content state takes it from here.
        if self._block_has_wrapper:
            self._recover("unclosed_tool_calls", f"no {TOOL_CALLS_CLOSE} before offset {self._offset}")
        self._close_block()
        return True

    def _tag_end(self, scan: str) -> int | None:
        """Length of a tag whose ``>`` has arrived; None while it may still be arriving."""
        end = scan.find(">", 0, _TAG_LIMIT)
        if end == -1:
            return _TAG_LIMIT if len(scan) >= _TAG_LIMIT else None
        return end + 1

    def _open_invoke(self, scan: str) -> bool:
        match = _INVOKE_OPEN.match(scan)
        if match is None or match.end() > _TAG_LIMIT:
            tag_length = self._tag_end(scan)
            if tag_length is None:
                return False
            tag = self._consume(tag_length)
            self._recover("malformed_tool_call", f"skipped unreadable tag {tag!r} at offset {self._offset - len(tag)}")
            return True
        name = self._buffer[match.start(1) : match.end(1)]
        self._call = _OpenCall(index=self._calls_started, id=self._make_id(), name=name)
        self._calls_started += 1
        self._check_pipes(self._consume(match.end()))
        self._events.append(ToolCallStart(self._call.index, self._call.id, name))
        self._state = _State.INVOKE
        return True

    def _advance_invoke(self) -> bool:
        call = self._call
        assert call is not None
        call.pending_space += self._consume(len(self._buffer) - len(self._buffer.lstrip()))
        scan = _normalise_pipes(self._buffer)
        if not scan:
            return False
        if scan.startswith(_PARAMETER_HEAD):
            return self._open_parameter(scan)
        if scan.startswith(INVOKE_CLOSE):
            call.pending_space = ""
            self._check_pipes(self._consume(len(INVOKE_CLOSE)))
            self._finish_call()
            self._state = _State.BLOCK
            return True
        if scan.startswith((_INVOKE_HEAD, TOOL_CALLS_CLOSE, EOS)):
            call.pending_space = ""
            self._close_unclosed_invoke()
            self._state = _State.BLOCK
            return True
        if self._may_become(scan, _INVOKE_HEADS):
            return False
        # Text that belongs to no element: skip it up to the next tag (leaving the whitespace before that
        # tag, so the skipped text is the same however the output was chunked); report it when the call ends.
        next_tag = scan.find("<", 1)
        self._skip_in_call(len(self._buffer[: None if next_tag == -1 else next_tag].rstrip()))
        return True

    def _skip_in_call(self, length: int) -> None:
        call = self._call
        assert call is not None
        call.skipped += call.pending_space + self._consume(length)
        call.pending_space = ""

    def _open_parameter(self, scan: str) -> bool:
        call = self._call
        assert call is not None
        match = _PARAMETER_OPEN.match(scan)
        if match is None or match.end() > _TAG_LIMIT:
            tag_length = self._tag_end(scan)
            if tag_length is None:
                return False
            self._skip_in_call(tag_length)
            return True
        call.pending_space = ""
        name = self._buffer[match.start(1) : match.end(1)]
        is_string = None if match.group(2) is None else match.group(2) == "true"
        self._check_pipes(self._consume(match.end()))
        if is_string is None:
            call.well_formed = False
            self._recover("missing_string_attribute", f"parameter {name!r} of {call.name!r} read as a string")
        self._value_parameter = (name, is_string)
        self._value_parts = []
        self._state = _State.VALUE
        return True

    def _advance_value(self) -> bool:
        """Collect a parameter value up to its closing tag; the buffer keeps only a possible marker start,
        so values of any length cost linear time."""
        call = self._call
        assert call is not None
        scan = _normalise_pipes(self._buffer)
        close = scan.find(PARAMETER_CLOSE)
        eos = scan.find(EOS)
        if eos != -1 and (close == -1 or eos < close):
            self._consume(eos + len(EOS))
            self._drop_open_call("EOS inside a parameter value")  # the model stopped mid-value
            self._end(eos=True)
            return False
        if close == -1:
            self._value_parts.append(self._consume(_start_of_partial(scan, _VALUE_ENDS)))
            return False
        value = "".join(self._value_parts) + self._consume(close)
        self._check_pipes(self._consume(len(PARAMETER_CLOSE)))
        name, is_string = self._value_parameter
        if name in call.parameters:
            call.well_formed = False
            self._recover("duplicate_parameter", f"{call.name!r} repeats {name!r}; the last value is kept")
        call.parameters[name] = (value, is_string is not False)
        self._state = _State.INVOKE
        return True

    def _finish_call(self) -> None:
        call = self._call
        assert call is not None
        self._call = None
        if call.skipped:
            call.well_formed = False
            self._recover("malformed_tool_call", f"skipped {call.skipped!r} inside {call.name!r} ({call.id})")
        members = []
        for name, (value, is_string) in call.parameters.items():
            members.append(f"{to_json(name)}: {self._parameter_json(call, name, value, is_string)}")
        arguments = "{" + ", ".join(members) + "}"
        dsml = "".join(call.dsml).rstrip()
        self._tool_calls.append(ParsedToolCall(call.id, call.name, arguments, dsml, call.well_formed))
        self._events.append(ToolCallArguments(call.index, call.id, arguments))

    def _parameter_json(self, call: _OpenCall, name: str, value: str, is_string: bool) -> str:
        """Strings are quoted; other values go in verbatim (as the official parser does) when they are JSON."""
        if is_string:
            return to_json(value)
        try:
            json.loads(value)
        except ValueError:
            call.well_formed = False
            self._recover(
                "invalid_json_parameter",
                f'{call.name!r} parameter {name!r} has string="false" but is not JSON; kept as a string',
            )
            return to_json(value)
        return value

    # ---- the end

    def _end(self, eos: bool) -> None:
        self._ended_with_eos = eos
        if self._after_block and self._skipped_after_block:
            self._recover("text_after_tool_calls", "whitespace after the tool-call block was dropped")
        self._state = _State.DONE

    def _drop_open_call(self, why: str) -> None:
        call = self._call
        assert call is not None
        self._call = None
        self._recover("truncated", f"{why}: unfinished call {call.name!r} ({call.id}) dropped")

    def _finish(self, eos: bool) -> None:
        """The text ran out before an EOS marker; ``eos`` says whether generation stopped on EOS anyway."""
        state = self._state
        if state in (_State.REASONING, _State.CONTENT):
            # Held text was waiting to see whether a marker follows. After EOS its newlines are plain text;
            # when the output was cut off they may have begun a tool-call block, so they go too.
            if eos:
                held = self._buffer
                self._emit_text(self._consume(len(held) - len(held.lstrip("\n"))))
            partial = self._consume(len(self._buffer))
            if eos and state is _State.REASONING:
                self._recover("missing_think_end", "EOS inside the reasoning")
            if partial or not eos:
                detail = f"output ended in the {state.value}" + ("" if eos else " without EOS")
                self._recover("truncated", detail + (f"; partial marker {partial!r} dropped" if partial else ""))
        elif state is _State.BLOCK:
            if not eos:
                self._recover("truncated", f"output ended inside the {state.value}")
            elif self._block_has_wrapper:
                self._recover("unclosed_tool_calls", f"no {TOOL_CALLS_CLOSE} before EOS")
        elif state is _State.INVOKE and eos:
            self._close_unclosed_invoke()
            if self._block_has_wrapper:
                self._recover("unclosed_tool_calls", f"no {TOOL_CALLS_CLOSE} before EOS")
        else:
            self._drop_open_call(f"output ended inside a {state.value}")
        self._end(eos)

    def _close_unclosed_invoke(self) -> None:
        call = self._call
        assert call is not None
        call.well_formed = False
        self._recover("unclosed_invoke", f"{call.name!r} ({call.id}) has no {INVOKE_CLOSE}")
        self._finish_call()


def parse_completion(
    text: str,
    thinking_mode: str = "chat",
    *,
    make_tool_call_id: Callable[[], str] = new_tool_call_id,
) -> ParsedCompletion:
    """Parse a whole completion at once (same result as streaming it)."""
    parser = CompletionParser(thinking_mode, make_tool_call_id=make_tool_call_id)
    parser.feed(text)
    parser.close()
    return parser.message
