"""Tokenizer loading, incremental detokenisation, and small test tokenizers with every V4 special token.

V4 uses a byte-level BPE: every token stands for a fixed byte string, and a character may be split across
tokens. Streaming therefore decodes bytes, not tokens: :class:`IncrementalDetokenizer` feeds each token's
bytes through an incremental UTF-8 decoder, so a delta never ends in half a character and the deltas always
concatenate to :meth:`ChatTokenizer.decode` of the whole list. Special-token ids are always looked up in the
files, never assumed.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from tokenizers import decoders as token_decoders

from dsv4.chat.encoding import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    EXTRACTED_URL,
    LATEST_REMINDER,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER,
)

# Control tokens: never part of ordinary text.
CONTROL_TOKENS: tuple[str, ...] = (
    BOS,
    EOS,
    USER,
    ASSISTANT,
    LATEST_REMINDER,
    *TASK_TOKENS.values(),
    EXTRACTED_URL,
)
# Markup the model writes inside its own output; single tokens so that markers cost one id each.
MARKUP_TOKENS: tuple[str, ...] = (THINK_START, THINK_END, DSML)
V4_TOKENS: tuple[str, ...] = CONTROL_TOKENS + MARKUP_TOKENS

# Texts longer than this are tokenised without holding the GIL (a batch of one costs ~10 us more).
RELEASE_GIL_CHARS = 16384

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _byte_symbols() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte is drawn as one printable character.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved, in byte
    order, to code points from 256 up. This is the mapping tokenizer.json files of byte-level models use.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return symbols


# Byte -> the character a byte-level BPE vocabulary spells it with (GPT-2's alphabet): shared by every
# writer and reader of such a vocabulary in dsv4 (the test tokenizers, the small model's trained one).
BYTE_SYMBOLS = _byte_symbols()
_SYMBOL_BYTES = {symbol: byte for byte, symbol in BYTE_SYMBOLS.items()}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character."""

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Text completed by these tokens; bytes of an unfinished character wait for the next push."""
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        return self._utf8.decode(b"".join(_bytes_of(self._token_bytes, token_id) for token_id in ids))

    def flush(self) -> str:
        """End of stream: an unfinished character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _bytes_of(token_bytes: Sequence[bytes], token_id: int) -> bytes:
    # Ids past the tokenizer (a model's padded vocabulary) carry no text.
    return token_bytes[token_id] if 0 <= token_id < len(token_bytes) else b""


class TooManyTokens(ValueError):
    """A text has more tokens than the caller's limit: ``count`` of them (at least, unless ``exact``)."""

    def __init__(self, count: int, limit: int, *, exact: bool = True) -> None:
        super().__init__(f"{'' if exact else 'at least '}{count} tokens, more than the limit of {limit}")
        self.count = count
        self.limit = limit
        self.exact = exact


class ChatTokenizer:
    """A byte-level BPE tokenizer plus the V4 special-token ids read from its files."""

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str = BOS, eos_token: str = EOS) -> None:
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._required_id(bos_token, "bos_token")
        self.eos_token_id = self._required_id(eos_token, "eos_token")
        # Every V4 token this tokenizer knows, by text; absent ones are simply missing.
        self.special_token_ids: dict[str, int] = {
            token: token_id for token in V4_TOKENS if (token_id := tokenizer.token_to_id(token)) is not None
        }
        self.token_bytes: list[bytes] = self._token_byte_table()
        # Added tokens are split out of the text before BPE runs, so no token ever spans their edges (unless
        # they strip the whitespace around them or match whole words only: those are left out).
        self.added_token_texts: tuple[str, ...] = tuple(
            sorted(
                {
                    token.content
                    for token in tokenizer.get_added_tokens_decoder().values()
                    if token.content and not (token.lstrip or token.rstrip or token.single_word)
                }
            )
        )

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    def _required_id(self, token: str, role: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {role} {token!r}")
        return token_id

    def _token_byte_table(self) -> list[bytes]:
        """Each id's bytes: what incremental decoding (and :meth:`decode`) concatenates."""
        decoder = self.tokenizer.decoder
        if decoder is None or '"ByteLevel"' not in decoder.__getstate__().decode("utf-8"):
            raise ValueError("only byte-level BPE tokenizers (a ByteLevel decoder) are supported")
        added = {token_id: token.content for token_id, token in self.tokenizer.get_added_tokens_decoder().items()}
        # Added tokens may sit past the base vocabulary with gaps before them.
        size = max([self.tokenizer.get_vocab_size(with_added_tokens=True), *(token_id + 1 for token_id in added)])
        table = []
        for token_id in range(size):
            if token_id in added:
                table.append(added[token_id].encode("utf-8"))
                continue
            piece = self.tokenizer.id_to_token(token_id)
            if piece is None:
                table.append(b"")
                continue
            try:
                table.append(bytes(_SYMBOL_BYTES[symbol] for symbol in piece))
            except KeyError:
                raise ValueError(
                    f"token {token_id} ({piece!r}) is not byte-level BPE; only byte-level tokenizers are supported"
                ) from None
        return table

    def encode(self, text: str, *, limit: int | None = None) -> list[int]:
        """Ids for ``text``; special-token strings in it become their ids, nothing is added around it.

        A long text goes through ``encode_batch_fast``, which releases the GIL while it runs (``encode`` holds
        it: a megabyte takes seconds), so that tokenising it in a worker thread stalls no other thread.
        With ``limit``, a text of more tokens raises :class:`TooManyTokens` before its ids become a Python
        list (which holds the GIL: ~50 ms a million ids).
        """
        if len(text) > RELEASE_GIL_CHARS:
            encoding = self.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0]
        else:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if limit is not None and len(encoding) > limit:
            raise TooManyTokens(len(encoding), limit)
        return encoding.ids

    def decode(self, token_ids: Iterable[int]) -> str:
        """Text of ``token_ids`` with special tokens kept (the chat parser needs them)."""
        return b"".join(_bytes_of(self.token_bytes, token_id) for token_id in token_ids).decode("utf-8", "replace")

    def incremental_detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.token_bytes)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that transformers can also read."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        added = self.tokenizer.get_added_tokens_decoder()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(token_id): {
                    "content": token.content,
                    "lstrip": token.lstrip,
                    "rstrip": token.rstrip,
                    "normalized": token.normalized,
                    "single_word": token.single_word,
                    "special": token.special,
                }
                for token_id, token in sorted(added.items())
            },
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", "utf-8")


