"""Continuous batching with chunked prefill over the paged KV pool.

Every step packs, under a token budget, the next tokens of as many sequences as fit: running sequences
first - their one-token decodes, then the next chunks of partially prefilled prompts, oldest first - and
then waiting ones, oldest first, while a state slot, blocks for their first chunk and a ``max_num_seqs``
place are free.
A chunk may end anywhere - inside a compression window or the sliding window - because the cache keeps
the exact continuation state.

Blocks are reserved when a chunk is scheduled, before the forward writes them, so a forward can never run
out of cache halfway. When a running sequence cannot grow, the newest running sequence not yet scheduled
in this step is preempted (possibly itself): its
cache is freed at once and it goes back to the front of the queue to recompute its prompt and output
later. Its sampling state (and seeded generator) is kept, so it continues with the very tokens it would
have produced undisturbed.

With ``aligned_chunks`` (batch-invariant engines) a sequence is always cut the same way, whatever shares
the step: its prompt in chunks that end at multiples of ``chunk_size`` (a chunk that does not fit whole in
this step waits for the next), then one token per step - also when a preempted sequence recomputes its
output - so every token is computed in the very same span as in any other run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from dsv4.cache.pool import KVPool
from dsv4.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class Chunk:
    """Tokens [start, start + length) of one sequence, fed in this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last known token, so its last row is sampled."""
        return self.start + self.length == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler (cache too small)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        pool: KVPool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunk_size: int,
        aligned_chunks: bool = False,
    ):
        if min(max_num_seqs, max_num_batched_tokens, chunk_size) < 1:
            raise ValueError(
                "max_num_seqs, max_num_batched_tokens and chunk_size must be >= 1, got "
                f"{max_num_seqs}, {max_num_batched_tokens}, {chunk_size}"
            )
        self.pool = pool
        self.max_num_seqs = min(max_num_seqs, pool.max_sequences)
        if aligned_chunks and max_num_batched_tokens < chunk_size + self.max_num_seqs:
            raise ValueError(
                f"aligned chunks need max_num_batched_tokens >= chunk_size + max_num_seqs "
                f"({chunk_size} + {self.max_num_seqs}), or running decodes could starve a whole chunk"
            )
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_size = chunk_size
        self.aligned_chunks = aligned_chunks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        capacity = self.pool.num_blocks * self.pool.block_tokens
        if seq.num_tokens >= capacity:
            raise ValueError(
                f"a prompt of {seq.num_tokens} tokens cannot fit in a KV pool of {self.pool.num_blocks} blocks "
                f"of {self.pool.block_tokens} tokens; give the engine more num_blocks or kv_cache_bytes"
            )
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop ``seq`` wherever it is and free its cache at once."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        seq.finish(FinishReason.ABORT)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[Sequence] = set()
        # Decodes before prefill chunks, so that a long prompt never stalls the streams already flowing.
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop to make room for an older one
            n = self._next_chunk(seq, budget)
            if n:
                n = self._grow(seq, n, scheduled, out)
            if n:
                out.chunks.append(Chunk(seq, seq.num_computed, n))
                scheduled.add(seq)
                budget -= n

        # Admitting while others were just preempted would only evict them again.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            n = self._next_chunk(self.waiting[0], budget)
            if n:
                n = self._admit(self.waiting[0], n)
            if n == 0:
                break
            seq = self.waiting.popleft()
            out.chunks.append(Chunk(seq, 0, n))
            budget -= n
        return out

    def _next_chunk(self, seq: Sequence, budget: int) -> int:
        """The length of ``seq``'s next chunk within ``budget`` tokens (0: none in this step)."""
        if not self.aligned_chunks:
            return min(seq.num_uncomputed, self.chunk_size, budget)
        start, prompt = seq.num_computed, len(seq.prompt_ids)
        if start < prompt:  # up to the next multiple of chunk_size, or the prompt's end
            n = min((start // self.chunk_size + 1) * self.chunk_size, prompt) - start
        else:  # output tokens, recomputed after a preemption as they were first computed: one per step
            n = 1
        return n if n <= budget else 0

    def _fit(self, seq: Sequence, n: int) -> int:
        """Most of the wanted ``n`` tokens that ``seq`` can take with the blocks it holds plus the free ones
        (with aligned chunks, all or nothing)."""
        assert seq.cache is not None
        held = len(seq.cache.blocks) + self.pool.num_free_blocks
        fit = max(0, min(n, held * self.pool.block_tokens - seq.num_computed))
        return 0 if self.aligned_chunks and fit < n else fit

    def _grow(self, seq: Sequence, n: int, scheduled: set[Sequence], out: SchedulerOutput) -> int:
        """Reserve room for up to ``n`` more tokens of a running sequence, preempting the newest sequence not
        yet scheduled in this step while it cannot take a single one; returns how many it got (0 when
        ``seq`` had to go itself)."""
        while (fit := self._fit(seq, n)) == 0:
            victim = next(s for s in reversed(self.running) if s not in scheduled)
            if victim is seq and len(self.running) == 1:
                # alone and still too large for the whole pool: it can never continue
                self.running.pop()
                self._release(seq)
                seq.finish(FinishReason.LENGTH)
                out.finished.append(seq)
                return 0
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return 0
        assert seq.cache is not None
        self.pool.reserve(seq.cache, fit)
        return fit

    def _admit(self, seq: Sequence, n: int) -> int:
        """Give a waiting sequence a slot and blocks for its first chunk (as much of ``n`` as fits)."""
        if self.pool.num_free_slots == 0:
            return 0
        room = self.pool.num_free_blocks * self.pool.block_tokens
        n = 0 if self.aligned_chunks and n > room else min(n, room)
        if n == 0:
            return 0
        seq.cache = self.pool.new_sequence()
        self.pool.reserve(seq.cache, n)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)  # newest preempted first, so older ones end up in front

    def _release(self, seq: Sequence) -> None:
        if seq.cache is not None:
            self.pool.free(seq.cache)
            seq.cache = None
        seq.num_computed = 0

    # ------------------------------------------------------------------ after the forward
    def update(self, chunks: Iterable[Chunk]) -> list[Sequence]:
        """Account for a finished forward; free and return the sequences that ended in it."""
        done = []
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed = chunk.start + chunk.length
            if seq.finished:
                self.running.remove(seq)
                self._release(seq)
                done.append(seq)
        return done
