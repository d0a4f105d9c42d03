"""The whole forward: embedding, hc-stream expansion, the blocks, the hc head collapse, final norm, logits.

The model runs on a flattened batch: ``tokens`` [T] of any number of sequences, each described by a
``Span`` (its rows, its first position, its cache). Projections, MoE and mHC run on all T rows at once;
only the attention's cache-dependent part walks the spans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv4.config import LayerSpec, ModelConfig
from dsv4.device import device_scope
from dsv4.model.attention import Attention
from dsv4.model.batch import Span, StepBatch
from dsv4.model.hyper import hc_head, hc_post, hc_pre
from dsv4.model.linear import Linear
from dsv4.model.moe import MoE
from dsv4.model.norm import RMSNorm
from dsv4.model.parallel import SINGLE, ParallelContext, shard_of
from dsv4.numerics.modes import Numerics, get_numerics


def _fp32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.float32), requires_grad=False)


class Block(nn.Module):
    """Attention then MoE, each wrapped in an mHC pre/post pair (parameters named as in the checkpoint)."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, numerics: Numerics, parallel: ParallelContext = SINGLE):
        super().__init__()
        self.config, self.numerics = config, numerics
        self.attn = Attention(config, spec, numerics, parallel)
        self.ffn = MoE(config, spec, numerics, parallel)
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        mix, width = (2 + config.hc_mult) * config.hc_mult, config.hc_mult * config.dim
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _fp32(mix, width), _fp32(mix), _fp32(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _fp32(mix, width), _fp32(mix), _fp32(3)

    def forward(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """h [T, hc, d] -> [T, hc, d]."""
        c = self.config
        n = self.numerics
        x, post, comb = hc_pre(
            h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps, n
        )
        h = hc_post(self.attn(self.attn_norm(x), batch), h, post, comb)
        x, post, comb = hc_pre(
            h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps, n
        )
        return hc_post(self.ffn(self.ffn_norm(x), batch.tokens), h, post, comb)


class MTPBlock(Block):
    """Multi-token prediction (depth 1): from the main model's final streams at position t and the token at
    t+1, predict the token at t+2. Shares the main embedding and head; has its own norms and hc head."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, numerics: Numerics, parallel: ParallelContext = SINGLE):
        super().__init__(config, spec, numerics, parallel)
        self.e_proj = Linear(config.dim, config.dim, config.weight_dtype, numerics)
        self.h_proj = Linear(config.dim, config.dim, config.weight_dtype, numerics)
        self.enorm = RMSNorm(config.dim, config.norm_eps)
        self.hnorm = RMSNorm(config.dim, config.norm_eps)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (
            _fp32(config.hc_mult, config.hc_mult * config.dim),
            _fp32(config.hc_mult),
            _fp32(1),
        )


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # fp32 [len(logit_rows), vocab], the whole vocabulary on every rank
    hidden: torch.Tensor  # final residual streams [T, hc, d] (the MTP block's input)


class Transformer(nn.Module):
    def __init__(
        self, config: ModelConfig, numerics: str | Numerics = "bf16_official", parallel: ParallelContext = SINGLE
    ):
        super().__init__()
        self.config, self.numerics, self.parallel = config, get_numerics(numerics), parallel
        n = self.numerics
        # Vocabulary-parallel: a rank embeds, and scores, the tokens of its slice of the vocabulary.
        embed = shard_of("embed.weight", config, parallel)
        self.vocab = embed.span(config.vocab_size)
        self.embed = nn.Module()
        self.embed.weight = nn.Parameter(
            torch.empty(embed.shape((config.vocab_size, config.dim)), dtype=torch.bfloat16), requires_grad=False
        )
        self.layers = nn.ModuleList(Block(config, spec, n, parallel) for spec in config.layers)
        self.mtp = nn.ModuleList(MTPBlock(config, spec, n, parallel) for spec in config.mtp_layers)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = Linear(config.dim, config.vocab_size, "bf16", n, shard_of("head.weight", config, parallel))
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (
            _fp32(config.hc_mult, config.hc_mult * config.dim),
            _fp32(config.hc_mult),
            _fp32(1),
        )

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def n_cache_layers(self) -> int:
        return len(self.layers) + len(self.mtp)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(tokens, self.embed.weight).to(self.numerics.dtype)
        # Each row has one owner; the others contribute -0.0, the identity of IEEE addition, so the sum
        # across ranks is the owner's row bit for bit (signed zeros included).
        local = tokens - self.vocab.start
        mine = (local >= 0) & (local < len(self.vocab))
        rows = F.embedding(torch.where(mine, local, 0), self.embed.weight)
        rows = torch.where(mine.unsqueeze(-1), rows, -0.0)
        return self.parallel.all_reduce(rows).to(self.numerics.dtype)

    def _logits(
        self, h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm: RMSNorm
    ) -> torch.Tensor:
        c = self.config
        y = norm(hc_head(h, fn, scale, base, c.hc_eps, c.norm_eps, self.numerics))
        return self.parallel.all_gather(self.head.fp32(y.float()))  # every rank's vocabulary slice, in order

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        spans: list[Span],
        logit_rows: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Run ``tokens`` [T] (the spans' tokens, concatenated) and return the logits of ``logit_rows``
        (default: the last token of every span).

        With more than one rank this is a collective: every rank calls it with the same arguments (each with
        its own replica of the caches) and every rank gets the whole vocabulary's logits."""
        with device_scope(self.device):
            batch = StepBatch.build(tokens, spans, logit_rows, self.config.window_size)  # once, for every layer
            h = self._embed(tokens).unsqueeze(1).repeat(1, self.config.hc_mult, 1)
            for layer in self.layers:
                h = layer(h, batch)
            logits = self._logits(
                h[batch.logit_rows], self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.norm
            )
        return ForwardOutput(logits=logits, hidden=h)

    @torch.inference_mode()
    def mtp_forward(
        self,
        hidden: torch.Tensor,
        next_tokens: torch.Tensor,
        spans: list[Span],
        logit_rows: torch.Tensor | None = None,
        depth: int = 0,
    ) -> torch.Tensor:
        """Logits of the token two ahead: ``hidden`` [T, hc, d] from ``forward`` at positions p, ``next_tokens``
        [T] the tokens at p+1 (the spans describe positions p, as for ``forward``). A collective, as ``forward``."""
        block = self.mtp[depth]
        with device_scope(self.device):
            batch = StepBatch.build(next_tokens, spans, logit_rows, self.config.window_size)
            e = block.enorm(self._embed(next_tokens))
            h = block.e_proj(e).unsqueeze(1) + block.h_proj(block.hnorm(hidden))
            h = block(h, batch)
            rows = batch.logit_rows
            return self._logits(h[rows], block.hc_head_fn, block.hc_head_scale, block.hc_head_base, block.norm)
