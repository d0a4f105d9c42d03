"""One engine step on the model: flatten the scheduled chunks into one batch, run it, sample.

All chunks - prefill chunks of any length and one-token decodes of different sequences - go through a
single forward as spans of one flattened token tensor. Logits are computed only for the rows that are
sampled (the last row of each chunk that reaches its sequence's last known token): the head is a
[rows x vocab] GEMM, and a long prefill chunk must not pay it for every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dsv4.engine.sampler import SampledToken, Sampler
from dsv4.engine.scheduler import Chunk
from dsv4.model.batch import Span
from dsv4.model.hyper import compile_decode_batches
from dsv4.model.transformer import Transformer

if TYPE_CHECKING:
    from dsv4.engine.tensor_parallel import TensorParallelGroup


def warm_up(model: Transformer) -> None:
    """Compile what the model would otherwise compile on its first decodes: the mHC loop of each decode
    batch size (compiled for CPU only)."""
    if model.device.type == "cpu":
        c = model.config
        compile_decode_batches(c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps)


@dataclass
class StepResult:
    chunk: Chunk
    token: SampledToken
    logits: torch.Tensor  # fp32 [vocab], the row the token was sampled from


class ModelRunner:
    """Runs each step on rank 0's model; with ``replicas`` (tensor parallelism) every other rank is first
    told the same step, so that they all enter the forward's collectives together."""

    def __init__(self, model: Transformer, sampler: Sampler, replicas: TensorParallelGroup | None = None):
        self.model, self.sampler, self.replicas = model, sampler, replicas

    def run(self, chunks: list[Chunk]) -> list[StepResult]:
        """Forward every chunk and sample the chunks that complete their sequence's known tokens."""
        ids: list[int] = []
        spans: list[Span] = []
        rows: list[int] = []
        sampling: list[Chunk] = []
        for chunk in chunks:
            seq = chunk.seq
            assert seq.cache is not None and chunk.start == seq.num_computed
            spans.append(Span(len(ids), chunk.length, chunk.start, seq.cache))
            ids += seq.token_ids(chunk.start, chunk.start + chunk.length)
            if chunk.samples:
                rows.append(len(ids) - 1)
                sampling.append(chunk)
        if not spans:
            return []
        if self.replicas is not None:
            self.replicas.plan(ids, spans, rows)
        device = self.model.device
        tokens, rows_t = torch.tensor(ids, device=device), torch.tensor(rows, dtype=torch.long, device=device)
        logits = self.model(tokens, spans, rows_t).logits
        if not sampling:
            return []
        states = [c.seq.sampling for c in sampling]
        tokens = self.sampler(logits, states).rows()
        results = []
        for i, (chunk, token) in enumerate(zip(sampling, tokens, strict=True)):
            forced = chunk.seq.forced_token()
            if forced is not None and forced != token.token_id:
                logprob = None
                if token.logprob is not None:
                    logprob = torch.log_softmax(logits[i], dim=-1)[forced].item()
                token = SampledToken(forced, logprob, token.top)
            results.append(StepResult(chunk, token, logits[i]))
        return results
