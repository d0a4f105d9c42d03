"""Next-token sampling for a continuously batched set of sequences, each with its own ``SamplingParams``.

The pipeline follows vLLM's (v1) order, so that a request means the same thing here as there:

1. raw logprobs: ``log_softmax`` of the logits exactly as the model produced them (vLLM's default
   ``raw_logprobs`` mode), i.e. *before* min_tokens, penalties, temperature and truncation. They describe
   the model, not the sampling recipe, so they are comparable across requests and usable for scoring;
2. ``min_tokens``: the sequence's stop tokens get ``-inf`` until it has ``min_tokens`` output tokens
   (not for a sequence with a grammar, which decides alone where its output may end);
3. penalties: repetition (HF/vLLM: over prompt + output tokens, a positive logit is divided by the
   penalty and a negative one multiplied), then frequency and presence (OpenAI: over output tokens,
   ``logit -= frequency * count + presence * (count > 0)``);
4. the grammar mask (``dsv4.engine.constraint``): tokens a row's grammar does not allow get ``-inf``;
5. greedy rows (temperature < ``GREEDY_TEMPERATURE``) take the argmax here; ties go to the lowest id;
6. temperature, then min_p (drop tokens whose probability is below ``min_p`` times the top one), then
   top_k, then top_p over the distribution renormalised after min_p and top_k. Each cut is *inclusive of
   ties* at its boundary, so the kept set depends only on the values, never on the order a sort left
   equal values in;
7. an exact categorical draw by the exponential race (Gumbel-max) the official inference code uses:
   ``argmax(log p_i - log E_i)`` with ``E_i ~ Exp(1)``. The ``E_i`` are drawn in float64 (vLLM has the same
   option): float32 uniforms are quantised to 2^-24, and over a 129k vocabulary the smallest ``E_i``, which
   decide how often unlikely tokens win, would then be coarse, or exactly 0 and hand the step to
   whichever token drew it.

A seeded row draws its ``E_i`` from its own ``torch.Generator`` and nothing else does, so its tokens
depend only on its seed and its logits, whatever else is in the batch and in whatever order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dsv4.engine.constraint import GrammarConstraint, mask_logits
from dsv4.engine.sampling import SamplingParams

_NEG_INF = float("-inf")


def _column(values: list[float] | list[int], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-row parameters as a [B, 1] tensor, to broadcast against [B, V]."""
    return torch.tensor(values, dtype=dtype, device=device)[:, None]


class SamplingState:
    """What the sampler must remember about one sequence between steps.

    The engine creates one per sequence when it is admitted and calls :meth:`append` with every token the
    sequence keeps (the sampler itself never appends, so a caller that discards a sampled token, e.g. on
    preemption or speculative rejection, keeps the penalties consistent).
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        eos_token_ids: Iterable[int] = (),
        constraint: GrammarConstraint | None = None,
    ):
        self.params = params
        # The grammar's matcher (``params.grammar``): it masks each step and follows every kept token.
        self.constraint = constraint
        self.stop_token_ids = params.stop_token_set(eos_token_ids)  # what ends the sequence
        self.output_ids: list[int] = []
        # The prompt is only needed to build the repetition mask once, so it is not kept otherwise.
        self._prompt_ids: Sequence[int] = prompt_ids if params.penalised else ()
        self._generator: torch.Generator | None = None
        # Penalty state, built on first use on the logits' device and then updated incrementally, so a
        # long prompt costs O(prompt) once rather than every step.
        self._seen: Tensor | None = None  # [V] bool: token occurs in prompt or output
        self._counts: Tensor | None = None  # [V] fp32: occurrences in the output
        self._folded = 0  # how many of output_ids are already in _seen/_counts

    def append(self, token_id: int) -> bool:
        """Keep a token; False when the grammar does not allow it."""
        self.output_ids.append(token_id)
        return self.constraint is None or self.constraint.advance(token_id)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own generator (seeded rows only), created on the device the logits live on."""
        if self.params.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.params.seed)
        return self._generator

    def penalty_state(self, vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(seen [V] bool, output counts [V] fp32), brought up to date with ``output_ids``."""
        if self._seen is None or self._counts is None:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if len(self._prompt_ids):
                self._seen[torch.as_tensor(self._prompt_ids, dtype=torch.long, device=device)] = True
            self._prompt_ids = ()
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if self._folded < len(self.output_ids):
            new = torch.as_tensor(self.output_ids[self._folded :], dtype=torch.long, device=device)
            self._seen[new] = True
            self._counts.index_put_((new,), torch.ones_like(new, dtype=torch.float32), accumulate=True)
            self._folded = len(self.output_ids)
        return self._seen, self._counts


@dataclass(frozen=True)
class SampledToken:
    """One row's result in plain Python, for the detokeniser and the API layer."""

    token_id: int
    logprob: float | None  # raw-model logprob of token_id; None when the request asked for no logprobs
    top: list[tuple[int, float]]  # the top-N (id, raw logprob), most likely first; [] when N is 0 or None


@dataclass(frozen=True)
class SamplerOutput:
    """A step's tokens, left on the logits' device so the next forward can consume them without a sync."""

    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] fp32 raw logprob of token_ids; None when no row asked
    top_ids: Tensor | None  # [B, K] int64, K = the largest N asked in the batch; None when K = 0
    top_logprobs: Tensor | None  # [B, K] fp32
    num_top: list[int | None]  # per row: the N it asked for (None = no logprobs)

    def rows(self) -> list[SampledToken]:
        """Per-row results, with one device-to-host copy per tensor rather than one per row."""
        token_ids = self.token_ids.tolist()
        logprobs = self.logprobs.tolist() if self.logprobs is not None else None
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        top_logprobs = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        out = []
        for i, (token, n) in enumerate(zip(token_ids, self.num_top, strict=True)):
            if n is None or logprobs is None:
                out.append(SampledToken(token, None, []))
                continue
            top = []
            if n and top_ids is not None and top_logprobs is not None:
                top = list(zip(top_ids[i][:n], top_logprobs[i][:n], strict=True))
            out.append(SampledToken(token, logprobs[i], top))
        return out


