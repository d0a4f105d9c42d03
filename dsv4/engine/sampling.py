"""Per-request sampling parameters, validated at the edge so the engine's hot loop never has to.

The names and ranges follow the OpenAI API (``presence_penalty`` and ``frequency_penalty`` in [-2, 2],
``top_logprobs`` at most 20) and vLLM where OpenAI has no equivalent (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``), so that clients written for
either behave the same here. ``n`` is deliberately absent: the server fans a request out into independent
sequences, each with its own ``SamplingParams`` (and, when seeded, its own seed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

# Temperatures below this are treated as greedy, as vLLM does: dividing fp32 logits by such a temperature
# only amplifies rounding noise, and the distribution is already argmax to within fp32 resolution.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs; also bounds the top-k gather the sampler does per step
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the range torch.Generator.manual_seed accepts


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `top_k=True` is a client bug, not a request for one token
    return isinstance(value, int) and not isinstance(value, bool)


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


@dataclass
class SamplingParams:
    """How one sequence picks its next tokens and when it stops."""

    temperature: float = 1.0  # V4's generation_config value; 0 (or below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM rule, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI rule, over output tokens
    frequency_penalty: float = 0.0  # OpenAI rule, over output tokens
    seed: int | None = None
    max_tokens: int = 256
    min_tokens: int = 0  # EOS and stop_token_ids are masked, and stop strings ignored, until this many
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = no logprobs; N = the chosen token's logprob plus the top N
    # An llguidance grammar the output must match (dsv4.chat.grammar builds them from API requests); it
    # decides when the output may end, so min_tokens does not apply to such a sequence.
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalised(self) -> bool:
        """Whether the sampler must track token counts for this sequence (an O(vocab) cost per step)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def stop_token_set(self, eos_token_ids: Iterable[int]) -> frozenset[int]:
        """The tokens that end this sequence: the caller's stop ids, plus EOS unless ``ignore_eos``.

        It is also the set ``min_tokens`` masks, as in vLLM: with ``ignore_eos`` EOS may be sampled at any
        time (it just does not stop the sequence).
        """
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(eos_token_ids)
        return frozenset(ids)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value the engine cannot honour."""
        temperature = _check_real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        top_p = _check_real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        _check_int("top_k", self.top_k, -1)
        min_p = _check_real("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        repetition_penalty = _check_real("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_real(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None:
            _check_int("seed", self.seed, SEED_MIN, SEED_MAX)
        max_tokens = _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0, max_tokens)
        if not isinstance(self.stop, list | tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list | tuple) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar):
            raise ValueError(f"grammar must be a non-empty string, got {self.grammar!r}")
