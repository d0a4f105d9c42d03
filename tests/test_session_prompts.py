"""Agent sessions against a scripted engine: a history sent back tokenises to the ids the model saw.

The engine here "samples" scripted token ids - on purpose a non-canonical tokenisation of their text, which
the tokenizer would write differently - and keeps a toy prefix cache (every prompt, and every prompt +
output without its stop token), so the cached-token usage of each API can be checked exactly. Clients
re-serialise tool arguments and drop reasoning, as real ones do; the ids must still extend the earlier ones.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from dsv4.chat.encoding import EOS, THINK_END
from dsv4.chat.openai import from_openai_request
from dsv4.chat.parser import parse_completion
from dsv4.chat.tokenizer import ChatTokenizer, TooManyTokens, build_test_tokenizer
from dsv4.server.app import create_app, serve_in_thread
from dsv4.server.engine_client import EngineStats, GenerationStream, SequenceDelta, SequenceRequest
from dsv4.server.prompt_cache import PromptMemory
from dsv4.server.serving import ServerConfig, ToolCallMemory

MODEL = "dsv4-test"
DSML = "｜DSML｜"


def tool_call(city: str) -> str:
    """A tool-call block as the model samples it ("[1,2]" is not what a client's JSON writes back)."""
    return (
        f"\n\n<{DSML}tool_calls>\n"
        f'<{DSML}invoke name="get_weather">\n'
        f'<{DSML}parameter name="city" string="true">{city}</{DSML}parameter>\n'
        f'<{DSML}parameter name="days" string="false">[1,2]</{DSML}parameter>\n'
        f"</{DSML}invoke>\n"
        f"</{DSML}tool_calls>"
    )


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "array"}}},
    },
}


