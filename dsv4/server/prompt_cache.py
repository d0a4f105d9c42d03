"""Incremental tokenisation: a chat history sent back by a client tokenises to the ids the model saw.

The engine's prefix cache matches token ids. The server, though, receives a conversation as messages,
renders it to text and would tokenise that text whole, and byte-level BPE does not promise that
``encode(a + b) == encode(a) + encode(b)``; worse, the model may sample a non-canonical tokenisation of its
own text (``"He" "llo"`` where the tokenizer writes ``"Hello"``). Tokenised whole, the next turn of an
agent would then differ from the cached ids at its previous output, and the whole turn would be computed
again.

:class:`PromptMemory` records, for every chat sequence the server submits, the rendered prompt text -> its
prompt ids, and when the sequence finishes, the prompt text + the text of its sampled ids -> prompt ids +
sampled ids (a stop token excluded: the cache holds the state before it is appended, and the next
rendering writes the end-of-sentence token itself). A new prompt is encoded as the ids of the longest
recorded text it starts with, followed by the tokenisation of the rest only.

In the V4 format (:mod:`dsv4.chat.encoding`) the common agent loop extends a recorded text exactly: a
prompt ends in ``<｜Assistant｜><think>`` (or ``</think>``), the model samples ``reasoning</think>content``
plus its tool-call block, and the next request renders that assistant turn back byte for byte (tool
conversations keep every turn's reasoning; the tool-call DSML and a reasoning the client dropped are
restored by :class:`dsv4.server.serving.ToolCallMemory`), then ``<｜end▁of▁sentence｜>``, the tool results
and the next transition. Conversations without tools in thinking mode drop earlier reasoning and switch the
earlier transition to ``</think>``, so there a new user turn extends no earlier output and only what
precedes it can match.

A recorded text is used only where the cut it makes is one the tokenizer makes anyway: the remainder starts
with, or the recorded text ends with, an added token (special and markup tokens are split out of the text
before BPE runs), so the only non-canonical ids in a prompt are the ones the model sampled itself.

Whole histories are too large to keep across a restart, but only the model's own non-canonical spellings
need to be: each run of sampled ids between added tokens whose text the tokenizer would spell otherwise
is remembered (text -> ids) and, with a ``journal`` in the session directory, appended to it and replayed
at start-up. A prompt's segment between added tokens that equals such a text takes those ids; so after a
restart a history still tokenises to the ids the restored checkpoints hold.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dsv4.chat.tokenizer import ChatTokenizer, TooManyTokens
from dsv4.server.journal import Journal

# Characters of recorded text kept (least recently used first out). Each entry holds a whole rendered
# history, a few bytes a character, plus its ids at 4 bytes each (about one per 3-4 characters): 64M
# characters are at most ~0.5 GB and usually ~130 MB, which holds the last two entries (prompt and
# prompt + output) of 8 agent sessions at 1M tokens, or of hundreds at 100K.
PROMPT_MEMORY_CHARS = 64 * 2**20
# Entries kept whatever their size: a lookup compares the new prompt with each of them (a linear scan).
PROMPT_MEMORY_ENTRIES = 4096
# Sampled spellings kept: texts of up to a few hundred characters each, only the non-canonical ones.
SPELLING_MEMORY = 65536


class PromptMemory:
    """Rendered text -> the token ids the engine was given (and sampled) for it, bounded LRU.

    A lookup scans every entry, longest first, with ``str.startswith``: the entries are bounded in number
    (:data:`PROMPT_MEMORY_ENTRIES`) and the comparison work in total characters (:data:`PROMPT_MEMORY_CHARS`;
    a comparison stops at the first differing character, and is a memcmp), so even a 500 KB history is
    matched in well under a millisecond to a few milliseconds, far less than tokenising it. The
    tokenisation of the remainder is then the only real work. Entries are written on the event loop and
    read from worker threads; a lock guards the table and scans run on a snapshot of it.
    """

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        max_chars: int = PROMPT_MEMORY_CHARS,
        max_entries: int = PROMPT_MEMORY_ENTRIES,
        journal: Path | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._max_chars = max_chars
        self._max_entries = max_entries
        self._cuts = tokenizer.added_token_texts
        self._entries: OrderedDict[str, array[int]] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        added = {tokenizer.tokenizer.token_to_id(text) for text in self._cuts}
        self._added_ids = frozenset(i for i in added if i is not None)
        # longest first, so that an added token that contains another is split out whole
        self._split = re.compile("|".join(re.escape(c) for c in sorted(self._cuts, key=len, reverse=True)) or "(?!)")
        self._spellings: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._journal = Journal(journal) if journal is not None else None
        if self._journal is not None:
            lines = self._journal.replay(self._read)
            self._journal.compact(lines, len(self._spellings), self._records)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def chars(self) -> int:
        return self._chars

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """The ids of ``text``: a recorded prefix's ids, then the tokenisation of what follows it. With
        ``limit``, more ids than that raise :class:`TooManyTokens`."""
        match = self.longest_prefix(text)
        length, ids = (0, []) if match is None else match
        if limit is not None and len(ids) > limit:  # the rest is not worth tokenising
            raise TooManyTokens(len(ids) + (length < len(text)), limit, exact=length == len(text))
        if length == len(text):
            return ids
        spelled = self._spelled_segments(text, length)
        if spelled:
            ids += self._encode_spelled(text, length, spelled)
            if limit is not None and len(ids) > limit:
                raise TooManyTokens(len(ids), limit)
            return ids
        if limit is None:
            return ids + self._tokenizer.encode(text[length:])
        try:
            rest = self._tokenizer.encode(text[length:], limit=max(0, limit - len(ids)))
        except TooManyTokens as error:
            raise TooManyTokens(len(ids) + error.count, limit) from None
        return ids + rest

    def longest_prefix(self, text: str) -> tuple[int, list[int]] | None:
        """(characters, ids) of the longest recorded text that ``text`` starts with at a clean cut."""
        with self._lock:
            entries = sorted(self._entries.items(), key=lambda item: len(item[0]), reverse=True)
        for prefix, ids in entries:
            if len(prefix) <= len(text) and text.startswith(prefix) and self._clean_cut(text, len(prefix)):
                with self._lock:
                    if prefix in self._entries:
                        self._entries.move_to_end(prefix)
                return len(prefix), ids.tolist()
        return None

    def _spelled_segments(self, text: str, start: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """(start, end, ids) of the segments of ``text[start:]`` between added tokens that the model spelled
        its own way, each cut where the tokenizer cuts anyway."""
        if not self._spellings:
            return []
        found = []
        with self._lock:
            for begin, end in self._segments(text, start):
                ids = self._spellings.get(text[begin:end])
                if ids is not None and self._clean_cut(text, begin) and self._clean_cut(text, end):
                    found.append((begin, end, ids))
        return found

    def _segments(self, text: str, start: int) -> Iterator[tuple[int, int]]:
        begin = start
        for cut in self._split.finditer(text, start):
            if cut.start() > begin:
                yield begin, cut.start()
            begin = cut.end()
        if begin < len(text):
            yield begin, len(text)

    def _encode_spelled(self, text: str, start: int, spelled: list[tuple[int, int, tuple[int, ...]]]) -> list[int]:
        ids: list[int] = []
        for begin, end, spelling in spelled:
            if begin > start:
                ids += self._tokenizer.encode(text[start:begin])
            ids += spelling
            start = end
        if start < len(text):
            ids += self._tokenizer.encode(text[start:])
        return ids

    def _clean_cut(self, text: str, at: int) -> bool:
        """Whether the tokenizer itself cuts ``text`` at ``at``: its end, or next to an added token."""
        return at == len(text) or text.startswith(self._cuts, at) or text.endswith(self._cuts, 0, at)

    def remember(self, text: str, token_ids: Sequence[int]) -> None:
        """Record that the engine was given (or sampled) ``token_ids`` for ``text``."""
        if not text or not token_ids or len(text) > self._max_chars:
            return
        ids = array("i", token_ids)
        with self._lock:
            old = self._entries.pop(text, None)
            if old is not None:
                self._chars -= len(text)
            self._entries[text] = ids
            self._chars += len(text)
            while self._chars > self._max_chars or len(self._entries) > self._max_entries:
                evicted, _ = self._entries.popitem(last=False)
                self._chars -= len(evicted)

    def remember_completion(
        self,
        prompt_text: str,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        finish_reason: str | None,
        stop_reason: str | int | None,
    ) -> None:
        """Record a finished sequence: prompt + the exact text of its sampled ids (a stop token excluded).

        The text is decoded from the ids, not taken from the stream (a stop string is cut from that), and
        nothing is recorded when the ids do not decode to whole UTF-8 text (output cut off mid-character):
        the ids would then not spell the text they would stand for.
        """
        ids = list(output_ids)
        if finish_reason == "stop" and isinstance(stop_reason, int) and ids and ids[-1] == stop_reason:
            ids.pop()
        if not ids:
            return
        table = self._tokenizer.token_bytes
        raw = b"".join(table[token_id] if 0 <= token_id < len(table) else b"" for token_id in ids)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return
        self.remember(prompt_text + text, [*prompt_ids, *ids])
        self._remember_spellings(ids)

    def _runs(self, ids: list[int]) -> Iterator[list[int]]:
        """The runs of ``ids`` between added tokens."""
        run: list[int] = []
        for token_id in ids:
            if token_id in self._added_ids:
                if run:
                    yield run
                run = []
            else:
                run.append(token_id)
        if run:
            yield run

    def _remember_spellings(self, ids: list[int]) -> None:
        """Keep (and journal) each run of sampled ids whose text the tokenizer would spell otherwise."""
        table = self._tokenizer.token_bytes
        records = []
        for run in self._runs(ids):
            try:
                text = b"".join(table[i] for i in run).decode("utf-8")
            except UnicodeDecodeError:
                continue
            if self._split.search(text) or self._tokenizer.encode(text) == run:
                continue  # canonical (or not a whole segment): tokenising it again gives these ids
            self._spell(text, tuple(run))
            records.append({"text": text, "ids": run})
        if self._journal is not None:
            self._journal.append(records)

    def _spell(self, text: str, ids: tuple[int, ...]) -> None:
        with self._lock:
            self._spellings[text] = ids
            self._spellings.move_to_end(text)
            while len(self._spellings) > SPELLING_MEMORY:
                self._spellings.popitem(last=False)

    def _read(self, record: dict[str, Any]) -> None:
        self._spell(str(record["text"]), tuple(int(i) for i in record["ids"]))

    def _records(self) -> list[dict[str, Any]]:
        return [{"text": text, "ids": list(ids)} for text, ids in self._spellings.items()]
