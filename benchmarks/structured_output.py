"""What grammar-constrained sampling costs per decode step at V4's vocabulary, and what fast-forward saves.

V4's tokenizer is not shipped with this repository, so a byte-level BPE of the same size (129,280 ids,
every V4 special token) is trained once on the Python standard library's sources - code and English, a
token trie shaped like a real one - and cached. For each grammar a sequence is walked to a typical point
(inside prose, inside a JSON string, between tool-call parameters) and the sampler step is timed with and
without the mask, at batch 1 and 16 (16 copies of the matcher, each computing its own mask).

    python benchmarks/structured_output.py [--steps 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as token_decoders

from dsv4.chat.grammar import completion_grammar
from dsv4.chat.tokenizer import CONTROL_TOKENS, MARKUP_TOKENS, ChatTokenizer
from dsv4.engine.constraint import GrammarConstraint, compiler_for, token_bitmask
from dsv4.engine.sampler import Sampler, SamplingState
from dsv4.engine.sampling import SamplingParams
from dsv4.tiny import cache_dir

V4_VOCAB = 129280
DSML = "｜DSML｜"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "options": {"type": "object", "properties": {"metric": {"type": "boolean"}}},
            },
            "required": ["city", "days"],
        },
    },
}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "sources": {"type": "array", "items": {"type": "string"}}},
            "required": ["answer", "sources"],
        },
    },
}
CALL = (
    f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="get_weather">\n'
    f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
    f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>\n'
    f"</{DSML}invoke>\n</{DSML}tool_calls>"
)
# (name, request, text the sequence has produced when the step is timed)
CASES = [
    ("auto, in prose", {"tools": [WEATHER]}, "</think>Let me check the forecast for you"),
    ("required, in a string value", {"tools": [WEATHER], "tool_choice": "required"}, "</think>" + CALL[:140]),
    ("json_schema, in a string", {"response_format": SCHEMA}, '</think>{"answer": "The capital of France is'),
    ("json_schema, between keys", {"response_format": SCHEMA}, '</think>{"answer": "Paris"'),
]


def _corpus() -> Iterator[str]:
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            yield path.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def v4_sized_tokenizer() -> ChatTokenizer:
    """A byte-level BPE of V4's size with every V4 special token, trained once and cached."""
    path = cache_dir() / f"bench-bpe-{V4_VOCAB}.json"
    if not path.is_file():
        start = time.perf_counter()
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = token_decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=V4_VOCAB - len(MARKUP_TOKENS),
            min_frequency=1,
            special_tokens=list(CONTROL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(_corpus(), trainer)
        tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in MARKUP_TOKENS])
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(path))
        print(f"trained a {tokenizer.get_vocab_size()}-id BPE in {time.perf_counter() - start:.0f} s -> {path}")
    return ChatTokenizer(Tokenizer.from_file(str(path)))


def _walk(tokenizer: ChatTokenizer, grammar: str, text: str) -> GrammarConstraint:
    constraint = compiler_for(tokenizer, V4_VOCAB).constraint(grammar)
    for token in tokenizer.encode(text):
        if not constraint.advance(token):
            raise RuntimeError(f"the grammar refuses {text!r}: {constraint.error}")
    return constraint


def _time(fn: object, steps: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()  # type: ignore[operator]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mask_overhead(tokenizer: ChatTokenizer, steps: int) -> None:
    print(f"\nper decode step, vocabulary {V4_VOCAB:,} (median of {steps}; sampler = temperature 1 draw):")
    print(f"{'grammar / position':34} {'batch':>5} {'mask only':>11} {'sampler':>10} {'+ mask':>10} {'overhead':>9}")
    sampler = Sampler(torch.Generator().manual_seed(0))
    for name, request, text in CASES:
        grammar = completion_grammar(
            thinking=True,
            tools=request.get("tools", []),
            tool_choice=request.get("tool_choice", "auto"),
            forced_tool=None,
            response_format=request.get("response_format"),
            special_token_ids=tokenizer.special_token_ids,
        )
        assert grammar is not None
        for batch in (1, 16):
            constraints = [_walk(tokenizer, grammar, text) for _ in range(batch)]
            logits = torch.randn(batch, V4_VOCAB)
            free = [SamplingState(SamplingParams(), []) for _ in range(batch)]
            held = [SamplingState(SamplingParams(), [], constraint=c) for c in constraints]
            mask = _time(lambda c=constraints: token_bitmask(c, V4_VOCAB), steps)
            plain = _time(lambda s=free, x=logits: sampler(x, s), steps)
            masked = _time(lambda s=held, x=logits: sampler(x, s), steps)
            print(
                f"{name:34} {batch:>5} {mask * 1e3:>8.3f} ms {plain * 1e3:>7.2f} ms {masked * 1e3:>7.2f} ms "
                f"{(masked - plain) * 1e3:>6.2f} ms"
            )


def fast_forward(tokenizer: ChatTokenizer) -> None:
    """Steps a completion needs with and without fast-forward: the text is fed token by token, and where
    the grammar forces what follows, those tokens are taken without a step."""
    print("\nfast-forward (V4-sized tokenizer):")
    for name, request, text in [
        ("required, one call", {"tools": [WEATHER], "tool_choice": "required"}, CALL),
        ("named, one call", {"tools": [WEATHER], "tool_choice": "function", "forced_tool": "get_weather"}, CALL),
    ]:
        grammar = completion_grammar(
            thinking=False,
            tools=request["tools"],
            tool_choice=request["tool_choice"],
            forced_tool=request.get("forced_tool"),
            response_format=None,
            special_token_ids=tokenizer.special_token_ids,
        )
        assert grammar is not None
        constraint = compiler_for(tokenizer, V4_VOCAB).constraint(grammar)
        target = tokenizer.encode(text) + [tokenizer.eos_token_id]
        done, sampled, forced = [], 0, 0
        while len(done) < len(target):
            token = target[len(done)]
            if not constraint.advance(token):
                raise RuntimeError(f"the grammar refuses {tokenizer.decode(done + [token])!r}")
            done.append(token)
            sampled += 1
            for token in constraint.forced_tokens() or ([constraint.eos_token_id] if constraint.finished else []):
                if len(done) < len(target) and token == target[len(done)] and constraint.advance(token):
                    done.append(token)
                    forced += 1
                else:
                    break
        saved = f"{forced / len(done):.0%} of the steps saved"
        print(f"  {name:22} {len(done)} tokens: {sampled} sampled steps, {forced} forced ({saved})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = v4_sized_tokenizer()
    start = time.perf_counter()
    compiler_for(tokenizer, V4_VOCAB)
    built = time.perf_counter() - start
    print(f"tokenizer: {tokenizer.vocab_size:,} ids; llguidance token trie built in {built:.2f} s")
    mask_overhead(tokenizer, args.steps)
    fast_forward(tokenizer)


if __name__ == "__main__":
    main()