def byte_ids(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """``text`` one byte per token: a tokenisation the tokenizer itself never writes for ordinary words."""
    return [tokenizer.token_bytes.index(bytes([byte])) for byte in text.encode("utf-8")]


def sampled(tokenizer: ChatTokenizer, reasoning: str, rest: str) -> list[int]:
    """What the scripted model samples: its reasoning byte by byte, then ``rest`` canonically, then EOS."""
    ids = byte_ids(tokenizer, reasoning) + tokenizer.encode(rest) + [tokenizer.eos_token_id]
    text = tokenizer.decode(ids)
    assert tokenizer.encode(text) != ids  # really non-canonical
    return ids


class SessionEngine:
    """An EngineClient that answers each prompt with scripted token ids, one per event-loop turn, and keeps
    a toy prefix cache: a prompt's cached tokens are the longest cached sequence it starts with."""

    def __init__(self) -> None:
        self.tokenizer = build_test_tokenizer()
        self.max_model_len = 4096
        self.vocab_size = self.tokenizer.vocab_size
        self.replies: list[list[int]] = []
        self.prompts: list[list[int]] = []
        self.outputs: list[list[int]] = []
        self.cache: list[list[int]] = []

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def healthy(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=0, kv_used_bytes=0, kv_free_bytes=0)

    def submit(self, requests: Sequence[SequenceRequest]) -> GenerationStream:
        stream = GenerationStream([r.request_id for r in requests], lambda ids: None)
        loop = asyncio.get_running_loop()
        for index, request in enumerate(requests):
            ids = list(request.prompt_token_ids)
            self.prompts.append(ids)
            hits = [len(c) for c in self.cache if len(c) <= len(ids) and ids[: len(c)] == c]
            cached = min(max(hits, default=0), len(ids) - 1)
            self.cache.append(ids)
            loop.create_task(self._generate(stream, index, ids, cached, self.replies.pop(0)))
        return stream

    async def _generate(self, stream: GenerationStream, index: int, prompt: list[int], cached: int, reply: list[int]):
        detokenizer = self.tokenizer.incremental_detokenizer()
        for position, token in enumerate(reply):
            await asyncio.sleep(0)
            last = position + 1 == len(reply)
            eos = token == self.tokenizer.eos_token_id
            text = "" if eos else detokenizer.push(token)
            finish, stop = ("stop", token) if eos else ("length", None) if last else (None, None)
            stream.push(index, SequenceDelta([token], text, None, finish, stop, len(prompt), cached))
            if finish is not None:
                break
        self.outputs.append(reply)
        self.cache.append(prompt + (reply[:-1] if reply[-1] == self.tokenizer.eos_token_id else reply))


@pytest.fixture
def served() -> Iterator[tuple[str, SessionEngine]]:
    engine = SessionEngine()
    with serve_in_thread(create_app(engine, ServerConfig(model_names=(MODEL,)))) as url:
        yield url, engine


def extends(later: list[int], earlier: list[int]) -> bool:
    return len(later) > len(earlier) and later[: len(earlier)] == earlier


# ---------------------------------------------------------------------------------------------- OpenAI


def test_openai_tool_loop_extends_the_sampled_ids(served: tuple[str, SessionEngine]) -> None:
    url, engine = served
    tok = engine.tokenizer
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    engine.replies = [
        sampled(tok, "I should look it up.", THINK_END + tool_call("Paris")),
        sampled(tok, "Now Lyon, to compare.", THINK_END + "Let me check." + tool_call("Lyon")),
        sampled(tok, "Both sunny.", THINK_END + "Sunny in both."),
    ]
    messages: list[dict[str, object]] = [{"role": "user", "content": "Weather in Paris and Lyon?"}]

    # turn 1, streamed
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    opened = next(c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(engine.prompts[0])
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    # the client drops reasoning_content and writes the arguments back its own way ("[1, 2]")
    arguments = json.dumps({"city": "Paris", "days": [1, 2]})
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": opened.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": opened.id, "content": '{"forecast": "sunny"}'},
    ]

    # turn 2, not streamed
    reply = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])  # type: ignore[arg-type,list-item]
    (call,) = reply.choices[0].message.tool_calls or []
    turn1 = engine.prompts[0] + engine.outputs[0][:-1]
    assert extends(engine.prompts[1], turn1) and engine.prompts[1][len(turn1)] == tok.eos_token_id
    rendered = tok.decode(engine.prompts[1])
    assert "I should look it up.</think>" + tool_call("Paris") + EOS in rendered
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens == len(engine.prompts[1])
    assert reply.usage.prompt_tokens_details.cached_tokens == len(turn1)
    # the ids differ from tokenising the same text whole: that is the point
    assert tok.encode(rendered) != engine.prompts[1]

    # turn 3, streamed; this client keeps content but again drops reasoning and re-serialises
    messages += [
        {
            "role": "assistant",
            "content": reply.choices[0].message.content,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"days": [1, 2], "city": "Lyon"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    turn2 = engine.prompts[1] + engine.outputs[1][:-1]
    assert extends(engine.prompts[2], turn2) and engine.prompts[2][len(turn2)] == tok.eos_token_id
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == len(turn2)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Sunny in both."


def test_openai_n_choices_each_recorded(served: tuple[str, SessionEngine]) -> None:
    url, engine = served
    tok = engine.tokenizer
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    engine.replies = [
        sampled(tok, "First idea.", THINK_END + tool_call("Paris")),
        sampled(tok, "Second idea.", THINK_END + tool_call("Rome")),
        sampled(tok, "Done.", THINK_END + "Sunny."),
    ]
    first = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER_TOOL],
        n=2,  # type: ignore[list-item]
    )
    second = first.choices[1].message  # the client continues with the second choice
    (call,) = second.tool_calls or []
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "rain"},
    ]
    oai.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL])  # type: ignore[arg-type,list-item]
    (rome,) = [o for o in engine.outputs[:2] if "Rome" in tok.decode(o)]
    assert extends(engine.prompts[2], engine.prompts[0] + rome[:-1])


# ------------------------------------------------------------------------------------------- Anthropic


def test_anthropic_tool_loop_extends_the_sampled_ids(served: tuple[str, SessionEngine]) -> None:
    url, engine = served
    tok = engine.tokenizer
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    engine.replies = [
        sampled(tok, "Need the forecast.", THINK_END + "Checking." + tool_call("Paris")),
        sampled(tok, "It is sunny.", THINK_END + "Sunny."),
        sampled(tok, "Again.", THINK_END + "Still sunny."),
        sampled(tok, "Once more.", THINK_END + "Sunny, yes."),
    ]
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    request: dict[str, object] = {
        "model": MODEL,
        "max_tokens": 400,
        "tools": tools,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
    }
    with claude.messages.stream(**request) as stream:  # type: ignore[arg-type]
        first = stream.get_final_message()
    assert first.usage.input_tokens == len(engine.prompts[0]) and first.usage.cache_read_input_tokens == 0
    tool_use = next(block for block in first.content if block.type == "tool_use")
    # the client drops the thinking block; its tool_use input goes back as a dict (JSON "[1, 2]")
    kept = [block.model_dump(exclude_none=True) for block in first.content if block.type != "thinking"]
    request["messages"] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": kept},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}]},
    ]
    second = claude.messages.create(**request)  # type: ignore[arg-type]
    turn1 = engine.prompts[0] + engine.outputs[0][:-1]
    assert extends(engine.prompts[1], turn1) and engine.prompts[1][len(turn1)] == tok.eos_token_id
    assert "Need the forecast.</think>Checking." + tool_call("Paris") + EOS in tok.decode(engine.prompts[1])
    assert second.usage.cache_read_input_tokens == len(turn1)
    assert second.usage.input_tokens == len(engine.prompts[1]) - len(turn1)

    # the same prompt again, streamed: the raw message_delta carries the usage with the cache read
    body = {**request, "stream": True}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=30) as response:
        data = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    final = next(d for d in data if d["type"] == "message_delta")["usage"]
    assert engine.prompts[2] == engine.prompts[1]
    assert final["cache_read_input_tokens"] == len(engine.prompts[1]) - 1  # all but the token that gives logits
    assert final["input_tokens"] == 1
    # and the SDK's accumulated message takes it from there
    with claude.messages.stream(**request) as stream:  # type: ignore[arg-type]
        again = stream.get_final_message()
    assert again.usage.cache_read_input_tokens == len(engine.prompts[1]) - 1 and again.usage.input_tokens == 1


