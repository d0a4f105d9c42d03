"""Issue #10's proof: a scripted 30-turn agent conversation through the HTTP server computes only each turn's
new tokens, with the logits and tokens of a cold run - also across a server restart on the disk tier - while
two sessions run interleaved on one server.

Everything is real - the HTTP server, its prompt rendering and incremental tokenisation, the engine with its
prefix cache and session directory - except the model's choices: a random tiny model never calls a tool by
itself, so each turn's reply is scripted and fed to the engine by teacher forcing (``forced_token_ids``):
reasoning, ``</think>``, content and a DSML tool-call block, then EOS - the text V4 samples in thinking mode.
Every sixth turn is not forced: a few free greedy tokens (finish "length"), after which the agent writes a
user message. Two agents take turns (A1, B1, A2, B2, ...; 30 turns each, 60 in all): client A re-serialises tool-call
arguments (keys reversed, indented), client B drops ``reasoning_content`` from the history it sends back.
The server restarts on its session directory after turn RESTART_AFTER of each.

From a session's second turn on, ``usage.prompt_tokens_details.cached_tokens`` must be the previous turn's
prompt + output less the output's last token, which was sampled but never fed through the model (the EOS
of a forced reply, the last token of a free one), and the engine's ``computed_tokens`` must grow by the
prompt's uncached tokens plus the output's decode steps. One structural exception: client B drops the
reasoning of a free (tool-less) turn, which no tool-call id identifies, so the server cannot restore it and
that history diverges right after the previous prompt, whose end is a checkpoint; the same for a free reply
that is not plain text (a stray ``<think>``, which the parser drops from the API's text, or bytes that are
not whole UTF-8): no client can send it back as sampled.

Logits are compared with a cold engine's (no prefix cache) on a subset of turns: within fp32 rounding
(1e-4), except where the CSA indexer's top-k swapped two entries whose scores tie within rounding - the
restored history holds earlier replies as they were decoded, token by token, where the cold run computes
them as prompt - which the test verifies by recording the indexer's picks (see :class:`IndexerPicks`).

The server's tool-call memory (sampled DSML and reasoning by tool-call id) and its prompt memory's record of
the model's non-canonical spellings persist in the session directory beside the engine's checkpoints, so
after the restart a history whose client re-serialised arguments or dropped the reasoning of a tool-calling
turn, or that holds a free reply the model spelled its own way, still tokenises to the ids on disk. Free
turns run under the server's tool-call grammar (tool_choice auto); scripted ones, fed instead of sampled,
without it.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dsv4.chat.encoding import DSML, THINK_END, THINK_START, render_tool_calls
from dsv4.engine.llm import LLM, RequestOutput
from dsv4.engine.sampling import SamplingParams
from dsv4.model.indexer import Indexer
from dsv4.server.app import create_app, serve_in_thread
from dsv4.server.engine_client import EngineError, GenerationStream, LLMEngineClient, SequenceRequest
from dsv4.server.serving import ServerConfig
from dsv4.tiny import tiny_config, write_random_checkpoint

MODEL = "tiny"
NUMERICS = "fp32_nosim"  # fp32 without simulation: a restored prefix changes logits only by GEMM rounding
SESSIONS = ("A", "B")
TURNS = 30  # per session, 60 in all (each forced turn is ~100 decode steps)
FREE_EVERY = 6  # turns 6, 12, ... are free greedy replies of FREE_TOKENS tokens
FREE_TOKENS = 3
RESTART_AFTER = 19  # the server restarts after turn 19 of each session; turn 20 continues after tool results
LOGIT_TOLERANCE = 1e-4
# An indexer score margin (k-th minus (k+1)-th best, relative) within which fp32 rounding may swap two entries.
TIE = 1e-5

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read",
            "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "n": {"type": "integer"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "test",
            "description": "Run tests",
            "parameters": {"type": "object", "properties": {"k": {"type": "string"}, "v": {"type": "boolean"}}},
        },
    },
]
SYSTEM = "You are a careful coding agent. Use the tools."


# ------------------------------------------------------------------------------------------ the script


def is_free(turn: int) -> bool:
    return turn % FREE_EVERY == 0


def cold_checked(session: str, turn: int) -> bool:
    """The turns compared with a cold engine: every tenth (the first after the restart, turn 20, and the last
    among them) and one free turn per session."""
    return turn % 10 == 0 or (session, turn) in (("A", 6), ("B", 12))


def scripted_calls(session: str, turn: int) -> list[tuple[str, dict[str, Any]]]:
    """A forced turn's tool calls: one with one argument (a DSML call is ~85 tokens of the test tokenizer,
    each a decode step), with two arguments every fourth turn, and a second, parallel call every seventh."""
    args: dict[str, Any] = {"path": f"{session.lower()}{turn}.py"}
    if turn % 4 == 0:
        args["n"] = turn
    calls: list[tuple[str, dict[str, Any]]] = [("read", args)]
    if turn % 7 == 0:
        calls.append(("test", {"k": f"t{turn}", "v": turn % 2 == 0}))
    return calls


def scripted_reasoning(turn: int) -> str:
    return f"T{turn}: read it."


def scripted_reply(session: str, turn: int) -> str:
    """What the model "samples" after ``<think>`` (EOS follows as a token): reasoning, ``</think>``, content
    on every third turn, tool calls."""
    content = "" if turn % 3 else f"Step {turn}."
    calls = [
        {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for name, args in scripted_calls(session, turn)
    ]
    return scripted_reasoning(turn) + THINK_END + content + render_tool_calls(calls)


def tool_result(session: str, turn: int, position: int) -> str:
    """A tool result of a few dozen to a few hundred tokens."""
    rng = random.Random(f"{session}-{turn}-{position}")
    return "\n".join(f"{turn}.{i}: value = {rng.randrange(10**6)}" for i in range(2 + rng.randrange(15)))


def resend(session: str, message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message as the session's client sends it back in its next request."""
    sent: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    calls = message.get("tool_calls")
    if session == "A":  # keeps the reasoning, writes the arguments its own way
        sent["reasoning_content"] = message.get("reasoning_content")
        if calls:
            sent["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": reserialised(call["function"]["arguments"])}}
                for call in calls
            ]
    elif calls:  # B: drops the reasoning, keeps the arguments
        sent["tool_calls"] = calls
    return sent


