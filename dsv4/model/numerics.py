"""Numerics modes, chosen at load time and named as in the reference vectors' manifest.

* ``bf16_official`` - the official dtype policy: bf16 activations, fp32 where the official code computes in
  fp32 (norms, compressors, router, mHC, MoE accumulation, head), with the FP8/FP4 quantisation simulation.
  The default for official checkpoints: it is what the released model was trained (QAT) and served with.
* ``fp32_sim`` - fp32 activations with the same quantisation simulation.
* ``fp32_nosim`` - fp32 everywhere, weights dequantised, no simulation: what transformers' DeepseekV4 computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Numerics:
    name: str
    dtype: torch.dtype  # activation dtype between ops
    simulate: bool  # FP8 activation quantisation before FP8/FP4 GEMMs, FP8 KV rounding, FP4 indexer rounding


MODES: dict[str, Numerics] = {
    "bf16_official": Numerics("bf16_official", torch.bfloat16, True),
    "fp32_sim": Numerics("fp32_sim", torch.float32, True),
    "fp32_nosim": Numerics("fp32_nosim", torch.float32, False),
}
DEFAULT_MODE = "bf16_official"


def get_numerics(name: str | Numerics) -> Numerics:
    if isinstance(name, Numerics):
        return name
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown numerics mode {name!r}; choose one of {', '.join(MODES)}") from None
