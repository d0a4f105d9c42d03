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

With a prefix cache (``dsv4.cache.prefix``) a sequence is admitted from the checkpoint of the longest
cached prefix of its tokens and computes only the rest. Checkpoints are taken where chunks end, so they
cost no extra forward: at the end of every prompt, every ``checkpoint_interval`` tokens inside a long
prompt (chunks are cut there), and when a sequence finishes or is aborted its cache becomes the checkpoint
of what it computed (the state before the stop token), at no cost at all. Checkpoints are evicted before
any running sequence is preempted. Aligned chunks need more: a token's bits depend on the chunk it was
computed in (GEMM widths grow with the chunk), so a batch-invariant engine takes and reuses checkpoints
only where a cold run of any longer prompt cuts as well - at multiples of ``chunk_size`` inside a prompt
(at each ``checkpoint_interval`` and at the last such multiple before the prompt's end) - and never at the
end of an output, which a cold run computes in prompt chunks rather than one token per step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from dsv4.cache import layout
from dsv4.cache.pool import KVPool
from dsv4.cache.prefix import Checkpoint, PrefixCache
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
        prefix_cache: PrefixCache | None = None,
        checkpoint_interval: int | None = None,
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
        self.prefix_cache = prefix_cache
        if checkpoint_interval is not None and checkpoint_interval < 1:
            raise ValueError(f"checkpoint_interval must be >= 1, got {checkpoint_interval}")
        if aligned_chunks and checkpoint_interval:  # checkpoints of aligned engines sit on chunk boundaries
            checkpoint_interval = -(-checkpoint_interval // chunk_size) * chunk_size
        self.checkpoint_interval = checkpoint_interval
        self.computed_tokens = 0  # tokens fed through the model since start-up
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
        """Drop ``seq`` wherever it is; what it computed stays as a checkpoint (a client that hangs up and
        retries finds its prefix), else its cache is freed at once."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        seq.finish(FinishReason.ABORT)
        self._retire(seq)

    def fail(self, seq: Sequence) -> None:
        """End ``seq`` after a forward that raised while computing it: its cache may hold a partial write,
        so it is freed, never kept as a checkpoint (the blocks it shares with checkpoints are full ones,
        which a forward never writes)."""
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
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            out.chunks.append(Chunk(seq, seq.num_computed, n))
            budget -= n
        return out

    def _next_chunk(self, seq: Sequence, budget: int, start: int | None = None) -> int:
        """The length of ``seq``'s next chunk from ``start`` (default: what it has computed) within ``budget``
        tokens (0: none in this step)."""
        start = seq.num_computed if start is None else start
        prompt = len(seq.prompt_ids)
        if not self.aligned_chunks:
            n = min(seq.num_tokens - start, self.chunk_size, budget)
            if self.checkpoint_interval and start < prompt:  # end on the next checkpoint position
                n = min(n, (start // self.checkpoint_interval + 1) * self.checkpoint_interval - start)
            return n
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
        if self.prefix_cache is not None:  # cached prefixes go before any running sequence does
            assert seq.cache is not None
            self.prefix_cache.make_room(self.pool.blocks_needed(seq.cache, n), 0)
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

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence a slot - restored from the longest cached prefix of its tokens, if any - and
        blocks for its first chunk; returns that chunk's length (0: it stays waiting)."""
        hit = self._lookup(seq)
        start = hit.num_tokens if hit is not None else 0
        n = self._next_chunk(seq, budget, start)
        if n == 0:
            return 0
        block_tokens = self.pool.block_tokens
        shared = start // block_tokens  # the checkpoint's full blocks; a partial last one is copied
        need = layout.blocks_for(start + n, block_tokens) - shared
        if self.prefix_cache is not None:
            self.prefix_cache.make_room(need, 1, keep=hit)
        if self.pool.num_free_slots == 0:
            return 0
        if need > self.pool.num_free_blocks:
            if self.aligned_chunks:
                return 0
            n = (shared + self.pool.num_free_blocks) * block_tokens - start
            if n <= 0 or (start % block_tokens and self.pool.num_free_blocks == 0):
                return 0
        if hit is not None:
            assert self.prefix_cache is not None
            seq.cache = self.prefix_cache.restore(hit)
        else:
            seq.cache = self.pool.new_sequence()
        self.pool.reserve(seq.cache, n)
        if seq.status is SequenceStatus.WAITING:
            seq.num_cached_tokens = start
        seq.num_computed = start
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return n

    def _lookup(self, seq: Sequence) -> Checkpoint | None:
        """The checkpoint ``seq`` can start from, or None."""
        if self.prefix_cache is None:
            return None
        if not self.aligned_chunks:
            return self.prefix_cache.match(seq.token_ids(0, seq.num_tokens))
        # on the chunk grid inside the prompt only: where a cold run of this request cuts too
        hit = self.prefix_cache.match(seq.token_ids(0, seq.num_tokens), limit=len(seq.prompt_ids))
        return None if hit is None or hit.num_tokens % self.chunk_size else hit

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

    def _retire(self, seq: Sequence) -> None:
        """A finished or aborted sequence's cache becomes the checkpoint of the tokens it computed (the
        last sampled token never was); unanswered outputs are protected as tails."""
        cache, n = seq.cache, seq.num_computed
        if self.prefix_cache is None or cache is None or n == 0 or self.aligned_chunks:
            self._release(seq)
            return
        seq.cache, seq.num_computed = None, 0
        tail = seq.finish_reason is not FinishReason.ABORT
        self.prefix_cache.adopt(seq.token_ids(0, n), cache, tail=tail)

    def _checkpoint_due(self, seq: Sequence, end: int) -> bool:
        """Whether a running sequence that has just computed its tokens up to ``end`` is checkpointed there."""
        prompt, interval = len(seq.prompt_ids), self.checkpoint_interval
        if end > prompt:
            return False
        if self.aligned_chunks:
            on_grid = end % self.chunk_size == 0
            return on_grid and (end + self.chunk_size > prompt or bool(interval and end % interval == 0))
        return end == prompt or bool(interval and end % interval == 0)

    # ------------------------------------------------------------------ after the forward
    def update(self, chunks: Iterable[Chunk]) -> list[Sequence]:
        """Account for a finished forward; free and return the sequences that ended in it."""
        done = []
        for chunk in chunks:
            seq = chunk.seq
            end = seq.num_computed = chunk.start + chunk.length
            self.computed_tokens += chunk.length
            if seq.finished:
                self.running.remove(seq)
                self._retire(seq)
                done.append(seq)
            elif self.prefix_cache is not None and self._checkpoint_due(seq, end):
                assert seq.cache is not None
                self.prefix_cache.take(seq.token_ids(0, end), seq.cache)
        return done
