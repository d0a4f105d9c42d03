"""The streaming completion parser: official results on well-formed output, chunking invariance, the
model's known slips, and byte-stable re-rendering through the sampled tool-call map."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dsv4.chat.encoding import (
    ASSISTANT,
    EOS,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    encode_messages,
    render_assistant_completion,
    same_json,
)
from dsv4.chat.parser import (
    CompletionParser,
    ContentDelta,
    ParsedCompletion,
    ParserEvent,
    ReasoningDelta,
    Recovery,
    ToolCallArguments,
    ToolCallStart,
    parse_completion,
)

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# ---- helpers


def counting_ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def parse(text: str, mode: str = "chat") -> ParsedCompletion:
    return parse_completion(text, mode, make_tool_call_id=counting_ids())


def stream(chunks: Iterable[str], mode: str = "chat") -> tuple[list[ParserEvent], ParsedCompletion]:
    parser = CompletionParser(mode, make_tool_call_id=counting_ids())
    events: list[ParserEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    return events, parser.message


def coalesce(events: list[ParserEvent]) -> list[ParserEvent]:
    """Merge adjacent deltas of one kind: chunking may only change how text is cut into deltas."""
    merged: list[ParserEvent] = []
    for event in events:
        if isinstance(event, ReasoningDelta | ContentDelta) and merged and type(merged[-1]) is type(event):
            merged[-1] = type(event)(merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


def random_chunks(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    chunks, position = [], 0
    while position < len(text):
        size = rng.choice([1, 1, 2, 3, 5, 8, 13, 40])
        chunks.append(text[position : position + size])
        position += size
    return chunks


def kinds(parsed: ParsedCompletion) -> list[str]:
    return [recovery.kind for recovery in parsed.recoveries]


def call(call_id: str, name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def assert_same_message(parsed: ParsedCompletion, message: dict[str, Any], with_reasoning: bool) -> None:
    assert parsed.content == (message.get("content") or "")
    assert parsed.reasoning_content == ((message.get("reasoning_content") or "") if with_reasoning else "")
    expected_calls = message.get("tool_calls") or []
    assert [c.name for c in parsed.tool_calls] == [c["function"]["name"] for c in expected_calls]
    for got, expected in zip(parsed.tool_calls, expected_calls, strict=True):
        assert same_json(json.loads(got.arguments), json.loads(expected["function"]["arguments"]))


# ---- strategies: text free of markers, with markup-like near misses mixed in

MARKER_FREE_FRAGMENTS = [
    "a",
    "Z",
    " ",
    "\n",
    "\n\n",
    "\t",
    "é",
    "中文",
    "😀",
    '"',
    "\\",
    "{",
    "}",
    "[1, 2]",
    "<",
    ">",
    "|",
    "｜",
    "</",
    "<b>x</b>",
    "<tool_result>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<thinking>",
    "think>",
    "DSML",
    "｜DSML｜",
    "<｜DSML",
    "tool_calls>",
    "invoke name=",
    "parameter",
    'string="true"',
    "<｜end",
]
FORBIDDEN = ["<｜DSML｜", "</｜DSML｜", "<think>", "</think>", EOS]


def marker_free(text: str) -> bool:
    normalised = text.replace("|", "｜")
    return not any(marker in normalised for marker in FORBIDDEN) and not text.startswith(tuple(TASK_TOKENS.values()))


plain_text = st.lists(st.sampled_from(MARKER_FREE_FRAGMENTS) | st.text(max_size=3), max_size=12).map("".join)
safe_text = plain_text.filter(marker_free)
# Inside a parameter value only its closing tag (and EOS, which ends generation) would end the value.
VALUE_FRAGMENTS = [
    "<think>",
    "</think>",
    '<｜DSML｜invoke name="x">',
    "<|DSML|tool_calls>",
    "</｜DSML｜invoke>",
    '<｜DSML｜parameter name="p" string="true">',
    "<｜action｜>",
]
argument_text = (
    st.lists(st.sampled_from(MARKER_FREE_FRAGMENTS + VALUE_FRAGMENTS) | st.text(max_size=3), max_size=12)
    .map("".join)
    .filter(lambda text: "/｜DSML｜parameter" not in text.replace("|", "｜") and EOS not in text)
)
identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | argument_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(argument_text, inner, max_size=3),
    max_leaves=8,
)
arguments = st.dictionaries(identifiers, json_values, max_size=4)
tool_call_lists = st.lists(st.tuples(identifiers, arguments), max_size=3)


@st.composite
def assistant_messages(draw: st.DrawFn) -> dict[str, Any]:
    calls = [call(f"id_{n}", name, args) for n, (name, args) in enumerate(draw(tool_call_lists))]
    message: dict[str, Any] = {"role": "assistant", "content": draw(safe_text)}
    message["reasoning_content"] = draw(safe_text)
    if calls:
        message["tool_calls"] = calls
    return message


# ---- well-formed output


def test_plain_answers_in_both_modes() -> None:
    thinking = parse("Let me see.</think>Paris." + EOS, "thinking")
    assert (thinking.reasoning_content, thinking.content, thinking.tool_calls) == ("Let me see.", "Paris.", [])
    assert thinking.finish_reason == "stop" and thinking.recoveries == []
    chat = parse("Paris." + EOS, "chat")
    assert (chat.reasoning_content, chat.content) == ("", "Paris.")


def test_official_shape_and_arguments_format() -> None:
    completion = (
        "Checking.</think>\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="location" string="true">Beijing</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="opts" string="false">{"a":[1,2]}</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="noop">\n\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls>" + EOS
    )
    message = parse(completion, "thinking").to_openai()
    assert message == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Checking.",
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"location": "Beijing", "days": 3, "opts": {"a":[1,2]}}',
                },
            },
            {"id": "call_1", "type": "function", "function": {"name": "noop", "arguments": "{}"}},
        ],
    }


def test_events_come_as_soon_as_they_are_certain() -> None:
    parser = CompletionParser("thinking", make_tool_call_id=counting_ids())
    assert parser.feed("Hmm") == [ReasoningDelta("Hmm")]
    assert parser.feed("</thi") == []
    assert parser.feed("nk>Sure\n") == [ContentDelta("Sure")]
    assert parser.feed("\n<｜DSML｜tool_") == []  # could still be a tool-call block: held back
    assert parser.feed('calls>\n<｜DSML｜invoke name="f') == []
    assert parser.feed('">\n') == [ToolCallStart(0, "call_0", "f")]
    assert parser.feed('<｜DSML｜parameter name="x" string="true">1</｜DSML｜parameter>\n') == []
    assert parser.feed("</｜DSML｜invoke>") == [ToolCallArguments(0, "call_0", '{"x": "1"}')]
    assert parser.feed("\n</｜DSML｜tool_calls>" + EOS) == []
    assert parser.close() == []
    assert parser.message.finish_reason == "tool_calls"
    assert parser.message.content == "Sure"


def test_near_miss_markup_is_released_as_content() -> None:
    parser = CompletionParser("chat")
    assert parser.feed("a\n\n<｜DS") == [ContentDelta("a")]
    assert parser.feed("X") == [ContentDelta("\n\n<｜DSX")]
    assert parser.feed("<thin") == []
    assert parser.feed("g>") == [ContentDelta("<thing>")]


def test_prompt_tail_tokens_are_skipped() -> None:
    assert parse("<think>r</think>c" + EOS, "thinking").reasoning_content == "r"
    assert parse("</think>c" + EOS, "thinking").content == "c"
    assert parse("</think>c" + EOS, "chat").content == "c"
    for token in TASK_TOKENS.values():
        assert parse(f"</think>{token}Search{EOS}", "chat").content == "Search"
        assert parse(f"<think>{token}Search{EOS}", "thinking").to_openai()["content"] == "Search"
        assert parse(f"{token}Search{EOS}", "chat").recoveries == []


@PROPERTY_SETTINGS
@given(
    st.lists(assistant_messages(), min_size=1, max_size=3),
    st.sampled_from(["chat", "thinking"]),
    safe_text,
)
def test_rendered_conversations_parse_back(assistants: list[dict[str, Any]], mode: str, question: str) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "s", "tools": tools}]
    for turn, assistant in enumerate(assistants):
        if turn:
            results = [
                {"role": "tool", "tool_call_id": tool_call["id"], "content": "ok"}
                for tool_call in assistants[turn - 1].get("tool_calls", [])
            ]
            messages += results
        messages.append({"role": "user", "content": f"{question} {turn}"})
        messages.append(assistant)
    prompt = encode_messages(messages, mode)
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The assistant's bytes in the whole prompt lie between the renderings that stop before and after it.
        start = len(encode_messages(messages[:position], mode))
        end = len(encode_messages(messages[: position + 1], mode))
        assert prompt[:start].endswith(ASSISTANT + (THINK_START if mode == "thinking" else THINK_END))
        parsed = parse(prompt[start:end], mode)
        assert parsed.recoveries == []
        assert_same_message(parsed, message, with_reasoning=mode == "thinking")


@PROPERTY_SETTINGS
@given(assistant_messages(), st.sampled_from(["chat", "thinking"]), st.integers(0, 2**16))
def test_streaming_in_random_chunks_matches_whole(message: dict[str, Any], mode: str, seed: int) -> None:
    completion = render_assistant_completion(message, mode)
    whole_events, whole = stream([completion], mode)
    chunk_events, chunked = stream(random_chunks(completion, seed), mode)
    assert coalesce(chunk_events) == coalesce(whole_events)
    assert chunked == whole
    assert_same_message(whole, message, with_reasoning=mode == "thinking")


@PROPERTY_SETTINGS
@given(assistant_messages(), st.sampled_from(["chat", "thinking"]))
def test_rendering_a_parsed_completion_gives_the_sampled_bytes(message: dict[str, Any], mode: str) -> None:
    completion = render_assistant_completion(message, mode)
    parsed = parse(completion, mode)
    rerendered = render_assistant_completion(parsed.to_openai(), mode, sampled_tool_calls=parsed.sampled_tool_calls())
    assert rerendered == completion


SLIP_FRAGMENTS = [
    "x",
    " ",
    "\n",
    "\n\n",
    "é",
    "<",
    ">",
    "|",
    '"',
    "<think>",
    "</think>",
    "<｜DSML｜tool_calls>",
    "</｜DSML｜tool_calls>",
    '<｜DSML｜invoke name="f">',
    '<|DSML|invoke name="g">',
    "</｜DSML｜invoke>",
    '<｜DSML｜parameter name="a" string="true">',
    '<｜DSML｜parameter name="b" string="false">',
    '<｜DSML｜parameter name="c">',
    "</｜DSML｜parameter>",
    "</|DSML|parameter>",
    "<｜DSML｜",
    "<｜DSML｜bogus>",
    "<｜action｜>",
    EOS,
    "1",
    "{bad",
]


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(
    st.lists(st.sampled_from(SLIP_FRAGMENTS), max_size=25).map("".join),
    st.sampled_from(["chat", "thinking"]),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_any_text_streams_like_whole_and_never_leaks_markup(text: str, mode: str, seed: int, eos: bool) -> None:
    parser = CompletionParser(mode, make_tool_call_id=counting_ids())
    whole_events = parser.feed(text) + parser.close(eos=eos)
    parser_chunked = CompletionParser(mode, make_tool_call_id=counting_ids())
    chunk_events = [e for chunk in random_chunks(text, seed) for e in parser_chunked.feed(chunk)]
    chunk_events += parser_chunked.close(eos=eos)
    assert coalesce(chunk_events) == coalesce(whole_events)
    assert parser_chunked.message == parser.message
    message = parser.message
    for leaked in ("DSML", "<think>", "</think>", EOS):
        assert leaked not in message.content.replace("|", "｜")
        assert leaked not in message.reasoning_content
    for tool_call in message.tool_calls:
        json.loads(tool_call.arguments)
    assert message.recoveries == [e for e in whole_events if isinstance(e, Recovery)]


# ---- the model's known slips


def block(*invokes: str) -> str:
    return "\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜tool_calls>"


def invoke(name: str, **parameters: str) -> str:
    lines = [f'<｜DSML｜parameter name="{k}" string="true">{v}</｜DSML｜parameter>' for k, v in parameters.items()]
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(lines) + "\n</｜DSML｜invoke>"


def test_missing_think_end_before_tool_calls() -> None:
    parsed = parse("I should search." + block(invoke("search", q="x")) + EOS, "thinking")
    assert parsed.reasoning_content == "I should search."
    assert parsed.content == ""
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("search", '{"q": "x"}')]
    assert kinds(parsed) == ["missing_think_end"]


def test_missing_tool_calls_wrapper() -> None:
    text = "Let me look.\n\n" + invoke("a", x="1") + "\n" + invoke("b", y="2") + EOS
    parsed = parse(text)
    assert parsed.content == "Let me look."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("a", '{"x": "1"}'), ("b", '{"y": "2"}')]
    assert kinds(parsed) == ["missing_tool_calls_wrapper"]


def test_ascii_pipes_in_markers() -> None:
    well_formed = "Sure." + block(invoke("f", q="a|b")) + EOS
    slipped = well_formed.replace("｜DSML｜", "|DSML|")
    parsed = parse(slipped)
    reference = parse(well_formed)
    assert parsed.to_openai() == reference.to_openai()
    assert json.loads(parsed.tool_calls[0].arguments) == {"q": "a|b"}
    assert kinds(parsed) == ["ascii_pipe"]
    # a slipped call is re-rendered canonically rather than reproduced
    assert parsed.sampled_tool_calls() == {} and reference.sampled_tool_calls() != {}
    mixed = parse(well_formed.replace('<｜DSML｜invoke name="f">', '<｜DSML|invoke name="f">'))
    assert mixed.to_openai() == reference.to_openai() and kinds(mixed) == ["ascii_pipe"]


def test_string_false_value_that_is_not_json() -> None:
    text = (
        block(
            '<｜DSML｜invoke name="f">\n'
            '<｜DSML｜parameter name="n" string="false">not json</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="m" string="false">[1, 2]</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>"
        )
        + EOS
    )
    parsed = parse(text)
    assert json.loads(parsed.tool_calls[0].arguments) == {"n": "not json", "m": [1, 2]}
    assert kinds(parsed) == ["invalid_json_parameter"]
    assert "'n'" in parsed.recoveries[0].detail


def test_truncation_at_every_position_never_leaks_and_keeps_finished_calls() -> None:
    message = {
        "role": "assistant",
        "reasoning_content": "Plan.",
        "content": "Calling.",
        "tool_calls": [call("1", "f", {"a": "x\ny", "n": [1, {"k": None}]}), call("2", "g", {"b": True})],
    }
    completion = render_assistant_completion(message, "thinking")
    full = parse(completion, "thinking")
    first_call_end = completion.index("</｜DSML｜invoke>") + len("</｜DSML｜invoke>")
    for cut in range(len(completion) - len(EOS)):
        parsed = parse(completion[:cut], "thinking")
        assert full.reasoning_content.startswith(parsed.reasoning_content)
        assert full.content.startswith(parsed.content)
        assert "truncated" in kinds(parsed)
        assert parsed.finish_reason in ("length", "tool_calls")
        finished = parsed.tool_calls
        assert [(c.name, c.arguments) for c in finished] == [
            (c.name, c.arguments) for c in full.tool_calls[: len(finished)]
        ]
        if cut >= first_call_end:
            assert len(finished) >= 1


def test_truncated_call_is_reported_not_shown() -> None:
    parser = CompletionParser("chat", make_tool_call_id=counting_ids())
    events = parser.feed("Ok." + block(invoke("f", a="1"))[:-40])
    events += parser.close()
    assert ToolCallStart(0, "call_0", "f") in events
    assert parser.message.tool_calls == [] and parser.message.content == "Ok."
    truncated = [r for r in parser.message.recoveries if r.kind == "truncated"]
    assert len(truncated) == 1 and "call_0" in truncated[0].detail and "'f'" in truncated[0].detail


def test_eos_token_not_fed_as_text() -> None:
    parsed_text = parse("Done." + EOS)
    parser = CompletionParser("chat")
    parser.feed("Done.")
    parser.close(eos=True)
    assert parser.message == parsed_text
    assert parser.message.finish_reason == "stop"


def test_text_after_the_tool_call_block() -> None:
    parsed = parse("Checking." + block(invoke("f", a="1")) + "\nAll done." + EOS)
    assert parsed.content == "Checking.All done."
    assert len(parsed.tool_calls) == 1
    assert kinds(parsed) == ["text_after_tool_calls"]
    bare = parse(invoke("f", a="1") + "\n\nNow I wait." + EOS)
    assert bare.content == "Now I wait." and len(bare.tool_calls) == 1
    assert kinds(bare) == ["missing_tool_calls_wrapper", "text_after_tool_calls"]


def test_several_slips_at_once() -> None:
    text = 'Thinking...\n<|DSML|invoke name="f">\n<|DSML|parameter name="v" string="false">{oops'
    text += "</|DSML|parameter>\n</|DSML|invoke>\nThat should work." + EOS
    parsed = parse(text, "thinking")
    assert parsed.reasoning_content == "Thinking...\n"
    assert parsed.content == "That should work."
    assert json.loads(parsed.tool_calls[0].arguments) == {"v": "{oops"}
    assert kinds(parsed) == [
        "ascii_pipe",
        "missing_think_end",
        "missing_tool_calls_wrapper",
        "invalid_json_parameter",
        "text_after_tool_calls",
    ]


def test_rarer_damage_is_reported() -> None:
    unclosed = parse(
        block('<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>')
    )
    assert [c.arguments for c in unclosed.tool_calls] == ['{"a": "1"}']
    assert "unclosed_invoke" in kinds(unclosed)
    duplicate = parse(block(invoke("f", a="1").replace("</｜DSML｜invoke>", "") + invoke("x", a="2")[21:]) + EOS)
    assert "duplicate_parameter" in kinds(duplicate)
    stray = parse("a</think>b<think>c</｜DSML｜invoke>d" + EOS)
    assert stray.content == "abcd"
    assert kinds(stray) == ["stray_think_tag", "stray_think_tag", "stray_dsml_tag"]
    missing_attribute = parse(
        block('<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a">1</｜DSML｜parameter>\n</｜DSML｜invoke>') + EOS
    )
    assert missing_attribute.tool_calls[0].arguments == '{"a": "1"}'
    assert kinds(missing_attribute) == ["missing_string_attribute"]
    after_eos = CompletionParser("chat")
    after_eos.feed("x" + EOS + "junk")
    after_eos.close()
    assert after_eos.message.content == "x" and kinds(after_eos.message) == ["text_after_eos"]


def test_reasoning_cut_by_eos_stays_reasoning() -> None:
    parsed = parse("Still thinking" + EOS, "thinking")
    assert (parsed.reasoning_content, parsed.content) == ("Still thinking", "")
    assert kinds(parsed) == ["missing_think_end"]


def test_parser_misuse() -> None:
    with pytest.raises(ValueError, match="thinking_mode"):
        CompletionParser("fast")
    parser = CompletionParser()
    with pytest.raises(RuntimeError):
        _ = parser.message
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed("x")


# ---- byte stability across a client's re-serialisation


def test_resampled_arguments_keep_their_bytes_in_history() -> None:
    sampled = (
        "Let me check."
        + block(
            '<｜DSML｜invoke name="lookup">\n'
            '<｜DSML｜parameter name="z" string="false">{"b":1,"a":[1.5e3, true, null]}</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="city" string="true">Zürich</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="note" string="false">"caf\\u00e9"</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>"
        )
        + EOS
    )
    parsed = parse(sampled)
    assert parsed.recoveries == []
    sampled_map = parsed.sampled_tool_calls()
    assert render_assistant_completion(parsed.to_openai(), sampled_tool_calls=sampled_map) == sampled
    assert render_assistant_completion(parsed.to_openai()) != sampled  # canonical JSON differs

    client_copy = parsed.to_openai()
    for tool_call in client_copy["tool_calls"]:
        arguments = json.loads(tool_call["function"]["arguments"])
        tool_call["function"]["arguments"] = json.dumps(arguments, sort_keys=True, separators=(",", ":"))
    history = [
        {"role": "user", "content": "Weather?"},
        client_copy,
        {"role": "tool", "tool_call_id": client_copy["tool_calls"][0]["id"], "content": "sunny"},
    ]
    prompt = encode_messages(history, "chat", sampled_tool_calls=sampled_map)
    prefix = encode_messages(history[:1], "chat")
    assert prompt.startswith(prefix + sampled)

    client_copy["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Bern"})
    changed = encode_messages(history, "chat", sampled_tool_calls=sampled_map)
    assert sampled not in changed and '"city" string="true">Bern<' in changed


def test_booleans_are_not_numbers_when_matching_samples() -> None:
    parameter = '<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>'
    parsed = parse(block(f'<｜DSML｜invoke name="f">\n{parameter}\n</｜DSML｜invoke>') + EOS)
    message = parsed.to_openai()
    message["tool_calls"][0]["function"]["arguments"] = '{"a": true}'
    rendered = render_assistant_completion(message, sampled_tool_calls=parsed.sampled_tool_calls())
    assert '"a" string="false">true<' in rendered
    message["tool_calls"][0]["function"]["arguments"] = '{"a": 1.0}'
    rendered = render_assistant_completion(message, sampled_tool_calls=parsed.sampled_tool_calls())
    assert '"a" string="false">1<' in rendered