def reserialised(arguments: str) -> str:
    return json.dumps(dict(reversed(json.loads(arguments).items())), indent=2)


# ------------------------------------------------------------------------------------------ indexer picks

Picks = dict[tuple[int, int], tuple[frozenset[int], float]]  # (CSA layer, position) -> (entries, relative margin)


class IndexerPicks:
    """Instrumentation of the CSA indexer: for every position a request computes, the compressed entries
    the indexer picks and the relative margin between its k-th and (k+1)-th best scores.

    Why: a restored prefix holds the previous replies as they were decoded, one token per step, where a cold
    run computes them as prompt; that changes scores by fp32 roundings only, but two entries that tie within
    one are then swapped by the top-k, and the logits from there on differ by more than rounding (seen:
    2.4e-4, from one swap at a margin of one ulp). Comparing the picks tells such a swap from a wrong cache.
    """

    def __init__(self) -> None:
        self.by_request: defaultdict[str, Picks] = defaultdict(dict)
        self._engines: list[LLM] = []
        self._layers: dict[int, int] = {}
        self._rows: list[tuple[Picks, int, int]] = []  # the (record, layer, position) of each row still to pick

    def watch(self, llm: LLM) -> LLM:
        assert llm.model is not None
        indexers = [m for m in llm.model.modules() if isinstance(m, Indexer)]
        self._layers |= {id(m): layer for layer, m in enumerate(indexers)}
        self._engines.append(llm)
        return llm

    def _request_of(self, paged: object) -> str:
        for llm in self._engines:
            assert llm.scheduler is not None
            for seq in llm.scheduler.running:
                if seq.cache is paged:
                    return seq.request_id
        raise LookupError("a cache no watched engine runs")

    def install(self, patch: pytest.MonkeyPatch) -> None:
        select, select_group, top = Indexer.select, Indexer.select_group, Indexer._top

        def recording_select(indexer: Indexer, q: torch.Tensor, weights: torch.Tensor, pos0: int, cache: Any) -> Any:
            record, layer = self.by_request[self._request_of(cache.seq)], self._layers[id(indexer)]
            self._rows = [(record, layer, pos0 + i) for i in range(len(q))]  # a chunk: its rows in order
            return select(indexer, q, weights, pos0, cache)

        def recording_select_group(indexer: Indexer, q: torch.Tensor, weights: torch.Tensor, group: Any) -> Any:
            layer = self._layers[id(indexer)]
            self._rows = [
                (self.by_request[self._request_of(cache.seq)], layer, position)
                for cache, position in zip(group.caches, group.step.positions, strict=True)
            ]
            return select_group(indexer, q, weights, group)

        def recording_top(scores: torch.Tensor, usable: torch.Tensor, k: int) -> torch.Tensor:
            chosen = top(scores, usable, k)
            rows, self._rows = self._rows[: len(chosen)], self._rows[len(chosen) :]
            margins = [math.inf] * len(chosen)
            if scores.shape[-1] > k:
                masked = scores.masked_fill(torch.arange(scores.shape[-1]) >= usable[:, None], float("-inf"))
                best = masked.topk(k + 1, dim=-1).values
                relative = (best[:, k - 1] - best[:, k]) / best[:, k - 1].abs().clamp(min=1.0)
                margins = torch.where(usable > k, relative, math.inf).tolist()
            for (record, layer, position), row, margin in zip(rows, chosen.tolist(), margins, strict=True):
                record[(layer, position)] = (frozenset(row) - {-1}, margin)
            return chosen

        patch.setattr(Indexer, "select", recording_select)
        patch.setattr(Indexer, "select_group", recording_select_group)
        patch.setattr(Indexer, "_top", staticmethod(recording_top))


