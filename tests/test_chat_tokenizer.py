"""Test tokenizers with the V4 special tokens, loading from files, and incremental detokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from tokenizers import decoders as token_decoders

from dsv4.chat.encoding import BOS, EOS, encode_messages
from dsv4.chat.tokenizer import (
    CONFIG_FILE,
    RELEASE_GIL_CHARS,
    TOKENIZER_FILE,
    V4_TOKENS,
    ChatTokenizer,
    TooManyTokens,
    build_test_tokenizer,
    load_tokenizer,
)

TOKENIZER = build_test_tokenizer(1280)
TEXT_SETTINGS = settings(max_examples=150, deadline=None, database=None)


def test_layout_of_the_test_tokenizer() -> None:
    assert TOKENIZER.vocab_size == 1280 == TOKENIZER.tokenizer.get_vocab_size(with_added_tokens=True)
    assert (TOKENIZER.bos_token_id, TOKENIZER.eos_token_id) == (0, 1)
    assert set(TOKENIZER.special_token_ids) == set(V4_TOKENS)
    for token, token_id in TOKENIZER.special_token_ids.items():
        assert TOKENIZER.encode(token) == [token_id]
    assert "<｜extracted_url｜>" in TOKENIZER.special_token_ids
    assert build_test_tokenizer(300).vocab_size == 300


def test_vocab_size_bounds() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_test_tokenizer(200)
    with pytest.raises(ValueError, match="vocab_size"):
        build_test_tokenizer(10**6)


@TEXT_SETTINGS
@given(st.text())
def test_any_text_round_trips(text: str) -> None:
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text


def test_a_prompt_round_trips_with_single_id_markers() -> None:
    prompt = encode_messages([{"role": "user", "content": "Grüße 😀"}], "thinking")
    ids = TOKENIZER.encode(prompt)
    assert ids[0] == TOKENIZER.bos_token_id
    assert ids[-2:] == [TOKENIZER.special_token_ids["<｜Assistant｜>"], TOKENIZER.special_token_ids["<think>"]]
    assert TOKENIZER.decode(ids) == prompt
    assert TOKENIZER.tokenizer.decode(ids, skip_special_tokens=False) == prompt


@TEXT_SETTINGS
@given(st.text(), st.lists(st.integers(1, 4), min_size=1))
def test_incremental_deltas_concatenate_to_the_whole(text: str, group_sizes: list[int]) -> None:
    ids = TOKENIZER.encode(text + EOS)
    detokenizer = TOKENIZER.incremental_detokenizer()
    deltas, position = [], 0
    for size in group_sizes * len(ids):
        if position >= len(ids):
            break
        deltas.append(detokenizer.push(ids[position : position + size]))
        position += size
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == text + EOS
    assert all("\ufffd" not in delta for delta in deltas) or "\ufffd" in text


def test_characters_split_across_tokens_wait_for_their_last_byte() -> None:
    ids = TOKENIZER.encode("😀")
    assert len(ids) == 4  # four byte tokens, no merge covers them
    detokenizer = TOKENIZER.incremental_detokenizer()
    assert [detokenizer.push(token_id) for token_id in ids] == ["", "", "", "😀"]
    cut = TOKENIZER.incremental_detokenizer()
    assert cut.push(ids[:2]) == "" and cut.flush() == "\ufffd"


def test_ids_past_the_tokenizer_carry_no_text() -> None:
    assert TOKENIZER.decode([5000, -1]) == ""
    assert TOKENIZER.incremental_detokenizer().push(5000) == ""


def test_save_and_load(tmp_path: Path) -> None:
    TOKENIZER.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.special_token_ids == TOKENIZER.special_token_ids
    assert loaded.token_bytes == TOKENIZER.token_bytes
    text = f"{BOS}hello <think>x</think>"
    assert loaded.encode(text) == TOKENIZER.encode(text)
    config = json.loads((tmp_path / CONFIG_FILE).read_text("utf-8"))
    assert config["bos_token"] == BOS and config["added_tokens_decoder"]["1"]["content"] == EOS


def test_special_token_ids_come_from_the_files(tmp_path: Path) -> None:
    """A tokenizer that puts BOS and EOS elsewhere and writes them as AddedToken objects in the config."""
    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: token_id for token_id, symbol in enumerate(sorted(byte_symbols))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = token_decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<s>", special=True), AddedToken(EOS, special=True)])
    tokenizer.save(str(tmp_path / TOKENIZER_FILE))
    config = {"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": EOS}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config), "utf-8")
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (256, 257)
    assert loaded.special_token_ids == {EOS: 257}
    assert loaded.decode(loaded.encode("<s>x" + EOS)) == "<s>x" + EOS


def test_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        load_tokenizer(tmp_path)
    TOKENIZER.save(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"eos_token": EOS}), "utf-8")
    with pytest.raises(ValueError, match="bos_token"):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"bos_token": "<nope>", "eos_token": EOS}), "utf-8")
    with pytest.raises(ValueError, match="no bos_token"):
        load_tokenizer(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{", "utf-8")
    with pytest.raises(ValueError, match="cannot read"):
        load_tokenizer(tmp_path)


def test_non_byte_level_tokenizers_are_refused() -> None:
    tokenizer = Tokenizer(models.WordLevel(vocab={"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    with pytest.raises(ValueError, match="byte-level"):
        ChatTokenizer(tokenizer)
    tokenizer.decoder = token_decoders.ByteLevel()
    tokenizer.add_tokens(["▁piece"])  # added tokens are literal text, so they are fine
    ChatTokenizer(tokenizer)
    odd = Tokenizer(models.WordLevel(vocab={"▁hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    odd.decoder = token_decoders.ByteLevel()
    odd.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    with pytest.raises(ValueError, match="not byte-level"):
        ChatTokenizer(odd)


@pytest.mark.parametrize("repeat", [1, 2000], ids=["short", "long"])
def test_encode_with_a_limit(repeat: int) -> None:
    """Long texts go through the GIL-releasing batch call, with the same ids; a limit refuses a text of
    more tokens with its count."""
    text = f"Hello, wörld {BOS} 12345\n  tabs\t{EOS}x" * repeat
    assert (len(text) > RELEASE_GIL_CHARS) == (repeat > 1)
    ids = TOKENIZER.encode(text)
    assert ids == TOKENIZER.tokenizer.encode(text, add_special_tokens=False).ids
    assert TOKENIZER.encode(text, limit=len(ids)) == ids
    with pytest.raises(TooManyTokens) as refused:
        TOKENIZER.encode(text, limit=len(ids) - 1)
    assert (refused.value.count, refused.value.limit) == (len(ids), len(ids) - 1)
