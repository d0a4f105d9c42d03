"""The disk tier of the prefix cache: checkpoints and their cache blocks as files that survive a restart.

Layout under the session directory::

    <directory>/<namespace>/blocks/<key>.safetensors        one per full cache block, named by its prefix digest
    <directory>/<namespace>/checkpoints/<key>.safetensors   one per checkpoint: its block keys + its own tensors

``<namespace>`` is a hash of the format version and the caller's fingerprint (model config + cache layout).
Block keys name token prefixes, not models, so two models with the same tokenizer would otherwise write
different contents under the same name; with a namespace each model's server owns its own subtree and never
reads, counts, evicts or deletes another's files, which makes sharing one directory between models safe.

A block holds the paged-cache rows of ``block_tokens`` tokens, which depend on every token before them, so it
is named by the digest of the whole prefix it ends and stored once however many checkpoints of the
conversation refer to it: a session checkpointed at every turn writes each block of its history once.

Every file is a valid safetensors file. Its ``__metadata__`` holds one JSON header (key ``dsv4.session``):
format version, kind, key, the fingerprint, for checkpoints ``num_tokens`` and ``block_keys``, and per tensor
its original dtype, shape and the sha256 of its bytes. One-byte tensors (FP8, E8M0, packed FP4, ...) are
stored as their raw bytes (``U8``), since safetensors readers need not know those dtypes, and are viewed
back as the original dtype on load. Tensors are laid out by decreasing element size, so every tensor starts
at a multiple of its element size and loads as a view into one buffer read from the file (no per-tensor copy).

Guarantees:

* **Crash safety.** A file is written under a temporary name (``.<name>.<pid>.<random>.tmp``) in its final
  directory, fsynced, renamed over the final name and the directory fsynced. A crash leaves at worst a
  temporary file, which the next start-up removes; a final name always holds a complete file.
* **Corruption.** Start-up reads only the headers and checks them against the file size (a truncated file
  is caught there). ``load`` re-reads the header and checks every tensor's dtype, shape and checksum. A bad
  file is logged (``dsv4.sessions``), dropped from the index and deleted, with the checkpoints that need it
  if it is a block; ``load`` returns None rather than raise. Blocks no checkpoint references (their
  checkpoint was never written, or was lost) are deleted at start-up. A file whose header names another
  fingerprint or format version is logged and ignored but left in place, and not counted against the
  budget, since it is not this server's to delete.
* **Budget.** After every put the bytes of the namespace's usable files are at most ``budget_bytes``
  (unless the blocks claimed for the checkpoint being assembled alone exceed it, see ``SessionStore``):
  checkpoints are evicted least recently used first, with the blocks only they reference. Recency is the
  checkpoint file's mtime, so it survives a restart.

One live server per namespace: the store keeps an in-memory index and does not coordinate with another
process writing the same namespace (reads would still be verified, so such sharing degrades to misses).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

log = logging.getLogger("dsv4.sessions")

FORMAT_VERSION = 1
_META_KEY = "dsv4.session"
_SUFFIX = ".safetensors"
_TEMP_SUFFIX = ".tmp"
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_KEY = re.compile(r"[0-9a-f]{1,128}")  # hex digests only: a key becomes a file name

# Multi-byte dtypes stored natively; every one-byte dtype is stored as U8.
_NATIVE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
}


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint in the index: what ``lookup`` returns and ``load`` reads."""

    key: str
    num_tokens: int
    block_keys: tuple[str, ...]


@dataclass
class LoadedCheckpoint:
    """A checkpoint's tensors, verified; they are views into buffers read from the files (CPU, writable)."""

    num_tokens: int
    blocks: list[dict[str, torch.Tensor]]  # one dict per full block, in order
    tensors: dict[str, torch.Tensor]  # the checkpoint's own tensors


class _Unusable(Exception):
    """A file that must not be used; ``foreign`` ones belong to another fingerprint and are left in place."""

    def __init__(self, reason: str, foreign: bool = False) -> None:
        super().__init__(reason)
        self.foreign = foreign


@dataclass
class _Header:
    meta: dict[str, Any]  # the dsv4.session header
    spans: dict[str, tuple[int, int]]  # tensor name -> [start, end) in the data section
    data_bytes: int
    file_bytes: int
    mtime_ns: int


@dataclass
class _Entry:
    stored: StoredCheckpoint
    nbytes: int


