"""The engine as the HTTP layer sees it: submit sequences, read their deltas asynchronously, abort.

:class:`dsv4.engine.llm.LLM` is synchronous code whose steps take far longer than an HTTP round trip, so
it must never run on the event loop. :class:`LLMEngineClient` drives its add/step/abort loop in one
background thread and hands each step's outputs to the event loop through a per-request queue. The HTTP
layer depends only on the :class:`EngineClient` protocol, so it can be tested against a scripted engine
without a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dsv4.cache.prefix import PrefixCacheStats
from dsv4.chat.tokenizer import ChatTokenizer
from dsv4.engine.llm import StepFailed
from dsv4.engine.sampler import SampledToken
from dsv4.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from dsv4.engine.llm import LLM, RequestOutput

log = logging.getLogger("dsv4.server.engine")


# Steps in a row whose forward raised before the engine counts as broken rather than one request as bad.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class QueueFull(Exception):
    """More sequences are in flight than the engine runs at once plus the bounded queue holds."""


class EngineError(RuntimeError):
    """The engine failed, refused a sequence, or shut down while a request was in flight."""


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate: an API request fans out into one per choice (``n``) and per prompt."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class SequenceDelta:
    """What one sequence produced since its last delta; ``text`` never holds a possible stop-string prefix."""

    token_ids: list[int]
    text: str
    logprobs: list[SampledToken] | None  # one per token in ``token_ids`` when the request asked
    finish_reason: str | None  # None while running, then "stop", "length" or "abort"
    stop_reason: str | int | None  # the stop string or stop token id that ended the sequence
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose cache came from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# What an engine without a prefix cache reports.
NO_PREFIX_CACHE = PrefixCacheStats(checkpoints=0, cached_bytes=0, hit_tokens=0, computed_tokens=0, evictions=0)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_used_bytes: int
    kv_free_bytes: int
    prefix: PrefixCacheStats = NO_PREFIX_CACHE  # the prefix cache and session directory (totals since start)


class GenerationStream:
    """The deltas of one API request's sequences as ``(index, delta)``, until every sequence finishes.

    All sequences of a request share one queue, so a request with ``n`` choices is consumed by one loop
    instead of one task per choice. :meth:`close` aborts whatever has not finished (a client that went
    away, an error); it must run on every exit path, which is why handlers call it in ``finally``.
    """

    def __init__(self, request_ids: Sequence[str], on_abort: Callable[[list[str]], None]) -> None:
        self.request_ids = list(request_ids)
        self._on_abort = on_abort
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, SequenceDelta | BaseException]] = asyncio.Queue()
        self._unfinished = set(range(len(self.request_ids)))

    def push(self, index: int, item: SequenceDelta | BaseException) -> None:
        """Deliver a delta or an error for sequence ``index``; safe from any thread."""
        with contextlib.suppress(RuntimeError):  # a closed loop (shutdown) has nobody left to tell
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> tuple[int, SequenceDelta]:
        if not self._unfinished:
            raise StopAsyncIteration
        index, item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._unfinished.discard(index)
        return index, item

    def close(self) -> None:
        if self._unfinished:
            self._on_abort([self.request_ids[i] for i in sorted(self._unfinished)])
            self._unfinished.clear()


class EngineClient(Protocol):
    """What the HTTP layer needs from an engine."""

    tokenizer: ChatTokenizer
    max_model_len: int
    vocab_size: int

    def start(self) -> None: ...

    def close(self) -> None:
        """Stop generating; in-flight streams end with :class:`EngineError`. Blocks until stopped."""

    @property
    def healthy(self) -> bool: ...

    def submit(self, requests: Sequence[SequenceRequest]) -> GenerationStream:
        """Queue sequences (all or none); raises :class:`QueueFull` or :class:`EngineError`. Call on the loop."""

    def stats(self) -> EngineStats: ...


class LLMEngineClient:
    """:class:`EngineClient` over an :class:`LLM`, stepped by one background thread.

    The thread owns the ``LLM``: the event loop only appends to the ``_new``/``_aborted`` lists under a
    lock and wakes the thread, and the thread publishes an :class:`EngineStats` snapshot after each step,
    so nothing reads scheduler state while a step mutates it. At most ``max_num_seqs + max_queue``
    sequences are in flight; beyond that :meth:`submit` refuses, so a burst of clients gets a fast 429
    instead of an unbounded wait.
    """

    def __init__(self, llm: LLM, *, max_queue: int) -> None:
        if llm.tokenizer is None or llm.scheduler is None or llm.pool is None:
            raise ValueError(f"{llm.source} cannot be served: it needs weights and a tokenizer.json")
        self._llm = llm
        self.tokenizer: ChatTokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.config.vocab_size
        self.capacity = llm.scheduler.max_num_seqs + max_queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._new: list[tuple[SequenceRequest, GenerationStream, int]] = []
        self._aborted: list[str] = []
        self._streams: dict[str, tuple[GenerationStream, int]] = {}
        self._closing = False
        self._failure: BaseException | None = None
        self._consecutive_failures = 0
        self._stats = self._read_stats()
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._failure is None and not self._closing

    def stats(self) -> EngineStats:
        return self._stats

    def submit(self, requests: Sequence[SequenceRequest]) -> GenerationStream:
        stream = GenerationStream([r.request_id for r in requests], self._abort)
        with self._lock:
            if self._closing or self._failure is not None or not self._thread.is_alive():
                raise EngineError("the engine is not running")
            if len(self._streams) + len(requests) > self.capacity:
                raise QueueFull(f"{len(self._streams)} sequences in flight; the server holds at most {self.capacity}")
            for index, request in enumerate(requests):
                self._streams[request.request_id] = (stream, index)
                self._new.append((request, stream, index))
        self._wake.set()
        return stream

    def _abort(self, request_ids: list[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                if self._streams.pop(request_id, None) is not None:
                    self._aborted.append(request_id)
        self._wake.set()

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            leftover, self._streams = self._streams, {}
            self._new.clear()
        for request_id, (stream, index) in leftover.items():
            self._llm.abort(request_id)
            stream.push(index, EngineError("the server is shutting down"))
        self._stats = self._read_stats()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                with self._lock:
                    if self._closing:
                        return
                    new, self._new = self._new, []
                    aborted, self._aborted = self._aborted, []
                # adds before aborts: a stream closed before its sequence reached the engine is in both
                for request, stream, index in new:
                    self._add(request, stream, index)
                for request_id in aborted:
                    self._llm.abort(request_id)
                if self._llm.has_unfinished:
                    self._step()
                self._stats = self._read_stats()
                if not self._llm.has_unfinished:
                    self._wake.wait()
        except Exception as error:  # a bug in a step: fail every request rather than hang them
            log.exception("engine step failed; the server stops generating")
            with self._lock:
                self._failure = error
                failed, self._streams = self._streams, {}
            for stream, index in failed.values():
                stream.push(index, EngineError(f"engine failure: {error}"))

    def _step(self) -> None:
        """One engine step. A step whose forward raised has ended its own sequences (``StepFailed``): their
        requests fail with the error and the others go on; ``MAX_CONSECUTIVE_STEP_FAILURES`` in a row mean
        the engine itself is broken, and the server stops generating (``/health`` reports it)."""
        try:
            outputs = self._llm.step()
        except StepFailed as failure:
            self._consecutive_failures += 1
            log.error("%s", failure, exc_info=failure.__cause__)
            if self._consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            for request_id in failure.request_ids:
                with self._lock:
                    target = self._streams.pop(request_id, None)
                if target is not None:
                    stream, index = target
                    stream.push(index, EngineError(f"generation failed: {failure.__cause__!r}"))
            return
        self._consecutive_failures = 0
        for output in outputs:
            self._deliver(output)

    def _add(self, request: SequenceRequest, stream: GenerationStream, index: int) -> None:
        try:
            self._llm.add_request(request.prompt_token_ids, request.params, request.request_id)
        except ValueError as error:
            with self._lock:
                self._streams.pop(request.request_id, None)
            stream.push(index, EngineError(str(error)))

    def _deliver(self, output: RequestOutput) -> None:
        with self._lock:
            target = self._streams.get(output.request_id)
            if target is not None and output.finished:
                del self._streams[output.request_id]
        if target is None:  # aborted while this step ran
            return
        stream, index = target
        new = len(output.delta_token_ids)
        logprobs = None
        if output.logprobs is not None:
            logprobs = output.logprobs[len(output.logprobs) - new :] if new else []
        delta = SequenceDelta(
            token_ids=list(output.delta_token_ids),
            text=output.delta_text,
            logprobs=logprobs,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
            num_prompt_tokens=output.num_prompt_tokens,
            num_cached_tokens=output.num_cached_tokens,
        )
        stream.push(index, delta)

    def _read_stats(self) -> EngineStats:
        scheduler, pool = self._llm.scheduler, self._llm.pool
        assert scheduler is not None and pool is not None
        prefix = self._llm.prefix_stats()
        return EngineStats(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting) + len(self._new),
            # checkpoints give way to running sequences: their bytes count as free (and as prefix-cache bytes)
            kv_used_bytes=pool.used_bytes - prefix.cached_bytes,
            kv_free_bytes=pool.free_bytes + prefix.cached_bytes,
            prefix=prefix,
        )