@pytest.fixture(scope="module")
def picks() -> Iterator[IndexerPicks]:
    recorder = IndexerPicks()
    with pytest.MonkeyPatch.context() as patch:
        recorder.install(patch)
        yield recorder


# ------------------------------------------------------------------------------------------ the engine


@dataclass
class Record:
    """One sequence as the engine ran it."""

    request_id: str
    prompt_ids: list[int]
    forced_ids: list[int] | None
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None
    finish_reason: str | None = None
    cached: int = 0
    computed: int = 0  # the engine's computed_tokens delta from its admission to its end
    disk_hits: int = 0  # the engine's disk_hits delta over the same span
    output_bytes: bytes = b""  # what the output ids spell


class ScriptedEngineClient(LLMEngineClient):
    """The server's real engine client, except that each sequence is fed the reply scripted for its turn
    (``forced``, set before each request; None: sampled freely) and keeps its logits, and that every
    sequence's run is recorded. Turns are sent one at a time, so the engine's counters over a sequence's
    run are that sequence's alone."""

    def __init__(self, llm: LLM) -> None:
        super().__init__(llm, max_queue=4)
        self.forced: list[int] | None = None
        self.records: dict[str, Record] = {}
        self._before: dict[str, tuple[int, int]] = {}

    def _add(self, request: SequenceRequest, stream: GenerationStream, index: int) -> None:
        stats = self._llm.prefix_stats()
        self._before[request.request_id] = (stats.computed_tokens, stats.disk_hits)
        # a scripted reply replaces sampling, and with it the tool-call grammar that would constrain it
        params = request.params if self.forced is None else replace(request.params, grammar=None)
        prompt_ids = list(request.prompt_token_ids)
        self.records[request.request_id] = Record(request.request_id, prompt_ids, self.forced, params)
        try:
            self._llm.add_request(
                request.prompt_token_ids,
                params,
                request.request_id,
                forced_token_ids=self.forced,
                capture_logits=True,
            )
        except ValueError as error:
            with self._lock:
                self._streams.pop(request.request_id, None)
            stream.push(index, EngineError(str(error)))

    def _deliver(self, output: RequestOutput) -> None:
        if output.finished:
            record = self.records[output.request_id]
            stats = self._llm.prefix_stats()
            computed, disk_hits = self._before.pop(output.request_id)
            record.output_ids = list(output.token_ids)
            record.output_bytes = b"".join(self.tokenizer.token_bytes[i] for i in output.token_ids)
            record.logits = output.logits
            record.finish_reason = output.finish_reason
            record.cached = output.num_cached_tokens
            record.computed = stats.computed_tokens - computed
            record.disk_hits = stats.disk_hits - disk_hits
        super()._deliver(output)


