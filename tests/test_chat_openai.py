"""OpenAI chat-completions bodies -> V4 prompts: byte-exact when nothing V4 lacks is asked for, clear
errors naming the field otherwise."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from dsv4.chat.encoding import ASSISTANT, BOS, MAX_EFFORT_PREAMBLE, THINK_END, THINK_START, USER
from dsv4.chat.openai import (
    REQUIRED_TOOL_INSTRUCTION,
    ChatPrompt,
    RequestError,
    forced_tool_instruction,
    from_openai_request,
)
from dsv4.chat.parser import parse_completion

VECTORS = Path(__file__).parent / "data" / "encoding"


def official_1_as_openai_request() -> dict[str, Any]:
    """The first official vector as a client would send it: tools in the body, not on the system message."""
    case = json.loads((VECTORS / "official_1.json").read_text("utf-8"))
    messages = copy.deepcopy(case["messages"])
    tools = messages[0].pop("tools")
    return {"model": "dsv4", "messages": messages, "tools": tools, "thinking": {"type": "enabled"}}


def render(body: dict[str, Any], **options: Any) -> str:
    return from_openai_request(body, **options).render()


def test_a_plain_request_is_byte_exact_with_the_official_vector() -> None:
    expected = (VECTORS / "official_1.txt").read_text("utf-8")
    body = official_1_as_openai_request()
    assert render(body) == expected
    assert render({**body, "tool_choice": "auto"}) == expected
    prompt = from_openai_request(body)
    assert (prompt.thinking_mode, prompt.tool_choice, prompt.tool_names) == (
        "thinking",
        "auto",
        ("get_weather", "search"),
    )


def test_a_parsed_reply_goes_back_into_the_next_request() -> None:
    body = official_1_as_openai_request()
    body["messages"] = body["messages"][:2]
    sampled = (
        'Use the tool.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="location" string="true">Paris</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
    )
    first_prompt = render(body)
    reply = parse_completion(sampled, "thinking")
    body["messages"] += [reply.to_openai(), {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "9C"}]
    assert render(body).startswith(first_prompt + sampled)


def test_roles_and_content_parts() -> None:
    body = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "hi", "name": "ann"},
            {"role": "assistant", "content": None, "reasoning_content": "r"},
            {"role": "latest_reminder", "content": "today"},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
        ]
    }
    assert render(body, default_thinking=False) == (
        f"{BOS}Be\n\nbrief.{USER}hi{ASSISTANT}{THINK_END}<｜end▁of▁sentence｜>"
        f"<｜latest_reminder｜>today{USER}again{ASSISTANT}{THINK_END}"
    )


def test_thinking_switches_and_reasoning_effort() -> None:
    base = {"messages": [{"role": "user", "content": "q"}]}

    def mode(**fields: Any) -> tuple[str, str | None]:
        prompt = from_openai_request({**base, **fields}, default_thinking=True)
        return prompt.thinking_mode, prompt.reasoning_effort

    assert mode() == ("thinking", None)
    assert mode(thinking={"type": "disabled"}) == ("chat", None)
    assert mode(chat_template_kwargs={"thinking": False}) == ("chat", None)
    assert mode(thinking={"type": "enabled"}, chat_template_kwargs={"thinking": True}) == ("thinking", None)
    assert mode(reasoning_effort="none") == ("chat", None)
    for effort in ("minimal", "low", "medium", "high"):
        assert mode(reasoning_effort=effort) == ("thinking", "high")
    assert mode(reasoning_effort="xhigh") == ("thinking", "max")
    assert mode(reasoning_effort="max", thinking={"type": "disabled"}) == ("chat", None)
    assert from_openai_request(base, default_thinking=False).thinking_mode == "chat"
    assert render({**base, "reasoning_effort": "max"}) == f"{BOS}{MAX_EFFORT_PREAMBLE}{USER}q{ASSISTANT}{THINK_START}"


def test_tool_choice() -> None:
    body = official_1_as_openai_request()
    body["messages"] = body["messages"][:2]
    auto = render(body)
    none = render({**body, "tool_choice": "none"})
    assert "## Tools" in auto and "## Tools" not in none
    assert none == f"{BOS}You are a helpful assistant.{USER}What's the weather in Beijing?{ASSISTANT}{THINK_START}"
    required = from_openai_request({**body, "tool_choice": "required"})
    assert required.tool_choice == "required" and required.forced_tool is None
    assert required.render() == auto.replace(
        "assistant.\n\n## Tools", f"assistant.\n\n{REQUIRED_TOOL_INSTRUCTION}\n\n## Tools"
    )
    named = from_openai_request({**body, "tool_choice": {"type": "function", "function": {"name": "search"}}})
    assert (named.tool_choice, named.forced_tool) == ("function", "search")
    assert f"assistant.\n\n{forced_tool_instruction('search')}\n\n## Tools" in named.render()


def test_tools_without_a_system_message_and_response_format() -> None:
    body = official_1_as_openai_request()
    body["messages"] = body["messages"][1:2]
    assert render(body).startswith(f"{BOS}\n\n## Tools\n\n")
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    formatted = render({"messages": body["messages"], "response_format": schema}, default_thinking=False)
    assert formatted.startswith(f"{BOS}\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema")
    assert json.dumps(schema) in formatted
    plain = render({"messages": body["messages"], "response_format": {"type": "text"}}, default_thinking=False)
    assert plain == f"{BOS}{USER}What's the weather in Beijing?{ASSISTANT}{THINK_END}"


def test_request_is_not_modified_and_prompt_is_a_value() -> None:
    body = official_1_as_openai_request()
    snapshot = json.dumps(body)
    prompt = from_openai_request(body)
    assert isinstance(prompt, ChatPrompt)
    prompt.render()
    assert json.dumps(body) == snapshot


GOOD_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{**GOOD_CALL, "function": {"arguments": "{}"}}]}]},
            "messages[0].tool_calls[0].function.name",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{**GOOD_CALL, "function": {"name": "f", "arguments": {}}}]}
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{**GOOD_CALL, "id": None}]}]},
            "messages[0].tool_calls[0].id",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{**GOOD_CALL, "type": "x"}]}]},
            "messages[0].tool_calls[0].type",
        ),
        ({"messages": [{"role": "assistant", "tool_calls": "f"}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "tool", "tool_call_id": "zz", "content": "r"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "q"}], "tools": [{"type": "retrieval"}]}, "tools[0].type"),
        (
            {
                "messages": [{"role": "user", "content": "q"}],
                "tools": [{"type": "function", "function": {"name": "f"}}] * 2,
            },
            "tools[1].function.name",
        ),
        (
            {
                "messages": [{"role": "user", "content": "q"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}],
            },
            "tools[0].function.parameters",
        ),
        ({"messages": [{"role": "user", "content": "q"}], "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "q"}], "tool_choice": "required"}, "tool_choice"),
        (
            {
                "messages": [{"role": "user", "content": "q"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice.function.name",
        ),
        ({"messages": [{"role": "user", "content": "q"}], "reasoning_effort": "extreme"}, "reasoning_effort"),
        (
            {
                "messages": [{"role": "user", "content": "q"}],
                "reasoning_effort": "none",
                "thinking": {"type": "enabled"},
            },
            "reasoning_effort",
        ),
        ({"messages": [{"role": "user", "content": "q"}], "thinking": {"type": "on"}}, "thinking.type"),
        (
            {
                "messages": [{"role": "user", "content": "q"}],
                "thinking": {"type": "enabled"},
                "chat_template_kwargs": {"thinking": False},
            },
            "chat_template_kwargs.thinking",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}], "chat_template_kwargs": {"thinking": "yes"}},
            "chat_template_kwargs.thinking",
        ),
        ({"messages": [{"role": "user", "content": "q"}], "response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"messages": [{"role": "user", "content": "q"}], "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}], "chat_template_kwargs": {"drop_thinking": 1}},
            "chat_template_kwargs.drop_thinking",
        ),
    ],
)
def test_invalid_requests_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as raised:
        from_openai_request(body)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert isinstance(raised.value, ValueError)