def test_count_tokens_agrees_with_the_prompt(served: tuple[str, SessionEngine]) -> None:
    url, engine = served
    tok = engine.tokenizer
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    engine.replies = [sampled(tok, "Hmm, a greeting.", THINK_END + "Hello!")]
    request = {"model": MODEL, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    message = claude.messages.create(max_tokens=100, messages=[{"role": "user", "content": "Hi"}], **request)  # type: ignore[arg-type]
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in message.content]},
        {"role": "user", "content": "Bye"},
    ]
    count = claude.messages.count_tokens(messages=history, **request)  # type: ignore[arg-type]
    text = tok.decode(engine.prompts[0])
    # without tools, thinking before the last user turn is dropped: only the shared head matches
    expected = text.removesuffix("<think>") + "</think>Hello!" + EOS + "<｜User｜>Bye<｜Assistant｜><think>"
    assert count.input_tokens == len(tok.encode(expected))


# ------------------------------------------------------------------------------------- the memories


def test_prompt_memory_longest_clean_prefix() -> None:
    tok = build_test_tokenizer()
    memory = PromptMemory(tok)
    calls: list[str] = []
    encode = tok.encode
    tok.encode = lambda text: calls.append(text) or encode(text)  # type: ignore[method-assign]
    head = "<｜User｜>hello<｜Assistant｜></think>"
    memory.remember(head, [1, 2, 3])
    memory.remember(head + "ab", [1, 2, 3, 4])
    memory.remember("<｜User｜>hel", [9])  # a prefix, but not at a cut the tokenizer makes
    assert memory.encode(head + "ab" + EOS + "x") == [1, 2, 3, 4, *encode(EOS + "x")]
    assert calls[-1] == EOS + "x"  # only the remainder is tokenised
    # "ab" + "c" would cut a word the tokenizer may merge: the shorter entry, which ends at a token, serves
    assert memory.encode(head + "abc") == [1, 2, 3, *encode("abc")]
    assert memory.encode(head) == [1, 2, 3]
    assert memory.encode("<｜User｜>hello") == encode("<｜User｜>hello")


def test_prompt_memory_is_bounded() -> None:
    tok = build_test_tokenizer()
    memory = PromptMemory(tok, max_chars=30, max_entries=3)
    for i in range(5):
        memory.remember(f"<｜User｜>{i}", [i])
    assert len(memory) == 3 and memory.longest_prefix("<｜User｜>0") is None
    memory.longest_prefix("<｜User｜>2")  # used: now the most recent
    memory.remember("<｜User｜>xyz", [7])  # 3 x 9 + 11 characters: the least recently used entry goes
    assert memory.chars == 29 and memory.longest_prefix("<｜User｜>3") is None
    assert memory.longest_prefix("<｜User｜>2") is not None
    memory.remember("y" * 31, [1])  # larger than the whole budget: not kept
    assert memory.longest_prefix("y" * 31) is None


def test_prompt_memory_records_completions_as_sampled() -> None:
    tok = build_test_tokenizer()
    memory = PromptMemory(tok)
    prompt, prompt_ids = "<｜User｜>Hi<｜Assistant｜></think>", [5, 6]
    out = byte_ids(tok, "Hey") + [tok.eos_token_id]
    memory.remember_completion(prompt, prompt_ids, out, "stop", tok.eos_token_id)
    assert memory.longest_prefix(prompt + "Hey" + EOS) == (len(prompt) + 3, [5, 6, *out[:-1]])
    # a stop string: the ids are kept whole, and the text is theirs (the stream's text lacks the match)
    memory.remember_completion(prompt, prompt_ids, byte_ids(tok, "Yo!"), "stop", "!")
    assert memory.longest_prefix(prompt + "Yo!" + EOS) == (len(prompt) + 3, [5, 6, *byte_ids(tok, "Yo!")])
    # cut off inside a character: not recorded
    memory.remember_completion(prompt, prompt_ids, byte_ids(tok, "é")[:1], "length", None)
    assert len(memory) == 2


