"""The prefix cache: checkpoints of sequences' caches, so that an agent's next request, which re-sends its
whole history, computes only the tokens it adds.

What can be shared, and what must be checkpointed. A full block of the paged pool (``pool.py``) never
changes once every token of its range was seen, so it is shared by reference. The window ring and the
compressor frontiers are overwritten as a sequence moves on: a prefix ending at position P is reusable
only with a copy of that state taken at P. A *checkpoint* is therefore a frozen pool sequence: a state
slot, references to its full blocks and its own copy of a partial last block. Restoring one is a
``fork``: the full blocks are shared, the slot and the partial block copied (a few MB for V4-Flash,
whatever the context).

A prefix is named by a digest of all its tokens (``prefix_digests``), in memory and on disk, so a lookup
is one hash pass over the request's ids. Checkpoints live in the pool next to running sequences and are
evicted least-recently-used when running sequences need a slot or blocks; the ends of outputs that no
request has continued yet (an agent waiting on a tool call) are evicted only after every other
checkpoint. A running sequence never loses its blocks: the cache holds references, and a block returns
to the free list when its last reference goes. With a ``SessionStore`` (``disk.py``) every checkpoint is
also written through to disk, blocks once by content, and a lookup that finds a longer prefix on disk
than in memory loads it into the pool.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dsv4.cache.pool import KVPool, PagedSequence, PoolExhausted

if TYPE_CHECKING:
    from dsv4.cache.disk import SessionStore, StoredCheckpoint

log = logging.getLogger("dsv4.sessions")


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters of the prefix cache, for ``/metrics`` and the benchmarks (totals since start-up)."""

    checkpoints: int  # checkpoints held in memory now
    cached_bytes: int  # pool bytes held only by the cache: checkpoint slots and blocks no running sequence uses
    hit_tokens: int  # prompt tokens restored from a checkpoint instead of computed
    computed_tokens: int  # tokens fed through the model (prompt chunks and decode steps)
    evictions: int  # checkpoints evicted from memory to make room
    disk_checkpoints: int = 0  # checkpoints in the session directory
    disk_bytes: int = 0
    disk_hits: int = 0  # requests whose prefix was restored from disk


