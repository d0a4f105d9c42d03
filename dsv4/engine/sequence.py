"""One request's state as it moves through the engine: waiting, running (prefilling, then decoding),
possibly preempted and requeued, and finally finished.

A sequence's tokens are its prompt followed by its output; ``num_computed`` of them are in its cache. The
engine never distinguishes prefill from decode: every step feeds the next tokens not yet computed, and
samples only when that brings the cache up to the last known token. So a decode is a one-token chunk, and
a preempted sequence resumes by recomputing prompt + output exactly as it would prefill a longer prompt.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Sequence as Seq

import torch

from dsv4.cache.pool import PagedSequence
from dsv4.chat.tokenizer import IncrementalDetokenizer
from dsv4.engine.constraint import GrammarConstraint
from dsv4.engine.sampler import SampledToken, SamplingState, StopChecker
from dsv4.engine.sampling import SamplingParams

log = logging.getLogger("dsv4.engine")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # never scheduled; holds no cache
    RUNNING = "running"  # holds a cache slot and blocks
    PREEMPTED = "preempted"  # cache taken back; requeued to recompute prompt + output
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens, the model's context, or a cache too small for this one sequence
    ABORT = "abort"


class Sequence:
    """A request's ids, cache handle, sampling and streaming state, and timestamps for metrics.

    ``forced_ids`` (teacher forcing) replaces the first ``len(forced_ids)`` sampled tokens, so that a
    reference decode can be fed through the engine; ``capture_logits`` keeps the fp32 logits row of every
    sampling step (row 0 at the last prompt position, row j after output token j-1).

    ``constraint`` is the matcher of ``params.grammar``. Where the grammar allows exactly one continuation,
    its tokens are appended at once without being sampled (``num_fast_forward`` counts them): the next step
    computes them as one chunk instead of one step each. Not for a request that wants logprobs or logits,
    which exist only for sampled tokens.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        params: SamplingParams,
        eos_token_ids: Seq[int],
        max_model_len: int,
        detokenizer: IncrementalDetokenizer | None = None,
        prompt: str | None = None,
        forced_ids: Seq[int] | None = None,
        capture_logits: bool = False,
        constraint: GrammarConstraint | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_model_len = max_model_len
        self.sampling = SamplingState(params, self.prompt_ids, eos_token_ids, constraint)
        self.stop_checker = StopChecker(params.stop)
        self.detokenizer = detokenizer
        self.forced_ids = list(forced_ids) if forced_ids is not None else None
        self.logits: list[torch.Tensor] | None = [] if capture_logits else None
        self.logprobs: list[SampledToken] | None = [] if params.logprobs is not None else None

        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None  # the stop string or stop token that ended it
        self.cache: PagedSequence | None = None
        self.num_computed = 0  # tokens of prompt + output held in the cache
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens restored from the prefix cache at admission
        self.num_fast_forward = 0  # output tokens the grammar forced, appended without a step of their own
        self._fast_forward = constraint is not None and params.logprobs is None and not capture_logits
        self.text = ""  # output text released so far (held-back stop-string prefixes excluded)
        self._reported_tokens = 0  # what take_delta() has handed out
        self._reported_text = 0

        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    # ------------------------------------------------------------------ tokens
    @property
    def output_ids(self) -> list[int]:
        return self.sampling.output_ids  # one list: the sampler's penalties see exactly what was kept

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without building the concatenation."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : stop - p]
        if stop <= p:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[: stop - p]

    def forced_token(self) -> int | None:
        """The teacher-forced token for the next output position, if any."""
        if self.forced_ids is None or len(self.output_ids) >= len(self.forced_ids):
            return None
        return self.forced_ids[len(self.output_ids)]

    # ------------------------------------------------------------------ progress
    def append(self, sampled: SampledToken, logits: torch.Tensor | None) -> None:
        """Keep one new token (and those its grammar then forces), release the text they complete, and
        decide whether the sequence ends here."""
        self._keep(sampled, logits)
        constraint = self.sampling.constraint
        if constraint is None or self.finished:
            return
        if constraint.error is not None:
            log.warning("request %s left its grammar (%s); aborted", self.request_id, constraint.error)
            self.finish(FinishReason.ABORT)
            return
        if not self._fast_forward:
            return
        forced = constraint.forced_tokens()
        if not forced and constraint.finished:
            forced = [constraint.eos_token_id]  # the grammar is complete: only EOS may follow
        for token in forced:
            if self.finished:
                break
            self._keep(SampledToken(token, None, []), None)
            self.num_fast_forward += 1

    def _keep(self, sampled: SampledToken, logits: torch.Tensor | None) -> None:
        token = sampled.token_id
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        allowed = self.sampling.append(token)
        if self.logprobs is not None:
            self.logprobs.append(sampled)
        if self.logits is not None and logits is not None:
            self.logits.append(logits.clone())  # a row view would keep the whole step's logits alive

        n_out, params = len(self.output_ids), self.params
        if token in self.sampling.stop_token_ids and n_out >= params.min_tokens:
            self.finish(FinishReason.STOP, token)  # a stop token's own text is not part of the output
            return
        if self.detokenizer is not None:
            update = self.stop_checker.push(self.detokenizer.push(token), can_stop=n_out >= params.min_tokens)
            self.text += update.text
            if update.stop is not None:
                self.finish(FinishReason.STOP, update.stop)
                return
        constraint = self.sampling.constraint
        if constraint is not None and allowed and token == constraint.eos_token_id:
            self.finish(FinishReason.STOP, token)  # the grammar's end, also under ignore_eos or min_tokens
            return
        if n_out >= params.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish(FinishReason.LENGTH)

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Mark finished and release any held-back text (not after a stop string: that text is the match)."""
        if self.finished:
            return
        if self.detokenizer is not None and self.stop_checker.matched is None:
            tail = self.detokenizer.flush()
            if tail:
                update = self.stop_checker.push(tail, can_stop=len(self.output_ids) >= self.params.min_tokens)
                self.text += update.text
                if update.stop is not None:
                    reason, stop_reason = FinishReason.STOP, update.stop
            if self.stop_checker.matched is None:
                self.text += self.stop_checker.flush()
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.finish_time = time.monotonic()

    def take_delta(self) -> tuple[list[int], str]:
        """(tokens, text) produced since the last call: what a stream sends next."""
        tokens = self.output_ids[self._reported_tokens :]
        text = self.text[self._reported_text :]
        self._reported_tokens, self._reported_text = len(self.output_ids), len(self.text)
        return tokens, text
