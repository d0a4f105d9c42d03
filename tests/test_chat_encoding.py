"""Byte-exact V4 prompt rendering: the official vectors, every assistant turn inside them, and each feature
of the official encoder that the vectors do not exercise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dsv4.chat.encoding import (
    ASSISTANT,
    BOS,
    EOS,
    MAX_EFFORT_PREAMBLE,
    THINK_END,
    THINK_START,
    USER,
    EncodingError,
    completion_mode_for_prompt,
    encode_messages,
    render_assistant_completion,
    same_json,
)
from dsv4.chat.parser import parse_completion

CASES = sorted((Path(__file__).parent / "data" / "encoding").glob("*.json"))


def render_case(case: dict[str, Any]) -> str:
    return encode_messages(
        case["messages"],
        case["thinking_mode"],
        context=case.get("context"),
        drop_thinking=case.get("drop_thinking", True),
        reasoning_effort=case.get("reasoning_effort"),
    )


@pytest.mark.parametrize("case_path", CASES, ids=[path.stem for path in CASES])
def test_vector_renders_byte_exact(case_path: Path) -> None:
    case = json.loads(case_path.read_text("utf-8"))
    expected = case_path.with_suffix(".txt").read_bytes()
    assert render_case(case).encode("utf-8") == expected


@pytest.mark.parametrize("case_path", CASES, ids=[path.stem for path in CASES])
def test_every_assistant_turn_in_a_vector_parses_back(case_path: Path) -> None:
    case = json.loads(case_path.read_text("utf-8"))
    prompt = case_path.with_suffix(".txt").read_text("utf-8")
    assistants = [message for message in case["messages"] if message["role"] == "assistant"]
    spans, position = [], 0
    while (start := prompt.find(ASSISTANT, position)) != -1:
        end = prompt.index(EOS, start) + len(EOS)
        spans.append(prompt[start + len(ASSISTANT) : end])
        position = end
    assert len(spans) == len(assistants)
    for span, message in zip(spans, assistants, strict=True):
        parsed = parse_completion(span, case["thinking_mode"])
        assert parsed.recoveries == []
        assert parsed.content == (message.get("content") or "")
        # turns whose reasoning the encoder dropped show only "</think>"
        kept_reasoning = span.startswith(THINK_START)
        assert parsed.reasoning_content == (message.get("reasoning_content", "") if kept_reasoning else "")
        expected_calls = message.get("tool_calls") or []
        assert [call.name for call in parsed.tool_calls] == [call["function"]["name"] for call in expected_calls]
        for got, expected in zip(parsed.tool_calls, expected_calls, strict=True):
            assert same_json(json.loads(got.arguments), json.loads(expected["function"]["arguments"]))


def conversation(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    return list(messages)


SYSTEM = {"role": "system", "content": "S"}
TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]


def test_turn_formats_of_both_modes() -> None:
    messages = conversation(SYSTEM, {"role": "user", "content": "q"})
    assert encode_messages(messages, "chat") == f"{BOS}S{USER}q{ASSISTANT}{THINK_END}"
    assert encode_messages(messages, "thinking") == f"{BOS}S{USER}q{ASSISTANT}{THINK_START}"
    answered = [*messages, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    assert encode_messages(answered, "chat").endswith(f"{ASSISTANT}{THINK_END}a{EOS}")
    assert encode_messages(answered, "thinking").endswith(f"{ASSISTANT}{THINK_START}r{THINK_END}a{EOS}")
    assert encode_messages(messages, "chat", add_default_bos_token=False) == f"S{USER}q{ASSISTANT}{THINK_END}"


def test_reasoning_effort() -> None:
    messages = conversation(SYSTEM, {"role": "user", "content": "q"})
    assert encode_messages(messages, "thinking", reasoning_effort="max") == (
        BOS + MAX_EFFORT_PREAMBLE + f"S{USER}q{ASSISTANT}{THINK_START}"
    )
    assert MAX_EFFORT_PREAMBLE.startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert MAX_EFFORT_PREAMBLE.endswith("left unchecked.\n\n")
    assert encode_messages(messages, "thinking", reasoning_effort="high") == encode_messages(messages, "thinking")
    assert encode_messages(messages, "chat", reasoning_effort="max") == encode_messages(messages, "chat")


def test_drop_thinking_and_its_tool_exception() -> None:
    messages = conversation(
        SYSTEM,
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
    )
    dropped = encode_messages(messages, "thinking")
    assert f"{ASSISTANT}{THINK_END}a1{EOS}" in dropped and "r1" not in dropped
    kept = encode_messages(messages, "thinking", drop_thinking=False)
    assert f"{ASSISTANT}{THINK_START}r1{THINK_END}a1{EOS}" in kept
    with_tools = [{**SYSTEM, "tools": TOOLS}, *messages[1:]]
    assert f"{THINK_START}r1{THINK_END}a1{EOS}" in encode_messages(with_tools, "thinking")


def test_earlier_developer_turns_vanish_when_thinking_is_dropped() -> None:
    messages = conversation(
        {"role": "developer", "content": "dev"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q"},
    )
    assert "dev" not in encode_messages(messages, "thinking")
    assert f"{USER}dev" in encode_messages(messages, "chat")


def test_tool_block_and_call_rendering() -> None:
    messages = conversation(
        {**SYSTEM, "tools": TOOLS},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "c",
            "tool_calls": [
                {"id": "1", "function": {"name": "f", "arguments": '{"s": "x", "n": 1.5, "o": {"k": [true]}}'}},
                {"id": "2", "function": {"name": "g", "arguments": "not json"}},
                {"id": "3", "function": {"name": "h", "arguments": "{}"}},
            ],
        },
    )
    prompt = encode_messages(messages, "chat")
    assert prompt.startswith(f"{BOS}S\n\n## Tools\n\nYou have access to a set of tools")
    assert (
        '\n\n### Available Tool Schemas\n\n{"name": "f", "description": "d", "parameters": {"type": "object"}}\n\n'
        in prompt
    )
    assert prompt.endswith(
        "c\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="s" string="true">x</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">1.5</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="o" string="false">{"k": [true]}</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="g">\n'
        '<｜DSML｜parameter name="arguments" string="true">not json</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="h">\n\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls>" + EOS
    )


def test_tool_results_merge_into_user_turns_in_call_order() -> None:
    calls = [{"id": i, "function": {"name": "f", "arguments": "{}"}} for i in ("a", "b", "c")]
    messages = conversation(
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c", "content": "C"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "B1"}, {"type": "image"}]},
        {"role": "user", "content": "next"},
    )
    prompt = encode_messages(messages, "chat")
    assert prompt.endswith(
        f"{USER}<tool_result>A</tool_result>\n\n<tool_result>B1\n\n[Unsupported image]</tool_result>"
        f"\n\n<tool_result>C</tool_result>\n\nnext{ASSISTANT}{THINK_END}"
    )


def test_consecutive_user_turns_merge() -> None:
    messages = conversation({"role": "user", "content": "a"}, {"role": "user", "content": "b"})
    assert encode_messages(messages, "chat") == f"{BOS}{USER}a\n\nb{ASSISTANT}{THINK_END}"


def test_response_format_developer_and_latest_reminder() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
    messages = conversation(
        {**SYSTEM, "response_format": schema},
        {"role": "latest_reminder", "content": "2026-01-01"},
        {"role": "developer", "content": "find it", "tools": TOOLS, "response_format": {"type": "json_object"}},
    )
    prompt = encode_messages(messages, "thinking")
    assert prompt.startswith(
        f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        + json.dumps(schema)
        + "<｜latest_reminder｜>2026-01-01<｜User｜>find it\n\n## Tools\n\n"
    )
    assert prompt.endswith('to reply:\n{"type": "json_object"}<｜Assistant｜><think>')


@pytest.mark.parametrize(
    ("task", "mode", "tail"),
    [
        ("action", "chat", f"{ASSISTANT}{THINK_END}<｜action｜>"),
        ("action", "thinking", f"{ASSISTANT}{THINK_START}<｜action｜>"),
        ("query", "thinking", "<｜query｜>"),
        ("title", "chat", "<｜title｜>"),
    ],
)
def test_quick_instruction_tasks(task: str, mode: str, tail: str) -> None:
    messages = conversation({"role": "user", "content": "q", "task": task})
    assert encode_messages(messages, mode) == f"{BOS}{USER}q{tail}"
    answered = [*messages, {"role": "assistant", "content": "out", "reasoning_content": "ignored"}]
    assert encode_messages(answered, mode) == f"{BOS}{USER}q{tail}out{EOS}"


def test_context_renders_only_new_messages() -> None:
    history = conversation(
        {**SYSTEM, "tools": TOOLS},
        {"role": "user", "content": "q1"},
    )
    turn = {
        "role": "assistant",
        "reasoning_content": "r",
        "content": "",
        "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}],
    }
    new = [turn, {"role": "tool", "tool_call_id": "x", "content": "ok"}, {"role": "user", "content": "q2"}]
    full = encode_messages(history + new, "thinking")
    cached = encode_messages(history, "thinking")
    continuation = encode_messages(new, "thinking", context=history)
    assert not continuation.startswith(BOS)
    assert cached + continuation == full


def test_completion_helpers_agree_with_the_full_prompt() -> None:
    messages = conversation(SYSTEM, {"role": "user", "content": "q"})
    reply = {"role": "assistant", "content": "a", "reasoning_content": "r"}
    for mode in ("chat", "thinking"):
        prompt = encode_messages(messages, mode)
        assert completion_mode_for_prompt(prompt) == mode
        assert encode_messages([*messages, reply], mode) == prompt + render_assistant_completion(reply, mode)
    assert render_assistant_completion({**reply, "wo_eos": True}, "thinking") == "r</think>a"


def test_callers_messages_are_not_modified() -> None:
    messages = conversation(
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
    )
    snapshot = json.dumps(messages)
    encode_messages(messages, "thinking")
    assert json.dumps(messages) == snapshot


@pytest.mark.parametrize(
    ("messages", "options", "message"),
    [
        ([{"role": "robot", "content": "x"}], {}, "unknown role"),
        ([{"role": "user", "content": "x"}], {"thinking_mode": "fast"}, "thinking_mode"),
        ([{"role": "user", "content": "x"}], {"reasoning_effort": "low"}, "reasoning_effort"),
        ([{"role": "developer", "content": ""}], {}, "developer"),
        ([{"role": "user", "content": "x", "task": "dance"}], {}, "unknown task"),
        ([{"role": "user", "content": 3}], {}, "must be a string"),
        ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], {}, "name"),
        ([{"role": "assistant", "tool_calls": ["f"]}], {}, "function"),
        ([{"role": "system", "content": "", "tools": [{"type": "function"}]}], {}, "function"),
        (["not a message"], {}, "object"),
    ],
)
def test_invalid_input_raises_encoding_error(messages: list[Any], options: dict[str, Any], message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        encode_messages(messages, **options)
    assert issubclass(EncodingError, ValueError)