class Sampler:
    """Samples one token per row of a logits batch; stateless apart from the generator for unseeded rows.

    ``generator`` drives every row without a seed (None = torch's default generator for the device); it is
    shared, so those rows are random but not reproducible, exactly as an unseeded request should be.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, logits: Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"expected logits [{len(states)}, V], got {list(logits.shape)}")
        logits = logits.float()
        num_top = [s.params.logprobs for s in states]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(n is not None for n in num_top) else None

        x = self._constrain(self._adjust(logits, states), logits, states)
        token_ids = x.argmax(dim=-1)  # the greedy rows' answer; the others are overwritten below
        sampled = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=x.device)
            token_ids[rows] = self._draw(x[rows], [states[i] for i in sampled])

        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None, num_top)
        chosen = raw_logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
        k = max((n for n in num_top if n is not None), default=0)
        if k == 0:
            return SamplerOutput(token_ids, chosen, None, None, num_top)
        top_logprobs, top_ids = raw_logprobs.topk(min(k, logits.shape[-1]), dim=-1)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs, num_top)

    @staticmethod
    def _adjust(logits: Tensor, states: Sequence[SamplingState]) -> Tensor:
        """min_tokens masking and penalties, on a copy: the caller's logits (and raw logprobs) stay intact."""
        vocab = logits.shape[-1]
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for i, s in enumerate(states):
            if s.constraint is None and len(s.output_ids) < s.params.min_tokens:
                # an id outside the vocabulary can never be sampled, so there is nothing to mask
                cols = [t for t in s.stop_token_ids if t < vocab]
                mask_rows += [i] * len(cols)
                mask_cols += cols
        penalised = [i for i, s in enumerate(states) if s.params.penalised]
        if not mask_rows and not penalised:
            return logits

        x = logits.clone()
        if mask_rows:
            x[torch.tensor(mask_rows, device=x.device), torch.tensor(mask_cols, device=x.device)] = _NEG_INF
        if penalised:
            seen, counts = zip(*(states[i].penalty_state(vocab, x.device) for i in penalised), strict=True)
            seen, counts = torch.stack(seen), torch.stack(counts)
            params = [states[i].params for i in penalised]
            rep = _column([p.repetition_penalty for p in params], x.device)
            rows = torch.tensor(penalised, device=x.device)
            y = x[rows]
            y = torch.where(seen, torch.where(y > 0, y / rep, y * rep), y)
            y = y - _column([p.frequency_penalty for p in params], x.device) * counts
            y = y - _column([p.presence_penalty for p in params], x.device) * (counts > 0)
            x[rows] = y
        return x

    @staticmethod
    def _constrain(x: Tensor, logits: Tensor, states: Sequence[SamplingState]) -> Tensor:
        """Tokens a row's grammar does not allow get ``-inf`` (on a copy, as in ``_adjust``)."""
        rows = [i for i, s in enumerate(states) if s.constraint is not None]
        if not rows:
            return x
        if x is logits:
            x = logits.clone()
        constraints = [states[i].constraint for i in rows]
        index = torch.tensor(rows, device=x.device)
        constrained = x[index]
        mask_logits(constraints, constrained)  # type: ignore[arg-type]
        x[index] = constrained
        return x

    @staticmethod
    def _truncate(x: Tensor, params: Sequence[SamplingParams]) -> tuple[Tensor, Tensor | None]:
        """(logits / temperature, mask of the tokens min_p, top_k and top_p keep; None = all of them)."""
        vocab = x.shape[-1]
        device = x.device
        # Subtracting the row max first keeps small temperatures from overflowing to inf (and inf - inf).
        x = (x - x.amax(dim=-1, keepdim=True)) / _column([p.temperature for p in params], device)
        keep: Tensor | None = None
        if any(p.min_p > 0 for p in params):
            probs = torch.softmax(x, dim=-1)
            keep = probs >= _column([p.min_p for p in params], device) * probs.amax(dim=-1, keepdim=True)

        use_top_k = any(0 < p.top_k < vocab for p in params)
        if use_top_k or any(p.top_p < 1 for p in params):
            sorted_x, order = x.sort(dim=-1, descending=True)
            if keep is not None:
                sorted_x = sorted_x.masked_fill(~keep.gather(-1, order), _NEG_INF)
            if use_top_k:
                k = _column([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device, torch.long)
                sorted_x = sorted_x.masked_fill(sorted_x < sorted_x.gather(-1, k - 1), _NEG_INF)
            # min_p and top_k each keep a prefix of the sorted row; top_p shortens it to the first n entries
            # whose preceding mass (renormalised over the prefix) is below top_p, and the value of entry n
            # becomes the threshold, so ties with it survive too.
            finite = (sorted_x > _NEG_INF).sum(dim=-1, keepdim=True)
            # float64 so that a 129k-entry running sum is accurate well below any top_p a client sends
            cumulative = torch.softmax(sorted_x, dim=-1).double().cumsum(dim=-1)
            before = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))
            top_p = _column([p.top_p for p in params], device, torch.float64)
            n = torch.where(top_p < 1, (before < top_p).sum(dim=-1, keepdim=True).clamp_max(finite), finite)
            keep = x >= sorted_x.gather(-1, n - 1)
        return x, keep

    def _draw(self, x: Tensor, states: Sequence[SamplingState]) -> Tensor:
        """The categorical draw for the non-greedy rows, each from its own generator if it has a seed."""
        x, keep = self._truncate(x, [s.params for s in states])
        b, vocab = x.shape
        device = x.device
        race = torch.empty((b, vocab), dtype=torch.float64, device=device)
        generators = [s.generator(device) for s in states]
        if all(g is None for g in generators):
            race.exponential_(generator=self.generator)
        else:
            unseeded = [j for j, g in enumerate(generators) if g is None]
            if unseeded:
                fill = torch.empty((len(unseeded), vocab), dtype=torch.float64, device=device)
                race[torch.tensor(unseeded, device=device)] = fill.exponential_(generator=self.generator)
            for j, g in enumerate(generators):
                if g is not None:
                    race[j].exponential_(generator=g)
        # Clamping keeps log finite, so a masked (-inf) entry stays -inf and never becomes NaN.
        scores = x - race.clamp_min_(torch.finfo(torch.float64).tiny).log_()
        if keep is not None:
            scores = scores.masked_fill(~keep, _NEG_INF)
        return scores.argmax(dim=-1)