def prefix_digests(token_ids: Sequence[int], lengths: Iterable[int]) -> dict[int, str]:
    """{n: digest of token_ids[:n]} for every n in ``lengths`` with 0 < n <= len(token_ids); one pass over the
    ids (blake2b's state is copied at each length)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    wanted = sorted({n for n in lengths if 0 < n <= len(ids)})
    h = hashlib.blake2b(digest_size=16)
    out: dict[int, str] = {}
    done = 0
    for n in wanted:
        h.update(ids[done:n].tobytes())
        done = n
        out[n] = h.copy().hexdigest()
    return out


@dataclass(eq=False)
class Checkpoint:
    key: str  # digest of the tokens it holds
    num_tokens: int
    seq: PagedSequence  # frozen: never scheduled, only forked
    tail: bool  # the end of an output no request has continued yet: evicted last


class PrefixCache:
    """Checkpoints in ``pool``, found by token prefix; all calls come from the engine's thread."""

    def __init__(self, pool: KVPool, disk: SessionStore | None = None):
        self.pool, self.disk = pool, disk
        self._lru: OrderedDict[str, Checkpoint] = OrderedDict()  # least recently used first
        self._lengths: Counter[int] = Counter()
        self._block_refs: Counter[int] = Counter()  # block -> references held by checkpoints
        self.hit_tokens = self.evictions = self.disk_hits = 0

    # ------------------------------------------------------------------ lookup
    def match(self, token_ids: Sequence[int], limit: int | None = None) -> Checkpoint | None:
        """The checkpoint of the longest prefix of ``token_ids`` that leaves at least one token to compute
        (the last token's logits are what a request samples from) and holds at most ``limit`` tokens, from
        memory or, if longer, from disk."""
        limit = len(token_ids) - 1 if limit is None else min(limit, len(token_ids) - 1)
        lengths = {n for n in self._lengths if n <= limit}
        if self.disk is not None:
            lengths |= {n for n in self.disk.lengths() if n <= limit}
        digests = prefix_digests(token_ids, lengths)
        best = None
        for n in sorted(digests, reverse=True):
            best = self._lru.get(digests[n])
            if best is not None:
                break
        if self.disk is not None:
            stored = self.disk.lookup(digests)
            if stored is not None and stored.num_tokens > (best.num_tokens if best else 0):
                best = self._load(stored, keep=best) or best
        if best is not None:
            self._lru.move_to_end(best.key)
        return best

    def restore(self, checkpoint: Checkpoint) -> PagedSequence:
        """A new running sequence continuing from ``checkpoint``; raises ``PoolExhausted`` (changing nothing)
        when the pool has no slot or no block for the copied partial block."""
        seq = self.pool.fork(checkpoint.seq)
        checkpoint.tail = False  # continued: an ordinary prefix from now on
        self.hit_tokens += checkpoint.num_tokens
        return seq

    # ------------------------------------------------------------------ insertion
    def take(self, token_ids: Sequence[int], seq: PagedSequence) -> bool:
        """Checkpoint a running sequence holding exactly ``token_ids`` (a copy of its slot and partial block).
        Returns False when the pool has no room for it even after evicting older checkpoints."""
        key = self._existing(token_ids)
        if key is None:
            return True
        partial = seq.num_tokens % self.pool.block_tokens > 0
        if not self.make_room(int(partial), 1):
            return False
        self._insert(token_ids, key, self.pool.fork(seq), tail=False)
        return True

    def adopt(self, token_ids: Sequence[int], seq: PagedSequence, *, tail: bool) -> None:
        """Turn a sequence that is done running (finished or aborted) into the checkpoint of ``token_ids``:
        no copy at all, its slot and blocks change owner."""
        key = self._existing(token_ids)
        if key is None:
            self.pool.free(seq)
            return
        self._insert(token_ids, key, seq, tail)

    def _existing(self, token_ids: Sequence[int]) -> str | None:
        """The key for a new checkpoint of ``token_ids``, or None (after refreshing it) if there is one."""
        key = prefix_digests(token_ids, [len(token_ids)])[len(token_ids)]
        if key in self._lru:
            self._lru.move_to_end(key)
            return None
        return key

    def _insert(self, token_ids: Sequence[int], key: str, seq: PagedSequence, tail: bool) -> None:
        num_tokens = len(token_ids)
        assert seq.num_tokens == num_tokens, f"a checkpoint of {num_tokens} tokens holds {seq.num_tokens}"
        self._lru[key] = Checkpoint(key, num_tokens, seq, tail)
        self._lengths[num_tokens] += 1
        self._block_refs.update(seq.blocks)
        if self.disk is not None:
            self._save(token_ids, key, seq)

    # ------------------------------------------------------------------ eviction
    def make_room(self, blocks: int, slots: int, keep: Checkpoint | None = None) -> bool:
        """Evict checkpoints (least recently used first, unanswered tails last, never ``keep``) until the pool
        has ``blocks`` free blocks and ``slots`` free slots; False if it cannot get there."""
        pool = self.pool
        if pool.num_free_blocks >= blocks and pool.num_free_slots >= slots:
            return True
        kept = set(keep.seq.blocks) if keep is not None else set()
        reclaimable = sum(1 for b in self._cache_only_blocks() if b not in kept)
        checkpoints = len(self._lru) - (keep is not None and keep.key in self._lru)
        if pool.num_free_blocks + reclaimable < blocks or pool.num_free_slots + checkpoints < slots:
            return False  # running sequences hold the rest: evicting would lose prefixes and gain nothing
        while pool.num_free_blocks < blocks or pool.num_free_slots < slots:
            victim = next((c for c in self._lru.values() if not c.tail and c is not keep), None)
            victim = victim or next((c for c in self._lru.values() if c is not keep), None)
            if victim is None:
                return False
            self.evict(victim)
            self.evictions += 1
        return True

    def evict(self, checkpoint: Checkpoint) -> None:
        """Drop ``checkpoint`` from memory (its disk copy stays)."""
        del self._lru[checkpoint.key]
        self._lengths[checkpoint.num_tokens] -= 1
        if not self._lengths[checkpoint.num_tokens]:
            del self._lengths[checkpoint.num_tokens]
        for block in checkpoint.seq.blocks:
            self._block_refs[block] -= 1
            if not self._block_refs[block]:
                del self._block_refs[block]
        self.pool.free(checkpoint.seq)

    def clear(self) -> None:
        """Drop every checkpoint from memory (the disk tier keeps its files)."""
        for checkpoint in list(self._lru.values()):
            self.evict(checkpoint)

    # ------------------------------------------------------------------ accounting
    def stats(self) -> PrefixCacheStats:
        pool = self.pool
        only_cached = sum(1 for _ in self._cache_only_blocks())
        disk = self.disk
        return PrefixCacheStats(
            checkpoints=len(self._lru),
            cached_bytes=len(self._lru) * pool.slot_nbytes + only_cached * pool.block_nbytes,
            hit_tokens=self.hit_tokens,
            computed_tokens=0,  # the scheduler counts these (LLM.prefix_stats)
            evictions=self.evictions,
            disk_checkpoints=disk.num_checkpoints if disk else 0,
            disk_bytes=disk.total_bytes if disk else 0,
            disk_hits=self.disk_hits,
        )

    def _cache_only_blocks(self) -> Iterator[int]:
        """Blocks that only checkpoints hold: evicting those checkpoints frees them."""
        refcount = self.pool.refcount
        return (b for b, n in self._block_refs.items() if refcount(b) == n)

    # ------------------------------------------------------------------ disk tier
    def _save(self, token_ids: Sequence[int], key: str, seq: PagedSequence) -> None:
        """Write a new checkpoint through to disk: the full blocks the store lacks (named by the digest of
        every token up to their end: their rows depend on all of them), then the checkpoint itself."""
        assert self.disk is not None
        B = self.pool.block_tokens
        ends = range(B, seq.num_tokens + 1, B)
        digests = prefix_digests(token_ids, ends)
        block_keys = [digests[end] for end in ends]
        try:
            for block, block_key in zip(seq.blocks, block_keys, strict=False):
                if not self.disk.has_block(block_key):
                    self.disk.put_block(block_key, self.pool.export_block(block))
            self.disk.put_checkpoint(key, seq.num_tokens, block_keys, self.pool.export_state(seq))
        except OSError as error:  # a full or failing disk costs the disk copy, never the request
            log.warning("session checkpoint of %d tokens not written to disk: %s", seq.num_tokens, error)

    def _load(self, stored: StoredCheckpoint, keep: Checkpoint | None) -> Checkpoint | None:
        assert self.disk is not None
        full, partial = divmod(stored.num_tokens, self.pool.block_tokens)
        if not self.make_room(full + (partial > 0), 1, keep=keep):
            return None
        loaded = self.disk.load(stored)
        if loaded is None:
            return None
        try:
            seq = self.pool.import_sequence(loaded.num_tokens, loaded.blocks, loaded.tensors)
        except (PoolExhausted, ValueError) as error:
            log.warning("session checkpoint %s not restored: %s", stored.key, error)
            self.disk.discard(stored.key)
            return None
        checkpoint = Checkpoint(stored.key, stored.num_tokens, seq, tail=False)
        self._lru[stored.key] = checkpoint
        self._lengths[stored.num_tokens] += 1
        self._block_refs.update(seq.blocks)
        self.disk_hits += 1
        return checkpoint
