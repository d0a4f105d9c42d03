"""The synthetic agent corpus and the small model's tokenizer (issue #14): deterministic, valid V4 that the
inference side parses back, held-out splits disjoint from training, haystacks of the requested length with
their needles at the requested depths, a tokenizer that round-trips and keeps the V4 tokens whole, and a loss
mask on exactly the assistant turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.chat.encoding import (
    DSML,
    EOS,
    THINK_START,
    completion_mode_for_prompt,
    encode_messages,
    render_assistant_completion,
    same_json,
)
from dsv4.chat.parser import parse_completion
from dsv4.chat.tokenizer import V4_TOKENS, ChatTokenizer, load_tokenizer
from dsv4.cli import main
from dsv4.train.corpus import (
    Corpus,
    CorpusConfig,
    Sample,
    encode_sample,
    read_corpus,
    read_manifest,
    write_corpus,
)
from dsv4.train.rng import Rng
from dsv4.train.tasks import LONG_TASKS, TASKS
from dsv4.train.tokenizer import VOCAB_SIZE, tokenizer_report, train_tokenizer
from dsv4.train.words import split_of


def mixed(split: str = "train", seed: int = 0, count: int = 60) -> list[Sample]:
    return list(Corpus(CorpusConfig(seed=seed, split=split)).samples(0, count))


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return train_tokenizer(sample.text for sample in Corpus(CorpusConfig(seed=100)).samples(0, 150))


def test_rng_is_fixed_by_its_seed() -> None:
    # SplitMix64's published first outputs for seed 0: the stream is the algorithm's, not the platform's.
    rng = Rng(0)
    assert [rng.next64() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    rng = Rng(7)
    draws = [rng.below(10) for _ in range(2000)]
    assert set(draws) == set(range(10))
    assert all(0 <= Rng(seed).fraction() < 1 for seed in range(100))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    config = CorpusConfig(seed=5)
    first = write_corpus(tmp_path / "a", config, 25, progress=False)
    write_corpus(tmp_path / "b", config, 25, progress=False)
    other = write_corpus(tmp_path / "c", CorpusConfig(seed=6), 25, progress=False)
    names = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert names == ["manifest.json", "train-00000.jsonl"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["shards"][0]["sha256"] != other["shards"][0]["sha256"]
    # Random access: a sample does not depend on which others were generated before it; the manifest's
    # configuration regenerates the written samples.
    written = [sample.to_json() for sample in read_corpus(tmp_path / "a")]
    assert Corpus(config)[17].to_json() == written[17]
    regenerated = Corpus(CorpusConfig.from_dict(read_manifest(tmp_path / "a")["config"]))
    assert [sample.to_json() for sample in regenerated.samples(0, 25)] == written


def test_every_task_and_both_modes_occur() -> None:
    samples = mixed(count=120)
    assert {sample.tasks[0] for sample in samples} == set(TASKS)
    assert {sample.thinking_mode for sample in samples} == {"chat", "thinking"}
    assert any(len(sample.tasks) > 1 for sample in samples)
    calls = [target for sample in samples for target in sample.targets if "tool_calls" in target]
    assert any(len(target["tool_calls"]) == 2 for target in calls)  # parallel calls
    assert any(
        isinstance(value, int)
        for target in calls
        for call in target["tool_calls"]
        for value in call["arguments"].values()
    )


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_samples_are_v4_and_parse_back_to_their_targets(split: str) -> None:
    for sample in mixed(split, count=80):
        assert sample.text == encode_messages(sample.messages, sample.thinking_mode)
        assert len(sample.spans) == len(sample.targets) > 0
        for turn, target in enumerate(sample.targets):
            mode = completion_mode_for_prompt(sample.prompt(turn))
            parsed = parse_completion(sample.completion(turn), mode)
            assert parsed.recoveries == [], (sample.id, turn)
            assert parsed.ended_with_eos
            if sample.thinking_mode == "thinking" and mode == "thinking":
                assert parsed.reasoning_content
            if "tool_calls" in target:
                assert [call.name for call in parsed.tool_calls] == [call["name"] for call in target["tool_calls"]]
                for got, expected in zip(parsed.tool_calls, target["tool_calls"], strict=True):
                    assert same_json(json.loads(got.arguments), expected["arguments"])
            else:
                assert parsed.tool_calls == []
                assert all(answer in parsed.content for answer in target["answer"]), (sample.id, turn)


def test_thinking_is_dropped_from_earlier_turns_without_tools() -> None:
    recalls = [s for s in mixed(count=200) if s.tasks == ["recall"] and s.thinking_mode == "thinking"]
    multi_turn = [s for s in recalls if len(s.spans) > 1]
    assert multi_turn
    for sample in multi_turn:
        assert "tools" not in sample.messages[0]
        prompts = [sample.prompt(turn) for turn in range(len(sample.spans))]
        assert [prompt.endswith(THINK_START) for prompt in prompts] == [False] * (len(prompts) - 1) + [True]


def _pair(key: str) -> tuple[str, str]:
    """The word pair of an identifier: ``adj-noun[-NN]`` or ``First Last``."""
    parts = key.split(" ") if " " in key else key.split("-")[:2]
    return parts[0], parts[1]


def test_heldout_is_disjoint_from_training() -> None:
    train, heldout = mixed("train", count=150), mixed("heldout", count=150)
    train_keys = {key for sample in train for key in sample.keys}
    heldout_keys = {key for sample in heldout for key in sample.keys}
    assert len(heldout_keys) > 150
    assert {split_of(_pair(key)) for key in train_keys} == {"train"}
    assert {split_of(_pair(key)) for key in heldout_keys} == {"heldout"}
    train_text = "\n".join(sample.text for sample in train)
    assert not [key for key in heldout_keys if key in train_text]
    assert not {sample.text for sample in train} & {sample.text for sample in heldout}


@pytest.mark.parametrize("length", [1536, 6144])
def test_haystack_length_and_needle_depths(tokenizer: ChatTokenizer, length: int) -> None:
    depths = (0.0, 0.3, 0.7, 1.0)
    config = CorpusConfig(seed=2, split="heldout", tasks=LONG_TASKS, haystack_tokens=(length, length), depths=depths)
    samples = list(Corpus(config, tokenizer).samples(0, 6))
    assert {sample.tasks[0] for sample in samples} == set(LONG_TASKS)
    for sample in samples:
        total = len(tokenizer.encode(sample.text))
        assert length - 64 < total <= length, (sample.id, total)
        start, end = sample.haystack
        haystack = sample.text[start:end]
        lines = haystack.split("\n")
        needle_lines = {needle["line"] for needle in sample.needles}
        filler_tokens = sum(len(tokenizer.encode(line + "\n")) for i, line in enumerate(lines) if i not in needle_lines)
        longest = max(len(tokenizer.encode(line + "\n")) for line in lines)
        assert sorted(needle["depth"] for needle in sample.needles) == list(depths)
        for needle in sample.needles:
            line = lines[needle["line"]]
            assert sample.text.startswith(line, needle["offset"])
            assert needle["key"] in line and needle["value"] in line
            assert haystack.count(needle["key"]) == 1  # one answer per question
            before = sum(len(tokenizer.encode(lines[i] + "\n")) for i in range(needle["line"]) if i not in needle_lines)
            assert abs(before / filler_tokens - needle["depth"]) <= longest / filler_tokens
        asked = [t for turn, t in enumerate(sample.targets) if sample.spans[turn][0] > end]
        assert {str(value) for t in asked for value in t.get("answer", [])} | {
            str(call["arguments"].get("code", call["arguments"].get("badge")))
            for t in asked
            for call in t.get("tool_calls", [])
        } >= {needle["value"] for needle in sample.needles}


def test_a_haystack_too_short_for_its_conversation_is_refused() -> None:
    config = CorpusConfig(tasks=("haystack",), haystack_tokens=(64, 64))
    with pytest.raises(ValueError, match="without filler"):
        Corpus(config)[0]


def test_tokenizer_layout_round_trip_and_atomic_special_tokens(tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    assert tokenizer.vocab_size <= VOCAB_SIZE
    assert [tokenizer.encode(token) for token in V4_TOKENS] == [[token_id] for token_id in range(len(V4_TOKENS))]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.tokenizer.to_str() == tokenizer.tokenizer.to_str()
    assert loaded.special_token_ids == {token: token_id for token_id, token in enumerate(V4_TOKENS)}
    samples = mixed("heldout", count=60)
    assert tokenizer_report(loaded, (sample.text for sample in samples))["round_trip_failures"] == 0
    for sample in samples:
        ids = loaded.encode(sample.text)
        for token_id, token in enumerate(V4_TOKENS):
            assert ids.count(token_id) == sample.text.count(token)
    assert tokenizer.encode("48213") == [tokenizer.tokenizer.token_to_id(digit) for digit in "48213"]
    # Markers stand apart from what they enclose: a value tokenises the same wherever it is written.
    for value in ("frosty-iris-42", "Maria Okafor", "96035"):
        line = f'<{DSML}parameter name="key" string="true">{value}</{DSML}parameter>'
        pieces = [tokenizer.decode([token_id]) for token_id in tokenizer.encode(line)]
        start = pieces.index('">') + 1
        assert "".join(pieces[start : start + len(tokenizer.encode(value))]) == value


def test_tokenizer_training_is_deterministic() -> None:
    texts = [sample.text for sample in mixed(count=40)]
    assert train_tokenizer(texts, 600).tokenizer.to_str() == train_tokenizer(texts, 600).tokenizer.to_str()
    with pytest.raises(ValueError, match="at least"):
        train_tokenizer(texts, 100)


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer: ChatTokenizer) -> None:
    for sample in mixed(count=60):
        ids, mask = encode_sample(tokenizer, sample)
        assert ids == tokenizer.encode(sample.text)
        runs: list[list[int]] = []
        for position, (token_id, learned) in enumerate(zip(ids, mask, strict=True)):
            if learned and (position == 0 or not mask[position - 1]):
                runs.append([])
            if learned:
                runs[-1].append(token_id)
        assert mask[-1] and ids[-1] == tokenizer.eos_token_id  # every conversation ends with an assistant turn
        completions = [sample.completion(turn) for turn in range(len(sample.spans))]
        assert [tokenizer.decode(run) for run in runs] == completions
        assistants = [message for message in sample.messages if message["role"] == "assistant"]
        for turn, (message, completion) in enumerate(zip(assistants, completions, strict=True)):
            mode = completion_mode_for_prompt(sample.prompt(turn))
            shown = message if mode == "thinking" else {k: v for k, v in message.items() if k != "reasoning_content"}
            assert completion == render_assistant_completion(shown, mode)
            assert completion.endswith(EOS)


def test_cli_corpus_and_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus, tokenizer_dir = tmp_path / "corpus", tmp_path / "tokenizer"
    assert main(["corpus", "--out", str(corpus), "--samples", "40", "--seed", "3", "--quiet"]) == 0
    assert "wrote 40 train samples" in capsys.readouterr().out
    assert read_manifest(corpus)["samples"] == 40
    assert main(["tokenizer", "--corpus", str(corpus), "--out", str(tokenizer_dir), "--quiet"]) == 0
    assert "round-trips byte-exactly" in capsys.readouterr().out
    heldout = tmp_path / "heldout"
    arguments = ["corpus", "--out", str(heldout), "--samples", "4", "--split", "heldout", "--tasks", "haystack"]
    assert main([*arguments, "--haystack-tokens", "3000", "--depths", "0,1", "--tokenizer", str(tokenizer_dir)]) == 0
    capsys.readouterr()
    for sample in read_corpus(heldout):
        assert len(load_tokenizer(tokenizer_dir).encode(sample.text)) <= 3000
        assert sorted(needle["depth"] for needle in sample.needles) == [0.0, 1.0]

    # bad input: a one-line error and exit status 2, no half-written output
    assert main(["corpus", "--out", str(corpus), "--samples", "3"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["corpus", "--out", str(tmp_path / "short"), "--tasks", "haystack", "--haystack-tokens", "50"]) == 2
    assert "without filler" in capsys.readouterr().err
    assert not (tmp_path / "short").exists()
    assert main(["tokenizer", "--corpus", str(heldout), "--out", str(tmp_path / "t2")]) == 2
    assert "train the tokenizer on train data" in capsys.readouterr().err
    assert main(["tokenizer", "--corpus", str(tmp_path), "--out", str(tmp_path / "t3")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    for bad in (["--samples", "0"], ["--haystack-tokens", "9:3"], ["--depths", "1.5"], ["--tasks", "poetry"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["corpus", "--out", str(tmp_path / "bad"), *bad])
        assert exit_info.value.code == 2