@dataclass
class _Encoded:
    """A file ready to write: its header bytes and the raw bytes of its tensors in file order."""

    header: bytes
    chunks: list[memoryview]

    @property
    def nbytes(self) -> int:
        return 8 + len(self.header) + sum(c.nbytes for c in self.chunks)


def _canonical(value: Any) -> Any:
    """The value as it reads back from a header, so that tuples and lists, int keys and str keys compare equal."""
    return json.loads(json.dumps(value))


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"not a hex digest: {key!r}")


def _encode(meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> _Encoded:
    """A safetensors file of ``tensors`` whose header is ``meta`` plus each tensor's dtype, shape and checksum."""
    table: dict[str, Any] = {}
    described: dict[str, Any] = {}
    items = []
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.element_size() == 1:
            code = "U8"
        elif t.dtype in _NATIVE_CODES:
            code = _NATIVE_CODES[t.dtype]
        else:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored")
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        described[name] = {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
        items.append((t.element_size(), name, code, list(t.shape), raw))
    items.sort(key=lambda item: -item[0])  # stable: alignment of every tensor to its element size
    offset = 0
    for _, name, code, shape, raw in items:
        table[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
    table["__metadata__"] = {_META_KEY: json.dumps({**meta, "tensors": described}, separators=(",", ":"))}
    header = json.dumps(table, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
    return _Encoded(header, [raw for *_, raw in items])


def _read_exactly(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Unusable(f"truncated {what}")
    return data


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise _Unusable(f"unknown dtype {name!r}")
    return dtype


class SessionStore:
    """Checkpoints and blocks on disk, within a byte budget, least recently used evicted first.

    Not thread-safe: every call comes from the engine's thread, so nothing is locked.

    A checkpoint is assembled as ``has_block``/``put_block`` for each of its blocks, then ``put_checkpoint``.
    The blocks found or put since the last ``put_checkpoint`` are *claimed*: eviction does not delete them,
    so that budget enforcement in the middle of that sequence cannot remove a block the caller was just told
    is stored. Write failures (disk full, permissions) raise ``OSError`` and leave the index unchanged.
    """

    def __init__(self, directory: str | Path, budget_bytes: int, fingerprint: Mapping[str, Any]) -> None:
        self._fingerprint = _canonical(dict(fingerprint))
        self._budget = int(budget_bytes)
        identity = json.dumps({"version": FORMAT_VERSION, "fingerprint": self._fingerprint}, sort_keys=True)
        namespace = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.directory = Path(directory) / namespace  # this fingerprint's subtree: all this store touches
        self._dirs = {"block": self.directory / "blocks", "checkpoint": self.directory / "checkpoints"}
        for d in self._dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self._blocks: dict[str, int] = {}  # key -> file bytes
        self._checkpoints: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._refs: Counter[str] = Counter()  # block key -> checkpoints referencing it
        self._claimed: set[str] = set()
        self._total = 0
        self._last_use_ns = 0
        self._scan()
        self._enforce_budget(keep=None)

    # ------------------------------------------------------------------ queries
    @property
    def num_checkpoints(self) -> int:
        return len(self._checkpoints)

    @property
    def total_bytes(self) -> int:
        """Bytes of the usable files (foreign and corrupt ones excluded)."""
        return self._total

    def lengths(self) -> set[int]:
        return {e.stored.num_tokens for e in self._checkpoints.values()}

    def has_block(self, key: str) -> bool:
        """Whether the block is stored; a stored block is claimed until the next ``put_checkpoint``."""
        if key in self._blocks:
            self._claimed.add(key)
            return True
        return False

    def lookup(self, digests: Mapping[int, str]) -> StoredCheckpoint | None:
        """The longest stored checkpoint whose key is ``digests[its num_tokens]``; counts as a use."""
        for n in sorted(digests, reverse=True):
            entry = self._checkpoints.get(digests[n])
            if entry is not None and entry.stored.num_tokens == n:
                self._touch(entry.stored.key)
                return entry.stored
        return None

    # ------------------------------------------------------------------ writes
    def put_block(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store a full block (a no-op if stored: blocks are immutable) and claim it."""
        _check_key(key)
        self._claimed.add(key)
        if key in self._blocks:
            return
        encoded = _encode(
            {"version": FORMAT_VERSION, "kind": "block", "key": key, "fingerprint": self._fingerprint}, tensors
        )
        self._write(self._path("block", key), encoded)
        self._blocks[key] = encoded.nbytes
        self._total += encoded.nbytes
        self._enforce_budget(keep=None)

    def put_checkpoint(
        self, key: str, num_tokens: int, block_keys: Sequence[str], tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Store a checkpoint over its stored blocks, replacing one of the same key; releases the claims.

        Raises ``ValueError`` if a block is not stored. A checkpoint that with its blocks alone exceeds the
        budget is not stored (logged). Claimed blocks no checkpoint references are deleted: every stored block
        is referenced by a checkpoint or claimed by the one being assembled.
        """
        _check_key(key)
        block_keys = tuple(block_keys)
        missing = [k for k in block_keys if k not in self._blocks]
        if missing:
            raise ValueError(f"checkpoint {key}: {len(missing)} block(s) not stored, first {missing[0]!r}")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        meta = {
            "version": FORMAT_VERSION,
            "kind": "checkpoint",
            "key": key,
            "fingerprint": self._fingerprint,
            "num_tokens": int(num_tokens),
            "block_keys": list(block_keys),
        }
        encoded = _encode(meta, tensors)
        needed = encoded.nbytes + sum(self._blocks[k] for k in set(block_keys))
        fits = needed <= self._budget
        if fits:
            self._write(self._path("checkpoint", key), encoded)
        else:
            log.warning(
                "checkpoint %s (%d tokens) needs %d bytes with its blocks, over the %d-byte budget: not stored",
                key,
                num_tokens,
                needed,
                self._budget,
            )
        released = self._claimed | set(block_keys)
        self._claimed.clear()
        if fits:
            self._refs.update(block_keys)  # before releasing the old entry's, so shared blocks survive
            old = self._checkpoints.pop(key, None)
            if old is not None:
                self._total -= old.nbytes
                self._release(old.stored.block_keys)
            self._checkpoints[key] = _Entry(StoredCheckpoint(key, int(num_tokens), block_keys), encoded.nbytes)
            self._total += encoded.nbytes
            self._touch(key)
        for k in released:  # claimed for nothing: no checkpoint uses them
            if k in self._blocks and not self._refs[k]:
                self._delete_block(k)
        self._enforce_budget(keep=key if fits else None)

    def discard(self, key: str) -> None:
        """Forget a checkpoint and delete its file and the blocks no other checkpoint (or claim) uses."""
        if key in self._checkpoints:
            self._drop_checkpoint(key, delete_file=True)

    # ------------------------------------------------------------------ reads
    def load(self, checkpoint: StoredCheckpoint) -> LoadedCheckpoint | None:
        """The checkpoint's verified tensors, or None (logged) if anything about its files is wrong."""
        entry = self._checkpoints.get(checkpoint.key)
        if entry is None or entry.stored != checkpoint:
            log.info("checkpoint %s is no longer stored", checkpoint.key)
            return None
        path = self._path("checkpoint", checkpoint.key)
        try:
            meta, tensors = self._read(path, "checkpoint", checkpoint.key)
            if meta["num_tokens"] != checkpoint.num_tokens or tuple(meta["block_keys"]) != checkpoint.block_keys:
                raise _Unusable("header does not match the index")
        except _Unusable as e:
            log.warning("session file %s unusable (%s): dropped", path, e)
            self._drop_checkpoint(checkpoint.key, delete_file=not e.foreign)
            return None
        blocks = []
        for block_key in checkpoint.block_keys:
            path = self._path("block", block_key)
            try:
                blocks.append(self._read(path, "block", block_key)[1])
            except _Unusable as e:
                log.warning("session file %s unusable (%s): dropped with the checkpoints using it", path, e)
                self._drop_block(block_key, delete_file=not e.foreign)
                return None
        self._touch(checkpoint.key)
        return LoadedCheckpoint(checkpoint.num_tokens, blocks, tensors)

    def _read(self, path: Path, kind: str, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Header and verified tensors of a file: one read of its data into a buffer the tensors view."""
        try:
            with open(path, "rb", buffering=0) as f:
                header = self._read_header(f, kind, key)
                buf = bytearray(header.data_bytes)
                view, filled = memoryview(buf), 0
                while filled < len(buf):
                    n = f.readinto(view[filled:])
                    if not n:
                        raise _Unusable("truncated data")
                    filled += n
        except OSError as e:
            raise _Unusable(f"unreadable: {e}") from e
        data = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        tensors = {}
        for name, desc in header.meta["tensors"].items():
            start, end = header.spans[name]
            if hashlib.sha256(view[start:end]).hexdigest() != desc["sha256"]:
                raise _Unusable(f"checksum mismatch in {name}")
            dtype = _dtype(desc["dtype"])
            chunk = data[start:end]
            if start % dtype.itemsize:  # not laid out by this module: copy to an aligned buffer
                chunk = chunk.clone()
            tensors[name] = chunk.view(dtype).reshape(desc["shape"])
        return header.meta, tensors

    def _read_header(self, f: BinaryIO, kind: str, key: str) -> _Header:
        """Parse and check a file's header against its size and this store, reading none of its data."""
        stat = os.fstat(f.fileno())
        (header_bytes,) = struct.unpack("<Q", _read_exactly(f, 8, "header size"))
        if header_bytes > min(_MAX_HEADER_BYTES, stat.st_size - 8):
            raise _Unusable("truncated or garbage header size")
        try:
            table = json.loads(_read_exactly(f, header_bytes, "header"))
            meta = json.loads(table.pop("__metadata__")[_META_KEY])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _Unusable(f"bad header: {e!r}") from e
        if not isinstance(meta, dict):
            raise _Unusable("bad header")
        if meta.get("version") != FORMAT_VERSION:
            raise _Unusable(f"format version {meta.get('version')!r}", foreign=True)
        if meta.get("fingerprint") != self._fingerprint:
            raise _Unusable("another model's fingerprint", foreign=True)
        if meta.get("kind") != kind or meta.get("key") != key:
            raise _Unusable(f"header names {meta.get('kind')} {meta.get('key')}")
        if kind == "checkpoint" and not (
            isinstance(meta.get("num_tokens"), int)
            and isinstance(meta.get("block_keys"), list)
            and all(isinstance(k, str) and _KEY.fullmatch(k) for k in meta["block_keys"])
        ):
            raise _Unusable("bad checkpoint fields")
        described = meta.get("tensors")
        if not isinstance(described, dict) or described.keys() != table.keys():
            raise _Unusable("header's tensor list does not match the file's")
        spans: dict[str, tuple[int, int]] = {}
        try:
            for name, entry in table.items():
                desc = described[name]
                dtype = _dtype(desc["dtype"])
                code = "U8" if dtype.itemsize == 1 else _NATIVE_CODES.get(dtype)
                start, end = (int(x) for x in entry["data_offsets"])
                numel = 1
                for d in desc["shape"]:
                    numel *= int(d)
                if entry["dtype"] != code or entry["shape"] != desc["shape"] or end - start != numel * dtype.itemsize:
                    raise _Unusable(f"{name}: stored as {entry['dtype']} {entry['shape']}, header says {desc}")
                if not isinstance(desc["sha256"], str):
                    raise _Unusable(f"{name}: no checksum")
                spans[name] = (start, end)
        except (KeyError, TypeError, ValueError) as e:
            raise _Unusable(f"bad tensor entry: {e!r}") from e
        offset = 0  # safetensors: the tensors cover the data section exactly, without gaps
        for start, end in sorted(spans.values()):
            if start != offset:
                raise _Unusable("tensor data overlaps or leaves gaps")
            offset = end
        if 8 + header_bytes + offset != stat.st_size:
            raise _Unusable(f"{stat.st_size} bytes, header describes {8 + header_bytes + offset}")
        return _Header(meta, spans, offset, stat.st_size, stat.st_mtime_ns)

    # ------------------------------------------------------------------ start-up
    def _scan(self) -> None:
        """Index the namespace from the files' headers; remove temporary files and files that cannot be used."""
        for d in self._dirs.values():
            for path in d.glob("*" + _TEMP_SUFFIX):
                log.info("removing %s, left by an interrupted write", path)
                path.unlink(missing_ok=True)
        checkpoints: list[tuple[int, str, StoredCheckpoint, int]] = []
        for kind, d in self._dirs.items():
            for path in sorted(d.glob("*" + _SUFFIX)):
                key = path.name.removesuffix(_SUFFIX)
                try:
                    if not _KEY.fullmatch(key):
                        raise _Unusable("not a digest-named file")
                    with open(path, "rb", buffering=0) as f:
                        header = self._read_header(f, kind, key)
                except (_Unusable, OSError) as e:
                    foreign = isinstance(e, _Unusable) and e.foreign
                    log.warning("session file %s unusable (%s): %s", path, e, "ignored" if foreign else "deleted")
                    if not foreign:
                        self._unlink(path)
                    continue
                if kind == "block":
                    self._blocks[key] = header.file_bytes
                    self._total += header.file_bytes
                else:
                    meta = header.meta
                    stored = StoredCheckpoint(key, meta["num_tokens"], tuple(meta["block_keys"]))
                    checkpoints.append((header.mtime_ns, key, stored, header.file_bytes))
        for mtime_ns, key, stored, nbytes in sorted(checkpoints):  # least recently used first
            missing = [k for k in stored.block_keys if k not in self._blocks]
            if missing:
                log.warning("checkpoint %s lacks block %s: deleted", key, missing[0])
                self._unlink(self._path("checkpoint", key))
                continue
            self._checkpoints[key] = _Entry(stored, nbytes)
            self._refs.update(stored.block_keys)
            self._total += nbytes
            self._last_use_ns = max(self._last_use_ns, mtime_ns)
        for key in [k for k in self._blocks if not self._refs[k]]:
            log.info("deleting block %s: no checkpoint uses it (interrupted or lost)", key)
            self._delete_block(key)

    # ------------------------------------------------------------------ bookkeeping
    def _path(self, kind: str, key: str) -> Path:
        return self._dirs[kind] / (key + _SUFFIX)

    def _write(self, path: Path, encoded: _Encoded) -> None:
        """Write atomically: a temporary file in the same directory, fsynced, renamed, directory fsynced."""
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        try:
            with open(temp, "xb") as f:
                f.write(struct.pack("<Q", len(encoded.header)))
                f.write(encoded.header)
                for chunk in encoded.chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _touch(self, key: str) -> None:
        """Mark a checkpoint most recently used, in the index and in its file's mtime (strictly increasing,
        so that the order is kept across a restart even between uses within one clock tick)."""
        self._checkpoints.move_to_end(key)
        self._last_use_ns = max(time.time_ns(), self._last_use_ns + 1)
        try:
            os.utime(self._path("checkpoint", key), ns=(self._last_use_ns, self._last_use_ns))
        except OSError as e:  # the file is gone or read-only: only the order after a restart suffers
            log.warning("could not mark checkpoint %s used: %s", key, e)

    def _enforce_budget(self, keep: str | None) -> None:
        """Evict least recently used checkpoints (never ``keep``) with the blocks only they use, to fit the budget."""
        if self._total <= self._budget:
            return
        for key in list(self._checkpoints):
            if self._total <= self._budget:
                return
            if key != keep:
                log.debug("evicting checkpoint %s from disk", key)
                self._drop_checkpoint(key, delete_file=True)
        if self._total > self._budget:
            log.warning("session files take %d bytes, over the %d-byte budget", self._total, self._budget)

    def _drop_checkpoint(self, key: str, delete_file: bool) -> None:
        entry = self._checkpoints.pop(key)
        self._total -= entry.nbytes
        if delete_file:
            self._unlink(self._path("checkpoint", key))
        self._release(entry.stored.block_keys)

    def _release(self, block_keys: Sequence[str]) -> None:
        """Drop one reference to each block, deleting those left unreferenced and unclaimed."""
        for key in block_keys:
            self._refs[key] -= 1
            if self._refs[key] <= 0:
                del self._refs[key]
                if key in self._blocks and key not in self._claimed:
                    self._delete_block(key)

    def _drop_block(self, key: str, delete_file: bool) -> None:
        """Forget a block that cannot be used, and every checkpoint that needs it (their files too)."""
        self._total -= self._blocks.pop(key)
        self._claimed.discard(key)
        if delete_file:
            self._unlink(self._path("block", key))
        for ckpt in [k for k, e in self._checkpoints.items() if key in e.stored.block_keys]:
            self._drop_checkpoint(ckpt, delete_file=True)

    def _delete_block(self, key: str) -> None:
        self._total -= self._blocks.pop(key)
        self._unlink(self._path("block", key))

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not delete %s: %s", path, e)
