"""Structured output: the completion grammar (``dsv4.chat.grammar``) and its enforcement while sampling
(``dsv4.engine.constraint``).

A random model's unconstrained output is noise, so any valid output is the grammar's doing. The hundred-
request checks run the whole engine (scheduler, fast-forward chunks, sampler, detokeniser) with the
model's forward replaced by random logits - the same noise a random checkpoint gives, at no cost per
token - and every completion must parse with no recovery at all and validate against its schemas. A real
random checkpoint then checks what needs the model: constrained and unconstrained sequences sharing steps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import torch

from dsv4.chat.encoding import EOS
from dsv4.chat.grammar import GrammarError, completion_grammar
from dsv4.chat.parser import CompletionParser, ParsedCompletion
from dsv4.chat.tokenizer import build_test_tokenizer
from dsv4.engine.constraint import compiler_for
from dsv4.engine.llm import LLM, RequestOutput
from dsv4.engine.sampling import SamplingParams
from dsv4.tiny import tiny_config, write_random_checkpoint

DSML = "｜DSML｜"
PROMPT = "<｜begin▁of▁sentence｜><｜User｜>What is the weather in Paris?<｜Assistant｜>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
# nested objects, arrays, $defs and nullable values
BOOKING = {
    "type": "function",
    "function": {
        "name": "book",
        "strict": True,
        "parameters": {
            "type": "object",
            "$defs": {
                "seat": {
                    "type": "object",
                    "properties": {
                        "row": {"type": "integer", "minimum": 1, "maximum": 40},
                        "window": {"type": "boolean"},
                    },
                    "required": ["row", "window"],
                    "additionalProperties": False,
                }
            },
            "properties": {
                "guest": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 6},
                        "vip": {"type": ["boolean", "null"]},
                    },
                    "required": ["name", "vip"],
                    "additionalProperties": False,
                },
                "seats": {"type": "array", "items": {"$ref": "#/$defs/seat"}, "minItems": 1, "maxItems": 3},
                "note": {"type": "string", "maxLength": 5},
            },
            "required": ["guest", "seats", "note"],
            "additionalProperties": False,
        },
    },
}
LOOSE = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 10},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
    },
    "required": ["answer", "confidence", "tags"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}


def grammar(tokenizer: Any, **request: Any) -> str:
    options: dict[str, Any] = {"thinking": False, "tools": [], "tool_choice": "auto", "forced_tool": None}
    options["response_format"] = None
    g = completion_grammar(**{**options, **request}, special_token_ids=tokenizer.special_token_ids)
    assert g is not None
    return g


def parse(text: str, eos: bool, thinking: bool = False) -> ParsedCompletion:
    parser = CompletionParser("thinking" if thinking else "chat")
    parser.feed(text)
    parser.close(eos=eos)
    return parser.message


def schema_of(name: str) -> Mapping[str, Any]:
    return next(t["function"]["parameters"] for t in (WEATHER, BOOKING) if t["function"]["name"] == name)


# ------------------------------------------------------------------------------------------ the grammar


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_test_tokenizer()


def accepts(tokenizer: Any, g: str, text: str, eos: bool = True) -> bool:
    """Whether the grammar takes ``text`` (tokenised as the tokenizer does) and then EOS."""
    constraint = compiler_for(tokenizer, tokenizer.vocab_size).constraint(g)
    ids = tokenizer.encode(text) + ([tokenizer.eos_token_id] if eos else [])
    return all(constraint.advance(token) for token in ids)


def block(*invokes: str) -> str:
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def weather_call(city: str = "Paris", days: str = "3") -> str:
    return (
        f'<{DSML}invoke name="get_weather">\n'
        f'<{DSML}parameter name="city" string="true">{city}</{DSML}parameter>\n'
        f'<{DSML}parameter name="days" string="false">{days}</{DSML}parameter>\n'
        f"</{DSML}invoke>"
    )


def test_auto_takes_prose_or_prose_then_one_well_formed_block(tokenizer: Any) -> None:
    g = grammar(tokenizer, tools=[WEATHER], thinking=True)
    assert accepts(tokenizer, g, "let me see</think>It is sunny.")
    assert accepts(tokenizer, g, "let me see</think>Checking." + block(weather_call()))
    assert accepts(tokenizer, g, "</think>" + block(weather_call(), weather_call("Rome", "14")))
    # what the parser would have to repair, or would read as markup, is refused
    assert not accepts(tokenizer, g, "</think>Checking.\n<|DSML|tool_calls>")
    assert not accepts(tokenizer, g, "</think>Checking.\n\n<|DSML|tool_calls>\n" + weather_call())
    assert not accepts(tokenizer, g, "</think>Checking." + block(weather_call()) + " more")
    assert not accepts(tokenizer, g, "</think>a <think> inside")
    assert not accepts(tokenizer, g, "</think>it ends in a marker's start <")
    assert not accepts(tokenizer, g, "no think end" + block(weather_call()))
    assert not accepts(tokenizer, g, "</think>" + block(weather_call(days="15")))  # maximum 14
    assert not accepts(tokenizer, g, "</think>" + block(weather_call(city="Ouagadougou")))  # maxLength 8
    assert not accepts(tokenizer, g, "</think>" + block(weather_call(days='"3"')))  # not an integer


def test_required_named_and_none(tokenizer: Any) -> None:
    required = grammar(tokenizer, tools=[WEATHER, LOOSE], tool_choice="required")
    assert accepts(tokenizer, required, block(weather_call()))
    assert not accepts(tokenizer, required, "Sure." + block(weather_call()))  # a forced call has no prose
    assert not accepts(tokenizer, required, "Sure.")
    named = grammar(tokenizer, tools=[WEATHER, LOOSE], tool_choice="function", forced_tool="ping")
    assert accepts(tokenizer, named, block(f'<{DSML}invoke name="ping">\n</{DSML}invoke>'))
    assert not accepts(tokenizer, named, block(weather_call()))
    single = grammar(tokenizer, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert not accepts(tokenizer, single, block(weather_call(), weather_call()))
    none = grammar(tokenizer, tools=[WEATHER], tool_choice="none")
    assert accepts(tokenizer, none, "No tools today.")
    assert not accepts(tokenizer, none, "No." + block(weather_call()))


def test_response_format_and_its_json(tokenizer: Any) -> None:
    g = grammar(tokenizer, response_format=RESPONSE_FORMAT)
    assert accepts(tokenizer, g, '{"answer": "yes", "confidence": 0.5, "tags": ["a"]}')
    assert not accepts(tokenizer, g, '{"answer":"yes","confidence":0.5,"tags":["a"]}')  # the encoder's separators
    assert not accepts(tokenizer, g, '{"answer": "yes", "confidence": 2, "tags": []}')
    json_object = grammar(tokenizer, response_format={"type": "json_object"})
    assert accepts(tokenizer, json_object, '{"x": [1, 2]}')
    assert not accepts(tokenizer, json_object, "[1, 2]")
    assert (
        completion_grammar(
            thinking=True, tools=[], tool_choice="auto", forced_tool=None, response_format=None, special_token_ids={}
        )
        is None
    )


# A strict tool whose parameter schema llguidance cannot enforce (a non-numeric bound), and the field a 400 names.
UNENFORCEABLE_STRICT_TOOL = (
    {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "strict": True,
                    "parameters": {"type": "object", "properties": {"x": {"type": "integer", "minimum": "low"}}},
                },
            }
        ]
    },
    "tools[0].function.parameters.properties.x",
)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"tools": [{"type": "function", "function": {"name": 'a"b'}}]}, "tools[0].function.name"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "strict": True, "parameters": {"anyOf": [{"type": "object"}]}},
                    }
                ]
            },
            "tools[0].function.parameters.anyOf",
        ),
        UNENFORCEABLE_STRICT_TOOL,
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}, "strict": True}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_unenforceable_requests_name_their_field(tokenizer: Any, request_fields: dict[str, Any], field: str) -> None:
    with pytest.raises(GrammarError) as error:
        grammar(tokenizer, **request_fields)
    assert error.value.field == field


def test_rollback_and_forced_tokens(tokenizer: Any) -> None:
    g = grammar(tokenizer, tools=[WEATHER], tool_choice="function", forced_tool="get_weather")
    constraint = compiler_for(tokenizer, tokenizer.vocab_size).constraint(g)
    forced = constraint.forced_tokens()  # a named call's head is fixed up to its first value
    assert tokenizer.decode(forced).endswith('<｜DSML｜parameter name="city" string="true">')
    assert all(constraint.advance(t) for t in forced)
    city = tokenizer.encode("Rome")
    assert all(constraint.advance(t) for t in city)
    constraint.rollback(len(city))
    assert all(constraint.advance(t) for t in tokenizer.encode("Oslo"))
    assert not constraint.advance(tokenizer.special_token_ids["<think>"])
    assert constraint.error is not None


# ------------------------------------------------------------------------------------------ the engine


class NoiseModel:
    """Stands in for the forward pass: random logits, plus ``bias`` (a model that keeps trying to write
    markup, say), so the engine's every other part runs as it would on a random checkpoint."""

    device = torch.device("cpu")

    def __init__(self, vocab_size: int, bias: torch.Tensor | None = None, seed: int = 0) -> None:
        self.vocab_size, self.bias = vocab_size, bias
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, ids: torch.Tensor, spans: Any, rows: torch.Tensor) -> SimpleNamespace:
        logits = 2.5 * torch.randn((len(rows), self.vocab_size), generator=self.generator)
        return SimpleNamespace(logits=logits if self.bias is None else logits + self.bias)