@dataclass(frozen=True)
class StopUpdate:
    text: str  # safe to emit now: it can no longer turn out to be part of a stop string
    stop: str | None = None  # the stop string matched; the sequence is finished and ``text`` is its last


class StopChecker:
    """Finds stop strings in one sequence's streamed text, even when they span deltas.

    The sequence stops at the *first position where any stop string ends*: that is where generation
    would halt if the text arrived one character at a time, so the result is the same however the text
    is cut into deltas. Among stop strings ending there, the longest (earliest-starting) one is reported.
    The emitted text excludes the stop string, as in the OpenAI API.

    Text that could still be the start of a stop string is held back until it is either completed (and
    dropped) or ruled out (and emitted); :meth:`flush` releases it when the sequence ends otherwise.
    """

    def __init__(self, stop: Sequence[str]):
        if not all(stop):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(dict.fromkeys(stop))
        self._pending = ""  # received but not yet emitted
        self._quiet = 0  # pending[:_quiet] arrived with can_stop=False: no match may end inside it
        self.matched: str | None = None

    def push(self, delta: str, *, can_stop: bool = True) -> StopUpdate:
        """Feed the next decoded text; ``can_stop=False`` while the sequence is within ``min_tokens``.

        A stop string that ends inside text fed with ``can_stop=False`` is ignored (vLLM does not check
        stop strings before ``min_tokens``), but one that merely starts there can still match.
        """
        if self.matched is not None:
            raise RuntimeError(f"stop string {self.matched!r} already matched; the sequence is finished")
        self._pending += delta
        if not can_stop:
            self._quiet = len(self._pending)
        else:
            match = self._first_match()
            if match is not None:
                start, self.matched = match
                text, self._pending = self._pending[:start], ""
                return StopUpdate(text, self.matched)
        cut = len(self._pending) - self._held_length()
        text, self._pending = self._pending[:cut], self._pending[cut:]
        self._quiet = max(0, self._quiet - cut)
        return StopUpdate(text)

    def flush(self) -> str:
        """Release the held-back tail when the sequence ends for another reason (EOS, length)."""
        text, self._pending, self._quiet = self._pending, "", 0
        return text

    def _first_match(self) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self._stops:
            start = self._pending.find(s, max(0, self._quiet - len(s) + 1))
            if start >= 0:
                candidate = (start + len(s), start, s)
                best = candidate if best is None else min(best, candidate)
        return None if best is None else (best[1], best[2])

    def _held_length(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        held = 0
        for s in self._stops:
            for length in range(min(len(s) - 1, len(self._pending)), held, -1):
                if self._pending.endswith(s[:length]):
                    held = length
                    break
        return held
