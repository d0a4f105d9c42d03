"""Interleaved partial RoPE on the last ``rope_head_dim`` dims, with YaRN for the compressed layers.

Pairs (2i, 2i+1) of the RoPE slice form complex numbers rotated by p·ω_i. Window-only layers use
``rope_theta`` without YaRN; CSA/HCA layers use ``compress_rope_theta`` with YaRN frequency interpolation
and no attention-temperature correction. The same table serves queries, window keys, compressed entries
(at the position of their first token), the indexer, and the inverse rotation of the attention output.
"""

from __future__ import annotations

import math

import torch

from dsv4.config import LayerSpec, ModelConfig


def rope_frequencies(config: ModelConfig, spec: LayerSpec) -> torch.Tensor:
    """ω_i for one layer, fp32 [rope_head_dim / 2], built in the reference's order of operations."""
    dim, base = config.rope_head_dim, spec.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if spec.yarn:

        def correction_dim(rotations: float) -> float:
            return dim * math.log(config.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(config.beta_fast)), 0)
        high = min(math.ceil(correction_dim(config.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp
        freqs = freqs / config.rope_factor * (1 - keep) + freqs * keep
    return freqs


class Rotary:
    """The rotation table of one layer, evaluated on demand at arbitrary positions.

    A precomputed table over a 1M-token context would cost 256 MB per layer kind; computing
    ``polar(1, p·ω)`` for the positions at hand gives the same fp32 values (one product, then cos/sin).
    """

    def __init__(self, config: ModelConfig, spec: LayerSpec):
        self.freqs = rope_frequencies(config, spec)
        self.dim = config.rope_head_dim

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """complex64 [len(positions), dim/2]."""
        angles = torch.outer(positions.to(torch.int64), self.freqs)
        return torch.polar(torch.ones_like(angles), angles)

    def rotate(self, x: torch.Tensor, cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the last ``dim`` features of x [n, ..., D] by cis [n, dim/2]; returns a new tensor."""
        rope = x[..., -self.dim :]
        z = torch.view_as_complex(rope.float().unflatten(-1, (-1, 2)).contiguous())
        if inverse:
            cis = cis.conj()
        cis = cis.view(cis.shape[0], *([1] * (z.dim() - 2)), cis.shape[-1])
        rotated = torch.view_as_real(z * cis).flatten(-2).to(x.dtype)
        return torch.cat([x[..., : -self.dim], rotated], dim=-1)
