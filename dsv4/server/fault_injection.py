"""Test-only engine fault injection, for the soak benchmark (``benchmarks/soak.py``).

The soak test must prove that a step whose forward raises fails only the requests of that step and that
the server serves on; against a real ``dsv4 serve`` process it cannot monkeypatch the model, as the unit
tests do. So ``dsv4 serve`` started with ``DSV4_TEST_FAULT_TOKEN=ID`` in its environment makes the model's
forward raise :class:`InjectedFault` whenever a step computes the *start* of a prompt (position 0) whose
first token is ``ID``. Generated tokens are never at position 0 and chat prompts begin with BOS, so only a
client that sends such a prompt on purpose (``/v1/completions`` with token ids) meets the fault, and the
soak knows which request it poisoned; other sequences computed in the same step fail with it, as they
would with a real fault.

Off unless the variable is set: nothing in the HTTP API can switch it on, only the environment of the
server process. Never set it on a server that others use.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from dsv4.engine.llm import LLM
    from dsv4.model.batch import Span
    from dsv4.model.transformer import ForwardOutput

log = logging.getLogger("dsv4.server")

FAULT_TOKEN_ENV = "DSV4_TEST_FAULT_TOKEN"
# In the exception's message, so that it reaches the client in the 500 (or the stream's error event) and
# the soak can tell the fault it injected from a real one.
FAULT_MESSAGE = "injected engine fault"


class InjectedFault(RuntimeError):
    """The fault ``DSV4_TEST_FAULT_TOKEN`` asked for."""


def install_fault_injection(llm: LLM) -> int | None:
    """Wrap ``llm``'s forward if ``DSV4_TEST_FAULT_TOKEN`` is set; returns the fault token, or None."""
    value = os.environ.get(FAULT_TOKEN_ENV)
    if not value:
        return None
    model = llm.model
    if model is None:
        raise ValueError(f"{FAULT_TOKEN_ENV} needs a model with weights")
    try:
        token = int(value)
    except ValueError:
        raise ValueError(f"{FAULT_TOKEN_ENV} must be a token id, got {value!r}") from None
    if not 0 <= token < llm.config.vocab_size:
        raise ValueError(f"{FAULT_TOKEN_ENV} must be in [0, {llm.config.vocab_size}), got {token}")
    forward = model.forward

    def faulty(tokens: torch.Tensor, spans: list[Span], logit_rows: torch.Tensor | None = None) -> ForwardOutput:
        if any(span.pos0 == 0 and int(tokens[span.start]) == token for span in spans):
            raise InjectedFault(f"{FAULT_MESSAGE} ({FAULT_TOKEN_ENV}={token})")
        return forward(tokens, spans, logit_rows)

    # an instance attribute: nn.Module.__call__ looks ``forward`` up on the instance
    model.forward = faulty  # type: ignore[method-assign]
    log.warning("%s=%d: a prompt starting with token %d makes its step fail (test only)", FAULT_TOKEN_ENV, token, token)
    return token
