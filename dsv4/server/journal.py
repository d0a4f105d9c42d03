"""A memory's journal in the session directory: one JSON object per line, appended as the memory learns,
replayed at start-up, so that what the server remembered survives a restart beside the engine's checkpoints.

A torn last line (a crash mid-write) or any line its memory cannot read is skipped with a warning, and a
journal that has grown past ``COMPACT_FACTOR`` times what its memory still holds is rewritten from that.
A full or failing disk costs the journal, never the request: the memory still serves this process.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("dsv4.server")

COMPACT_FACTOR = 4
# What a memory's reader may raise on a line it cannot use (a missing key, a wrong type, a truncated value).
UNREADABLE = (ValueError, KeyError, TypeError, AttributeError)


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def replay(self, read: Callable[[dict[str, Any]], None]) -> int:
        """Feed every readable line's object to ``read``; returns the number of lines."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for line in lines:
            try:
                read(json.loads(line))
            except UNREADABLE:
                log.warning("%s: skipping an unreadable line", self.path)
        return len(lines)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        lines = [_line(record) for record in records]
        if not lines:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.writelines(lines)
        except OSError as error:
            log.warning("%s: not written: %s", self.path, error)

    def compact(self, lines_read: int, remembered: int, records: Callable[[], Iterable[dict[str, Any]]]) -> None:
        """Rewrite the journal as ``records()`` (what the memory holds) if it read more than ``COMPACT_FACTOR``
        lines per ``remembered`` entry."""
        if lines_read <= COMPACT_FACTOR * max(1, remembered):
            return
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text("".join(_line(record) for record in records()), encoding="utf-8")
        os.replace(scratch, self.path)


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"