@pytest.fixture(scope="module")
def noise_engine(tiny_checkpoint: Path) -> LLM:
    llm = LLM(tiny_checkpoint, "fp32_nosim", max_num_seqs=100, max_model_len=2048, progress=False, prefix_cache=False)
    llm.runner.model = NoiseModel(llm.config.vocab_size)  # type: ignore[assignment]
    return llm


def run(llm: LLM, g: str, count: int = 100, max_tokens: int = 1500, **params: Any) -> list[RequestOutput]:
    return llm.generate(
        [PROMPT] * count, [SamplingParams(max_tokens=max_tokens, seed=i, grammar=g, **params) for i in range(count)]
    )


def check_calls(outputs: list[RequestOutput], names: set[str], require_call: bool = True) -> list[ParsedCompletion]:
    messages = []
    for output in outputs:
        assert output.finish_reason == "stop" and output.token_ids[-1] == 1, output.text
        message = parse(output.text, eos=True)
        assert message.recoveries == [], (message.recoveries, output.text)
        assert bool(message.tool_calls) or not require_call, output.text
        for call in message.tool_calls:
            assert call.name in names
            if call.name in ("get_weather", "book"):
                jsonschema.validate(json.loads(call.arguments), schema_of(call.name))
        messages.append(message)
    return messages


