"""What one forward computes, described once: the flattened tokens of every sequence in the step, their
positions, the rows whose logits are wanted, and the decode members' index tensors.

Every layer reads the same description. Before it existed, each layer rebuilt the decode rows, positions,
window lists and the pool's slot and block-table tensors from the spans: a few dozen small host-to-device
copies per layer (each a synchronisation on a GPU) and as many Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.cache.view import DecodeStep, SequenceCache


@dataclass
class Span:
    """One sequence's slice of a flattened batch: tokens [start, start+length) at positions pos0.."""

    start: int
    length: int
    pos0: int
    cache: SequenceCache

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.length)


@dataclass
class StepBatch:
    """The spans of one forward and what every layer derives from them (on the model's device)."""

    tokens: torch.Tensor  # [T] the spans' tokens, concatenated
    spans: list[Span]
    positions: torch.Tensor  # [T]
    logit_rows: torch.Tensor  # rows whose logits the forward returns
    prefills: list[Span]  # spans of more than one token: each reads and grows its cache on its own
    decodes: list[Span]  # one-token spans: their cache reads and writes are batched (``DecodeStep``)
    decode_rows: torch.Tensor  # [S] their rows in the flattened batch
    decode_step: DecodeStep | None
    # [S, window]: each decode query's window rows in its group's window reads [S·window], oldest first then
    # -1; None when every window is full (the reads are then already in list order)
    window_lists: torch.Tensor | None
    prefill_rows: torch.Tensor | None  # the prefill spans' rows, in span order; None when they are all rows

    @classmethod
    def build(cls, tokens: torch.Tensor, spans: list[Span], logit_rows: torch.Tensor | None, window: int) -> StepBatch:
        """Call inside the model's device scope: the tensors made here land on its device."""
        positions = torch.cat([torch.arange(s.pos0, s.pos0 + s.length) for s in spans])
        if logit_rows is None:
            logit_rows = torch.tensor([s.start + s.length - 1 for s in spans])
        decodes = [s for s in spans if s.length == 1]
        hosts = [s.pos0 for s in decodes]
        at = torch.tensor(hosts, dtype=torch.long)
        lists = None
        if min(hosts, default=window) < window - 1:
            # Member i's window holds positions p-w+1 .. p (as rows i·w .. i·w+w-1 of the group's window
            # reads); its list starts at the first non-negative position.
            slot = torch.arange(window) + (window - 1 - at).clamp(min=0).unsqueeze(1)
            lists = torch.where(slot < window, torch.arange(len(decodes)).unsqueeze(1) * window + slot, -1)
        prefills = [s for s in spans if s.length > 1]
        prefill_rows = None
        if decodes and prefills:
            prefill_rows = torch.cat([torch.arange(s.start, s.start + s.length) for s in prefills])
        return cls(
            tokens=tokens,
            spans=spans,
            positions=positions,
            logit_rows=logit_rows,
            prefills=prefills,
            decodes=decodes,
            decode_rows=torch.tensor([s.start for s in decodes], dtype=torch.long),
            decode_step=DecodeStep([s.cache for s in decodes], hosts, at) if decodes else None,
            window_lists=lists,
            prefill_rows=prefill_rows,
        )
