"""Structured output through ``dsv4 serve`` on a small random model: OpenAI ``tool_choice`` and
``response_format``, Anthropic ``tool_choice``, streaming equal to non-streaming for n > 1, and schemas that
cannot be enforced refused with a 400 naming their field before anything is queued."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_structured_output import UNENFORCEABLE_STRICT_TOOL

from dsv4.engine.llm import LLM
from dsv4.server.app import create_app, serve_in_thread
from dsv4.server.engine_client import LLMEngineClient
from dsv4.server.serving import ServerConfig
from dsv4.tiny import tiny_config, write_random_checkpoint

MODEL = "tiny"
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": CITY}},
]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = tiny_config(n_layers=2, n_mtp_layers=0, n_heads=4, head_dim=128, n_routed_experts=4)
    checkpoint: Path = write_random_checkpoint(tmp_path_factory.mktemp("structured") / "ckpt", config, seed=4)
    engine = LLMEngineClient(LLM(checkpoint, "fp32_nosim", max_num_seqs=8, progress=False), max_queue=8)
    with serve_in_thread(create_app(engine, ServerConfig(model_names=(MODEL,)))) as base:
        yield base


@pytest.fixture
def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def prompt_tokens(url: str) -> float:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return sum(s.value for f in families for s in f.samples if s.name == "dsv4_prompt_tokens_total")


def calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_required_tool_calls_stream_as_they_complete_for_every_choice(oai: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": MESSAGES,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "reasoning_effort": "none",
        "seed": 11,
        "n": 3,
        "max_tokens": 200,
    }
    reply = oai.chat.completions.create(**request)
    complete = {}
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = calls(choice.message)
        jsonschema.validate(call[1], CITY)
        complete[choice.index] = call
    assert len({json.dumps(call) for call in complete.values()}) > 1  # the choices are sampled, not copied

    streamed: dict[int, dict[str, str]] = {}
    for chunk in oai.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = streamed.setdefault(choice.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert {i: (e["name"], json.loads(e["arguments"])) for i, e in streamed.items()} == complete


def test_named_function_and_json_schema(oai: openai.OpenAI) -> None:
    named = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        reasoning_effort="none",
        max_tokens=200,
    )
    assert [name for name, _ in calls(named.choices[0].message)][:1] == ["get_time"]
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    formatted = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}},
        reasoning_effort="none",
        max_tokens=50,
    )
    jsonschema.validate(json.loads(formatted.choices[0].message.content or ""), schema)


def test_anthropic_tool_choice(url: str) -> None:
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=300)
    tools = [{"name": t["function"]["name"], "input_schema": CITY, "strict": True} for t in TOOLS]
    for choice, names in (
        ({"type": "any", "disable_parallel_tool_use": True}, {"get_weather", "get_time"}),
        ({"type": "tool", "name": "get_weather"}, {"get_weather"}),
    ):
        message = client.messages.create(
            model=MODEL,
            max_tokens=200,
            messages=MESSAGES,
            tools=tools,
            tool_choice=choice,  # type: ignore[arg-type]
        )
        uses = [block for block in message.content if block.type == "tool_use"]
        assert message.stop_reason == "tool_use" and uses and {u.name for u in uses} <= names
    none = client.messages.create(
        model=MODEL,
        max_tokens=8,
        messages=MESSAGES,
        tools=tools,
        tool_choice={"type": "none"},  # type: ignore[arg-type]
    )
    assert all(block.type == "text" for block in none.content) and none.stop_reason != "tool_use"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        UNENFORCEABLE_STRICT_TOOL,
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "r", "strict": True, "schema": {"type": "strin"}},
                }
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_unenforceable_schemas_are_400_before_queueing(url: str, body: dict[str, Any], param: str) -> None:
    before = prompt_tokens(url)
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert prompt_tokens(url) == before  # the engine never saw it