@pytest.mark.parametrize(
    ("tools", "choice", "forced", "parallel"),
    [
        ([WEATHER, LOOSE], "required", None, True),
        ([WEATHER, BOOKING], "function", "get_weather", True),
        ([BOOKING, LOOSE], "required", None, False),
    ],
    ids=["required", "named", "strict-nested"],
)
def test_hundred_tool_calls_parse_and_validate(
    noise_engine: LLM, tools: list[dict[str, Any]], choice: str, forced: str | None, parallel: bool
) -> None:
    g = grammar(
        noise_engine.tokenizer, tools=tools, tool_choice=choice, forced_tool=forced, parallel_tool_calls=parallel
    )
    outputs = run(noise_engine, g)
    messages = check_calls(outputs, {forced} if forced else {t["function"]["name"] for t in tools})
    assert all(len(m.tool_calls) == 1 for m in messages) or parallel
    forced_tokens = sum(o.num_fast_forward_tokens for o in outputs)
    tokens = sum(len(o.token_ids) for o in outputs)
    assert forced_tokens > tokens / 2  # most of a tool call is tag text: appended, not sampled


def test_hundred_json_schema_replies_validate(noise_engine: LLM) -> None:
    outputs = run(noise_engine, grammar(noise_engine.tokenizer, response_format=RESPONSE_FORMAT))
    for message in check_calls(outputs, set(), require_call=False):
        jsonschema.validate(json.loads(message.content), ANSWER_SCHEMA)


def test_auto_never_yields_a_malformed_block(tiny_checkpoint: Path) -> None:
    """A model that keeps trying to write markup - DSML tags, think tags, ASCII pipes, newlines: with
    tool_choice auto every reply is prose or prose plus a well-formed block."""
    tokenizer = build_test_tokenizer()
    favoured = [tokenizer.special_token_ids[t] for t in ("｜DSML｜", "<think>", "</think>")]
    favoured += [i for i, b in enumerate(tokenizer.token_bytes) if b and set(b) <= set(b"<|\n")]
    bias = torch.zeros(tokenizer.vocab_size)
    bias[favoured] = 9.0
    llm = LLM(tiny_checkpoint, "fp32_nosim", max_num_seqs=100, max_model_len=2048, progress=False, prefix_cache=False)
    llm.runner.model = NoiseModel(llm.config.vocab_size, bias, seed=1)  # type: ignore[assignment]
    outputs = run(llm, grammar(tokenizer, tools=[WEATHER, LOOSE], thinking=True), max_tokens=600)
    blocks = 0
    for output in outputs:
        message = parse(output.text, eos=output.finish_reason == "stop", thinking=True)
        assert [r for r in message.recoveries if r.kind != "truncated"] == [], output.text
        if output.finish_reason == "stop":
            assert message.recoveries == []
        blocks += bool(message.tool_calls)
        for call in message.tool_calls:
            if call.name == "get_weather":
                jsonschema.validate(json.loads(call.arguments), schema_of(call.name))
    assert blocks >= 10  # the test does reach the block