def _token_text(value: Any, field: str) -> str:
    """tokenizer_config.json writes a token either as a string or as an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise ValueError(f"{CONFIG_FILE}: {field} must be a token string")
    return value


def load_tokenizer(directory: str | Path) -> ChatTokenizer:
    """Load ``tokenizer.json`` and ``tokenizer_config.json`` (for the BOS and EOS tokens) from ``directory``."""
    directory = Path(directory)
    tokenizer_path, config_path = directory / TOKENIZER_FILE, directory / CONFIG_FILE
    for path in (tokenizer_path, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {directory}")
    try:
        config = json.loads(config_path.read_text("utf-8"))
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as error:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"cannot read the tokenizer in {directory}: {error}") from error
    return ChatTokenizer(
        tokenizer,
        bos_token=_token_text(config.get("bos_token"), "bos_token"),
        eos_token=_token_text(config.get("eos_token"), "eos_token"),
    )


# Characters whose pairs become merges in test tokenizers, most common English first; the order only
# shapes how text splits into tokens, never whether it round-trips.
_MERGE_CHARACTERS = (
    " etaoinsrhldcumfpgwybvkxjqzETAOINSRHLDCUMFPGWYBVKXJQZ0123456789.,:;!?'\"()[]{}<>-_=+*/\\|@#$%^&`~\n"
)


def build_test_tokenizer(vocab_size: int = 1280) -> ChatTokenizer:
    """A byte-level BPE of exactly ``vocab_size`` ids holding every V4 special token.

    Ids 0 and 1 are BOS and EOS as in the real tokenizer, then the other V4 tokens, the 256 byte symbols
    and two-character merges of common ASCII until the vocabulary is full, so every id a tiny model can
    sample decodes to something. Any UTF-8 text round-trips through encode and decode.
    """
    symbols = [BYTE_SYMBOLS[byte] for byte in range(256)]
    merge_symbols = [BYTE_SYMBOLS[ord(character)] for character in _MERGE_CHARACTERS]
    pairs = sorted(
        ((first, second) for first in range(len(merge_symbols)) for second in range(len(merge_symbols))),
        key=lambda pair: (pair[0] + pair[1], pair),
    )
    smallest, largest = len(V4_TOKENS) + len(symbols), len(V4_TOKENS) + len(symbols) + len(pairs)
    if not smallest <= vocab_size <= largest:
        raise ValueError(f"vocab_size must be between {smallest} and {largest}, got {vocab_size}")
    vocab = {token: token_id for token_id, token in enumerate([*V4_TOKENS, *symbols])}
    merges = []
    for first, second in pairs[: vocab_size - len(vocab)]:
        merges.append((merge_symbols[first], merge_symbols[second]))
        vocab[merge_symbols[first] + merge_symbols[second]] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = token_decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CONTROL_TOKENS])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in MARKUP_TOKENS])
    return ChatTokenizer(tokenizer)
