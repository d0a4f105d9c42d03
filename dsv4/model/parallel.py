"""Tensor/expert-parallel placement: which slice of each projection and which experts a rank owns.

dsv4 runs on one rank today; the layers are laid out so that adding ranks changes only this file's
context and the collectives, never the math: column-parallel projections split their outputs (heads,
groups), row-parallel ones split their inputs and all-reduce in fp32, experts are owned by contiguous
ranges of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    world_size: int = 1
    rank: int = 0

    def shard(self, n: int, what: str) -> int:
        if n % self.world_size:
            raise ValueError(f"{what} = {n} is not divisible by the world size {self.world_size}")
        return n // self.world_size

    def owned_experts(self, n_experts: int) -> range:
        per_rank = self.shard(n_experts, "n_routed_experts")
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum partial results across ranks in fp32 (row-parallel outputs, routed-expert outputs)."""
        if self.world_size == 1:
            return x
        y = x.float()
        dist.all_reduce(y)
        return y.to(x.dtype)


SINGLE = ParallelContext()