def test_streamed_deltas_add_up_to_the_final_text(noise_engine: LLM) -> None:
    g = grammar(noise_engine.tokenizer, tools=[WEATHER], tool_choice="required")
    params = SamplingParams(max_tokens=300, seed=7, grammar=g)
    streamed = list(noise_engine.stream(PROMPT, params))
    assert "".join(o.delta_text for o in streamed) == streamed[-1].text
    assert parse(streamed[-1].text, eos=True).recoveries == []


def test_min_tokens_and_logprobs_with_a_grammar(noise_engine: LLM) -> None:
    """The grammar alone decides where the output ends; logprobs turn fast-forward off (every token has one)."""
    g = grammar(noise_engine.tokenizer, tools=[WEATHER], tool_choice="required")
    outputs = run(noise_engine, g, count=4, min_tokens=350, logprobs=2)
    check_calls(outputs, {"get_weather"})
    for output in outputs:
        assert output.num_fast_forward_tokens == 0
        assert output.logprobs is not None and len(output.logprobs) == len(output.token_ids)


def test_bad_grammar_is_refused_before_queueing(noise_engine: LLM) -> None:
    with pytest.raises(ValueError, match="invalid grammar"):
        noise_engine.add_request(PROMPT, SamplingParams(grammar="start: undefined_rule"))
    assert not noise_engine.has_unfinished


# ------------------------------------------------------------------------------------------ a real model


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(n_layers=2, n_mtp_layers=0, n_heads=4, head_dim=128, n_routed_experts=4)
    return write_random_checkpoint(tmp_path_factory.mktemp("structured") / "ckpt", config, seed=5)


def test_constrained_and_free_sequences_share_steps_unchanged(small_checkpoint: Path) -> None:
    """With batch invariance, a free sequence's logits and tokens are bit-identical alone and beside
    constrained ones, and so are the constrained ones' raw logits (the mask only touches its own row)."""
    llm = LLM(small_checkpoint, "fp32_nosim", batch_invariant=True, progress=False, prefix_cache=False)
    g = grammar(llm.tokenizer, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    free = SamplingParams(max_tokens=24, seed=3)
    constrained = [SamplingParams(max_tokens=300, seed=s, grammar=g) for s in (1, 2)]

    def outputs(params: list[SamplingParams]) -> dict[int, RequestOutput]:
        ids = [llm.add_request(PROMPT, p, capture_logits=True) for p in params]
        done: dict[str, RequestOutput] = {}
        while llm.has_unfinished:
            done.update({o.request_id: o for o in llm.step() if o.finished})
        return {i: done[r] for i, r in enumerate(ids)}

    alone = [outputs([p])[0] for p in [free, *constrained]]
    together = outputs([free, *constrained])
    for i, solo in enumerate(alone):
        assert together[i].token_ids == solo.token_ids
        assert together[i].logits is not None and solo.logits is not None
        assert torch.equal(together[i].logits, solo.logits)
    for i in (1, 2):
        message = check_calls([together[i]], {"get_weather"})[0]
        assert message.tool_calls
    assert EOS not in together[1].text


def test_the_real_random_model_under_every_grammar(tiny_checkpoint: Path) -> None:
    """The same promises with the real forward pass of a random checkpoint (its output is noise, so a valid
    reply is the grammar's doing): 25 requests each for required, named, strict nested and json_schema,
    all in one engine, batched. One call per reply: a random model given parallel calls may never stop
    adding them."""
    llm = LLM(tiny_checkpoint, "fp32_nosim", max_num_seqs=100, max_model_len=2048, progress=False)
    tok = llm.tokenizer
    one = {"tool_choice": "required", "parallel_tool_calls": False}
    cases = [
        (grammar(tok, tools=[WEATHER, LOOSE], **one), {"get_weather", "ping"}),
        (grammar(tok, tools=[WEATHER, BOOKING], tool_choice="function", forced_tool="get_weather"), {"get_weather"}),
        (grammar(tok, tools=[BOOKING, LOOSE], **one), {"book", "ping"}),
        (grammar(tok, response_format=RESPONSE_FORMAT), set()),
    ]
    params = [SamplingParams(max_tokens=1500, seed=i, grammar=g) for g, _ in cases for i in range(25)]
    outputs = llm.generate([PROMPT] * len(params), params)
    for (_, names), group in zip(cases, [outputs[i : i + 25] for i in range(0, 100, 25)], strict=True):
        messages = check_calls(group, names, require_call=bool(names))
        if not names:
            for message in messages:
                jsonschema.validate(json.loads(message.content), ANSWER_SCHEMA)