def test_prompt_memory_keeps_sampled_spellings_across_a_restart(tmp_path: Path) -> None:
    """After a restart the whole-history entries are gone, but the model's non-canonical spellings of its
    outputs are journaled: a history sent back still tokenises to the ids the model sampled, and a
    canonical output costs the journal nothing."""
    tok = build_test_tokenizer()
    journal = tmp_path / "server" / "sampled_spellings.jsonl"
    memory = PromptMemory(tok, journal=journal)
    prompt = "<｜User｜>Hi<｜Assistant｜><think>"
    reasoning, content = "Let me look", "Here it is"
    out = byte_ids(tok, reasoning) + [tok.special_token_ids[THINK_END]] + tok.encode(content) + [tok.eos_token_id]
    memory.remember_completion(prompt, tok.encode(prompt), out, "stop", tok.eos_token_id)
    assert len(journal.read_text().splitlines()) == 1  # the reasoning only: the content is canonical

    restarted = PromptMemory(tok, journal=journal)
    history = prompt + reasoning + THINK_END + content + EOS + "<｜User｜>And then?<｜Assistant｜><think>"
    expected = [*tok.encode(prompt), *out, *tok.encode("<｜User｜>And then?<｜Assistant｜><think>")]
    assert restarted.encode(history) == expected
    assert restarted.encode(history, limit=len(expected)) == expected
    with pytest.raises(TooManyTokens):
        restarted.encode(history, limit=len(expected) - 1)
    # the same words typed inside a longer segment are not the model's segment: tokenised as usual
    assert restarted.encode("<｜User｜>" + reasoning + "!") == tok.encode("<｜User｜>" + reasoning + "!")
    journal.write_text(journal.read_text() + '{"torn": \n')  # a crash mid-write: the line is skipped
    assert PromptMemory(tok, journal=journal).encode(history) == expected


def test_prompt_memory_500kb_history_tokenises_only_the_new_turn() -> None:
    tok = build_test_tokenizer()
    memory = PromptMemory(tok)
    history = "<｜User｜>" + "some earlier tool output, line after line\n" * 12_000
    assert len(history) > 500_000
    ids = tok.encode(history)
    for i in range(50):  # other sessions' histories, sharing the same start
        memory.remember(history[: 1000 * (i + 1)] + f"<｜User｜>{i}", [i])
    memory.remember(history, ids)
    calls: list[str] = []
    encode = tok.encode
    tok.encode = lambda text: calls.append(text) or encode(text)  # type: ignore[method-assign]
    start = time.perf_counter()
    out = memory.encode(history + "<｜Assistant｜></think>")
    elapsed = time.perf_counter() - start
    assert out[: len(ids)] == ids and calls == ["<｜Assistant｜></think>"]
    assert elapsed < 1.0, elapsed  # a few ms in practice; the full tokenisation takes far longer


def test_tool_call_memory_restores_dropped_reasoning() -> None:
    memory = ToolCallMemory(reasoning_chars=40)
    completion = parse_completion("Look twice." + THINK_END + tool_call("Paris") + EOS, "thinking")
    (call,) = completion.tool_calls
    memory.remember_turn(completion)
    body = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sun"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": [WEATHER_TOOL],
    }
    chat = from_openai_request(body)
    restored = memory.restore_reasoning(chat)
    assert restored.messages[2]["reasoning_content"] == "Look twice."
    assert "reasoning_content" not in restored.messages[4] and "reasoning_content" not in chat.messages[2]
    kept = from_openai_request(
        {**body, "messages": [body["messages"][0], {**body["messages"][1], "reasoning_content": "Mine."}]}
    )
    assert memory.restore_reasoning(kept).messages[2]["reasoning_content"] == "Mine."
    # bounded by characters, oldest turn out
    memory.remember_reasoning(["a", "b"], "x" * 30)
    assert memory.recall_reasoning(["b"]) == "x" * 30 and memory.recall_reasoning([call.id]) is None
    memory.remember_reasoning(["c"], "y" * 41)  # larger than the budget: not kept
    assert memory.recall_reasoning(["c"]) is None and memory.recall_reasoning(["a"]) == "x" * 30