# ------------------------------------------------------------------------------------------ the agents


@dataclass
class Turn:
    session: str
    turn: int
    server: int  # 1 before the restart, 2 after
    usage: dict[str, Any]
    message: dict[str, Any]
    finish_reason: str
    record: Record

    @property
    def free(self) -> bool:
        return is_free(self.turn)

    @property
    def cached(self) -> int:
        return self.usage["prompt_tokens_details"]["cached_tokens"]


@dataclass
class Agent:
    session: str
    messages: list[dict[str, Any]]
    turns: list[Turn] = field(default_factory=list)

    @classmethod
    def new(cls, session: str) -> Agent:
        task = f"Session {session}: find and fix the failing test in the repository."
        return cls(session, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}])

    def take_turn(self, turn: int, http: httpx.Client, engine: ScriptedEngineClient, server: int) -> None:
        """One request, as plain HTTP JSON; the reply and its tool results (after a free reply, a user
        message) join the history."""
        tokenizer = engine.tokenizer
        body: dict[str, Any] = {"model": MODEL, "messages": self.messages, "tools": TOOLS}
        if is_free(turn):
            engine.forced = None
            body |= {"temperature": 0, "max_tokens": FREE_TOKENS}
        else:
            engine.forced = [*tokenizer.encode(scripted_reply(self.session, turn)), tokenizer.eos_token_id]
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        reply = response.json()
        (choice,) = reply["choices"]
        request_id = response.headers["x-request-id"]
        (record,) = [r for key, r in engine.records.items() if key.startswith(f"{request_id}-")]
        message = choice["message"]
        self.turns.append(Turn(self.session, turn, server, reply["usage"], message, choice["finish_reason"], record))
        self.messages.append(resend(self.session, message))
        if is_free(turn):
            self.messages.append({"role": "user", "content": f"Go on with step {turn + 1}."})
            return
        for position, call in enumerate(message["tool_calls"]):
            result = tool_result(self.session, turn, position)
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})


def start_server(
    stack: ExitStack, checkpoint: Path, session_dir: Path, picks: IndexerPicks
) -> tuple[httpx.Client, ScriptedEngineClient]:
    llm = picks.watch(LLM(checkpoint, NUMERICS, max_num_seqs=2, progress=False, session_dir=session_dir))
    engine = ScriptedEngineClient(llm)
    config = ServerConfig(model_names=(MODEL,), session_dir=session_dir)
    url = stack.enter_context(serve_in_thread(create_app(engine, config)))
    http = stack.enter_context(httpx.Client(base_url=url, timeout=300))
    return http, engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # every layer kind (window, CSA, HCA) at widths that keep ~3,000 decode steps quick on a loaded CPU
    config = tiny_config(
        max_position_embeddings=65536, n_layers=3, n_mtp_layers=0, n_heads=4, head_dim=128, n_routed_experts=4
    )
    return write_random_checkpoint(tmp_path_factory.mktemp("agent") / "ckpt", config, seed=3)


@pytest.fixture(scope="module")
def agents(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, picks: IndexerPicks) -> dict[str, Agent]:
    """Sessions A and B, turn by turn (A1, B1, A2, ...), on a server with a session directory that is shut
    down after turn RESTART_AFTER of each and replaced by a fresh one (new engine, new app) on that directory."""
    session_dir = tmp_path_factory.mktemp("sessions")
    agents = {session: Agent.new(session) for session in SESSIONS}
    for server, turns in ((1, range(1, RESTART_AFTER + 1)), (2, range(RESTART_AFTER + 1, TURNS + 1))):
        with ExitStack() as stack:
            http, engine = start_server(stack, checkpoint, session_dir, picks)
            for turn in turns:
                for agent in agents.values():
                    agent.take_turn(turn, http, engine, server)
    return agents


def consecutive(agents: dict[str, Agent]) -> Iterator[tuple[Turn, Turn]]:
    """(previous turn, turn) of each session, from its second turn on."""
    for agent in agents.values():
        yield from zip(agent.turns, agent.turns[1:], strict=False)


def full_history(previous: Turn) -> int:
    """The previous prompt + output, less the output's last token (sampled, never computed)."""
    return len(previous.record.prompt_ids) + len(previous.record.output_ids) - 1


def expected_cached(previous: Turn, turn: Turn) -> int:
    if turn.session == "B" and previous.free:
        return len(previous.record.prompt_ids)  # the dropped free reasoning: see the module docstring
    if previous.free and not returned_as_sampled(previous.record.output_bytes):
        # a free reply that is not plain text - bytes that are not whole UTF-8 (cut mid-character, stray
        # bytes), or a markup token the parser drops from the API's text (a stray <think>) - cannot come back
        # from the client as sampled: the history diverges inside it, and the end of its prompt is the
        # checkpoint it restores
        return len(previous.record.prompt_ids)
    return full_history(previous)


def returned_as_sampled(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return THINK_START not in text and DSML not in text


def first_after_restart(turn: Turn) -> bool:
    return turn.turn == RESTART_AFTER + 1


# ------------------------------------------------------------------------------------------ the tests


def test_the_script_runs_as_written(agents: dict[str, Agent]) -> None:
    """The server returned the scripted replies (and the free ones) as the engine produced them."""
    for agent in agents.values():
        assert [t.turn for t in agent.turns] == list(range(1, TURNS + 1))
        for turn in agent.turns:
            record = turn.record
            assert turn.usage["prompt_tokens"] == len(record.prompt_ids)
            assert turn.usage["completion_tokens"] == len(record.output_ids)
            assert turn.cached == record.cached
            assert record.logits is not None and record.logits.shape[0] == len(record.output_ids)
            if turn.free:
                assert (turn.finish_reason, record.finish_reason) == ("length", "length")
                assert len(record.output_ids) == FREE_TOKENS
                continue
            assert record.output_ids == record.forced_ids and record.finish_reason == "stop"
            assert turn.finish_reason == "tool_calls"
            assert turn.message["reasoning_content"] == scripted_reasoning(turn.turn)
            calls = [
                (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in turn.message["tool_calls"]
            ]
            assert calls == scripted_calls(turn.session, turn.turn)


def test_each_turn_computes_only_its_new_tokens(agents: dict[str, Agent]) -> None:
    """From turn 2 on, both sessions restore their whole history (after the restart too) and compute only
    the new tokens - checked in the usage and in the engine's own counters."""
    misses = []
    for previous, turn in consecutive(agents):
        if turn.cached != expected_cached(previous, turn):
            misses.append((turn.session, turn.turn, turn.cached, expected_cached(previous, turn)))
    assert not misses, f"(session, turn, cached, expected): {misses}"
    for agent in agents.values():
        assert agent.turns[0].cached == 0
        for turn in agent.turns:
            record = turn.record
            assert record.computed == len(record.prompt_ids) - turn.cached + len(record.output_ids) - 1, turn.turn
            assert record.disk_hits == first_after_restart(turn)  # memory serves, until the restart


def test_the_restart_restores_from_disk(agents: dict[str, Agent]) -> None:
    """The first turn after the restart restores a checkpoint from the session directory (and computes only
    what it does not restore); the turns after it hit in memory again."""
    for agent in agents.values():
        first = agent.turns[RESTART_AFTER]
        assert first_after_restart(first) and first.server == 2 and agent.turns[RESTART_AFTER - 1].server == 1
        assert first.record.disk_hits == 1
        assert first.cached >= len(agent.turns[0].record.prompt_ids)  # at least the system prompt and task


def test_the_restart_restores_the_whole_history(agents: dict[str, Agent]) -> None:
    got = {s: (a.turns[RESTART_AFTER].cached, full_history(a.turns[RESTART_AFTER - 1])) for s, a in agents.items()}
    assert all(cached == want for cached, want in got.values()), f"session: (cached, previous history) {got}"


def warm_picks(agent: Agent, upto: Turn, picks: IndexerPicks) -> Picks:
    """The picks behind the cache ``upto`` ran on: the positions each turn up to it computed, a later turn's
    replacing an earlier one's (a history that diverged is recomputed from there)."""
    merged: Picks = {}
    for turn in agent.turns[: agent.turns.index(upto) + 1]:
        merged |= picks.by_request[turn.record.request_id]
    return merged


def test_logits_and_tokens_equal_a_cold_run(agents: dict[str, Agent], checkpoint: Path, picks: IndexerPicks) -> None:
    """Every fifth turn (the first after the restart among them, and the last) and a free turn per session,
    run again by an engine without a prefix cache - all at once, batched - from the ids the server gave the
    warm engine: the same tokens, and the same logits within fp32 rounding wherever the CSA indexer picked
    the same entries; where it did not, the entries it swapped must have tied within rounding."""
    turns = [t for agent in agents.values() for t in agent.turns if cold_checked(t.session, t.turn)]
    assert any(first_after_restart(t) for t in turns) and any(t.free for t in turns)
    cold = picks.watch(LLM(checkpoint, NUMERICS, max_num_seqs=len(turns), prefix_cache=False, progress=False))
    for index, turn in enumerate(turns):
        record = turn.record
        cold.add_request(
            record.prompt_ids, record.params, f"cold-{index}", forced_token_ids=record.forced_ids, capture_logits=True
        )
    outputs: dict[str, RequestOutput] = {}
    while cold.has_unfinished:
        outputs |= {o.request_id: o for o in cold.step() if o.finished}
    report = {}
    for index, turn in enumerate(turns):
        warm, out = turn.record, outputs[f"cold-{index}"]
        where = (turn.session, turn.turn)
        assert out.token_ids == warm.output_ids and out.finish_reason == warm.finish_reason, where
        assert warm.logits is not None and out.logits is not None
        diff = (warm.logits - out.logits).abs().max().item()
        mine, theirs = warm_picks(agents[turn.session], turn, picks), picks.by_request[f"cold-{index}"]
        assert theirs.keys() <= mine.keys(), where
        swaps = [(key, mine[key][1], theirs[key][1]) for key in theirs if mine[key][0] != theirs[key][0]]
        report[where] = (diff, swaps)
        # (layer, position), warm and cold relative margins: a swap is fine only where the scores tie
        assert all(min(a, b) <= TIE for _, a, b in swaps), (where, swaps)
        assert swaps or diff <= LOGIT_TOLERANCE, (where, diff, report)
